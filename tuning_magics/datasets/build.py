"""DataFrame -> validated JSONL, written atomically to a local path or gs://.

``dataset(df, out=..., prompt="question", completion="answer")`` maps columns to
one of the JSONL formats, validates every row for the target model and method,
and writes the file only when the whole dataset is valid (or, with
``skip_invalid=True``, without the rows at fault). Text columns take a
vectorised path: columns are checked as arrays (with the validator's rules and
messages) and JSON-escaped in one call each, so a million rows take seconds,
with memory bounded by the chunk size. Message lists and images go through the
record validator itself.
"""

from __future__ import annotations

import datetime as _dt
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from .. import params, storage
from ..errors import UserError
from . import formats as F
from .tokens import TokenCounter
from .validate import (
    BLANK_PATTERN,
    MAX_LISTED,
    TOO_DEEP,
    Issue,
    ValidationReport,
    _check_method,
    _is_na,
    _is_unicode,
    _resolve_model,
    check_records,
    is_dataframe,
    plain,
    text_message,
)

#: Rows turned into JSON per chunk: bounds the extra memory while writing.
CHUNK_ROWS = 20_000

# Column names tried, in order, when the caller names none.
_AUTO = (
    ("messages",),
    ("prompt", "completion"),
    ("user", "assistant"),
    ("input", "output"),
    ("question", "answer"),
    ("instruction", "response"),
)

_SKIP_HINT = "fix the data, or pass skip_invalid=True (--skip-invalid) to leave those rows out"


class DatasetInvalid(UserError):
    """The dataset has errors; nothing was written. ``.report`` lists them all, ``.problem`` names the first.

    ``.beside_report`` is the one line to give where the report itself is shown: it counts the
    errors and says where the first is, without saying it again.
    """

    def __init__(self, report: ValidationReport, *, hint: str = _SKIP_HINT):
        first = report.errors[0] if report.errors else Issue("unknown problem")
        more = f" (and {report.error_count - 1} more)" if report.error_count > 1 else ""
        self.problem = f"{first}{more}"
        super().__init__(f"{self.problem}; nothing was written: {hint}")
        self.report = report
        n = report.error_count
        where = f" (the first: {first.where})" if first.where else ""
        self.beside_report = (f"{n:,} error{'s' if n != 1 else ''} in {report.source}, listed above{where}; "
                              f"nothing was written: {hint}")


@dataclass
class Dataset:
    """A validated JSONL dataset: where it is, what is in it, and what tuning on it costs."""

    uri: str | None
    report: ValidationReport
    validation: "Dataset | None" = None
    model: str | None = None
    epochs: int = 1
    columns: dict = field(default_factory=dict)

    @property
    def path(self) -> str | None:
        return self.uri

    @property
    def format(self) -> str | None:
        return self.report.format

    @property
    def examples(self) -> int:
        return self.report.examples

    @property
    def tokens(self) -> dict:
        return self.report.tokens

    def billed_tokens(self, epochs: int | None = None) -> int:
        """Training tokens the service bills: dataset tokens times epochs."""
        return self.tokens["total"] * (epochs or self.epochs)

    def cost(self, epochs: int | None = None) -> float | None:
        """Estimated training cost in USD at list price, or None when no price is known."""
        from ..catalog import find

        spec = find(self.model)
        price = spec.price_per_million_tokens if spec else None
        if price is None:
            return None
        return round(self.billed_tokens(epochs) / 1e6 * price, 2)

    def head(self, n: int = 5) -> list[dict]:
        """The first ``n`` records of the written file."""
        import orjson

        out = []
        with storage.open_read(self.uri) as fh:
            for raw in fh:
                if raw.strip():
                    out.append(orjson.loads(raw))
                if len(out) >= n:
                    break
        return out

    def __repr__(self) -> str:
        val = f", validation={self.validation.examples}" if self.validation else ""
        return f"Dataset({self.uri!r}, {self.examples} examples, {self.format}{val})"

    def _repr_html_(self) -> str:
        from ..display.dataset_report import dataset_html

        return dataset_html(self)

    def _repr_pretty_(self, printer, cycle) -> None:
        from ..display.dataset_report import dataset_text

        printer.text(repr(self) if cycle else dataset_text(self))


