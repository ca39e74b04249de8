"""DataFrame -> validated JSONL, written atomically to a local path or gs://.

``dataset(df, out=..., prompt="question", completion="answer")`` maps columns to
one of the JSONL formats, validates every row for the target model and method,
and writes the file only when the whole dataset is valid (or, with
``skip_invalid=True``, without the rows at fault). Text columns take a
vectorised path: columns are checked as arrays and JSON-escaped in one call
each, so a million rows take seconds, with memory bounded by the chunk size.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import formats as F
from .tokens import TEMPLATE_TOKENS_PER_MESSAGE, TokenCounter, estimate_text
from .validate import (
    Issue,
    ValidationReport,
    _check_method,
    _is_na,
    _is_unicode,
    _resolve_model,
    check_records,
    plain,
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


class DatasetInvalid(UserError):
    """The dataset has errors; nothing was written. ``.report`` lists them all."""

    def __init__(self, report: ValidationReport, *, skipping: bool = False):
        first = report.errors[0] if report.errors else Issue("unknown problem")
        more = f" (and {report.error_count - 1} more)" if report.error_count > 1 else ""
        fix = "fix the data" if skipping else \
            "fix the data, or pass skip_invalid=True (--skip-invalid) to leave those rows out"
        super().__init__(f"{first}{more}; nothing was written: {fix}")
        self.report = report


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

        from .. import storage

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


# -- column mapping -------------------------------------------------------------------


@dataclass
class _Mapping:
    roles: list[tuple[str, str]]  # (role, column) for text columns, in turn order
    messages: str | None = None
    images: list[str] = field(default_factory=list)
    system_column: str | None = None
    system_prompt: str | None = None

    def used_columns(self) -> list[str]:
        cols = [c for _, c in self.roles] + self.images
        if self.messages:
            cols.append(self.messages)
        if self.system_column:
            cols.append(self.system_column)
        return cols


def _mapping(df, *, prompt, completion, user, assistant, system, system_prompt, messages, images) -> _Mapping:
    columns = list(df.columns)
    images = [images] if isinstance(images, str) else list(images or [])
    if not any((prompt, completion, user, assistant, messages)):
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
                f"name the columns to use: --prompt/--completion, --user/--assistant or --messages "
                f"(the DataFrame has {', '.join(map(str, columns[:8]))})",
                field="columns",
            )
    if prompt or completion:
        if user or assistant:
            raise UserError("use either prompt/completion or user/assistant columns, not both", field="prompt")
        user, assistant = prompt, completion
    if messages and (user or assistant):
        raise UserError("a messages column already holds the turns; drop --user/--assistant", field="messages")
    if system and system_prompt:
        raise UserError("use a system column or a fixed system prompt, not both", field="system_prompt")
    if system_prompt is not None and system_prompt != "" and (
        not isinstance(system_prompt, str) or not system_prompt.strip() or not _is_unicode(system_prompt)
    ):
        raise UserError(f"system_prompt must be non-blank text, not {system_prompt!r}", field="system_prompt")
    mapping = _Mapping(
        roles=[r for r in (("user", user), ("assistant", assistant)) if r[1]],
        messages=messages,
        images=images,
        system_column=system,
        system_prompt=system_prompt,
    )
    duplicated = set(df.columns[df.columns.duplicated()])
    for col in mapping.used_columns():
        if col in duplicated:
            raise UserError(f"column {col!r} appears more than once; rename or drop the duplicates", field=str(col))
        if col not in columns:
            import difflib

            close = difflib.get_close_matches(str(col), [str(c) for c in columns], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; columns are {', '.join(map(str, columns[:8]))}"
            raise UserError(f"column {col!r} is not in the DataFrame{hint}", field=str(col))
    if not messages and not any(r == "user" for r, _ in mapping.roles):
        raise UserError("name the column that holds the prompts (--prompt or --user)", field="prompt")
    return mapping


def _output_format(fmt, mapping: _Mapping, spec) -> str:
    if fmt:
        fmt = F.normalise_format(fmt)
        if fmt == F.PROMPT_COMPLETION and (mapping.messages or mapping.images or mapping.system_column or mapping.system_prompt):
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
    """JSON string literals (without quotes) of many non-empty strings, in one orjson call.

    In orjson's output every quote inside a string is escaped, so ``","`` only
    ever occurs between two elements: splitting on it is exact.
    """
    import orjson

    if not values:
        return []
    return orjson.dumps(values)[2:-2].split(b'","')


def _blank_mask(col, isna):
    """Rows whose text is empty or only white space (False where the value is missing)."""
    import numpy as np

    arrow = getattr(col.array, "_pa_array", None)
    if arrow is not None:
        import pyarrow.compute as pc

        blank = pc.or_(pc.equal(pc.binary_length(arrow), 0), pc.utf8_is_space(arrow))
        return blank.to_numpy(zero_copy_only=False).astype(bool) & ~isna
    values = col.to_numpy(dtype=object)
    return np.fromiter((isinstance(v, str) and not v.strip() for v in values), bool, len(values))


def _check_text_column(col, name: str, report: ValidationReport, positions, labels):
    """Vectorised null/type/empty checks; returns a boolean numpy mask of bad rows."""
    import numpy as np
    import pandas as pd

    isna = col.isna().to_numpy()
    bad_text = np.zeros(len(col), bool)
    if pd.api.types.is_string_dtype(col.dtype) and getattr(col.array, "_pa_array", None) is not None:
        bad_type = np.zeros(len(col), bool)  # Arrow strings are always valid UTF-8
    else:
        values = col.to_numpy(dtype=object)
        bad_type = ~np.fromiter((type(v) is str for v in values), bool, len(values)) & ~isna
        # Lone surrogates (a cut emoji) cannot be written as UTF-8.
        bad_text = np.fromiter((type(v) is str and not _is_unicode(v) for v in values), bool, len(values))
        if bad_type.any() or isna.any() or bad_text.any():
            col = col.where(~bad_type & ~isna & ~bad_text, "x")
        col = col.astype("str")
    blank = _blank_mask(col, isna) & ~bad_type & ~bad_text
    for mask, message in (
        (isna, "is empty (null/NaN); fill it or drop the row"),
        (bad_type, "must be text"),
        (bad_text, "is not valid Unicode text (it holds a lone surrogate); fix or remove it"),
        (blank, "is blank; give it text or drop the row"),
    ):
        for i in np.flatnonzero(mask)[:50]:
            report.error(message, int(positions[i]) + 1, f"row {_label(labels[i])!r}, column {name!r}")
        extra = int(mask.sum()) - 50
        if extra > 0:
            report.error_count += extra
    return isna | bad_type | bad_text | blank


def _label(value):
    """A DataFrame index label as plain Python (``5``, not ``np.int64(5)``)."""
    return value.item() if hasattr(value, "item") else value


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
    """Check the text columns of one subset of rows; returns (those rows, a mask of the bad ones)."""
    import numpy as np

    sub = df.iloc[rows] if rows is not None else df
    positions = np.asarray(rows) if rows is not None else np.arange(len(df))
    labels = sub.index.to_numpy()
    names = [c for _, c in mapping.roles]
    if mapping.system_column:
        names = [mapping.system_column] + names
    bad = np.zeros(len(sub), bool)
    for name in names:
        bad |= _check_text_column(sub[name], name, report, positions, labels)
    return sub, bad


def _token_lengths_text(sub, names: list[str], counter: TokenCounter, fixed: str | None):
    """Tokens per row: the text columns ``names`` plus an optional fixed system prompt, with template overhead."""
    import numpy as np

    n_messages = len(names) + (1 if fixed else 0)
    if counter.tokenizer is not None and not counter.estimated:
        total = np.zeros(len(sub), np.int64)
        for name in names:
            enc = counter.tokenizer(sub[name].tolist(), add_special_tokens=False)["input_ids"]
            total += np.fromiter(map(len, enc), np.int64, len(sub))
        # The template's own tokens, counted once on empty messages.
        overhead = counter.count([{"role": "user", "content": ""}] * n_messages)
        if fixed:
            total += len(counter.tokenizer(fixed, add_special_tokens=False)["input_ids"])
        return total + overhead
    fixed_bytes = len(fixed.encode()) if fixed else 0
    total = np.full(len(sub), n_messages * TEMPLATE_TOKENS_PER_MESSAGE + estimate_text(fixed_bytes), np.int64)
    for name in names:
        col = sub[name]
        try:
            nbytes = col.astype("string[pyarrow]").array._pa_array
            import pyarrow.compute as pc

            lengths = pc.binary_length(nbytes.cast("binary")).to_numpy(zero_copy_only=False)
        except Exception:  # noqa: BLE001 - no pyarrow: count characters in Python
            lengths = np.fromiter((len(v.encode()) for v in col.tolist()), np.int64, len(col))
        total += estimate_text(lengths.astype(np.int64))
    return total


# -- the general path (message lists, images) -----------------------------------------


def _image_part(value, line, column) -> dict:
    import base64

    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {"type": "image_url", "image_url": {"url": f"data:{_sniff(data)};base64,{base64.b64encode(data).decode()}"}}
    value = str(value)
    if value.startswith(("gs://", "https://", "http://", "data:")):
        return {"type": "image_url", "image_url": {"url": value}}
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"row {line}, column {column!r}: image file {value!r} does not exist; check the path "
                        "(relative paths start from the working folder)", field=column)
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
    """Yield (position, label, record or None, problem) for the general path."""
    sub = df.iloc[rows] if rows is not None else df
    positions = rows if rows is not None else range(len(df))
    cols = {c: sub[c].tolist() for c in mapping.used_columns()}
    for i, (pos, label) in enumerate(zip(positions, sub.index)):
        if mapping.messages:
            msgs = plain(cols[mapping.messages][i])  # Parquet gives numpy arrays for lists
            if not isinstance(msgs, list):
                yield pos, label, None, ("must be a list of {role, content} messages", mapping.messages)
                continue
        else:
            msgs = [{"role": role, "content": cols[c][i]} for role, c in mapping.roles]
        for m in msgs:
            if isinstance(m, dict) and _is_na(m.get("content")):
                m["content"] = None
        system = mapping.system_prompt if mapping.system_prompt else (cols[mapping.system_column][i] if mapping.system_column else None)
        if system is not None and not (isinstance(system, float) and system != system):
            msgs = [{"role": "system", "content": system}] + msgs
        if mapping.images:
            parts = []
            try:
                for c in mapping.images:
                    v = cols[c][i]
                    if v is None or (isinstance(v, float) and v != v):
                        continue
                    for item in (v if isinstance(v, (list, tuple)) else [v]):
                        parts.append(_image_part(item, label, c))
            except UserError as exc:
                yield pos, label, None, (str(exc).split(": ", 1)[-1], exc.field)
                continue
            if parts:
                first_user = next((m for m in msgs if isinstance(m, dict) and m.get("role") == "user"), None)
                if first_user is not None and isinstance(first_user.get("content"), str):
                    first_user["content"] = parts + [{"type": "text", "text": first_user["content"]}]
        try:
            record = F.from_messages(msgs, fmt) if fmt != F.CHAT else {"messages": msgs}
        except (ValueError, KeyError, TypeError, AttributeError):
            record = {"messages": msgs}
        yield pos, label, record, None


# -- the public function -------------------------------------------------------------------


def _default_out() -> str:
    from ..paths import data_home

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return str(data_home() / "datasets" / f"dataset-{stamp}.jsonl")


def _validation_path(out: str) -> str:
    if out.endswith(".jsonl"):
        return out[: -len(".jsonl")] + "_validation.jsonl"
    return out + "_validation"


def _split(n: int, validation_split, seed: int):
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number, not {seed!r}", field="seed")

    if validation_split is None or validation_split == 0:
        return None, None
    if isinstance(validation_split, float) and 0 < validation_split < 1:
        k = max(1, round(n * validation_split))
    elif isinstance(validation_split, int) and not isinstance(validation_split, bool) and 0 < validation_split < n:
        k = validation_split
    else:
        raise UserError(
            f"validation_split must be a fraction between 0 and 1 or a row count below {n}, not {validation_split!r}",
            field="validation_split",
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


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
    ``messages`` (a list of ``{role, content}`` per row); ``system`` (a column)
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
    if not (type(df).__name__ == "DataFrame" and hasattr(df, "columns")):
        raise UserError(f"dataset() takes a pandas DataFrame, not {type(df).__name__}", field="df")
    method = _check_method(method)
    spec = _resolve_model(model)
    if not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs must be a positive whole number, not {epochs!r}", field="epochs")
    mapping = _mapping(df, prompt=prompt, completion=completion, user=user, assistant=assistant,
                       system=system, system_prompt=system_prompt, messages=messages, images=images)
    if method == "sft" and not mapping.messages and not any(r == "assistant" for r, _ in mapping.roles):
        raise UserError("supervised tuning needs answers: name the --completion/--assistant column "
                        "(or use --method distillation for prompts alone)", field="completion")
    fmt = _output_format(format, mapping, spec)
    if len(df) == 0:
        raise UserError("the DataFrame has no rows", field="df")
    train_rows, val_rows = _split(len(df), validation_split, seed)
    out = str(out) if out is not None else _default_out()
    val_out = None
    if val_rows is not None:
        val_out = str(validation_out) if validation_out else _validation_path(out)
    from .. import storage

    if not overwrite:
        for target in filter(None, (out, val_out)):
            if storage.exists(target):
                raise UserError(f"{target} already exists; pass overwrite=True (--overwrite) or choose another path",
                                field="out")
    counter = TokenCounter(spec.id if spec else None)
    parts = [("train", out, train_rows)] + ([("validation", val_out, val_rows)] if val_rows is not None else [])
    prepared = []
    for kind, target, rows in parts:
        report = ValidationReport(source=target, model=spec.id if spec else None, method=method)
        if mapping.messages or mapping.images:
            writer = _prepare_general(df, mapping, fmt, report, counter, rows, spec, skip_invalid)
        else:
            writer = _prepare_text(df, mapping, fmt, report, counter, rows, spec, skip_invalid)
        prepared.append((kind, target, report, writer))
    if val_rows is not None:
        from ..catalog import MAX_VALIDATION_EXAMPLES

        vreport = prepared[1][2]
        if vreport.examples > MAX_VALIDATION_EXAMPLES:
            vreport.error(f"the validation set has {vreport.examples:,} examples; the service takes at most "
                          f"{MAX_VALIDATION_EXAMPLES:,}: use a smaller validation_split", field="validation_split")
    for _, _, report, _ in prepared:
        if not report.ok:
            raise DatasetInvalid(report, skipping=skip_invalid)
    written = []
    try:
        for kind, target, report, writer in prepared:
            with storage.atomic_writer(target, overwrite=overwrite) as fh:
                writer(fh)
            written.append(target)
    except BaseException:
        # The pair is written whole or not at all.
        for target in written:
            storage.remove(target)
        raise
    datasets = [Dataset(uri=t, report=r, model=spec.id if spec else None, epochs=epochs,
                        columns={"format": fmt}) for _, t, r, _ in prepared]
    train = datasets[0]
    train.validation = datasets[1] if len(datasets) > 1 else None
    return train


def _finish_report(report: ValidationReport, lengths, spec, line_numbers) -> None:
    import numpy as np

    report.token_lengths = np.asarray(lengths, dtype=np.int32)
    if spec is not None and len(lengths):
        over = np.flatnonzero(np.asarray(lengths) > spec.max_seq_len)
        for i in over[:50]:
            report.warn(f"is about {int(lengths[i]):,} tokens; {spec.id} takes at most {spec.max_seq_len:,}, "
                        "so it will be truncated", int(line_numbers[i]))
        if len(over) > 50:
            report.warning_count += len(over) - 50


def _prepare_text(df, mapping, fmt, report, counter, rows, spec, skip_invalid):
    import numpy as np

    sub, bad = _text_pass(df, mapping, report, rows)
    report.format = fmt
    if bad.any() and skip_invalid:
        dropped = int(bad.sum())
        report.warn(f"{dropped} invalid rows left out (skip_invalid)")
        report.errors.clear()
        report.error_count = 0
        sub = sub[~bad]
    report.examples = len(sub)
    if not report.ok or len(sub) == 0:
        if len(sub) == 0 and report.ok:
            report.error(f"no valid rows are left to write to {report.source}")
        return None
    names = [c for _, c in mapping.roles]
    fixed = mapping.system_prompt
    text_names = ([mapping.system_column] if mapping.system_column else []) + names
    lengths = _token_lengths_text(sub, text_names, counter, fixed)
    report.tokens_estimated = counter.estimated
    report.tokenizer_note = counter.note
    _finish_report(report, lengths, spec, np.arange(1, len(sub) + 1))
    first = {c: sub[c].iloc[0] for c in text_names}
    report.example = ([{"role": "system", "content": fixed}] if fixed else []) + (
        [{"role": "system", "content": first[mapping.system_column]}] if mapping.system_column else []
    ) + [{"role": r, "content": first[c]} for r, c in mapping.roles]
    roles = [r for r, _ in mapping.roles]
    fixed_escaped = _escaped([fixed])[0] if fixed else None

    def write(fh):
        for start in range(0, len(sub), CHUNK_ROWS):
            chunk = sub.iloc[start:start + CHUNK_ROWS]
            cols = [_escaped(chunk[c].tolist()) for c in names]
            if mapping.system_column:
                system = _escaped(chunk[mapping.system_column].tolist())
            else:
                system = [fixed_escaped] if fixed_escaped is not None else None
            fh.write(b"".join(_text_lines(cols, roles, fmt, system)))

    return write


def _prepare_general(df, mapping, fmt, report, counter, rows, spec, skip_invalid):
    import orjson

    checker_report = ValidationReport(source=report.source, model=report.model, method=report.method)
    records_for_check = []
    labels = []
    for pos, label, record, problem in _row_records(df, mapping, fmt, rows):
        if problem is not None:
            report.error(problem[0], pos + 1, f"row {_label(label)!r}, column {problem[1]!r}")
            continue
        records_for_check.append((pos + 1, record))
        labels.append(label)
    if records_for_check or not report.error_count:  # else "no examples" would only repeat the errors
        check_records(records_for_check, checker_report, model=spec, counter=counter)
    bad_lines = {e.line for e in checker_report.errors}
    label_of = {line: lab for (line, _), lab in zip(records_for_check, labels)}
    for e in checker_report.errors:
        field = f"row {_label(label_of.get(e.line))!r}" + (f", {e.field}" if e.field else "")
        report.error(e.message, e.line, field)
    report.error_count += checker_report.error_count - len(checker_report.errors)
    report.warnings.extend(checker_report.warnings)
    report.warning_count += checker_report.warning_count
    report.dropped = checker_report.dropped
    report.images = checker_report.images
    report.format = checker_report.format or fmt
    report.example = checker_report.example
    report.tokens_estimated, report.tokenizer_note = checker_report.tokens_estimated, checker_report.tokenizer_note
    keep = [i for i, (line, _) in enumerate(records_for_check) if line not in bad_lines]
    if skip_invalid and report.error_count:
        report.warn(f"{report.error_count} invalid rows left out (skip_invalid)")
        report.errors.clear()
        report.error_count = 0
    report.examples = len(keep) if (skip_invalid or report.ok) else len(records_for_check)
    report.token_lengths = [checker_report.token_lengths[i] for i in keep]
    if not report.ok:
        return None
    if not keep:
        report.error(f"no valid rows are left to write to {report.source}")
        return None
    lines = [orjson.dumps(records_for_check[i][1]) + b"\n" for i in keep]

    def write(fh):
        for start in range(0, len(lines), CHUNK_ROWS):
            fh.write(b"".join(lines[start:start + CHUNK_ROWS]))

    return write
