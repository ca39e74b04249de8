"""What the local engine does with a tuning request: its own checks, the job folder, the queue.

``api.tune()`` has checked what holds for every backend; :func:`submit`
checks what only this machine knows (the local extra is installed, the model
fits in memory, engine options, local folders, teachers it can reach), puts
the validated datasets into a new job folder and queues the job.
"""

from __future__ import annotations

from pathlib import Path

from ... import catalog
from ...datasets import prepare
from ...errors import UserError, require_extra
from ...jobs import TuneRequest
from . import jobs as local


def check(request: TuneRequest) -> tuple[str | None, str | None, dict]:
    """The local engine's own checks; returns (custom_base_model folder, teacher, engine options)."""
    model = request.model  # api.tune() chose this backend: a Gemini model never gets here
    require_extra("local")  # before anything is checked against, or written by, the local engine
    if request.pre_tuned_model_checkpoint_id is not None:
        raise UserError("pre_tuned_model_checkpoint_id continues a tuned Gemini model on Vertex AI; for the "
                        "local engine pass custom_base_model=job.tuned_model (or a checkpoint folder)",
                        field="pre_tuned_model_checkpoint_id")
    from .trainer import check_engine_options, check_gpu_options

    options = check_engine_options(dict(request.options))
    check_gpu_options(options, request.tuning_mode, options.get("device"))
    custom = request.custom_base_model
    if model.provider == "open" and custom is None:
        _check_fits(model, request.tuning_mode, request.adapter_size, options)
    if custom is not None:
        custom = _local_folder("custom_base_model", custom)
    if request.output_uri is not None and str(request.output_uri).startswith("gs://"):
        raise UserError(
            "output_uri: the local engine writes to a local folder, not gs://; give a path or leave it out",
            field="output_uri",
        )
    teacher = _teacher(request.base_teacher_model) if request.method == "distillation" else None
    from .scheduler import concurrency

    concurrency()  # a bad TUNING_MAGICS_LOCAL_CONCURRENCY is refused before anything is written
    return custom, teacher, options


#: The full teacher URL of a job whose URL carries a credential (the job's config keeps it redacted).
TEACHER_SECRET_FILE = "teacher-endpoint.secret"


def submit(request: TuneRequest) -> local.LocalJob:
    """Check the request, write the job folder (datasets included) and queue the job."""
    custom, teacher, options = check(request)
    model, method = request.model, request.method
    train, validation = request.train_dataset, request.validation_dataset
    with local.new_job_folder(request.output_uri, prefix="distill" if method == "distillation" else "tune") as (
        job_id, out,
    ):
        # Nothing half-made: a refused submission takes away what it made (a folder the user made stays).
        train_file = prepare.to_jsonl("train_dataset", train, out / "train.jsonl", model, method)
        validation_file = None
        if validation is not None:
            scored = "preference" if method == "preference" else "sft"
            validation_file = prepare.to_jsonl("validation_dataset", validation, out / "validation.jsonl",
                                               model, scored)
            prepare.check_validation_set(validation_file.uri, train_file.uri, model, scored)
        config = _config(request, custom, teacher, options, str(out))
        config.update(train_path=train_file.uri, validation_path=validation_file.uri if validation_file else None,
                      predicted_stats=prepare.predicted_stats(train_file.report, model, request.epochs))
        if request.evaluation is not None:
            config["evaluation"]["path"] = _evaluation_file(request, out, validation_file)
        if teacher is not None and config["base_teacher_model"] != teacher:
            _keep_secret(out / TEACHER_SECRET_FILE, teacher)
        local.record(job_id, config, out, display_name=request.tuned_model_display_name)
    return local.start(job_id)


