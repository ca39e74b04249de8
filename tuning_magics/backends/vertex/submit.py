"""What Vertex AI does with a tuning request: its own checks, the uploads, and the call to google-genai.

``api.tune()`` has checked what holds for every backend. :func:`submit`
checks what only the managed service knows (the region serves the model,
Gemini's and open models' own parameters, catalog teachers, gs:// locations,
a staging bucket, credentials), validates the datasets, uploads the local
ones to the staging bucket under a name made from their content (the same
data is never uploaded twice, an object is never replaced), and submits
through google-genai's ``client.tunings.tune``, the SDK's own request.

:func:`dry_run` does all of that but upload and submit: it returns the exact
JSON body google-genai would send (captured from the SDK itself, with no
network), the billed tokens and the estimated cost.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ... import catalog, params, storage
from ...datasets import prepare
from ...errors import UserError
from ...jobs import DryRun, Job, TuneRequest
from . import client as vc
from .images import stage_images
from .jobs import ADAPTER_SIZES, LABEL_DATASET, LABEL_PREDICTED, LABEL_VERSION, VertexJob

#: The options beyond tune()'s parameters the service takes, and their rules (the rest belong to other backends).
SERVICE_OPTIONS = {"batch_size": params.whole_at_least_1}
#: The metrics Vertex AI scores on each checkpoint itself (evaluation during tuning), in the region that has it.
EVALUATION_METRICS = ("exact_match", "rouge_l")
EVALUATION_REGION = "us-central1"


@dataclass
class _Plan:
    """A checked request, its datasets validated, with the gs:// names they have or will have."""

    request: TuneRequest
    ctx: vc.Context
    train_uri: str
    validation_uri: str | None
    uploads: dict = field(default_factory=dict)  # local file -> gs:// name
    stats: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    output_uri: str | None = None
    evaluation_uri: str | None = None  # where the service writes each checkpoint's evaluation
    teacher: str | None = None
    call: tuple = ()  # (base_model, training_dataset, config) for tunings.tune


def submit(request: TuneRequest) -> VertexJob:
    """Check, validate, upload and submit; returns the job at once."""
    ctx = vc.context()  # credentials first: nothing is uploaded for a job that cannot be submitted
    with tempfile.TemporaryDirectory(prefix="tuning-magics-upload-") as scratch:
        plan = _plan(request, ctx, Path(scratch))
        for local, uri in plan.uploads.items():
            storage.upload_content_addressed(local, uri.rsplit("/", 1)[0])
    base_model, dataset, config = plan.call
    with vc.api_errors(f"submit a tuning job for {request.model.id}", ctx), vc.sdk_quiet():
        raw = vc.genai_client(ctx).tunings.tune(base_model=base_model, training_dataset=dataset, config=config)
    return VertexJob(raw.name, ctx=ctx, _job=raw)


def dry_run(request: TuneRequest) -> DryRun:
    """Everything :func:`submit` does except upload and submit: the exact request body, billed tokens and cost."""
    ctx = vc.context(credentials=False)
    notes = []
    with tempfile.TemporaryDirectory(prefix="tuning-magics-dry-run-") as scratch:
        plan = _plan(request, ctx, Path(scratch))
    body = request_body(plan)
    model = request.model
    billed = plan.stats.get("billable_tokens", 0)
    price = model.price_per_million_tokens
    cost = None if price is None else round(billed / 1e6 * price, 2)
    if request.epochs is None:
        notes.append("epochs: the service's default applies; billed tokens are shown for one epoch")
    if request.method == "distillation":
        notes.append(f"distillation also pays for {request.base_teacher_model}'s answers to every prompt")
    notes += _check_buckets(plan)
    uploads = {str(Path(local).name if local.startswith(tempfile.gettempdir()) else local): uri
               for local, uri in plan.uploads.items()}
    return DryRun("vertex", model.id, body, billed, cost, plan.stats, uploads, tuple(notes))


# -- checks ------------------------------------------------------------------------------


