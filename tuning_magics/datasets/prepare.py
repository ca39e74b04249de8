"""What ``tune()`` does with a dataset before any backend trains on it.

A dataset can be a DataFrame, a list of records, a JSONL path, a ``gs://``
URI or a :class:`~tuning_magics.datasets.build.Dataset`. :func:`to_jsonl`
validates it for the model and method and writes it as one JSONL file;
:func:`validate_in_place` checks a ``gs://`` dataset where it is. Both return
the :class:`Prepared` file with its validation report, from which
:func:`predicted_stats` reads what the service should count. Every problem is
one :class:`~tuning_magics.errors.UserError` naming the parameter
(``train_dataset`` / ``validation_dataset``), the row or line, and the fix.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class Prepared:
    """A validated dataset: where its JSONL is, and the report of its validation."""

    uri: str
    report: object  # ValidationReport


def describe(dataset) -> str | None:
    """What the user passed, short enough to keep in a job's config."""
    if dataset is None:
        return None
    uri = getattr(dataset, "uri", None) or getattr(dataset, "path", None)
    if uri is not None:
        return str(uri)
    if isinstance(dataset, (str, os.PathLike)):
        return str(dataset)
    if isinstance(dataset, (list, tuple)):
        return f"list of {len(dataset)} records"
    from .validate import is_dataframe

    if is_dataframe(dataset):
        return f"DataFrame of {len(dataset)} rows"
    return type(dataset).__name__


def source_uri(name: str, dataset) -> str | None:
    """The path or URI a file dataset lives at; None for a DataFrame or records. Anything else is refused."""
    from .validate import is_dataframe

    if is_dataframe(dataset) or isinstance(dataset, (list, tuple)):
        if not len(dataset):
            raise UserError(f"{name} is empty; give at least one example", field=name)
        return None
    source = getattr(dataset, "uri", None) or getattr(dataset, "path", None) or dataset
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(
            f"{name} must be a DataFrame, a list of records, a JSONL path or a Dataset, not {type(dataset).__name__}",
            field=name,
        )
    return str(source)


def _checked_report(dataset, model, method: str):
    """The report of a Dataset that dataset() already checked for this model and method, else None."""
    report = getattr(dataset, "report", None)
    if report is not None and getattr(dataset, "model", None) == _id(model) and getattr(report, "method", None) == method:
        return report
    return None


def _id(model) -> str | None:
    """The catalog id of ``model``; None (no model's own rules) for a model outside the catalog."""
    return None if model is None else model.id


def to_jsonl(name: str, dataset, target: Path, model, method: str) -> Prepared:
    """Validate ``dataset`` for ``model`` and ``method`` and write it as JSONL at ``target`` (a local path).

    ``model`` is a catalog Model, or None for a model outside the catalog (a
    folder, an endpoint): then only the rules every model shares apply.

    Files are copied (gs:// objects fetched, checksum-verified), so a job trains
    on exactly the data it was given even if the user's file changes meanwhile.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    text = source_uri(name, dataset)
    if text is None:
        return Prepared(str(target), _write_frame(dataset, target, model, method, name))
    report = _checked_report(dataset, model, method)
    if text.startswith("gs://"):
        from .. import storage

        storage.download_file(text, target, overwrite=True)
        return Prepared(str(target), report or _validate_file(name, target, model, method, shown=text))
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"{name} {text!r} does not exist; check the path", field=name)
    report = report or _validate_file(name, path, model, method)
    shutil.copyfile(path, target)
    return Prepared(str(target), report)


def validate_in_place(name: str, uri: str, model, method: str, dataset=None) -> Prepared:
    """Validate a ``gs://`` dataset where it is (streamed, never copied) and return it."""
    report = _checked_report(dataset, model, method) if dataset is not None else None
    return Prepared(uri, report or _validate_file(name, uri, model, method))