def _config(request: TuneRequest, custom, teacher, options: dict, output_uri: str) -> dict:
    """What the job is told, as its ``config`` records it and the dry run shows it: every value that takes effect.

    A teacher URL's credential is never in it (see :data:`TEACHER_SECRET_FILE`).
    """
    from .client import redact_url

    config = {
        "base_model": request.model.id,
        "custom_base_model": custom,
        "tuning_mode": request.tuning_mode,
        "method": request.method,
        "base_teacher_model": redact_url(teacher) if teacher and teacher.startswith(("http://", "https://"))
        else teacher,
        "epochs": request.epochs,
        "learning_rate": request.learning_rate,
        "learning_rate_multiplier": request.learning_rate_multiplier,
        "adapter_size": request.adapter_size,
        "beta": request.beta,
        "train_dataset": prepare.describe(request.train_dataset),
        "validation_dataset": prepare.describe(request.validation_dataset),
        "output_uri": output_uri,
        "engine_options": options,
    }
    if request.tuned_model_display_name:
        config["tuned_model_display_name"] = request.tuned_model_display_name
    if request.description:
        config["description"] = request.description
    if request.labels:
        config["labels"] = dict(request.labels)
    if request.evaluation is not None:
        config["evaluation"] = request.evaluation.describe()
        if request.method == "preference" and request.evaluation.data is None:
            config["evaluation"]["method"] = "preference"  # the validation pairs: prompts, preferred answers
    return config


def _evaluation_file(request: TuneRequest, folder: Path, validation_file) -> str:
    """The examples scored at each checkpoint (``evaluation.data``, else the validation set), checked now as
    the worker will read them, so a mistake is said at submission and not after the first epoch."""
    from ...evaluation import examples_of

    spec = request.evaluation
    if spec.data is not None:
        uri = prepare.to_jsonl("evaluation.data", spec.data, folder / "evaluation.jsonl", request.model, "sft").uri
        method = "sft"
    else:  # a preference job's validation pairs: their prompts, the preferred answers as references
        uri, method = validation_file.uri, "preference" if request.method == "preference" else "sft"
    examples_of(uri, request.model, name="evaluation.data" if spec.data is not None else "validation_dataset",
                limit=spec.limit, method=method)
    return uri


def _keep_secret(path: Path, text: str) -> None:
    """Write ``text`` to a new file only this user can read."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def teacher_of(config: dict, folder) -> str | None:
    """The teacher a job asks: the full URL kept beside a redacted one, else the config's own."""
    secret = Path(folder) / TEACHER_SECRET_FILE
    if secret.is_file():
        return secret.read_text(encoding="utf-8").strip()
    return config.get("base_teacher_model")


def _check_fits(model: catalog.Model, mode: str, adapter_size, options: dict) -> None:
    """Refuse at once a job that could not fit in memory even with short sequences.

    The worker checks again, with the dataset's real lengths, before loading weights.
    """
    from .memory import check_fits

    seq = min(512, options.get("max_seq_len") or 512)
    check_fits(model.id, mode, seq, options.get("batch_size") or 8, adapter_size=adapter_size or 8,
               model_name=model.id, modes=model.modes)


def _local_folder(name: str, value) -> str:
    text = str(value)
    if text.startswith("gs://"):
        raise UserError(f"{name}: the local engine reads local folders, not gs://; download it first", field=name)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UserError(f"{name} {text!r} is not a folder; give a model folder or a job's tuned_model", field=name)
    return str(path.resolve())


def _teacher(teacher: str) -> str:
    """A teacher the local engine can ask: a catalog teacher, a catalog or local model, an endpoint or a folder."""
    found_teacher = catalog.get_teacher(teacher)
    if found_teacher is not None:
        return found_teacher.id
    found = catalog.find(teacher)
    if found is not None and found.provider != "gemini":
        return found.id
    if teacher.startswith(("http://", "https://")):
        _probe(teacher)
        return teacher  # an OpenAI-compatible endpoint
    if Path(teacher).expanduser().is_dir():
        return str(Path(teacher).expanduser().resolve())
    raise UserError(
        f"base_teacher_model {teacher!r} is neither a catalog teacher, a model, an endpoint URL nor a local "
        "folder; catalog.teachers() lists the teachers",
        field="base_teacher_model",
    )