# -- options and column mapping ---------------------------------------------------------------


@dataclass
class _Mapping:
    roles: list[tuple[str, object]]  # (role, column) for text columns, in turn order
    messages: object = None
    images: list = field(default_factory=list)
    system_column: object = None
    system_prompt: str | None = None
    pair: tuple | None = None  # (chosen column, rejected column) of preference pairs

    def used_columns(self) -> list:
        cols = [c for _, c in self.roles] + self.images + list(self.pair or ())
        if self.messages is not None:
            cols.append(self.messages)
        if self.system_column is not None:
            cols.append(self.system_column)
        return cols

    def text_columns(self) -> list[tuple[str, object]]:
        """(role, column) of every text column in turn order, the system column first."""
        system = [("system", self.system_column)] if self.system_column is not None else []
        return system + self.roles


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be True or False, not {value!r}", field=name)


def _column(df, name: str, value):
    """A column option as the DataFrame's own label: any label it has, or text / a whole number.

    ``"0"`` names column ``0`` when the DataFrame has no column ``"0"`` (the magics pass text).
    """
    if value is None:
        return None
    if isinstance(value, bool):  # True == 1 would find column 1
        raise UserError(f"{name} must be a column name, not {value!r}", field=name)
    try:
        present = value in df.columns
    except TypeError:  # unhashable: a list or a dict
        present = False
    if present:
        return value
    if isinstance(value, str):
        if value.lstrip("-").isdigit() and int(value) in df.columns:
            return int(value)
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return value
    raise UserError(f"{name} must be a column name, not {value!r}", field=name)


