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

import dataclasses
import re
import warnings
from datetime import datetime, timezone

from . import backends, catalog, params
from .errors import UserError
from .jobs import Job, TuneRequest

#: google-genai / vertexai spellings accepted for our parameters.
_ALIASES = {
    "source_model": "base_model",
    "training_dataset": "train_dataset",
    "epoch_count": "epochs",
    "teacher_model": "base_teacher_model",
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
    description: str | None = None,
    labels: dict | None = None,
    method: str = "sft",
    base_teacher_model: str | None = None,
    beta: float | None = None,
    pre_tuned_model_checkpoint_id: str | None = None,
    export_last_checkpoint_only: bool | None = None,
    evaluation=None,
    backend: str | None = None,
    dry_run: bool = False,
    wait: bool = False,
    **engine_options,
):
    """Submit a tuning job and return its :class:`~tuning_magics.jobs.Job` at once (or when done, ``wait=True``).

    ``base_model``: a catalog id or short name (``local/tiny-qwen3``, ``qwen3-4b``,
    ``gemini-2.5-flash``), or a tuned Gemini model's resource name to continue tuning it.
    ``train_dataset`` / ``validation_dataset``: a Dataset, a JSONL path or gs:// URI,
    a pandas DataFrame or a list of records. ``tuning_mode``: ``FULL`` or
    ``PEFT_ADAPTER`` (default: FULL where the model supports it). ``method``:
    ``"sft"``, ``"distillation"`` (then ``base_teacher_model`` labels the prompts) or
    ``"preference"`` (pairs of a preferred and a rejected answer, see
    :mod:`tuning_magics.datasets.preference`; ``beta``, default 0.1, is how far the
    model may move from where it started: lower moves further).
    ``backend``: a backend's name (``"local"``, ``"vertex"``, or one another
    package registers); by default ``local/*`` models run locally, Gemini on
    Vertex AI, and open models on Vertex AI when a Cloud project is configured,
    else locally, which the dry run's notes and a warning at submission say
    (``job.backend`` says which; :func:`tuning_magics.backends.choice` is the
    rule). A finished job as ``base_model`` continues from its tuned model.
    ``evaluation``: task metrics scored on each checkpoint as it is written
    (``{"data": df, "metrics": ["exact_match"]}``; the data defaults to the
    validation set), drawn beside the loss; see :mod:`tuning_magics.evaluation.during`.
    ``dry_run=True`` checks everything and returns the :class:`~tuning_magics.jobs.DryRun`
    (the exact request, billed tokens, estimated cost) without uploading or submitting.
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

    # Continued tuning: a job, or a tuned model's resource name, is the start; its backend says from where.
    source = None
    if isinstance(base_model, Job) or (isinstance(base_model, str) and base_model
                                       and catalog.find(base_model) is None):
        source = backends.source(base_model) if isinstance(base_model, Job) else backends.source_or_none(base_model)
    if source is not None:
        if custom_base_model is not None and source.custom_base_model is not None:
            raise UserError("base_model is a job, whose final model is where tuning starts; drop custom_base_model",
                            field="custom_base_model")
        base_model = source.base_model
        custom_base_model = custom_base_model or source.custom_base_model
    model = _model(base_model)
    chosen, passed_over = backends.choice(model, backend, setting=_backend_setting)
    if source is not None and source.backend != chosen.name:
        raise UserError(f"this base_model is continued by the {source.backend} backend; drop backend= or use "
                        f"{source.backend!r}", field="backend")
    method = _method(method)
    mode = _mode(model, tuning_mode)
    epochs = params.check("epochs", epochs)
    learning_rate = params.check("learning_rate", learning_rate)
    learning_rate_multiplier = params.check("learning_rate_multiplier", learning_rate_multiplier)
    if learning_rate is not None and learning_rate_multiplier is not None:
        raise UserError("give learning_rate or learning_rate_multiplier, not both", field="learning_rate")
    adapter_size = _check_adapter_size(model, mode, adapter_size)
    if beta is not None and method != "preference":
        raise UserError("beta is preference tuning's; drop it or set method='preference'", field="beta")
    beta = params.check("beta", beta)
    teacher = _teacher(model, method, base_teacher_model)
    if train_dataset is None:
        raise UserError("train_dataset is required: pass a DataFrame, a JSONL path or a Dataset", field="train_dataset")
    for name, value in (("tuned_model_display_name", tuned_model_display_name), ("description", description),
                        ("pre_tuned_model_checkpoint_id", pre_tuned_model_checkpoint_id)):
        if value is not None and not isinstance(value, str):
            raise UserError(f"{name} must be a string", field=name)
    if export_last_checkpoint_only is not None and not isinstance(export_last_checkpoint_only, bool):
        raise UserError("export_last_checkpoint_only must be True or False", field="export_last_checkpoint_only")
    # A Dataset built with a validation split carries its validation set along.
    if validation_dataset is None and getattr(train_dataset, "validation", None) is not None:
        validation_dataset = train_dataset.validation

    from .evaluation import during

    evaluation = during.check(evaluation)
    if evaluation is not None and evaluation.data is None and validation_dataset is None:
        raise UserError("evaluation scores the validation set unless given its own data; pass validation_dataset= "
                        "or evaluation={'data': ...}", field="evaluation")

    request = TuneRequest(
        model=model, train_dataset=train_dataset, method=method, tuning_mode=mode,
        validation_dataset=validation_dataset, custom_base_model=custom_base_model, base_teacher_model=teacher,
        epochs=epochs, learning_rate=learning_rate, learning_rate_multiplier=learning_rate_multiplier,
        adapter_size=adapter_size, output_uri=_output_uri(output_uri),
        tuned_model_display_name=tuned_model_display_name, description=description, labels=_labels(labels),
        pre_tuned_model_checkpoint_id=pre_tuned_model_checkpoint_id,
        export_last_checkpoint_only=export_last_checkpoint_only, options=dict(engine_options),
        pre_tuned_model=source.pre_tuned_model if source is not None else None, evaluation=evaluation, beta=beta,
    )
    if dry_run:
        plan = chosen.dry_run(request)
        return dataclasses.replace(plan, notes=(passed_over, *plan.notes)) if passed_over else plan
    job = chosen.submit(request)
    if passed_over:  # auto chose the home backend only because another cannot take the model here: say so
        warnings.warn(passed_over, UserWarning, stacklevel=2)
    return job.wait() if wait else job


def get_job(name: str, *, backend: str | None = None) -> Job:
    """The job with this id (``tune-20261123-a1b2c3``), Vertex AI resource name, or unique display name.

    The backend whose job names have this shape finds it (a ``projects/.../tuningJobs/...``
    name is a Vertex AI job); anything else is looked up locally.
    """
    if not isinstance(name, str) or not name:
        raise UserError("get_job needs a job id such as 'tune-20261123-a1b2c3'; list_jobs() shows them", field="name")
    found = backends.get(backend) if backend is not None and backends.check_name(backend) != "auto" \
        else backends.owner(name)
    return found.get(name)


def list_jobs(limit: int | None = None, *, backend: str | None = None, state=None,
              model: str | None = None) -> list[Job]:
    """Jobs of every backend that lists jobs here (or of ``backend``), newest first (at most ``limit``).

    ``state`` keeps only jobs in that state or states (``"SUCCEEDED"``,
    ``"JOB_STATE_RUNNING"``, ``["FAILED", "CANCELLED"]``; any case); ``model``
    keeps only jobs whose base model (or custom base model) contains that text,
    ignoring case. ``limit`` counts the jobs that pass the filters.

    Vertex AI jobs are listed when a Cloud project is configured. When a
    backend's jobs cannot be listed (no credentials, no network), the local
    jobs are still returned, with a warning that says in one line why the
    others are missing.
    """
    if limit is not None:
        limit = params.whole_at_least_1("limit", limit)
    states = _states(state)
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise UserError(f"model must be some text of a model id such as 'qwen3', not {model!r}", field="model")
    model = model.strip() if model is not None else None
    asked = backends.listed(backend)
    found: list[Job] = []
    for each in asked:
        try:
            found += each.find(limit, states=states, model=model)
        except UserError as exc:
            if len(asked) == 1 or each.name == backends.HOME:
                raise
            warnings.warn(f"{each.title} jobs are not listed: {exc}", UserWarning, stacklevel=2)
    far_past = datetime.min.replace(tzinfo=timezone.utc)
    found.sort(key=lambda job: job.created or far_past, reverse=True)
    return found[:limit] if limit is not None else found


def _states(state) -> frozenset[str] | None:
    """The ``JOB_STATE_*`` names a ``state`` filter asks for (None: every state)."""
    from .jobs import STATES

    if state is None:
        return None
    wanted = [state] if isinstance(state, str) else list(state) if isinstance(state, (list, tuple, set)) else None
    if not wanted:
        raise UserError(f"state must be a job state such as 'SUCCEEDED', or a list of them, not {state!r}",
                        field="state")
    out = set()
    for item in wanted:
        name = str(item).strip().upper()
        name = name if name.startswith("JOB_STATE_") else "JOB_STATE_" + name
        if name not in STATES:
            short = ", ".join(s.removeprefix("JOB_STATE_") for s in STATES)
            raise UserError(f"state must be one of {short}, not {item!r}", field="state")
        out.add(name)
    return frozenset(out)


def rebuild_registry(*job_folders):
    """List again, from their ``job.json``, the jobs the local registry lacks; a damaged registry is made anew.

    Folders under ``<home>/jobs`` are found by themselves; pass the folders of
    jobs that were given their own ``output_uri``. A readable registry keeps
    its jobs; a damaged one is kept aside. Returns what was done: ``.added``
    (job ids), ``.aside`` (the damaged file, or None); ``str()`` says it in one line.
    """
    return backends.get(backends.HOME).rebuild_registry(*job_folders)


# -- checks ------------------------------------------------------------------------


def _output_uri(output_uri) -> str | None:
    """A folder as text (a path or gs:// URI); anything else, a list or ``None/out`` for instance, is one line."""
    from . import storage

    if output_uri is None:
        return None
    return storage.check_path("output_uri", output_uri, kind="a folder, as a path or gs:// URI")


def _backend_setting() -> str:
    """The ``backend`` setting, read only when the model leaves the choice to it."""
    from .config import settings

    return settings.backend


_LABEL = re.compile(r"[a-z][a-z0-9_-]{0,62}")


def _labels(labels) -> dict:
    """User labels, checked against the service's rules so a mistake is caught before submission."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise UserError("labels must be a dict of text keys and values, e.g. {'team': 'search'}", field="labels")
    out = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL.fullmatch(key):
            raise UserError(f"labels: key {key!r} must start with a lower-case letter and hold only lower-case "
                            "letters, digits, '_' or '-' (at most 63)", field="labels")
        if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_-]{0,63}", value):
            raise UserError(f"labels: value {value!r} of {key!r} must be lower-case letters, digits, '_' or '-' "
                            "(at most 63)", field="labels")
        if key == "tuning-magics" or key.startswith("tm-"):
            raise UserError(f"labels: {key!r} is kept for tuning_magics' own lineage labels; choose another key",
                            field="labels")
        out[key] = value
    if len(out) > _MAX_USER_LABELS:
        raise UserError(f"labels: at most {_MAX_USER_LABELS} labels, not {len(out)} (the service takes 64, and "
                        "tuning_magics adds its lineage labels)", field="labels")
    return out


#: The service takes 64 labels per job; tuning_magics adds up to six of its own (version, dataset, counts).
_MAX_USER_LABELS = 58


def _method(method) -> str:
    norm = catalog.METHOD_SPELLINGS.get(str(method).strip().lower())
    if norm is None:
        raise UserError(f"method must be 'sft', 'distillation' or 'preference', not {method!r}", field="method")
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
    if method != "distillation":
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
    if not isinstance(teacher, str):
        raise UserError("base_teacher_model must be a model id, an endpoint URL or a folder, as text",
                        field="base_teacher_model")
    return teacher  # each backend knows which teachers it can reach