def _check_buckets(plan: _Plan) -> list[str]:
    """The dry run's read-only look at the buckets a submission would write to; notes for what it could not see."""
    wanted = {}  # bucket -> the setting or parameter that names it
    if plan.uploads:
        wanted[storage.split_folder_or_object(vc.staging_folder(plan.ctx, "the datasets"), need_object=False)[0]] = \
            "staging_bucket"
    if plan.output_uri and storage.is_gcs(plan.output_uri):
        wanted.setdefault(storage.split_folder_or_object(plan.output_uri, need_object=False)[0], "output_uri")
    notes = []
    for bucket, field_name in wanted.items():
        try:
            found = storage.bucket_exists(f"gs://{bucket}")
        except UserError as exc:
            notes.append(f"bucket gs://{bucket} was not checked: {exc}")
            continue
        if not found:
            raise UserError(f"{field_name}: the bucket gs://{bucket} does not exist (or this identity cannot see "
                            f"it); create it (gcloud storage buckets create gs://{bucket} "
                            f"--location={plan.ctx.location}) or name another", field=field_name)
    return notes




def check(request: TuneRequest, ctx: vc.Context) -> str | None:
    """Vertex AI's own rules for the request, each failure one line naming the parameter; returns the teacher."""
    model = request.model
    catalog.check_region(ctx.location, model)
    gemini = model.provider == "gemini"
    if gemini:
        if request.learning_rate is not None:
            raise UserError(f"{model.id} takes learning_rate_multiplier, not learning_rate; rename it",
                            field="learning_rate")
        if request.custom_base_model is not None:
            raise UserError("custom_base_model is for open models; a tuned Gemini model continues with "
                            "tune(base_model=job_or_model_name, pre_tuned_model_checkpoint_id=...)",
                            field="custom_base_model")
        if "batch_size" in request.options:  # the service refuses hyperParameters.batchSize for Gemini
            raise UserError(f"batch_size is for open models; {model.id} is tuned with the service's own batch "
                            "size: drop it", field="batch_size")
    else:
        for name in ("learning_rate_multiplier", "adapter_size", "export_last_checkpoint_only"):
            if getattr(request, name) is not None:
                hint = "learning_rate" if name == "learning_rate_multiplier" else "tuning_mode"
                raise UserError(f"{name} applies to Gemini models; for {model.id} use {hint}", field=name)
        if request.tuning_mode not in model.modes:  # api checked it; a catalog change must not slip through
            raise UserError(f"{model.id} supports tuning_mode {' or '.join(model.modes)}", field="tuning_mode")
    if request.pre_tuned_model_checkpoint_id is not None and request.pre_tuned_model is None:
        raise UserError("pre_tuned_model_checkpoint_id needs the tuned model to continue: "
                        "tune(base_model=job_or_model_name, pre_tuned_model_checkpoint_id=...)",
                        field="pre_tuned_model_checkpoint_id")
    if request.pre_tuned_model is not None and not model.continued_tuning:
        raise UserError(f"Vertex AI does not continue tuning {model.id} models; start again from {model.id}",
                        field="base_model")
    for name in ("custom_base_model", "output_uri"):
        value = getattr(request, name)
        if value is not None and not str(value).startswith("gs://"):
            raise UserError(f"{name} must be a gs:// folder for Vertex AI, not {value!r}; upload it first",
                            field=name)
    unknown = sorted(set(request.options) - set(SERVICE_OPTIONS))
    if unknown:
        raise UserError(f"{unknown[0]} is not an option of Vertex AI, which takes "
                        f"{', '.join(sorted(SERVICE_OPTIONS))} (or use another backend)", field=unknown[0])
    for name, value in request.options.items():
        SERVICE_OPTIONS[name](name, value)
    if request.method == "preference" and not model.preference_tuning:
        ids = ", ".join(m.id for m in catalog.models() if m.preference_tuning)
        raise UserError(f"Vertex AI preference-tunes {ids}, not {model.id}; choose one of them, or tune "
                        f"{model.id} with backend='local' (DPO)", field="method")
    if request.evaluation is not None:
        _check_evaluation(request, ctx)
    teacher = None
    if request.method == "distillation":
        found = catalog.get_teacher(request.base_teacher_model)
        if found is None:
            ids = ", ".join(t.id for t in catalog.teachers())
            raise UserError(f"base_teacher_model {request.base_teacher_model!r} is not a Vertex AI teacher; use "
                            f"one of {ids} (local models and endpoints teach with backend='local')",
                            field="base_teacher_model")
        teacher = found.id
    return teacher


