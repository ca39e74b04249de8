"""Submit, find and list tuning jobs: ``tune()``, ``get_job()``, ``list_jobs()``.

The parameter names are those of ``vertexai.tuning.sft.train`` and
google-genai's ``client.tunings.tune``, so code moves between them and this
module unchanged::

    job = tune("local/tiny-qwen3", df, epochs=2)          # returns at once
    job.wait().metrics()                                  # or tune(..., wait=True)

Every mistake a user can fix is caught here, before anything is queued, as a
one-line :class:`~tuning_magics.errors.UserError` that names the parameter and
says what to do. Nothing heavy (torch, transformers, the cloud SDKs) is
imported by this module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import catalog, params
from .errors import UserError, require_extra
from .jobs import Job

#: google-genai / vertexai spellings accepted for our parameters.
_ALIASES = {
    "source_model": "base_model",
    "training_dataset": "train_dataset",
    "epoch_count": "epochs",
    "teacher_model": "base_teacher_model",
}
_METHODS = {
    "sft": "sft",
    "supervised": "sft",
    "supervised_fine_tuning": "sft",
    "distillation": "distillation",
    "distill": "distillation",
}


def tune(
    base_model=None,
    train_dataset=None,
    *,
    custom_base_model: str | None = None,
    tuning_mode: str | None = None,
    epochs: int | None = None,
    learning_rate: float | None = None,
    learning_rate_multiplier: float | None = None,
    adapter_size: int | None = None,
    validation_dataset=None,
    output_uri: str | None = None,
    tuned_model_display_name: str | None = None,
    method: str = "sft",
    base_teacher_model: str | None = None,
    backend: str | None = None,
    wait: bool = False,
    **engine_options,
) -> Job:
    """Submit a tuning job and return its :class:`~tuning_magics.jobs.Job` at once (or when done, ``wait=True``).

    ``base_model``: a catalog id or short name (``local/tiny-qwen3``, ``qwen3-4b``).
    ``train_dataset`` / ``validation_dataset``: a Dataset, a JSONL path or gs:// URI,
    a pandas DataFrame or a list of records. ``tuning_mode``: ``FULL`` or
    ``PEFT_ADAPTER`` (default: FULL where the model supports it). ``method``:
    ``"sft"`` or ``"distillation"`` (then ``base_teacher_model`` labels the prompts).
    ``backend``: ``"local"`` (default without a Cloud project) or ``"vertex"``.
    Other keywords are engine options (``batch_size``, ``max_seq_len``, ``seed``, ...).
    ``source_model``, ``training_dataset`` and ``epoch_count`` are accepted as aliases.
    """
    given = dict(base_model=base_model, train_dataset=train_dataset, epochs=epochs,
                 base_teacher_model=base_teacher_model)
    for alias, name in _ALIASES.items():
        if alias in engine_options:
            value = engine_options.pop(alias)
            if given[name] is not None:
                raise UserError(f"give {name} or {alias}, not both (they are the same parameter)", field=name)
            given[name] = value
    base_model, train_dataset, epochs, base_teacher_model = (
        given["base_model"], given["train_dataset"], given["epochs"], given["base_teacher_model"])
    # vertexai's SourceModel(base_model=..., custom_base_model=...) is accepted as base_model.
    if base_model is not None and not isinstance(base_model, str) and hasattr(base_model, "base_model"):
        custom_base_model = custom_base_model or getattr(base_model, "custom_base_model", None) or None
        base_model = base_model.base_model

    model = _model(base_model)
    backend = _backend(backend, model)
    if backend == "local" and model.provider == "gemini":
        raise UserError(
            f"base_model {model.id} is tuned only by Vertex AI; use backend='vertex', or an open or local/tiny-* "
            "model with the local engine",
            field="base_model",
        )
    require_extra("local")  # before anything is checked against, or written by, the local engine
    method = _method(method)
    mode = _mode(model, tuning_mode)
    epochs = params.check("epochs", epochs)
    learning_rate = params.check("learning_rate", learning_rate)
    learning_rate_multiplier = params.check("learning_rate_multiplier", learning_rate_multiplier)
    if learning_rate is not None and learning_rate_multiplier is not None:
        raise UserError("give learning_rate or learning_rate_multiplier, not both", field="learning_rate")
    adapter_size = _check_adapter_size(model, mode, adapter_size)
    teacher = _teacher(model, method, base_teacher_model)
    if train_dataset is None:
        raise UserError("train_dataset is required: pass a DataFrame, a JSONL path or a Dataset", field="train_dataset")
    if tuned_model_display_name is not None and not isinstance(tuned_model_display_name, str):
        raise UserError("tuned_model_display_name must be a string", field="tuned_model_display_name")
    engine_options = _check_engine_options(engine_options)
    if model.provider == "open" and custom_base_model is None:
        _check_fits(model, mode, adapter_size, engine_options)
    if custom_base_model is not None:
        custom_base_model = _local_folder("custom_base_model", custom_base_model)
    if output_uri is not None and str(output_uri).startswith("gs://"):
        raise UserError(
            "output_uri: the local engine writes to a local folder, not gs://; give a path or leave it out",
            field="output_uri",
        )
    # A Dataset built with a validation split carries its validation set along.
    if validation_dataset is None and getattr(train_dataset, "validation", None) is not None:
        validation_dataset = train_dataset.validation

    from .backends.local import jobs as local
    from .backends.local.scheduler import concurrency

    concurrency()  # a bad TUNING_MAGICS_LOCAL_CONCURRENCY is refused before anything is written
    with local.new_job_folder(output_uri, prefix="distill" if method == "distillation" else "tune") as (job_id, out):
        # Nothing half-made: a refused submission takes away what it made (a folder the user made stays).
        train_path = _dataset_file("train_dataset", train_dataset, out / "train.jsonl", model, method)
        validation_path = None
        if validation_dataset is not None:
            validation_path = _dataset_file("validation_dataset", validation_dataset, out / "validation.jsonl",
                                            model, "sft")
            _check_validation_set(validation_path, train_path, model)
        config = {
            "base_model": model.id,
            "custom_base_model": custom_base_model,
            "tuning_mode": mode,
            "method": method,
            "base_teacher_model": teacher,
            "epochs": epochs,
            "learning_rate": learning_rate,
            "learning_rate_multiplier": learning_rate_multiplier,
            "adapter_size": adapter_size,
            "train_dataset": _describe(train_dataset),
            "validation_dataset": _describe(validation_dataset),
            "train_path": str(train_path),
            "validation_path": str(validation_path) if validation_path else None,
            "output_uri": str(out),
            "engine_options": engine_options,
        }
        local.record(job_id, config, out, display_name=tuned_model_display_name)
    job = local.start(job_id)
    return job.wait() if wait else job


def get_job(name: str, *, backend: str | None = None) -> Job:
    """The job with this id (``tune-20261123-a1b2c3``), resource name or unique display name."""
    if not isinstance(name, str) or not name:
        raise UserError("get_job needs a job id such as 'tune-20261123-a1b2c3'; list_jobs() shows them", field="name")
    if name.startswith("projects/"):
        _backend("vertex")
    if backend is not None:
        _backend(backend)
    from .backends.local import jobs as local

    return local.get(name)


def list_jobs(limit: int | None = None, *, backend: str | None = None) -> list[Job]:
    """Jobs, newest first (at most ``limit``)."""
    if limit is not None:
        limit = params.whole_at_least_1("limit", limit)
    if backend is not None:
        _backend(backend)
    from .backends.local import jobs as local

    return local.find(limit=limit)


def rebuild_registry(*job_folders):
    """List again, from their ``job.json``, the jobs the local registry lacks; a damaged registry is made anew.

    Folders under ``<home>/jobs`` are found by themselves; pass the folders of
    jobs that were given their own ``output_uri``. A readable registry keeps
    its jobs; a damaged one is kept aside. Returns what was done: ``.added``
    (job ids), ``.aside`` (the damaged file, or None); ``str()`` says it in one line.
    """
    from .backends.local import registry

    return registry.rebuild(*job_folders)


# -- checks ------------------------------------------------------------------------


def _backend(backend: str | None, model: catalog.Model | None = None) -> str:
    """The backend to use: the one given, else the local engine for its built-in models, else the setting."""
    if backend is None or str(backend).lower() == "auto":
        if model is not None and model.provider == "local":
            return "local"  # a built-in model exists only here: no setting (nor a broken pyproject) matters
        from .config import settings

        backend = settings.backend
    backend = str(backend).lower()
    if backend == "vertex":
        raise UserError(
            "the Vertex AI backend is not available in this version; use backend='local' "
            "(or unset the Cloud project / TUNING_MAGICS_BACKEND)",
            field="backend",
        )
    if backend != "local":
        raise UserError(f"backend must be 'local' or 'vertex', not {backend!r}", field="backend")
    return backend


def _method(method) -> str:
    norm = _METHODS.get(str(method).strip().lower())
    if norm is None:
        raise UserError(f"method must be 'sft' or 'distillation', not {method!r}", field="method")
    return norm


def _model(base_model) -> catalog.Model:
    if base_model is None or base_model == "":
        raise UserError(
            "base_model is required: name a model such as 'local/tiny-qwen3' (catalog.table() lists them)",
            field="base_model",
        )
    try:
        model = catalog.get(str(base_model))
    except UserError as exc:
        text = str(exc)
        raise UserError("base_" + text if text.startswith("model ") else text, field="base_model") from None
    return model


def _mode(model: catalog.Model, tuning_mode) -> str:
    if tuning_mode is None:
        return catalog.FULL if catalog.FULL in model.modes else model.modes[0]
    return catalog.check_mode(model, tuning_mode)


def _check_adapter_size(model: catalog.Model, mode: str, adapter_size) -> int | None:
    """The rule for every adapter size, then this model's and mode's."""
    adapter_size = params.check("adapter_size", adapter_size)
    if adapter_size is None:
        return None
    if mode != catalog.PEFT:
        raise UserError(
            "adapter_size applies only to tuning_mode='PEFT_ADAPTER'; drop it or switch tuning_mode",
            field="adapter_size",
        )
    if model.adapter_sizes and adapter_size not in model.adapter_sizes:
        sizes = ", ".join(map(str, model.adapter_sizes))
        raise UserError(f"adapter_size for {model.id} must be one of {sizes}, not {adapter_size}", field="adapter_size")
    return adapter_size


def _teacher(model: catalog.Model, method: str, teacher) -> str | None:
    if method == "sft":
        if teacher is not None:
            raise UserError(
                "base_teacher_model is used only with method='distillation'; drop it or set the method",
                field="base_teacher_model",
            )
        return None
    if not teacher:
        ids = ", ".join(t.id for t in catalog.teachers())
        raise UserError(
            f"method='distillation' needs base_teacher_model: one of {ids}, a local model folder or a "
            "local/tiny-* model",
            field="base_teacher_model",
        )
    if not model.distillation_student:
        students = ", ".join(m.short_name for m in catalog.models(student=True))
        raise UserError(
            f"base_model {model.id} cannot be a distillation student; choose one of {students}",
            field="base_model",
        )
    teacher = str(teacher)
    if catalog.get_teacher(teacher) is not None:
        return catalog.get_teacher(teacher).id
    found = catalog.find(teacher)
    if found is not None and found.provider != "gemini":
        return found.id
    if teacher.startswith(("http://", "https://")):
        return teacher  # an OpenAI-compatible endpoint
    if Path(teacher).expanduser().is_dir():
        return str(Path(teacher).expanduser().resolve())
    raise UserError(
        f"base_teacher_model {teacher!r} is neither a catalog teacher, a model, an endpoint URL nor a local "
        "folder; catalog.teachers() lists the teachers",
        field="base_teacher_model",
    )


def _check_fits(model: catalog.Model, mode: str, adapter_size, options: dict) -> None:
    """Refuse at once a job that could not fit in memory even with short sequences.

    The worker checks again, with the dataset's real lengths, before loading weights.
    """
    from .backends.local.memory import check_fits

    seq = min(512, options.get("max_seq_len") or 512)
    check_fits(model.id, mode, seq, options.get("batch_size") or 8, adapter_size=adapter_size or 8,
               model_name=model.id)


def _check_engine_options(options: dict) -> dict:
    from .backends.local.trainer import check_engine_options

    return check_engine_options(options)


def _local_folder(name: str, value) -> str:
    text = str(value)
    if text.startswith("gs://"):
        raise UserError(f"{name}: the local engine reads local folders, not gs://; download it first", field=name)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UserError(f"{name} {text!r} is not a folder; give a model folder or a job's tuned_model", field=name)
    return str(path.resolve())


# -- datasets ----------------------------------------------------------------------


def _describe(dataset) -> str | None:
    """What the user passed, short enough to keep in the job's config."""
    if dataset is None:
        return None
    uri = getattr(dataset, "uri", None) or getattr(dataset, "path", None)
    if uri is not None:
        return str(uri)
    if isinstance(dataset, (str, os.PathLike)):
        return str(dataset)
    if isinstance(dataset, (list, tuple)):
        return f"list of {len(dataset)} records"
    from .datasets.validate import is_dataframe

    if is_dataframe(dataset):
        return f"DataFrame of {len(dataset)} rows"
    return type(dataset).__name__