def check_validation_set(validation: str, train: str, model, method: str = "sft") -> None:
    """The service's rules for a validation set: at most 5000 examples, and not the training set again."""
    from .validate import validate

    report = validate(str(validation), model=model.id, method=method, training=str(train))
    if not report.ok:
        raise UserError(f"validation_dataset: {report.errors[0]}", field="validation_dataset")


def predicted_stats(report, model, epochs: int | None) -> dict:
    """What the service should count for this dataset: examples, billed tokens, truncated and dropped examples.

    Keys are those of :data:`tuning_magics.jobs.DATA_STAT_NAMES`, so a job shows
    them next to the service's own counts.
    """
    import numpy as np

    lengths = getattr(report, "token_lengths", None)
    lengths = np.asarray(lengths if lengths is not None else [], dtype=np.int64)
    return {
        "examples": int(report.examples),
        "billable_tokens": int(lengths.sum()) * int(epochs or 1),
        "truncated_examples": int((lengths > model.max_seq_len).sum()),
        "dropped_examples": int(getattr(report, "dropped", 0) or 0),
    }


def _validate_file(name: str, path, model, method: str, *, shown: str | None = None):
    from .validate import validate

    report = validate(str(path), model=_id(model), method=method)
    if not report.ok:
        more = f" (and {report.error_count - 1} more)" if report.error_count > 1 else ""
        where = shown or str(path)
        raise UserError(
            f"{name} {where}: {report.errors[0]}{more}; tuning_magics.validate({where!r}) lists them all",
            field=name,
        )
    return report


def _write_frame(data, target: Path, model, method: str, name: str):
    """A DataFrame or list of records -> validated JSONL at ``target``; returns the validation report.

    Records (and DataFrames whose columns already are record keys, such as
    ``messages`` or ``prompt``/``completion``) are checked and written as they are;
    other DataFrames go through :func:`tuning_magics.dataset`, which maps columns.
    Hints name what the user can do from tune(), which has no dataset options.
    """
    from .formats import TOP_KEYS
    from .validate import is_dataframe, plain, validate

    # Only GenerateContent columns need the records as they are; every other
    # DataFrame goes through dataset(), which names bad cells by row and column.
    # GenerateContent columns (and Gemini's preference pairs, which add completions) are records as they are.
    gc_keys = TOP_KEYS["generate_content"] | {"completions"}
    if is_dataframe(data) and not (set(data.columns) <= gc_keys and "contents" in data.columns):
        from .build import DatasetInvalid, dataset

        try:
            built = dataset(data, out=str(target), overwrite=True, model=_id(model), method=method)
        except DatasetInvalid as exc:
            raise UserError(f"{name}: {exc.problem}; nothing was submitted: fix the data, or build it with "
                            "tuning_magics.dataset(df, skip_invalid=True) and pass that", field=name) from None
        except UserError as exc:
            if exc.field == "completion":  # prompts but no answers
                raise UserError(f"{name}: the DataFrame has prompts but no answer column (completion, assistant, "
                                "output, answer or response); add one, or use method='distillation'",
                                field=name) from None
            if exc.field in ("columns", "prompt"):
                raise UserError(f"{name}: the DataFrame's columns are not prompt/completion, user/assistant or "
                                f"messages ({', '.join(map(str, list(data.columns)[:8]))}); rename them, or build it "
                                "with tuning_magics.dataset(df, prompt=..., completion=...) and pass that",
                                field=name) from None
            raise UserError(f"{name}: {exc}", field=name) from None
        return built.report
    import orjson

    from ..storage import atomic_writer

    rows = [plain(r) for r in (data.to_dict(orient="records") if is_dataframe(data) else data)]
    report = validate(rows, model=_id(model), method=method)
    if not report.ok:
        more = f" (and {report.error_count - 1} more)" if report.error_count > 1 else ""
        how = f", method={method!r}" if method != "sft" else ""
        raise UserError(f"{name}: {report.errors[0]}{more}; tuning_magics.validate(records{how}) lists them all",
                        field=name)
    with atomic_writer(target, overwrite=True) as fh:
        for row in rows:
            fh.write(orjson.dumps(row) + b"\n")
    return report