def _check_evaluation(request: TuneRequest, ctx: vc.Context) -> None:
    """Evaluation during tuning as Vertex AI has it (a preview): Gemini models, in us-central1, exact match and
    ROUGE-L, on the validation set."""
    model, spec = request.model, request.evaluation
    if model.provider != "gemini":
        raise UserError(f"Vertex AI evaluates checkpoints during tuning for Gemini models only; drop evaluation= and "
                        f"score {model.id} afterwards with job.evaluate(), or tune it with backend='local'",
                        field="evaluation")
    if ctx.location != EVALUATION_REGION:
        raise UserError(f"Vertex AI evaluates during tuning in {EVALUATION_REGION} only (a preview), not in "
                        f"{ctx.location}; set location='{EVALUATION_REGION}', or drop evaluation= and score the job "
                        "afterwards with job.evaluate()", field="evaluation")
    other = [m for m in spec.metrics if m not in EVALUATION_METRICS]
    if other:
        raise UserError(f"evaluation.metrics: Vertex AI scores {' and '.join(EVALUATION_METRICS)} during tuning, not "
                        f"{', '.join(other)}; score those afterwards with job.evaluate(metrics=[...])",
                        field="evaluation.metrics")
    if spec.data is not None and request.validation_dataset is not None:
        raise UserError("evaluation.data: Vertex AI scores each checkpoint on the validation set; give the evaluation "
                        "data as validation_dataset, or leave evaluation.data out", field="evaluation.data")


def _plan(request: TuneRequest, ctx: vc.Context, scratch: Path) -> _Plan:
    teacher = check(request, ctx)
    model, method = request.model, request.method
    plan = _Plan(request, ctx, "", None, teacher=teacher)
    train = _dataset(plan, "train_dataset", request.train_dataset, scratch / "train.jsonl", method)
    plan.train_uri = train.uri
    spec = request.evaluation
    # The service scores checkpoints on the validation set: evaluation's own data is that set.
    name, given = ("evaluation.data", spec.data) if spec is not None and spec.data is not None else \
        ("validation_dataset", request.validation_dataset)
    if given is not None:
        scored = "preference" if method == "preference" else "sft"
        validation = _dataset(plan, name, given, scratch / "validation.jsonl", scored)
        plan.validation_uri = validation.uri
        local_train = next((k for k, v in plan.uploads.items() if v == train.uri), train.uri)
        local_validation = next((k for k, v in plan.uploads.items() if v == validation.uri), validation.uri)
        prepare.check_validation_set(local_validation, local_train, model, scored)
        if spec is not None:
            from ...evaluation import examples_of

            examples_of(local_validation, model, name=name, limit=spec.limit)  # every example has its reference
    if spec is not None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        folder = vc.staging_folder(ctx, "the evaluation results")
        plan.evaluation_uri = f"{folder}/evaluations/{model.short_name}-{stamp}"
    plan.stats = prepare.predicted_stats(train.report, model, request.epochs)
    plan.output_uri = request.output_uri
    if plan.output_uri is None and model.provider == "open":
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        plan.output_uri = f"{vc.staging_folder(ctx, 'the tuned model')}/outputs/{model.short_name}-{stamp}"
    plan.labels = _labels(request, plan)
    # The SDK checks its own types here, before anything is uploaded.
    with vc.api_errors(f"build the tuning request for {model.id}", ctx):
        plan.call = _sdk_call(plan)
    return plan