def _dataset_file(name: str, dataset, target: Path, model: catalog.Model, method: str) -> Path:
    """Put the dataset into the job folder as JSONL and return its path.

    Files are copied so that a resumed job trains on exactly the data it started
    with, even if the user's file changes meanwhile.
    """
    from .datasets.validate import is_dataframe

    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dataframe(dataset) or isinstance(dataset, (list, tuple)):
        if not len(dataset):
            raise UserError(f"{name} is empty; give at least one example", field=name)
        _write_frame(dataset, target, model, method, name)
        return target
    # A Dataset from tuning_magics.dataset() was checked when built, if for this model and method.
    report = getattr(dataset, "report", None)
    validated = (report is not None and getattr(dataset, "model", None) == model.id
                 and getattr(report, "method", None) == method)
    source = getattr(dataset, "uri", None) or getattr(dataset, "path", None) or dataset
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(
            f"{name} must be a DataFrame, a list of records, a JSONL path or a Dataset, not {type(dataset).__name__}",
            field=name,
        )
    text = str(source)
    if text.startswith("gs://"):
        # The local engine trains from the job folder: fetch the object (checksum-verified) once.
        from . import storage

        storage.download_file(text, target, overwrite=True)
        if not validated:
            _validate_file(name, target, model, method)
        return target
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"{name} {text!r} does not exist; check the path", field=name)
    if not validated:
        _validate_file(name, path, model, method)
    shutil.copyfile(path, target)
    return target


