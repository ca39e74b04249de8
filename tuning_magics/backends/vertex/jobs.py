"""Vertex AI tuning jobs as :class:`~tuning_magics.jobs.Job`: watch, cancel, metrics, checkpoints.

A :class:`VertexJob` answers the same questions as a local job. The
service's ``JobState`` names are ours already (UPDATING and PARTIALLY_SUCCEEDED
become the nearest of ours, the latter with a note); its ``tuning_job_state``
(``TUNING_JOB_STATE_WAITING_FOR_QUOTA``, ...) becomes the sub-state
(``WAITING_FOR_QUOTA``, ...). ``tuning_data_stats`` become ``data_stats``,
shown beside what the validator predicted (kept in the job's labels). Whether a
job tuned Gemini is its base model's business (``is_gemini``), and a look the
service answers with a 429 or 5xx, or a dropped connection, keeps the last
snapshot and says so (``retrying``) instead of failing.
"""

from __future__ import annotations

import re
import time

from ... import catalog
from ...errors import UserError
from ...jobs import (
    JOB_STATE_CANCELLED,
    JOB_STATE_FAILED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    STATES,
    TERMINAL_STATES,
    Checkpoint,
    Job,
    JobInfo,
    Progress,
    metrics_frame,
)
from . import client as vc

#: The labels tuning_magics puts on every job (lineage the user can filter on).
LABEL_VERSION = "tuning-magics"
LABEL_DATASET = "tm-dataset"
#: The validator's predicted counts, so a job read back in another session still compares them.
LABEL_PREDICTED = {"examples": "tm-examples", "billable_tokens": "tm-billable-tokens",
                   "truncated_examples": "tm-truncated", "dropped_examples": "tm-dropped"}

_JOB_NAME = re.compile(r"projects/[^/]+/locations/[^/]+/tuningJobs/[^/]+")
#: Pauses (seconds) between the quick tries of a job's first read, which has no snapshot to show meanwhile.
FIRST_READ_PAUSES = (0.5, 1.0, 2.0)
#: The longest pause between looks while the service keeps answering 429 or 5xx, or the connection drops.
MAX_BACKOFF = 60.0


