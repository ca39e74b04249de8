"""Token counts: exact where the model's tokenizer is at hand offline, an estimate otherwise.

- The built-in ``local/tiny-*`` models: exact, from the text's bytes
  (:func:`tuning_magics.datasets.tokenizer.count_builtin`), with no tokenizer
  library installed.
- Catalog models whose tokenizer is in a local folder or the Hugging Face cache
  (transformers installed): exact; each example is rendered in the chat
  template (by :class:`ChatRenderer`, without Jinja for most examples) and the
  texts are encoded in batches by the Rust tokenizer.
- Otherwise an estimate: one token per four UTF-8 bytes of text plus four tokens
  of chat-template overhead per message, close for English and conservative
  for scripts such as Korean. Reports always say when counts are estimates.

Memory stays bounded whatever the text: long texts are encoded in pieces.
"""

from __future__ import annotations

from functools import lru_cache

from . import tokenizer as T
from .formats import text_of

#: Tokens the chat template adds around each message (role markers, separators), for estimates.
TEMPLATE_TOKENS_PER_MESSAGE = 4
BYTES_PER_TOKEN = 4
#: Characters handed to the tokenizer in one call; a longer text is cut into pieces of this size.
ENCODE_CHARS = 1 << 21
#: Examples counted in one batch (and characters, whichever limit comes first).
BATCH_EXAMPLES = 4096
BATCH_CHARS = 1 << 23

BUILTIN, TOKENIZER, ESTIMATE = "builtin", "tokenizer", "estimate"


def estimate_text(n_bytes):
    """Estimated tokens for ``n_bytes`` bytes of UTF-8 text (an int or a numpy array)."""
    return -(-n_bytes // BYTES_PER_TOKEN)


@lru_cache(maxsize=8)
def _tokenizer_for(location: str):
    """The transformers tokenizer of a folder or cached Hugging Face repo, or None when not available offline."""
    from pathlib import Path

    folder = location if Path(location).is_dir() else T.hf_cached_folder(location)
    if folder is None:
        return None
    try:
        tok = T.load_offline(folder)
    except Exception:  # noqa: BLE001 - any failure (transformers missing included) means "not available"
        return None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # Counting must see every token: no truncation or padding left set by the tokenizer's files.
        backend.no_truncation()
        backend.no_padding()
    return tok


class ChatRenderer:
    """A chat template's rendering, by string concatenation wherever that gives what Jinja gives.

    Jinja costs about 100 µs an example, more than encoding it. Most templates put
    each message's text in verbatim between pieces that depend only on the roles,
    so for each sequence of roles the template is rendered once with marker texts
    (white space around them shows a template that trims or rewrites them) and
    cut into those pieces. Texts holding ``<`` still go through Jinja (templates
    branch on tags such as ``</think>``), and the first examples of each role
    sequence are rendered both ways: a difference turns the pieces off.
    """

    #: Examples of each role sequence rendered both ways.
    CHECKED = 4
    _MARK = " \n\x00tm{}\x00\t "

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[tuple, list[str] | None] = {}
        self._checks: dict[tuple, int] = {}

    def render(self, roles: list[str], texts: list[str]) -> str:
        """The conversation in the template; raises what the template raises."""
        key = tuple(roles)
        if key not in self._pieces:
            self._pieces[key] = self._cut(key)
        pieces = self._pieces[key]
        if pieces is None or any("<" in t for t in texts):
            return self._jinja(roles, texts)
        parts = [pieces[0]]
        for text, piece in zip(texts, pieces[1:]):
            parts += (text, piece)
        out = "".join(parts)
        left = self._checks.get(key, self.CHECKED)
        if left:
            self._checks[key] = left - 1
            expected = self._jinja(roles, texts)
            if out != expected:
                self._pieces[key] = None
                return expected
        return out

    def _jinja(self, roles, texts) -> str:
        return self.tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in zip(roles, texts)],
                                                  tokenize=False)

    def _cut(self, roles: tuple) -> list[str] | None:
        marks = [self._MARK.format(i) for i in range(len(roles))]
        try:
            rest = self._jinja(roles, marks)
        except Exception:  # noqa: BLE001 - a template that refuses these roles refuses every text
            return None
        pieces = []
        for mark in marks:
            before, found, rest = rest.partition(mark)
            if not found or mark in rest:
                return None
            pieces.append(before)
        return pieces + [rest]