def _check_validation_set(validation_path: Path, train_path: Path, model: catalog.Model) -> None:
    """The service's rules for a validation set: at most 5000 examples, not the training set again."""
    from .datasets.validate import validate

    report = validate(str(validation_path), model=model.id, training=str(train_path))
    if not report.ok:
        raise UserError(f"validation_dataset: {report.errors[0]}", field="validation_dataset")


def _validate_file(name: str, path: Path, model: catalog.Model, method: str) -> None:
    from .datasets.validate import validate

    report = validate(str(path), model=model.id, method=method)
    if not report.ok:
        more = f" (and {report.error_count - 1} more)" if report.error_count > 1 else ""
        raise UserError(
            f"{name} {path}: {report.errors[0]}{more}; tuning_magics.validate({str(path)!r}) lists them all",
            field=name,
        )


def _write_frame(data, target: Path, model: catalog.Model, method: str, name: str) -> None:
    """A DataFrame or list of records -> validated JSONL at ``target``.

    Records (and DataFrames whose columns already are record keys, such as
    ``messages`` or ``prompt``/``completion``) are checked and written as they are;
    other DataFrames go through :func:`tuning_magics.dataset`, which maps columns.
    Hints name what the user can do from tune(), which has no dataset options.
    """
    from .datasets.formats import TOP_KEYS
    from .datasets.validate import is_dataframe, plain, validate

    # Only GenerateContent columns need the records as they are; every other
    # DataFrame goes through dataset(), which names bad cells by row and column.
    gc_keys = TOP_KEYS["generate_content"]
    if is_dataframe(data) and not (set(data.columns) <= gc_keys and "contents" in data.columns):
        from .datasets.build import DatasetInvalid, dataset

        try:
            dataset(data, out=str(target), overwrite=True, model=model.id, method=method)
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
        return
    import orjson

    from .storage import atomic_writer

    rows = [plain(r) for r in (data.to_dict(orient="records") if is_dataframe(data) else data)]
    report = validate(rows, model=model.id, method=method)
    if not report.ok:
        more = f" (and {report.error_count - 1} more)" if report.error_count > 1 else ""
        raise UserError(f"{name}: {report.errors[0]}{more}; tuning_magics.validate(records) lists them all",
                        field=name)
    with atomic_writer(target, overwrite=True) as fh:
        for row in rows:
            fh.write(orjson.dumps(row) + b"\n")