class VertexJob(Job):
    """A tuning job on Vertex AI."""

    backend = "vertex"

    def __init__(self, name: str, *, ctx: vc.Context | None = None, _job=None):
        self._name = name
        self._ctx = ctx
        self._raw = _job
        self._metrics = None  # (the snapshot they were read with, the frame)
        self._misses = 0  # looks in a row that failed for a reason that passes
        super().__init__(_info(_job) if _job is not None else None)

    @property
    def name(self) -> str:
        return self._name

    @property
    def ctx(self) -> vc.Context:
        if self._ctx is None:
            self._ctx = vc.context(resource=self._name)
        return self._ctx

    @property
    def raw(self):
        """The service's own ``TuningJob`` (google-genai type) of the last snapshot."""
        self.info  # noqa: B018 - a fresh snapshot when the last one is stale
        return self._raw

    def poll_interval(self, looks: int) -> float:
        """A tuning job takes minutes to days: look after 1 s, then less and less often, every 15 s at most.

        While looks fail for a reason that passes, the pause doubles with each, up to :data:`MAX_BACKOFF`.
        """
        usual = min(15.0, 1.5 ** looks)
        return max(usual, min(MAX_BACKOFF, 2.0 ** self._misses)) if self._misses else usual

    def _fetch(self) -> JobInfo:
        """The job as the service has it now.

        A look that fails for a reason that passes (429, 5xx, a dropped connection:
        :func:`~.client.transient`) never makes the job look failed: the last snapshot
        stands, ``retrying`` says what happened, and ``poll_interval`` backs off. A first
        read, with no snapshot yet, tries a few times quickly before it gives up with
        one line. Any other error (403, 404, ...) is one UserError line at once.
        """
        ctx = self.ctx
        pauses = FIRST_READ_PAUSES if self._info is None else ()
        for pause in (*pauses, None):
            try:
                with vc.api_errors(f"read tuning job {self._name}", ctx), vc.sdk_quiet():
                    raw = vc.genai_client(ctx).tunings.get(name=self._name)
                break
            except UserError as exc:
                why = getattr(exc, "transient", None)
                if not why or (pause is None and self._info is None):
                    raise
                if pause is not None:
                    time.sleep(pause)
                    continue
                self._misses += 1
                self.retrying = f"{why} to the last look ({self._misses} in a row); the state shown is the last read"
                return self._info
        self._misses, self.retrying = 0, None
        self._raw = raw
        return _info(raw)

    def cancel(self) -> VertexJob:
        """Ask the service to stop the job; it goes CANCELLING, then CANCELLED. An ended job is left as it is."""
        if self.refresh().done:
            return self
        with vc.api_errors(f"cancel tuning job {self._name}", self.ctx):
            vc.genai_client(self.ctx).tunings.cancel(name=self._name)
        return self.refresh()

    def resume(self) -> VertexJob:
        raise UserError(
            f"Vertex AI does not resume a {self.state} job; submit it again with tune(...) (a tuned Gemini model "
            "continues from a checkpoint with tune(base_model=job, pre_tuned_model_checkpoint_id=...))"
        )

    def metrics(self):
        """Training and evaluation loss and next-token accuracy per step, read from the job's experiment.

        Read once per snapshot of the job: ``progress()`` and a monitor's update ask
        for them together, and each read is several calls to the service. When no
        curve can be found, ``metrics_note`` (and the frame's ``attrs["note"]``) says
        why in one line; it is None otherwise.
        """
        from .metrics import evaluation_rows, read_metrics

        raw = self.raw  # a fresh snapshot when the last one is stale
        if self._metrics is not None and self._metrics[0] is raw:
            return self._metrics[1].copy()
        experiment = getattr(raw, "experiment", None)
        if experiment:
            ctx = self.ctx
            with vc.api_errors(f"read the metrics of tuning job {self._name}", ctx):
                rows, note = read_metrics(experiment, project=ctx.project, location=ctx.location,
                                          credentials=ctx.credentials, api_endpoint=ctx.api_endpoint)
        elif self.done:
            rows, note = [], "no loss curve: the job ended before tuning started (it has no experiment)"
        else:
            rows, note = [], "no loss curve yet: Vertex AI logs the metrics once tuning starts"
        frame = metrics_frame(rows + evaluation_rows(raw))
        if note:
            frame.attrs["note"] = note
        self.metrics_note = note
        self._metrics = (raw, frame)
        return frame.copy()

    def progress(self) -> Progress:
        """The step reached (from the experiment's metrics) of the steps the service planned (its data stats)."""
        seen = super().progress()
        total = getattr(_dataset_stats(getattr(self.raw, "tuning_data_stats", None)), "tuning_step_count", None)
        if self.succeeded and total:
            return Progress(int(total), int(total), seen.epochs, seen.epochs)
        return Progress(seen.step, int(total) if total else None, seen.epoch, seen.epochs)

    def _answerer(self, checkpoint: str, *, batch_size: int = 16, batch_from: int | None = None):
        """A Gemini job's base or final model answers online, or from ``batch_from`` uncached prompts through a
        batch prediction job (see :mod:`.answer`); checkpoints, and open models' endpoints, answer online."""
        online = super()._answerer(checkpoint)
        if batch_from is None or not self.is_gemini or checkpoint not in ("base", "final"):
            return online
        from .answer import GeminiAnswerer

        base = str((self.config or {}).get("base_model") or "")
        model = f"publishers/google/models/{base}" if checkpoint == "base" else self.tuned_model_name
        if not model or (checkpoint == "base" and not base.startswith("gemini-")):
            return online
        return GeminiAnswerer(online, model=model, ctx=self.ctx, batch_from=batch_from)

    @property
    def is_gemini(self) -> bool:
        """Whether the job tuned a Gemini model, as its base model's catalog entry says.

        Never decided by the tuned model: the service registers tuned open models in
        the Model Registry too, so a finished open-model job carries ``tuned_model.model``
        as well (google-genai's ``TunedModel``: ``model``, ``endpoint``, ``checkpoints``).
        A base model the catalog does not know is Gemini when its id says so; a job
        continued from a tuned model whose base the service did not name is Gemini,
        as only Gemini models are tuned further.
        """
        base = str((self.config or {}).get("base_model") or "")
        if not base:
            return getattr(self.raw, "pre_tuned_model", None) is not None
        found = catalog.find(base)
        return found.provider == "gemini" if found is not None else base.startswith("gemini-")

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Gemini: the tuned model's checkpoints. Open models: the output folder's ``checkpoint-N`` and ``final``."""
        if self.is_gemini:
            tuned = getattr(self.raw, "tuned_model", None)
            found = []
            for ck in (getattr(tuned, "checkpoints", None) or []):
                step = int(ck.step) if ck.step is not None else None
                found.append(Checkpoint(f"checkpoint-{ck.checkpoint_id}", step, ck.endpoint or tuned.model or ""))
            if getattr(tuned, "endpoint", None):
                found.append(Checkpoint("final", None, tuned.endpoint))
            return found
        out = self.output_uri
        if not out or self.state not in (JOB_STATE_SUCCEEDED, JOB_STATE_FAILED, JOB_STATE_CANCELLED):
            return []
        from ... import storage
        from .endpoints import CHECKPOINTS_FOLDER

        root = f"{out.rstrip('/')}/{CHECKPOINTS_FOLDER}/"
        with vc.api_errors(f"list the checkpoints of {self._name}", self.ctx):
            uris = storage.list_uris(root)
        names = sorted({u[len(root):].split("/", 1)[0] for u in uris if u.startswith(root) and "/" in u[len(root):]})
        steps = [(int(n.split("-", 1)[1]), n) for n in names if re.fullmatch(r"checkpoint-\d+", n)]
        result = [Checkpoint(n, s, root + n) for s, n in sorted(steps)]
        if "final" in names:
            result.append(Checkpoint("final", None, root + "final"))
        return result

    @property
    def error_summary(self) -> str | None:
        """The service's own message, first sentence: its error text goes on with details (traces, codes)."""
        message = getattr(getattr(self.raw, "error", None), "message", None)
        return vc.first_sentence(message) or super().error_summary

    @property
    def tuned_model_name(self) -> str | None:
        """The tuned model's Model Registry name (``projects/.../models/...@1``) once the service gave one, else None.

        Gemini jobs have one, and so may open-model jobs: :attr:`is_gemini` tells them apart.
        """
        tuned = getattr(self.raw, "tuned_model", None)
        return getattr(tuned, "model", None)

    @property
    def endpoint(self) -> str | None:
        """The endpoint that serves a tuned Gemini model, else None."""
        tuned = getattr(self.raw, "tuned_model", None)
        return getattr(tuned, "endpoint", None)

    def _check_export(self, format: str, checkpoint: str) -> None:
        if self.is_gemini:
            raise UserError(f"job {self.id} tuned Gemini, whose tuned weights stay inside Vertex AI and cannot be "
                            "exported; serve it there with job.deploy() or job.chat(), or answer many prompts with "
                            "batch prediction (job.evaluate(batch_from=...))", field="format")
        from ...errors import require_extra
        from . import export

        require_extra("local")  # transformers reads the checkpoint and answers with it
        export.check(self, format, checkpoint)

    def _export_config(self, checkpoint: str) -> dict:
        from . import export

        return export.config(self, checkpoint)

    def _export_bytes(self, format: str, checkpoint: str) -> int:
        from . import export

        return export.export_bytes(self, checkpoint)

    def _write_export(self, format: str, checkpoint: str, folder) -> None:
        from . import export

        export.write(self, checkpoint, folder)

    def _export_reference(self, prompts, checkpoint: str, hf):
        from . import export

        return export.reference(prompts, hf)

    def chat(self, messages_or_text, *, checkpoint: str | None = None, stream: bool = False, **gen):
        """Reply with the tuned Gemini model (any checkpoint), or with the endpoint ``deploy()`` made."""
        from .endpoints import chat_with_job

        return chat_with_job(self, messages_or_text, checkpoint=checkpoint, stream=stream, **gen)

    def deploy(self, **options):
        """Deploy the tuned open model through Model Garden (default ``g2-standard-12`` with one NVIDIA L4)."""
        from .endpoints import deploy_job

        return deploy_job(self, **options)