def _dataset(plan: _Plan, name: str, dataset, target: Path, method: str) -> prepare.Prepared:
    """A validated dataset with its gs:// name: validated where it is, or written locally and named by content.

    Inline images of a local dataset are staged as objects of their own (see ``images``).
    """
    from ...datasets import preference

    model = plan.request.model
    source = prepare.source_uri(name, dataset)
    if source is not None and source.startswith("gs://"):
        found = prepare.validate_in_place(name, source, model, method, dataset)
        if method == "preference" and found.report is not None and found.report.format != preference.GEMINI_PREFERENCE:
            raise UserError(f"{name}: Vertex AI reads preference pairs in Gemini's format (contents, completions "
                            f"scored 1 and 0), not {found.report.format}; pass the file from this machine (a path or "
                            "a DataFrame) and it is converted, or convert it with "
                            "tuning_magics.datasets.preference.convert_file", field=name)
        return found
    local = prepare.to_jsonl(name, dataset, target, model, method)
    if method == "preference":  # pairs go as Gemini's format, whichever the user brought
        preference.convert_file(local.uri, preference.GEMINI_PREFERENCE)
    staging = vc.staging_folder(plan.ctx, "the datasets")
    # Local and inline images go first, as objects of their own: the dataset then refers to them by gs:// URI.
    scratch = target.parent / target.stem
    scratch.mkdir(exist_ok=True)
    plan.uploads.update(stage_images(target, scratch, staging + "/images", storage.content_uri))
    uri = storage.content_uri(local.uri, staging + "/datasets")
    plan.uploads[local.uri] = uri
    return prepare.Prepared(uri, local.report)


def _labels(request: TuneRequest, plan: _Plan) -> dict:
    """The user's labels plus lineage: the tuning_magics version, the dataset's content, the predicted counts."""
    from ... import __version__

    labels = dict(request.labels)
    labels.setdefault(LABEL_VERSION, __version__.replace(".", "-"))
    name = plan.train_uri.rsplit("/", 1)[-1]
    if name.startswith("sha256-"):  # named by content: the label finds every job trained on these bytes
        labels.setdefault(LABEL_DATASET, name[len("sha256-"):][:32])
    for key, label in LABEL_PREDICTED.items():
        if plan.stats.get(key) is not None:
            labels.setdefault(label, str(plan.stats[key]))
    return labels


# -- the SDK call ------------------------------------------------------------------------


def _sdk_call(plan: _Plan):
    """``(base_model, training_dataset, config)`` for google-genai's ``tunings.tune``, as a user would write them."""
    from google.genai import types

    request, model = plan.request, plan.request.model
    config: dict = {}
    if request.method == "distillation":
        config["method"] = "DISTILLATION"
        config["base_teacher_model"] = plan.teacher
    elif request.method == "preference":
        config["method"] = "PREFERENCE_TUNING"
        if request.beta is not None:
            config["beta"] = request.beta
    if model.provider == "open" and (request.method == "sft" or request.tuning_mode != catalog.FULL):
        # Distillation tunes fully unless told otherwise: the seed's call sends no mode.
        config["tuning_mode"] = "TUNING_MODE_" + request.tuning_mode
    if request.epochs is not None:
        config["epoch_count"] = request.epochs
    optional = {
        "learning_rate": request.learning_rate,
        "learning_rate_multiplier": request.learning_rate_multiplier,
        "adapter_size": ADAPTER_SIZES.get(request.adapter_size) if request.adapter_size else None,
        "export_last_checkpoint_only": request.export_last_checkpoint_only,
        "pre_tuned_model_checkpoint_id": request.pre_tuned_model_checkpoint_id,
        "custom_base_model": request.custom_base_model,
        "output_uri": plan.output_uri,
        "tuned_model_display_name": request.tuned_model_display_name,
        "description": request.description,
        "labels": plan.labels or None,
        "batch_size": request.options.get("batch_size"),
    }
    config.update({k: v for k, v in optional.items() if v is not None})
    if plan.validation_uri:
        config["validation_dataset"] = types.TuningValidationDataset(gcs_uri=plan.validation_uri)
    if request.evaluation is not None:
        config["evaluation_config"] = _evaluation_config(request.evaluation, plan.evaluation_uri)
    base_model = request.pre_tuned_model or model.id
    return base_model, types.TuningDataset(gcs_uri=plan.train_uri), types.CreateTuningJobConfig(**config)