class TokenCounter:
    """Counts the tokens of conversations for one model, as the model sees them in training."""

    def __init__(self, model_id: str | None):
        from .. import catalog

        self.model_id = model_id
        self.tokenizer = None
        spec = catalog.find(model_id) if model_id else None
        if spec is not None and spec.provider == "local":
            self.kind = BUILTIN
        else:
            location = (spec.hf_repo if spec is not None else model_id) if model_id else None
            self.tokenizer = _tokenizer_for(location) if location else None
            self.kind = TOKENIZER if self.tokenizer is not None else ESTIMATE
            self.renderer = ChatRenderer(self.tokenizer) if self.tokenizer is not None else None
        self.estimated = self.kind == ESTIMATE
        if model_id is None:
            self.note = "token counts are estimates (about 4 bytes a token); name a model for exact counts"
        elif self.estimated:
            self.note = (f"token counts are estimates (about 4 bytes a token): the tokenizer of {model_id} "
                         "is not available offline")
        else:
            self.note = f"token counts use the tokenizer of {model_id}"

    def count(self, messages: list[dict]) -> int:
        """Tokens of one conversation."""
        if self.kind == BUILTIN:  # the common case of a validation, without a list around it
            return T.count_builtin(messages)
        return self.count_many([messages])[0]

    def count_many(self, conversations: list[list[dict]]) -> list[int]:
        """Tokens of each conversation; with a real tokenizer, encoded in one batch."""
        if self.kind == BUILTIN:
            return [T.count_builtin(m) for m in conversations]
        if self.kind == ESTIMATE:
            return [_estimate(m) for m in conversations]
        texts: list[str | None] = []
        render = self.renderer.render
        for messages in conversations:
            try:
                texts.append(render([m["role"] for m in messages], [text_of(m["content"]) for m in messages]))
            except Exception:  # noqa: BLE001 - a template that refuses the turns: estimate that one
                texts.append(None)
        counts = self._encode_lengths([t for t in texts if t is not None])
        it = iter(counts)
        return [next(it) if t is not None else _estimate(m) for t, m in zip(texts, conversations)]

    def _encode_lengths(self, texts: list[str]) -> list[int]:
        """Token counts of rendered texts, in calls of at most ENCODE_CHARS characters."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

            def encode(batch):
                return [len(e) for e in encode_batch(batch, add_special_tokens=False)]  # len(e.ids) copies
        else:  # a slow (Python) tokenizer
            def encode(batch):
                return [len(ids) for ids in self.tokenizer(batch, add_special_tokens=False,
                                                           verbose=False)["input_ids"]]
        totals = [0] * len(texts)
        owners: list[int] = []
        batch: list[str] = []
        size = 0
        for i, text in enumerate(texts):
            for piece in _pieces(text):
                if batch and size + len(piece) > ENCODE_CHARS:
                    for owner, n in zip(owners, encode(batch)):
                        totals[owner] += n
                    owners, batch, size = [], [], 0
                owners.append(i)
                batch.append(piece)
                size += len(piece)
        if batch:
            for owner, n in zip(owners, encode(batch)):
                totals[owner] += n
        return totals

    def count_columns(self, frame, columns: list[tuple[str, object]], system_prompt: str | None):
        """Tokens per row of a DataFrame whose text columns are turns: ``columns`` is [(role, column name)]
        in turn order, ``system_prompt`` an optional fixed system message. Returns a numpy array."""
        import numpy as np

        n = len(frame)
        fixed = [{"role": "system", "content": system_prompt}] if system_prompt else []
        if self.kind == TOKENIZER:
            out = np.zeros(n, np.int64)
            step = BATCH_EXAMPLES
            for start in range(0, n, step):
                chunk = {name: frame[name].iloc[start:start + step].tolist() for _, name in columns}
                convs = [fixed + [{"role": role, "content": chunk[name][i]} for role, name in columns]
                         for i in range(len(chunk[columns[0][1]]))]
                out[start:start + len(convs)] = self.count_many(convs)
            return out
        if self.kind == BUILTIN:
            total = np.full(n, self.count_many([fixed])[0], np.int64)  # <bos> and the fixed system turn
            for role, name in columns:
                total += T.builtin_turn_tokens(role) + _builtin_lengths(frame[name])
            return total
        fixed_tokens = _estimate(fixed) if fixed else 0
        total = np.full(n, len(columns) * TEMPLATE_TOKENS_PER_MESSAGE + fixed_tokens, np.int64)
        for _, name in columns:
            total += estimate_text(_utf8_lengths(frame[name]))
        return total


def _estimate(messages: list[dict]) -> int:
    return sum(estimate_text(len(text_of(m["content"]).encode("utf-8", "surrogatepass")))
               + TEMPLATE_TOKENS_PER_MESSAGE for m in messages)


def _pieces(text: str):
    """The text in pieces of at most ENCODE_CHARS characters, cut at white space where there is some."""
    if len(text) <= ENCODE_CHARS:
        yield text
        return
    start = 0
    while start < len(text):
        end = start + ENCODE_CHARS
        if end < len(text):
            cut = text.rfind(" ", start + ENCODE_CHARS // 2, end)
            end = cut if cut > start else end
        yield text[start:end]
        start = end


def _arrow_text(col):
    """A column of (checked) text cells as an Arrow string array, without a copy where it is one already."""
    import pyarrow as pa

    try:
        arr = pa.array(col, from_pandas=True)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # e.g. categories of mixed types, the bad rows left out
        pass
    return pa.array(col.to_numpy(dtype=object), type=pa.large_string())


def _utf8_lengths(col):
    """UTF-8 byte length of each text cell, as int64 numpy."""
    import numpy as np
    import pyarrow.compute as pc

    return pc.binary_length(_arrow_text(col)).to_numpy(zero_copy_only=False).astype(np.int64)


def _builtin_lengths(col):
    """Built-in tokenizer tokens of each text cell: its bytes, each special token counting as one."""
    import numpy as np
    import pyarrow.compute as pc

    arr = _arrow_text(col)
    lengths = pc.binary_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    if pc.any(pc.match_substring(arr, "<")).as_py():
        for token in T.SPECIAL_TOKENS:
            found = pc.count_substring(arr, token).to_numpy(zero_copy_only=False)
            lengths -= found.astype(np.int64) * (len(token.encode()) - 1)
    return lengths