def get(name: str) -> VertexJob:
    """The Vertex AI job with this resource name (``projects/P/locations/L/tuningJobs/ID``)."""
    if not _JOB_NAME.fullmatch(name):
        raise UserError(f"{name!r} is not a Vertex AI tuning job name (projects/P/locations/L/tuningJobs/ID); "
                        "list_jobs() shows them", field="name")
    job = VertexJob(name)
    job.refresh()
    return job


def find(limit: int | None = None) -> list[VertexJob]:
    """The project's tuning jobs in the configured location, newest first."""
    ctx = vc.context()
    out = []
    with vc.api_errors("list tuning jobs", ctx), vc.sdk_quiet():
        pager = vc.genai_client(ctx).tunings.list(config={"page_size": min(limit or 100, 100)})
        for raw in pager:
            out.append(VertexJob(raw.name, ctx=ctx, _job=raw))
            if limit is not None and len(out) >= limit:
                break
    return out


# -- the service's job -> JobInfo --------------------------------------------------------


def _enum_name(value) -> str | None:
    if value is None:
        return None
    return getattr(value, "name", None) or str(value)


#: The service's JobStates that are not ours, and the nearest of ours (aiplatform_v1beta1's job_state.py:
#: UPDATING "goes back to the RUNNING state", PARTIALLY_SUCCEEDED "some results may be missing due to errors").
_NEAREST_STATE = {"JOB_STATE_UPDATING": JOB_STATE_RUNNING, "JOB_STATE_PARTIALLY_SUCCEEDED": JOB_STATE_SUCCEEDED}