def _evaluation_config(spec, output_uri: str):
    """google-genai's EvaluationConfig for evaluation during tuning: the metrics, greedy answers of at most
    ``max_new_tokens``, the results under ``output_uri``. ROUGE-L goes as a RougeSpec, since ``Metric(name=...)``
    lower-cases the name into a ROUGE type the service does not know (``rougel``)."""
    from google.genai import types

    metrics = {"exact_match": types.Metric(name="exact_match"),
               "rouge_l": types.UnifiedMetric(rouge_spec=types.RougeSpec(rouge_type="rougeL"))}
    return types.EvaluationConfig(
        metrics=[metrics[name] for name in spec.metrics],
        output_config=types.OutputConfig(gcs_destination=types.GcsDestination(output_uri_prefix=output_uri)),
        inference_generation_config=types.GenerationConfig(temperature=0, max_output_tokens=spec.max_new_tokens))


def request_body(plan: _Plan) -> dict:
    """The JSON body google-genai sends for this plan, captured from the SDK itself without any network."""
    import httpx
    from google import genai
    from google.genai import types
    from google.oauth2.credentials import Credentials

    captured: list[dict] = []

    def answer(req: httpx.Request) -> httpx.Response:
        captured.append(json.loads(req.content or b"{}"))
        return httpx.Response(200, json={"name": f"{plan.ctx.parent}/tuningJobs/dry-run",
                                         "state": "JOB_STATE_PENDING"})

    capture = genai.Client(
        vertexai=True, project=plan.ctx.project, location=plan.ctx.location,
        credentials=Credentials(token="dry-run"),  # nothing is sent: the transport answers itself
        http_options=types.HttpOptions(httpx_client=httpx.Client(transport=httpx.MockTransport(answer))),
    )
    base_model, dataset, config = plan.call
    with vc.sdk_quiet(), warnings.catch_warnings():
        # As for the real call (client.genai_client): the SDK's notice is not the user's business.
        warnings.filterwarnings("ignore", message="The SDK's tuning implementation is experimental")
        capture.tunings.tune(base_model=base_model, training_dataset=dataset, config=config)
    return captured[0]


def tuned_model_source(base) -> tuple[str, str]:
    """``(tuned model resource, catalog id of its base model)`` for continuing a tuned Gemini model.

    ``base`` is a Vertex AI job (its tuned model) or a ``projects/.../models/...`` name.
    """
    if isinstance(base, Job):
        if getattr(base, "backend", "") != "vertex":
            raise UserError("only a Vertex AI job's tuned Gemini model can be tuned further this way; for a "
                            "local job pass custom_base_model=job.tuned_model", field="base_model")
        tuned = base.tuned_model_name
        if not tuned:
            raise UserError(f"job {base.name} has no tuned model yet ({base.state}); wait for it to succeed",
                            field="base_model")
        base_model = _catalog_gemini(base.config.get("base_model"))
        if not base_model:
            raise UserError(f"job {base.name} did not tune a Gemini model of the catalog "
                            f"({base.config.get('base_model')}); only tuned Gemini models are tuned further",
                            field="base_model")
        return tuned, base_model
    name = str(base)
    ctx = vc.context()
    with vc.api_errors(f"read tuned model {name}", ctx):
        found = vc.genai_client(ctx).models.get(model=name)
    info = getattr(found, "tuned_model_info", None)
    base_model = _catalog_gemini(getattr(info, "base_model", None))
    if not base_model:
        raise UserError(f"{name} is not a tuned Gemini model of the catalog; give the job or the tuned model's name",
                        field="base_model")
    return name, base_model


def _catalog_gemini(label: str | None) -> str | None:
    """The catalog id for the base model a tuned model's label names (labels spell '.' as '-')."""
    if not label:
        return None
    found = catalog.find(label)
    if found is not None:
        return found.id
    spelled = re.sub(r"-0\d\d$", "", label.lower())
    for model in catalog.models(provider="gemini"):
        if spelled in (model.id, model.id.replace(".", "-")):
            return model.id
    return None