#: Seconds the endpoint of a teacher has to answer the check at submission.
PROBE_TIMEOUT = 5.0


def _probe(url: str) -> None:
    """An endpoint teacher answers (``GET /models``) before a job is queued to ask it thousands of questions."""
    import os

    from .client import EndpointError, list_models, redact_url

    base = url.partition("#")[0]
    try:
        list_models(base, api_key=os.environ.get("OPENAI_API_KEY"), timeout=PROBE_TIMEOUT)
    except EndpointError as exc:
        if exc.status is None:
            raise UserError(f"base_teacher_model: the endpoint {redact_url(base)} does not answer ({exc.detail}); "
                            "start the server or check the URL", field="base_teacher_model") from None
        if exc.status in (401, 403):
            raise UserError(f"base_teacher_model: the endpoint {redact_url(base)} refused the API key "
                            f"(HTTP {exc.status}); set OPENAI_API_KEY in this process, then submit again",
                            field="base_teacher_model") from None
        # Some servers have no /models: the job names the model in its requests instead.


def dry_run(request: TuneRequest):
    """Everything :func:`submit` checks, with the datasets validated in a scratch folder; nothing is queued.

    The request shown is the job's config with every value that takes effect:
    the defaults the engine would use are filled in, and marked as defaults in a note.
    """
    import tempfile

    from ...jobs import DryRun
    from .trainer import effective_values

    custom, teacher, options = check(request)
    output = request.output_uri
    if output is not None:
        _check_output_folder(output)
    with tempfile.TemporaryDirectory(prefix="tuning-magics-dry-run-") as scratch:
        train = prepare.to_jsonl("train_dataset", request.train_dataset, Path(scratch) / "train.jsonl",
                                 request.model, request.method)
        if request.validation_dataset is not None:
            scored = "preference" if request.method == "preference" else "sft"
            validation = prepare.to_jsonl("validation_dataset", request.validation_dataset,
                                          Path(scratch) / "validation.jsonl", request.model, scored)
            prepare.check_validation_set(validation.uri, train.uri, request.model, scored)
        if request.evaluation is not None:
            _evaluation_file(request, Path(scratch), validation if request.validation_dataset is not None else None)
    stats = prepare.predicted_stats(train.report, request.model, request.epochs)
    where = str(Path(output).expanduser().resolve()) if output is not None else str(local.jobs_root() / "<job id>")
    body = _config(request, custom, teacher, options, where)
    defaults = effective_values(body, tiny=_tiny(request, custom))
    notes = ["the local engine bills nothing"]
    if defaults:
        notes.append("engine defaults that take effect: " + ", ".join(f"{k}={v:g}" if isinstance(v, float)
                                                                      else f"{k}={v}" for k, v in defaults.items()))
    return DryRun("local", request.model.id, {k: v for k, v in body.items() if v is not None},
                  stats["billable_tokens"], 0.0, stats, notes=tuple(notes))


def _tiny(request: TuneRequest, custom: str | None) -> bool:
    """Whether the trainer will take the model for a tiny one (its defaults differ): by its size, as it does."""
    if custom is None:
        return request.model.provider == "local"
    try:
        from .memory import param_count
        from .models import load_config
        from .trainer import TINY_MAX_PARAMS

        return param_count(load_config(custom)) < TINY_MAX_PARAMS
    except Exception:  # noqa: BLE001 - a folder whose config cannot be read: the trainer will say so
        return False


def _check_output_folder(output: str) -> None:
    """The dry run's read-only view of what submit would find at ``output_uri``."""
    folder = Path(output).expanduser()
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"output_uri {output!r} already holds files; give an empty or new folder, or leave "
                        "output_uri out", field="output_uri")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output_uri {output!r} is a file, not a folder; give a folder", field="output_uri")
