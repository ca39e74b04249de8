"""Tokenizers without model weights: the built-in byte tokenizer, and tokenizers found offline.

The built-in tiny models use a byte-level tokenizer built in code,
deterministically: five special tokens followed by the 256 byte tokens, no
merges. Every string round-trips exactly, so the tiny models can learn any
text without a trained vocabulary. Its chat template is ChatML, the format
Qwen uses::

    <bos><|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n

``<|im_end|>`` is the eos token so generation stops at the end of the
assistant's turn. Counting its tokens needs no library at all
(:func:`count_builtin`): every UTF-8 byte is one token and every special
token one token. Other models' tokenizers are read with transformers from a
folder or the local Hugging Face cache (:func:`load_offline`), never downloaded.
"""

from __future__ import annotations

from pathlib import Path

PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)
#: Size of the vocabulary: the special tokens then the 256 bytes.
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Content may be a plain string or a list of parts (multimodal chat format); only
# text parts are rendered because the tiny models are text-only.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'assistant' if message['role'] == 'model' else message['role'] %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\n') %}{% endif %}"
    "{{ '<|im_start|>' + role + '\n' + text + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: The built-in template's pieces: what comes first, what opens a turn of each role, what closes it.
TEMPLATE_START = BOS
TEMPLATE_OPEN = {role: f"{IM_START}{role}\n" for role in ("system", "user", "assistant")}
TEMPLATE_CLOSE = f"{IM_END}\n"

_SPECIAL_BYTES = tuple((t.encode(), len(t) - 1) for t in SPECIAL_TOKENS)
# Tokens of an empty turn of each role: <|im_start|>, the role's bytes, "\n", <|im_end|>, "\n".
_TURN_TOKENS = {role: len(role) + 4 for role in ("system", "user", "assistant")}


def _bytes_to_unicode() -> list[str]:
    """The printable character standing for each byte 0..255 (the GPT-2 byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tokenizer():
    """A fresh byte-level fast tokenizer with the ChatML chat template (a transformers tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i, ch in enumerate(_bytes_to_unicode()):
        vocab[ch] = len(SPECIAL_TOKENS) + i
    # BPE without merges over the byte alphabet is a pure byte tokenizer.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[EOS, IM_START],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def count_builtin_text(data: bytes) -> int:
    """Tokens of UTF-8 text for the built-in tokenizer: one a byte, one for each special token in it.

    Special tokens never overlap (each starts with ``<`` and ends with ``>``), so
    counting their occurrences is exact.
    """
    n = len(data)
    if b"<" in data:
        for token, saved in _SPECIAL_BYTES:
            n -= data.count(token) * saved
    return n


def count_builtin(messages: list[dict]) -> int:
    """Exact tokens of a conversation in the built-in models' chat template, with no tokenizer library.

    ``messages`` have roles system/user/assistant (or model) and text content;
    image parts are left out, as the template leaves them out.
    """
    from .formats import text_of

    n = 1  # <bos>
    for m in messages:
        role = m["role"]
        n += _TURN_TOKENS["assistant" if role == "model" else role] + count_builtin_text(
            text_of(m["content"]).encode("utf-8", "surrogatepass"))
    return n


def builtin_turn_tokens(role: str) -> int:
    """Tokens the built-in template adds around one turn of ``role``."""
    return _TURN_TOKENS[role]


_SPECIAL_RE = None


class ByteTokenizer:
    """The built-in tokenizer in plain Python: the same ids, offsets and chat template, no library needed.

    Gives what :func:`build_tokenizer` gives for the calls the dataset layer
    makes (``apply_chat_template`` as text, ``__call__`` with offsets,
    ``decode``), so the built-in models' examples are rendered exactly without
    importing transformers. Tests hold the two to the same output.
    """

    bos_token, eos_token, pad_token = BOS, IM_END, PAD

    def apply_chat_template(self, messages, *, tokenize: bool = False, add_generation_prompt: bool = False,
                            **_ignored) -> str:
        """The conversation as :data:`CHAT_TEMPLATE` renders it (text only; ``tokenize`` must be False)."""
        from .formats import text_of

        if tokenize:
            raise ValueError("ByteTokenizer renders text only; encode it with the tokenizer call")
        parts = [BOS]
        for m in messages:
            role = "assistant" if m["role"] == "model" else m["role"]
            parts.append(f"{IM_START}{role}\n{text_of(m['content'])}{IM_END}\n")
        if add_generation_prompt:
            parts.append(TEMPLATE_OPEN["assistant"])
        return "".join(parts)

    def __call__(self, text: str, *, add_special_tokens: bool = False, return_offsets_mapping: bool = False,
                 **_ignored) -> dict:
        """``{"input_ids": [...], "offset_mapping": [(start, end), ...]}``: character offsets, as a fast tokenizer gives.

        Special tokens are matched anywhere in the text; every other character
        gives one token a UTF-8 byte, each spanning that character.
        """
        global _SPECIAL_RE
        if _SPECIAL_RE is None:
            import re

            _SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
        ids: list[int] = [SPECIAL_TOKENS.index(BOS)] if add_special_tokens else []
        offsets: list[tuple[int, int]] = [(0, 0)] if add_special_tokens else []
        base = len(SPECIAL_TOKENS)
        special = {t: i for i, t in enumerate(SPECIAL_TOKENS)}

        def plain(start: int, end: int) -> None:
            for c in range(start, end):
                for b in text[c].encode("utf-8", "surrogatepass"):
                    ids.append(base + b)
                    offsets.append((c, c + 1))

        cursor = 0
        for match in _SPECIAL_RE.finditer(text):
            plain(cursor, match.start())
            ids.append(special[match.group()])
            offsets.append(match.span())
            cursor = match.end()
        plain(cursor, len(text))
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def decode(self, ids, **_ignored) -> str:
        """The text of ``ids`` (special tokens included)."""
        base = len(SPECIAL_TOKENS)
        out, pending = [], bytearray()
        for i in ids:
            if i >= base:
                pending.append(i - base)
                continue
            out.append(pending.decode("utf-8", "replace"))
            pending.clear()
            out.append(SPECIAL_TOKENS[i])
        out.append(pending.decode("utf-8", "replace"))
        return "".join(out)


# -- tokenizers read from disk -------------------------------------------------------------


#: Tokens that close a turn in the chat templates of the model families the engine tunes (ChatML, Gemma, Llama 3).
END_OF_TURN_TOKENS = (IM_END, "<end_of_turn>", "<|eot_id|>")


def stop_token_ids(tokenizer, eos=None) -> list[int]:
    """The token ids that end a reply: ``eos`` (a generation config's ``eos_token_id``: an id or a list), the
    tokenizer's end-of-sequence token and each end-of-turn token its vocabulary has."""
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def hf_cached_folder(repo: str) -> str | None:
    """The snapshot folder of ``repo`` in the local Hugging Face cache when its config is there, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # comes with transformers; without it nothing can be loaded anyway
        return None
    try:
        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # noqa: BLE001 - malformed repo ids raise validation errors
        return None
    if isinstance(found, str):
        return str(Path(found).parent)
    return None


def has_tokenizer(folder) -> bool:
    """True when ``folder`` holds tokenizer files."""
    p = Path(folder)
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load_offline(location: str):
    """The transformers tokenizer in a folder or cached Hugging Face repo, never downloading.

    Tokenizers without a chat template get the built-in ChatML template, so that
    training, chat and token counts always agree on the format. Raises OSError
    or ValueError when it cannot be loaded.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token works.
        tok.pad_token = tok.eos_token
    return tok