def _mapping(df, *, prompt, completion, user, assistant, system, system_prompt, messages, images, chosen=None,
             rejected=None) -> _Mapping:
    columns = list(df.columns)
    pair = None
    if chosen is not None:
        if completion is not None or assistant is not None:
            raise UserError("preference pairs have chosen and rejected answers, not a completion/assistant column; "
                            "drop it", field="completion")
        pair = (_column(df, "chosen", chosen), _column(df, "rejected", rejected))
        for name, col in zip(("chosen", "rejected"), pair):
            if col not in columns:
                raise UserError(f"column {col!r} ({name}) is not in the DataFrame; it has "
                                f"{', '.join(map(str, columns[:8]))}", field=name)
        if prompt is None and user is None and messages is None:
            found = next((c for c in ("prompt", "user", "question", "instruction", "input", "messages")
                          if c in columns), None)
            if found is None:
                raise UserError(f"name the prompt column (prompt=, user= or messages=); the DataFrame has "
                                f"{', '.join(map(str, columns[:8]))}", field="prompt")
            prompt, messages = (None, found) if found == "messages" else (found, None)
    prompt, completion, user, assistant, system, messages = (
        _column(df, n, v) for n, v in (("prompt", prompt), ("completion", completion), ("user", user),
                                       ("assistant", assistant), ("system", system), ("messages", messages)))
    if images is None:
        images = []
    elif isinstance(images, (list, tuple)):
        images = [_column(df, "images", c) for c in images]
    else:
        try:
            images = [_column(df, "images", images)]
        except UserError:
            raise UserError(f"images must be a column name or a list of them, not {images!r}",
                            field="images") from None
    given = lambda *values: any(v is not None for v in values)  # noqa: E731 - column 0 is a column
    if not given(prompt, completion, user, assistant, messages):
        # Whole pairs first; then a prompt column alone (what distillation takes).
        found = next((names for names in _AUTO if all(n in columns for n in names)), None)
        if found is None:
            found = next(((names[0], None) for names in _AUTO[1:] if names[0] in columns), None)
        if found == ("messages",):
            messages = "messages"
        elif found is not None:
            user, assistant = found
        else:
            raise UserError(
                f"name the columns to use: prompt=/completion=, user=/assistant= or messages= "
                f"(--prompt/--completion ...); the DataFrame has {', '.join(map(str, columns[:8]))}",
                field="columns",
            )
    named = [(option, col) for option, col in (("prompt", prompt), ("completion", completion), ("user", user),
                                               ("assistant", assistant), ("system", system),
                                               ("messages", messages)) if col is not None]
    named += [("images", col) for col in images]
    if given(prompt, completion):
        if given(user, assistant):
            raise UserError("use either prompt/completion or user/assistant columns, not both", field="prompt")
        user, assistant = prompt, completion
    if messages is not None and given(user, assistant):
        raise UserError("a messages column already holds the turns; drop the user/assistant columns",
                        field="messages")
    if system is not None and system_prompt is not None:
        raise UserError("use a system column or a fixed system prompt, not both", field="system_prompt")
    if system_prompt is not None and system_prompt != "" and (
        not isinstance(system_prompt, str) or not system_prompt.strip() or not _is_unicode(system_prompt)
    ):
        raise UserError(f"system_prompt must be non-blank text, not {system_prompt!r}", field="system_prompt")
    mapping = _Mapping(
        roles=[r for r in (("user", user), ("assistant", assistant)) if r[1] is not None],
        messages=messages,
        images=images,
        system_column=system,
        system_prompt=system_prompt or None,
        pair=pair,
    )
    duplicated = set(df.columns[df.columns.duplicated()])
    for option, col in named:
        if col in duplicated:
            raise UserError(f"column {col!r} appears more than once; rename or drop the duplicates", field=str(col))
        if col not in columns:
            import difflib

            close = difflib.get_close_matches(str(col), [str(c) for c in columns], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; columns are {', '.join(map(str, columns[:8]))}"
            raise UserError(f"{option}: column {col!r} is not in the DataFrame{hint}", field=option)
    if messages is None and not any(r == "user" for r, _ in mapping.roles):
        raise UserError("name the column that holds the prompts (prompt= or user=)", field="prompt")
    return mapping


def _output_format(fmt, mapping: _Mapping, spec) -> str:
    if mapping.pair is not None:
        from . import preference

        if fmt is None:
            return preference.GEMINI_PREFERENCE if spec is not None and spec.provider == "gemini" else \
                preference.PREFERENCE
        if fmt not in preference.FORMATS:
            raise UserError(f"preference pairs are written as {' or '.join(preference.FORMATS)}, not {fmt!r}",
                            field="format")
        return fmt
    if fmt is not None:
        if not isinstance(fmt, str):
            raise UserError(f"format must be chat, prompt_completion or generate_content, not {fmt!r}", field="format")
        fmt = F.normalise_format(fmt)
        if fmt == F.PROMPT_COMPLETION and (mapping.messages is not None or mapping.images
                                           or mapping.system_column is not None or mapping.system_prompt):
            raise UserError(
                "prompt_completion holds one prompt and one answer; use format=chat for system prompts, "
                "images or message lists",
                field="format",
            )
        return fmt
    if spec is not None and spec.provider == "gemini":
        return F.GENERATE_CONTENT
    return F.CHAT


# -- the vectorised text path ----------------------------------------------------------


def _escaped(values: list) -> list[bytes]:
    """JSON string literals (without quotes) of many strings.

    One orjson call per value: exact whatever the text holds, and faster than
    encoding the list at once and splitting it apart.
    """
    import orjson

    dumps = orjson.dumps
    return [dumps(v)[1:-1] for v in values]


def _arrow_strings(col):
    """The column as an Arrow string array when it is stored as one (no copy), else None."""
    import pandas as pd

    dtype = col.dtype
    arrow_backed = (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow") or (
        isinstance(dtype, pd.ArrowDtype) and str(dtype.pyarrow_dtype) in ("string", "large_string"))
    if not arrow_backed:
        return None
    import pyarrow as pa

    return pa.array(col, from_pandas=True)


_RULES = (None, "null", "type", "surrogate", "blank")  # a text cell's rule code -> its TEXT_RULES key


def _text_rules(col):
    """The validator's text rules over a whole column at once.

    Returns (codes, values): per row the index in :data:`_RULES` of the rule it breaks (0: good text),
    and the column's values when they were looked at one by one (else None). Works for every dtype:
    text, object, categorical, nullable numbers, Arrow types.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(col)
    isna = col.isna().to_numpy(dtype=bool)
    strings = _arrow_strings(col)
    values = None
    bad_type = bad_text = np.zeros(n, bool)
    if strings is None:  # object, categorical, numbers, dates...: look at each value
        values = col.to_numpy(dtype=object)
        is_text = np.fromiter((isinstance(v, str) for v in values), bool, n)
        bad_type = ~is_text & ~isna
        # Lone surrogates (a cut emoji) cannot be written as UTF-8.
        bad_text = np.fromiter((isinstance(v, str) and not _is_unicode(v) for v in values), bool, n)
        strings = pa.array(np.where(is_text & ~bad_text, values, "x"), type=pa.large_string())
    blank = pc.fill_null(pc.match_substring_regex(strings, BLANK_PATTERN), False).to_numpy(zero_copy_only=False)
    codes = np.select([isna, bad_type, bad_text, blank], [1, 2, 3, 4], 0).astype(np.int8)
    return codes, values


def _role_prefix(role: str, fmt: str) -> bytes:
    if fmt == F.GENERATE_CONTENT:
        return b'{"role":"%s","parts":[{"text":"' % (b"model" if role == "assistant" else b"user")
    return b'{"role":"%s","content":"' % role.encode()


def _text_lines(cols: list[list[bytes]], roles: list[str], fmt: str, system: list[bytes] | None) -> list[bytes]:
    """Assemble JSONL lines from escaped column values."""
    if fmt == F.PROMPT_COMPLETION:
        if len(cols) == 1:
            return [b'{"prompt":"%s"}\n' % p for p in cols[0]]
        return [b'{"prompt":"%s","completion":"%s"}\n' % pc for pc in zip(*cols)]
    if fmt == F.CHAT:
        head = b'{"messages":['
        tail = b"]}\n"
        sep, close = b'"},', b'"}'
        sys_prefix = b'{"role":"system","content":"'
    else:
        head = b'{"contents":['
        tail = b"]}\n"
        sep, close = b'"}]},', b'"}]}'
        sys_prefix = None
    template = head + sep.join(_role_prefix(r, fmt) + b"%s" for r in roles) + close + tail
    if system is None:
        if len(cols) == 1:
            return [template % (a,) for a in cols[0]]
        return [template % t for t in zip(*cols)]
    if fmt == F.CHAT:
        template = head + sys_prefix + b"%s" + sep + template[len(head):]
    else:
        template = b'{"systemInstruction":{"parts":[{"text":"%s"}]},' + template[1:]
    if len(system) == 1:
        s = system[0]
        return [template % (s, *t) for t in zip(*cols)]
    return [template % t for t in zip(system, *cols)]


def _text_pass(df, mapping: _Mapping, report: ValidationReport, rows):
    """Check the text columns of one subset of rows; returns (those rows, their positions, a mask of the bad ones).

    Problems are reported in row order, and a column used for two turns is checked once.
    """
    import numpy as np

    sub = df.iloc[rows] if rows is not None else df
    positions = np.asarray(rows) if rows is not None else np.arange(len(df))
    names = list(dict.fromkeys(name for _, name in mapping.text_columns()))
    checked = [(name, *_text_rules(sub[name])) for name in names]
    bad = np.zeros(len(sub), bool)
    for _, codes, _ in checked:
        bad |= codes != 0
    listed = 0
    for i in np.flatnonzero(bad)[:MAX_LISTED]:  # the report lists no more than these rows hold
        for name, codes, values in checked:
            if codes[i]:
                listed += 1
                report.error(text_message(_RULES[codes[i]], values[i] if values is not None else None),
                             int(positions[i]) + 1, f"column {name!r}")
    report.error_count += sum(int(np.count_nonzero(codes)) for _, codes, _ in checked) - listed
    return sub, positions, bad


# -- the general path (message lists, images) -----------------------------------------


def _image_part(value) -> dict:
    import base64

    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {"type": "image_url", "image_url": {"url": f"data:{_sniff(data)};base64,{base64.b64encode(data).decode()}"}}
    value = str(value)
    if value.startswith(("gs://", "https://", "http://", "data:")):
        return {"type": "image_url", "image_url": {"url": value}}
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"image file {value!r} does not exist; check the path "
                        "(relative paths start from the working folder)")
    data = path.read_bytes()
    return {"type": "image_url", "image_url": {"url": f"data:{_sniff(data)};base64,{base64.b64encode(data).decode()}"}}


def _sniff(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"


def _row_records(df, mapping: _Mapping, fmt: str, rows):
    """Yield (position, record or None, (problem, column) or None) for the general path."""
    sub = df.iloc[rows] if rows is not None else df
    positions = rows if rows is not None else range(len(df))
    cols = {c: sub[c].tolist() for c in mapping.used_columns()}
    for i, pos in enumerate(positions):
        if mapping.messages is not None:
            try:
                msgs = plain(cols[mapping.messages][i])  # Parquet gives numpy arrays for lists
            except RecursionError:
                yield pos, None, (TOO_DEEP, mapping.messages)
                continue
            if not isinstance(msgs, list):
                yield pos, None, ("must be a list of {role, content} messages", mapping.messages)
                continue
        else:
            msgs = [{"role": role, "content": cols[c][i]} for role, c in mapping.roles]
        for m in msgs:
            if isinstance(m, dict) and _is_na(m.get("content")):
                m["content"] = None
        system = mapping.system_prompt if mapping.system_prompt else (
            cols[mapping.system_column][i] if mapping.system_column is not None else None)
        if system is not None and not _is_na(system):
            msgs = [{"role": "system", "content": system}] + msgs
        if mapping.images:
            parts = []
            try:
                for c in mapping.images:
                    v = cols[c][i]
                    if _is_na(v):
                        continue
                    for item in (v if isinstance(v, (list, tuple)) else [v]):
                        parts.append(_image_part(item))
            except UserError as exc:
                yield pos, None, (str(exc), c)
                continue
            if parts:
                first_user = next((m for m in msgs if isinstance(m, dict) and m.get("role") == "user"), None)
                if first_user is not None and isinstance(first_user.get("content"), str):
                    first_user["content"] = parts + [{"type": "text", "text": first_user["content"]}]
        if mapping.pair is not None:  # the prompt's turns, then the two answers
            from . import preference

            answers = [cols[c][i] for c in mapping.pair]
            answers = [None if _is_na(a) else a for a in answers]
            if fmt == preference.PREFERENCE:
                record = {"prompt": msgs, "chosen": answers[0], "rejected": answers[1]}
            else:
                try:
                    record = preference.from_pair(msgs, *answers, fmt)
                except (TypeError, KeyError, AttributeError):
                    record = {"prompt": msgs, "chosen": answers[0], "rejected": answers[1]}
            yield pos, record, None
            continue
        try:
            record = F.from_messages(msgs, fmt) if fmt != F.CHAT else {"messages": msgs}
        except (ValueError, KeyError, TypeError, AttributeError):
            record = {"messages": msgs}
        yield pos, record, None


# -- the public function -------------------------------------------------------------------


def _default_out() -> str:
    from ..paths import data_home

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return str(data_home() / "datasets" / f"dataset-{stamp}.jsonl")


def _validation_path(out: str) -> str:
    if out.endswith(".jsonl"):
        return out[: -len(".jsonl")] + "_validation.jsonl"
    return out + "_validation"


def _split(n: int, validation_split, seed):
    import numpy as np

    seed = params.whole("seed", seed)
    if validation_split is None or (validation_split == 0 and not isinstance(validation_split, bool)):
        return None, None
    wrong = UserError(
        f"validation_split must be a fraction between 0 and 1 or a row count below {n}, not {validation_split!r}",
        field="validation_split",
    )
    if isinstance(validation_split, bool) or not isinstance(validation_split, numbers.Real) \
            or not math.isfinite(validation_split):
        raise wrong
    if isinstance(validation_split, numbers.Integral):
        if not 0 < validation_split < n:
            raise wrong
        k = int(validation_split)
    else:
        if not 0 < validation_split < 1:
            raise wrong
        k = max(1, round(n * validation_split))
        if k >= n:
            raise UserError(
                f"validation_split={validation_split} of {n} row{'s' if n != 1 else ''} holds out every row and "
                "leaves none to train on; add rows or leave validation_split out",
                field="validation_split",
            )
    order = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def _same_file(a: str, b: str) -> bool:
    if storage.is_gcs(a) or storage.is_gcs(b):
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def dataset(
    df,
    out: str | None = None,
    *,
    format: str | None = None,
    prompt: str | None = None,
    completion: str | None = None,
    user: str | None = None,
    assistant: str | None = None,
    system: str | None = None,
    system_prompt: str | None = None,
    messages: str | None = None,
    chosen: str | None = None,
    rejected: str | None = None,
    images=None,
    validation_split=None,
    validation_out: str | None = None,
    seed: int = 0,
    model: str | None = None,
    method: str = "sft",
    epochs: int = 1,
    overwrite: bool = False,
    skip_invalid: bool = False,
) -> Dataset:
    """Turn a DataFrame into validated JSONL at ``out`` (a local path or gs:// URI).

    Columns: ``prompt``/``completion`` or ``user``/``assistant`` (text), or
    ``messages`` (a list of ``{role, content}`` per row); with ``method="preference"``,
    the prompt (``prompt``/``user`` or ``messages``) and ``chosen``/``rejected`` (the
    preferred and the rejected answer; columns so named are found), written as
    ``preference`` pairs or, for Gemini, ``gemini_preference``; ``system`` (a column)
    or ``system_prompt`` (one text for every row); ``images`` (one or more
    columns of gs://, https or local paths, or bytes). With none named, common
    column names are recognised. ``format`` is ``chat`` (default),
    ``prompt_completion`` or ``generate_content`` (default for Gemini models).
    ``validation_split`` (a fraction or a row count) holds out a seeded random
    validation set, written beside ``out`` unless ``validation_out`` is given.
    ``model`` and ``method`` add the target's rules and tokenizer. Nothing is
    written unless every row is valid, unless ``skip_invalid`` leaves bad rows out;
    an existing file or object is never replaced unless ``overwrite``.
    """
    if not is_dataframe(df):
        raise UserError(f"dataset() takes a pandas DataFrame, not {type(df).__name__}", field="df")
    _check_flag("overwrite", overwrite)
    _check_flag("skip_invalid", skip_invalid)
    out, validation_out = (storage.check_path(n, v) if v is not None else None
                           for n, v in (("out", out), ("validation_out", validation_out)))
    method = _check_method(method)
    spec = _resolve_model(model)
    epochs = params.check("epochs", epochs, optional=False)
    if method == "preference" and chosen is None and rejected is None and \
            {"chosen", "rejected"} <= set(map(str, df.columns)):
        chosen, rejected = "chosen", "rejected"
    if (chosen is None) != (rejected is None) or (method == "preference") != (chosen is not None):
        raise UserError("preference pairs take method='preference' with a chosen and a rejected column (the "
                        "preferred and the rejected answer)", field="chosen" if chosen is None else "method")
    mapping = _mapping(df, prompt=prompt, completion=completion, user=user, assistant=assistant,
                       system=system, system_prompt=system_prompt, messages=messages, images=images,
                       chosen=chosen, rejected=rejected)
    if method == "sft" and mapping.messages is None and not any(r == "assistant" for r, _ in mapping.roles):
        raise UserError("supervised tuning needs answers: name the completion/assistant column "
                        "(or use method='distillation' for prompts alone)", field="completion")
    fmt = _output_format(format, mapping, spec)
    if len(df) == 0:
        raise UserError("the DataFrame has no rows", field="df")
    train_rows, val_rows = _split(len(df), validation_split, seed)
    out = out if out is not None else _default_out()
    val_out = None
    if val_rows is None and validation_out is not None:
        raise UserError("validation_out needs validation_split: add validation_split=0.1 (--split 0.1) to hold out "
                        "a validation set there, or drop validation_out", field="validation_out")
    if val_rows is not None:
        val_out = validation_out if validation_out is not None else _validation_path(out)
        if _same_file(out, val_out):
            raise UserError(f"validation_out {val_out!r} is the training file itself; give the validation set "
                            "its own path", field="validation_out")
    counter = TokenCounter(spec.id if spec else None)
    parts = [("train", out, train_rows)] + ([("validation", val_out, val_rows)] if val_rows is not None else [])
    # Both targets are checked before any work, and the pair is written whole or not at all.
    with storage.atomic_writers([target for _, target, _ in parts], overwrite=overwrite) as streams:
        prepared = []
        for kind, target, rows in parts:
            report = ValidationReport(source=target, model=spec.id if spec else None, method=method,
                                      row_labels=df.index)
            prepare = _prepare_general if mapping.messages is not None or mapping.images or mapping.pair \
                else _prepare_text
            writer = prepare(df, mapping, fmt, report, counter, rows, spec, skip_invalid)
            prepared.append((kind, target, report, writer))
        if val_rows is not None:
            from ..catalog import MAX_VALIDATION_EXAMPLES

            vreport = prepared[1][2]
            if vreport.examples > MAX_VALIDATION_EXAMPLES:
                vreport.error(f"the validation set has {vreport.examples:,} examples; the service takes at most "
                              f"{MAX_VALIDATION_EXAMPLES:,}: use a smaller validation_split", field="validation_split")
        for _, _, report, _ in prepared:
            if not report.ok:
                raise DatasetInvalid(report, hint="fix the data" if skip_invalid else _SKIP_HINT)
        for (_, _, _, writer), fh in zip(prepared, streams):
            writer(fh)
        if val_rows is not None and spec is not None and spec.provider == "open":
            _check_validation_bytes(streams[0].tell(), streams[1].tell(), validation_split)
    datasets = [Dataset(uri=t, report=r, model=spec.id if spec else None, epochs=epochs,
                        columns={"format": fmt}) for _, t, r, _ in prepared]
    train = datasets[0]
    train.validation = datasets[1] if len(datasets) > 1 else None
    return train


def _check_validation_bytes(train_bytes: int, validation_bytes: int, validation_split) -> None:
    """Open models: the split's validation file may be at most a quarter of the training file's bytes."""
    from ..catalog import OPEN_VALIDATION_BYTES_SHARE

    if train_bytes and validation_bytes > OPEN_VALIDATION_BYTES_SHARE * train_bytes:
        raise UserError(
            f"validation_split={validation_split} makes a validation file of {validation_bytes:,} bytes, "
            f"{validation_bytes / train_bytes:.2%} of the training file's {train_bytes:,}; for open models the "
            f"service takes at most {OPEN_VALIDATION_BYTES_SHARE:.0%}: use a smaller validation_split (nothing "
            "was written)", field="validation_split")


def _skip_bad_rows(report: ValidationReport, bad_count: int, left: int) -> None:
    """skip_invalid: the errors become one warning, and the caller leaves the rows at fault out;
    with no row ``left``, one error that gives the first reason."""
    first = report.errors[0]
    report.errors.clear()
    report.error_count = 0
    report.warn(f"{bad_count} invalid rows left out (skip_invalid)")
    if not left:
        report.error(f"no valid rows are left to write to {report.source}: skip_invalid left out all {bad_count} "
                     f"(the first: {first})")


def _prepare_text(df, mapping, fmt, report, counter, rows, spec, skip_invalid):
    import numpy as np

    sub, positions, bad = _text_pass(df, mapping, report, rows)
    report.format = fmt
    report.examples = len(sub)
    if bad.any():
        if skip_invalid:
            _skip_bad_rows(report, int(bad.sum()), int((~bad).sum()))
            report.examples -= int(bad.sum())
        sub, positions = sub[~bad], positions[~bad]  # tokens are counted over the valid rows alone
    columns = mapping.text_columns()
    fixed = mapping.system_prompt
    lengths = counter.count_columns(sub, columns, fixed)
    report.token_lengths = lengths
    report.tokens_estimated, report.tokenizer_note = counter.estimated, counter.note
    if spec is not None:
        over = np.flatnonzero(lengths > spec.max_seq_len)
        for i in over[:MAX_LISTED]:
            report.warn(f"is about {int(lengths[i]):,} tokens; {spec.id} takes at most {spec.max_seq_len:,}, "
                        "so it will be truncated", int(positions[i]) + 1)
        report.warning_count += max(0, len(over) - MAX_LISTED)
    if len(sub):
        report.example = ([{"role": "system", "content": fixed}] if fixed else []) + [
            {"role": role, "content": sub[name].iloc[0]} for role, name in columns]
    if not report.ok:
        return None
    roles = [r for r, _ in mapping.roles]
    names = [c for _, c in mapping.roles]
    fixed_escaped = _escaped([fixed])[0] if fixed else None

    def write(fh):
        for start in range(0, len(sub), CHUNK_ROWS):
            chunk = sub.iloc[start:start + CHUNK_ROWS]
            cols = [_escaped(chunk[c].tolist()) for c in names]
            if mapping.system_column is not None:
                system = _escaped(chunk[mapping.system_column].tolist())
            else:
                system = [fixed_escaped] if fixed_escaped is not None else None
            fh.write(b"".join(_text_lines(cols, roles, fmt, system)))

    return write


def _prepare_general(df, mapping, fmt, report, counter, rows, spec, skip_invalid):
    import orjson

    records = []  # (line, the record as JSON)
    bad_lines: set[int] = set()

    def numbered():
        for pos, record, problem in _row_records(df, mapping, fmt, rows):
            if problem is None:
                try:  # default=str: a cell of another type is the checks' to report
                    records.append((pos + 1, orjson.dumps(record, default=str)))
                except TypeError:  # nested deeper than JSON writers go
                    problem = (TOO_DEEP, mapping.messages)
            if problem is not None:
                report.examples += 1
                report.error(problem[0], pos + 1, f"column {problem[1]!r}")
                bad_lines.add(pos + 1)
                continue
            yield pos + 1, record

    check_records(numbered(), report, model=spec, counter=counter, bad_lines=bad_lines)
    report.format = report.format or fmt
    keep = [i for i, (line, _) in enumerate(records) if line not in bad_lines]
    if skip_invalid and bad_lines:
        _skip_bad_rows(report, len(bad_lines), len(keep))
        report.examples = len(keep)
    if not report.ok:
        return None

    def write(fh):
        for start in range(0, len(keep), CHUNK_ROWS):
            fh.write(b"".join(records[i][1] + b"\n" for i in keep[start:start + CHUNK_ROWS]))

    return write
