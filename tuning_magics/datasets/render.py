"""A conversation as the model sees it in training: its chat template's text, its tokens, and the loss mask.

This is the one place that decides it. The local engine builds its training
examples with :func:`render` (``backends/local/data.py``), and the dataset
report's "first example, as the model sees it" is :func:`preview`, which calls
the same :func:`render` with the same tokenizer. Labels are ``-100`` everywhere
except on the assistant's tokens (its reply and the end-of-turn marker), so the
loss teaches answers, not prompts.

The tokenizer is the model's own wherever it is on this machine: always for the
built-in ``local/tiny-*`` models (:class:`~.tokenizer.ByteTokenizer`, no library
needed), and for catalog models whose tokenizer is in the Hugging Face cache or a
folder. Otherwise the preview falls back to a hand-written layout of the family's
template (:mod:`.templates`) and says that it is an approximation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100


@dataclass
class Rendered:
    """One conversation in the chat template: the text, its tokens and their labels (``-100``: no loss)."""

    text: str
    input_ids: list[int]
    labels: list[int]
    #: (start, end) character span of each token in ``text``.
    offsets: list[tuple[int, int]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    def segments(self) -> list[tuple[str, bool]]:
        """The text cut into (text, carries_loss) pieces along the tokens' labels.

        Every character belongs to the token that covers it (the bytes of one
        character share it); text no token covers (cut off by truncation) carries
        no loss.
        """
        out: list[tuple[str, bool]] = []
        cursor = 0
        for (_, end), label in zip(self.offsets, self.labels):
            if end <= cursor:
                continue
            loss = label != IGNORE_INDEX
            piece = self.text[cursor:end]
            if out and out[-1][1] == loss:
                out[-1] = (out[-1][0] + piece, loss)
            else:
                out.append((piece, loss))
            cursor = end
        if cursor < len(self.text):
            rest = self.text[cursor:]
            if out and not out[-1][1]:
                out[-1] = (out[-1][0] + rest, False)
            else:
                out.append((rest, False))
        return out


def _template(tokenizer, messages, *, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns in it.

    A span runs from the start of the reply to the end of its end-of-turn
    marker. A turn with ``"weight": 0`` (OpenAI's chat format: not learned) has no span. It is found by rendering the conversation up to each assistant turn
    with and without the reply; templates for which that does not give prefixes
    of the full text (some drop earlier reasoning) fall back to locating the
    reply text itself.
    """
    full = _template(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    prefix_ok = True
    for i, m in enumerate(messages):
        if m["role"] not in ("assistant", "model"):
            continue
        before = _template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _template(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            prefix_ok = False
            break
        end = len(upto.rstrip())  # the newline after the end marker is the next turn's business
        if m.get("weight", 1) != 0:
            spans.append((len(before), end))
    if prefix_ok:
        return full, spans
    spans = []
    cursor = 0
    eos = tokenizer.eos_token or ""
    for m in messages:
        if m["role"] not in ("assistant", "model"):
            continue
        text = m["content"] if isinstance(m["content"], str) else ""
        start = full.find(text, cursor) if text else -1
        if start < 0:
            continue
        end = start + len(text)
        rest = full[end:]
        stripped = rest.lstrip()
        if eos and stripped.startswith(eos):
            end += len(rest) - len(stripped) + len(eos)
        if m.get("weight", 1) != 0:
            spans.append((start, end))
        cursor = end
    return full, spans


def render(tokenizer, messages: list[dict], max_seq_len: int | None = None) -> Rendered:
    """Tokenize one conversation with completion-only labels: ``-100`` outside the assistant turns.

    A token carries loss when it lies wholly inside an assistant span. With
    ``max_seq_len`` the tokens past it are cut off.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    span_i = 0
    for t, (a, b) in enumerate(offsets):
        while span_i < len(spans) and spans[span_i][1] <= a:
            span_i += 1
        if span_i < len(spans) and b > a and a >= spans[span_i][0] and b <= spans[span_i][1]:
            labels[t] = ids[t]
    if max_seq_len is not None and len(ids) > max_seq_len:
        ids, labels, offsets = ids[:max_seq_len], labels[:max_seq_len], offsets[:max_seq_len]
    return Rendered(text, ids, labels, offsets)


# -- the dataset report's preview -----------------------------------------------------------------------


@dataclass
class Preview:
    """The first example for the report: (text, carries_loss) pieces and where they come from."""

    segments: list[tuple[str, bool]]
    #: True when the pieces come from the model's own tokenizer and the engine's loss mask.
    exact: bool
    #: One sentence on the source: the tokenizer used, or why this is an approximation.
    note: str
    #: The rendering behind an exact preview (tokens and labels), None for an approximation.
    rendered: Rendered | None = field(default=None, repr=False)


def tokenizer_for(model_id: str | None):
    """The model's own tokenizer when it is on this machine without downloading, else None.

    The built-in models get :class:`~.tokenizer.ByteTokenizer` (no library);
    others are looked up as a folder or in the Hugging Face cache.
    """
    from .. import catalog
    from . import tokenizer as T
    from .tokens import _tokenizer_for

    if not model_id:
        return None
    spec = catalog.find(model_id)
    if spec is not None and spec.provider == "local":
        return T.ByteTokenizer()
    if spec is not None and spec.provider == "gemini":
        return None  # the service's tokenizer is not published
    location = spec.hf_repo if spec is not None else model_id
    return _tokenizer_for(location) if location else None


def preview(messages: list[dict], model_id: str | None) -> Preview:
    """One conversation as the model sees it in training, for the dataset report.

    With the model's tokenizer at hand: its chat template's text with exactly the
    tokens the engine takes the loss on marked (:func:`render`). Without it: the
    family's template written out by hand, marked as an approximation.
    """
    tokenizer = tokenizer_for(model_id)
    if tokenizer is not None:
        try:
            rendered = render(tokenizer, messages)
        except Exception:  # noqa: BLE001 - a template that refuses this conversation: show the approximation
            rendered = None
        if rendered is not None:
            return Preview(rendered.segments(), True,
                           f"the chat template of {model_id}'s own tokenizer, with exactly the "
                           f"{rendered.loss_tokens:,} tokens training takes the loss on", rendered)
    from .templates import segments, template_for

    if not model_id:
        why = "no model was named"
    elif tokenizer is not None:
        why = f"the chat template of {model_id} did not render this example"
    elif template_for(model_id) == "gemini":
        why = "the Gemini service does not publish its tokenizer"
    else:
        why = f"the tokenizer of {model_id} is not available offline"
    return Preview(segments(messages, model_id), False,
                   f"an approximation of the {template_for(model_id)} chat template ({why}): the exact text "
                   "and the tokens training takes the loss on may differ")