def _info(raw) -> JobInfo:
    service_state = _enum_name(raw.state) or "JOB_STATE_PENDING"
    state = service_state if service_state in STATES else _NEAREST_STATE.get(service_state, "JOB_STATE_PENDING")
    note = None
    if service_state == "JOB_STATE_PARTIALLY_SUCCEEDED":
        said = vc.first_sentence(getattr(raw.error, "message", None) or "") if raw.error is not None else ""
        note = ("the service reports JOB_STATE_PARTIALLY_SUCCEEDED: some results may be missing"
                + (f" ({said})" if said else "") + "; check the checkpoints before using them")
    substate = _enum_name(getattr(raw, "tuning_job_state", None))
    if substate:
        substate = substate.removeprefix("TUNING_JOB_STATE_")
        if substate == "UNSPECIFIED" or state in TERMINAL_STATES:
            substate = None
    error = None
    if raw.error is not None and (raw.error.message or raw.error.code):
        error = f"{raw.error.message or ''} (code {raw.error.code})".strip()
        if raw.error.details:
            error += "\n" + "\n".join(map(str, raw.error.details))
    labels = dict(raw.labels or {})
    return JobInfo(
        name=raw.name,
        state=state,
        display_name=raw.tuned_model_display_name,
        substate=substate,
        error=error,
        config=_config(raw, labels),
        output_uri=_output_uri(raw),
        created=raw.create_time,
        started=raw.start_time,
        ended=raw.end_time,
        attempts=1 if raw.start_time else 0,
        data_stats=_data_stats(raw.tuning_data_stats),
        note=note,
    )


def _output_uri(raw) -> str | None:
    if raw.output_uri:
        return raw.output_uri
    spec = raw.supervised_tuning_spec or raw.distillation_spec
    return getattr(spec, "output_uri", None) if spec is not None else None


def _config(raw, labels: dict) -> dict:
    sft, distill = raw.supervised_tuning_spec, raw.distillation_spec
    prefer = getattr(raw, "preference_optimization_spec", None)
    spec = sft or distill or prefer
    hyper = getattr(spec, "hyper_parameters", None)
    mode = _enum_name(getattr(spec, "tuning_mode", None) or getattr(hyper, "tuning_mode", None))
    adapter = _enum_name(getattr(hyper, "adapter_size", None))
    predicted = {key: int(labels[label]) for key, label in LABEL_PREDICTED.items()
                 if str(labels.get(label, "")).isdigit()}
    config = {
        "base_model": raw.base_model or getattr(getattr(raw, "pre_tuned_model", None), "base_model", None),
        "custom_base_model": raw.custom_base_model,
        "tuning_mode": (mode or "").removeprefix("TUNING_MODE_") or None,
        "method": "distillation" if distill is not None else "preference" if prefer is not None else "sft",
        "base_teacher_model": getattr(distill, "base_teacher_model", None),
        "epochs": int(hyper.epoch_count) if getattr(hyper, "epoch_count", None) else None,
        "learning_rate": getattr(hyper, "learning_rate", None),
        "learning_rate_multiplier": getattr(hyper, "learning_rate_multiplier", None),
        "adapter_size": _ADAPTER_NUMBERS.get(adapter or ""),
        "beta": getattr(hyper, "beta", None),
        "train_dataset": getattr(sft or prefer, "training_dataset_uri", None)
        or getattr(distill, "prompt_dataset_uri", None),
        "validation_dataset": getattr(spec, "validation_dataset_uri", None),
        "output_uri": _output_uri(raw),
        "labels": labels,
        "description": raw.description,
        "experiment": raw.experiment,
    }
    if config["tuning_mode"] == "PEFT_ADAPTER" or adapter:
        config["tuning_mode"] = config["tuning_mode"] or "PEFT_ADAPTER"
    if predicted:
        config["predicted_stats"] = predicted
    return config


_ADAPTER_NUMBERS = {"ADAPTER_SIZE_ONE": 1, "ADAPTER_SIZE_TWO": 2, "ADAPTER_SIZE_FOUR": 4,
                    "ADAPTER_SIZE_EIGHT": 8, "ADAPTER_SIZE_SIXTEEN": 16, "ADAPTER_SIZE_THIRTY_TWO": 32}
ADAPTER_SIZES = {n: name for name, n in _ADAPTER_NUMBERS.items()}


def _dataset_stats(stats):
    """The counts inside the service's ``tuning_data_stats``, wherever the tuning method keeps them."""
    if stats is None:
        return None
    distillation = getattr(stats, "distillation_data_stats", None)
    return (getattr(stats, "supervised_tuning_data_stats", None)
            or getattr(distillation, "training_dataset_stats", None)
            or getattr(stats, "preference_optimization_data_stats", None))


def _data_stats(stats) -> dict | None:
    """The service's counts as :data:`~tuning_magics.jobs.DATA_STAT_NAMES`, with the samples it lists.

    What the fields mean is google-genai's types.py (SupervisedTuningDataStats,
    DatasetStats): counts come from the ``total_*`` fields; ``total_truncated_example_count``
    counts the examples cut or dropped (too many tokens, an image that cannot be opened, ...);
    ``truncated_example_indices`` (SFT) and ``dropped_example_indices`` (distillation) are
    "a partial sample of the indices (starting from 1)", so they are kept as samples, never
    counted. The service gives no total of dropped examples apart from that one count:
    ``dropped_examples`` stays unknown. proto3's JSON leaves out a count of 0, so once the
    service has counted the examples, a count its stats type has but did not send is 0.
    """
    inner = _dataset_stats(stats)
    if inner is None:
        return None
    counted = getattr(inner, "tuning_dataset_example_count", None) is not None

    def total(name):
        value = getattr(inner, name, None)
        if value is not None:
            return int(value)
        return 0 if counted and name in type(inner).model_fields else None

    out = {
        "examples": total("tuning_dataset_example_count"),
        "billable_tokens": total("total_billable_token_count"),
        "truncated_examples": total("total_truncated_example_count"),
        "dropped_examples": None,
    }
    for name in ("truncated_example_indices", "dropped_example_indices", "dropped_example_reasons"):
        found = getattr(inner, name, None)
        if found:
            out[name] = [int(i) for i in found] if name.endswith("indices") else list(found)
    return out
