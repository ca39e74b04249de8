"""The backend-neutral tuning job: what the display layer and users see.

Both backends (the embedded local engine and Vertex AI) return a :class:`Job`.
State and sub-state names are the managed service's own, so code written
against one backend reads the same against the other.

Attributes (``state``, ``substate``, ``error``, ...) show the job as it was
at most ``Job.max_age`` seconds ago: reading them on a job that has not ended
fetches a fresh snapshot when the last one is older than that, so
``job.state`` in a notebook cell is always current, while several attributes
read together come from one consistent snapshot. ``refresh()`` forces a fetch.
A job that has ended never changes again (until ``resume()``), so it is not
fetched again.

``wait()`` returns the job whatever its final state: a failed job is a result
to look at (``job.error``), not an exception, unless ``wait(raise_on_failure=True)``
is asked for, which raises :class:`JobFailedError` with the job's error.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

JOB_STATE_QUEUED = "JOB_STATE_QUEUED"
JOB_STATE_PENDING = "JOB_STATE_PENDING"
JOB_STATE_RUNNING = "JOB_STATE_RUNNING"
JOB_STATE_SUCCEEDED = "JOB_STATE_SUCCEEDED"
JOB_STATE_FAILED = "JOB_STATE_FAILED"
JOB_STATE_CANCELLING = "JOB_STATE_CANCELLING"
JOB_STATE_CANCELLED = "JOB_STATE_CANCELLED"
#: Vertex AI only: the job waited too long for resources and will not run.
JOB_STATE_EXPIRED = "JOB_STATE_EXPIRED"
#: Vertex AI only: the service paused the job; it may go on later.
JOB_STATE_PAUSED = "JOB_STATE_PAUSED"

STATES = (
    JOB_STATE_QUEUED,
    JOB_STATE_PENDING,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    JOB_STATE_FAILED,
    JOB_STATE_CANCELLING,
    JOB_STATE_CANCELLED,
    JOB_STATE_EXPIRED,
    JOB_STATE_PAUSED,
)
TERMINAL_STATES = frozenset({JOB_STATE_SUCCEEDED, JOB_STATE_FAILED, JOB_STATE_CANCELLED, JOB_STATE_EXPIRED})
#: States in which a worker (or the service) is working on the job.
ACTIVE_STATES = frozenset({JOB_STATE_PENDING, JOB_STATE_RUNNING, JOB_STATE_CANCELLING})

# Sub-states of a job that has not ended, in the order a job passes through them.
WAITING_FOR_QUOTA = "WAITING_FOR_QUOTA"  # Vertex AI: queued behind the project's tuning quota
DISTILLING = "DISTILLING"  # local distillation: the teacher labels the prompts
PROCESSING_DATASET = "PROCESSING_DATASET"
WAITING_FOR_CAPACITY = "WAITING_FOR_CAPACITY"  # Vertex AI: waiting for accelerators
TUNING = "TUNING"
POST_PROCESSING = "POST_PROCESSING"
EVALUATING = "EVALUATING"  # local tuning: the model just saved answers the evaluation examples
SUBSTATES = (WAITING_FOR_QUOTA, DISTILLING, PROCESSING_DATASET, WAITING_FOR_CAPACITY, TUNING, EVALUATING,
             POST_PROCESSING)
#: Sub-states in which a job waits for the service rather than works.
WAITING_SUBSTATES = frozenset({WAITING_FOR_QUOTA, WAITING_FOR_CAPACITY})

#: Columns of :meth:`Job.metrics`, in this order (extra columns a backend records follow them).
METRIC_COLUMNS = ("step", "epoch", "train_loss", "eval_loss", "token_accuracy", "learning_rate", "tokens_per_second")


class JobFailedError(RuntimeError):
    """Raised by ``wait(raise_on_failure=True)`` when the job failed; ``.job`` is the job."""

    def __init__(self, job: Job):
        self.job = job
        summary = job.error_summary or "no error text was recorded"
        super().__init__(f"tuning job {job.name} failed: {summary} (job.error has the full text)")


@dataclass(frozen=True)
class JobInfo:
    """One snapshot of a job, as a backend reports it."""

    name: str
    state: str
    display_name: str | None = None
    substate: str | None = None
    error: str | None = None
    config: dict = field(default_factory=dict)
    output_uri: str | None = None
    created: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    attempts: int = 0
    #: What the service counted in the dataset (Vertex AI's ``tuning_data_stats``), in
    #: :data:`DATA_STAT_NAMES` keys; None until it has counted.
    data_stats: dict | None = None
    #: A word on how the job ended, e.g. "stopped early at step 12 of 48; final is checkpoint-8".
    note: str | None = None


#: The dataset figures both our validator and the service report, for :meth:`Job.data_stats`.
DATA_STAT_NAMES = ("examples", "billable_tokens", "truncated_examples", "dropped_examples")

#: A job that waited longer than this for quota or capacity gets the resubmit hint.
LONG_WAIT_SECONDS = 3600.0


@dataclass(frozen=True)
class TuneRequest:
    """One checked tuning request, as ``tune()`` hands it to a backend.

    Everything that holds for every backend has been checked (the model is in
    the catalog, the mode, method, teacher and numbers are valid); each
    backend checks what only it knows (memory and local folders for the local
    engine; region, bucket and credentials for Vertex AI) and prepares the
    datasets its own way. ``train_dataset`` and ``validation_dataset`` are what
    the user passed (DataFrame, records, path, gs:// URI or Dataset).
    """

    model: Any  # catalog.Model
    train_dataset: Any
    method: str = "sft"
    tuning_mode: str = "FULL"
    validation_dataset: Any = None
    custom_base_model: str | None = None
    base_teacher_model: str | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    learning_rate_multiplier: float | None = None
    adapter_size: int | None = None
    output_uri: str | None = None
    tuned_model_display_name: str | None = None
    description: str | None = None
    labels: dict = field(default_factory=dict)
    #: A tuned model to continue tuning (Vertex AI: ``projects/.../models/...``).
    pre_tuned_model: str | None = None
    pre_tuned_model_checkpoint_id: str | None = None
    export_last_checkpoint_only: bool | None = None
    #: Preference tuning: how far the model may move from where it started (DPO's beta; None: the default).
    beta: float | None = None
    #: Task metrics scored on each checkpoint during tuning (:class:`~tuning_magics.evaluation.during.DuringTuning`).
    evaluation: Any = None
    #: Backend-specific options (the local engine's ``batch_size``, ``max_seq_len``, ...).
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DryRun:
    """What ``tune(..., dry_run=True)`` would submit, with nothing uploaded or submitted.

    ``request`` is the exact body the backend would send (for Vertex AI, the JSON
    google-genai builds for ``tunings.tune``); ``uploads`` maps each local file to the
    ``gs://`` name it would be uploaded to; ``billed_tokens`` and ``cost_usd`` are
    estimates from the validated datasets (``cost_usd`` None where no price is published).
    """

    backend: str
    model: str
    request: dict
    billed_tokens: int
    cost_usd: float | None = None
    predicted_stats: dict = field(default_factory=dict)
    uploads: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        import json

        cost = "no published price" if self.cost_usd is None else f"about ${self.cost_usd:,.2f}"
        lines = [f"dry run on {self.backend}: nothing was uploaded or submitted",
                 f"model {self.model}; billed training tokens {self.billed_tokens:,} ({cost})"]
        lines += [f"would upload {src} -> {dst}" for src, dst in self.uploads.items()]
        lines += list(self.notes)
        lines.append(json.dumps(self.request, indent=2, sort_keys=True, default=str))
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


@dataclass(frozen=True)
class Progress:
    """How far training has come: the step of ``total_steps`` and the epoch of ``epochs`` (None where unknown)."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    epochs: int | None = None
    #: Training ended at ``step``, short of ``total_steps``, because stopping early was asked for.
    stopped_early: bool = False

    @property
    def fraction(self) -> float | None:
        """Share of the training done, 0 to 1 (None while the total is unknown)."""
        if self.step is None or not self.total_steps:
            return None
        return min(1.0, max(0.0, self.step / self.total_steps))


class Reply(Iterator[str]):
    """A streamed reply (``job.chat(..., stream=True)``): its text pieces as they come, then why it ended.

    Once read to its end, ``finish_reason`` is ``"stop"`` (the model ended it, or a
    stop sequence did) or ``"length"`` (cut at ``max_new_tokens``), and ``tokens`` is
    how many tokens of text it has (an end-of-turn token not counted). Both stay
    None where the backend does not say, or the reply was not read to its end.
    """

    def __init__(self, pieces, ended=None):
        self._pieces = iter(pieces)
        self._ended = ended  # called once the pieces are done: returns (finish_reason, tokens)
        self.finish_reason: str | None = None
        self.tokens: int | None = None

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration:
            if self._ended is not None:
                ended, self._ended = self._ended, None
                self.finish_reason, self.tokens = ended()
            raise

    def close(self) -> None:
        """Stop reading: the backend stops generating."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


@dataclass
class TrainingChats:
    """What the conversations a job trained on looked like (:meth:`Job.training_chats`), to chat in the same shape."""

    examples: int
    #: The system prompt most examples had (None: none had one), and how many had it.
    system_prompt: str | None
    with_system_prompt: int
    #: The longest example: most user turns, and most tokens (the model's tokenizer; an estimate without it).
    longest_turns: int
    longest_tokens: int
    tokens_estimated: bool
    counter: Any = field(default=None, repr=False)  # the datasets.tokens.TokenCounter that counted them

    def tokens(self, messages: list[dict]) -> int:
        """Tokens of a conversation, counted as the training examples were."""
        return self.counter.count(messages)

    @classmethod
    def read(cls, path, model_id: str | None) -> TrainingChats:
        """The shape of the conversations in the JSONL file ``path`` (local or ``gs://``, any accepted format)."""
        from collections import Counter

        from . import storage
        from .datasets.formats import read_conversations
        from .datasets.tokens import TokenCounter

        with storage.local_copy(path) as local:
            conversations = read_conversations(local)
        counter = TokenCounter(model_id)
        prompts = Counter(c[0]["content"] for c in conversations if c and c[0]["role"] == "system")
        system, with_system = prompts.most_common(1)[0] if prompts else (None, 0)
        return cls(examples=len(conversations), system_prompt=system, with_system_prompt=with_system,
                   longest_turns=max((sum(m["role"] == "user" for m in c) for c in conversations), default=0),
                   longest_tokens=max(counter.count_many(conversations), default=0),
                   tokens_estimated=counter.estimated, counter=counter)


@dataclass(frozen=True)
class Checkpoint:
    """One saved model: ``checkpoint-N`` (``step`` N) or ``final`` (``step`` None)."""

    name: str
    step: int | None
    uri: str

    def __str__(self) -> str:
        return self.uri


def now() -> datetime:
    """The current time in UTC (one clock for the time a job has spent)."""
    return datetime.now(timezone.utc)


def timestamp(seconds: float | None) -> datetime | None:
    """A UTC datetime for seconds since the epoch (None stays None)."""
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


class Job(ABC):
    """A tuning job on any backend. Subclasses implement ``_fetch`` and the actions."""

    #: Seconds a snapshot of a job that has not ended is trusted before attributes fetch a new one.
    max_age: float = 0.5
    #: "local" or "vertex".
    backend: str = ""
    #: While the last look at the job failed for a reason that passes (the service's 429 or 5xx, a
    #: dropped connection): what happened, in one line. The snapshot is then the last one read, and
    #: looks come less often until one succeeds. None otherwise.
    retrying: str | None = None
    #: Why :meth:`metrics` found no curve to show, in one line (None when it found one, or found
    #: nothing worth a word).
    metrics_note: str | None = None

    def __init__(self, info: JobInfo | None = None):
        self._info = info
        self._fetched_at = time.monotonic() if info is not None else 0.0
        self._training_chats: TrainingChats | None = None

    # -- what a backend provides -------------------------------------------------
    @abstractmethod
    def _fetch(self) -> JobInfo:
        """Read the job's current snapshot from the backend."""

    @abstractmethod
    def cancel(self) -> Job:
        """Ask the job to stop; a queued job is cancelled at once. Returns the job."""

    @abstractmethod
    def resume(self) -> Job:
        """Queue a FAILED or CANCELLED job again, continuing from its last complete checkpoint."""

    @abstractmethod
    def metrics(self):
        """A pandas DataFrame, one row per step, with the columns of :data:`METRIC_COLUMNS`."""

    @property
    @abstractmethod
    def checkpoints(self) -> list[Checkpoint]:
        """The complete checkpoints so far, in step order, ``final`` last when there is one."""

    def chat(self, messages_or_text, *, checkpoint: str | None = None, stream: bool = False,
             **gen) -> str | Iterator[str]:
        """Reply to a text or a list of chat messages with the tuned model (or ``checkpoint``)."""
        raise NotImplementedError(f"chat is not available for {type(self).__name__}")

    def deploy(self, **options):
        """Serve the tuned model behind an endpoint; returns the endpoint."""
        raise NotImplementedError(f"deploy is not available for {type(self).__name__}")

    @property
    def can_chat(self) -> bool:
        """Whether this backend's jobs answer chat() (the base class refuses)."""
        return type(self).chat is not Job.chat

    def evaluate(self, data=None, metrics=None, *, checkpoints="all", baseline: bool = True,
                 max_new_tokens: int | None = None, limit: int | None = 1000, judge=None, batch_from: int | None = 500):
        """Did tuning help? Score the base model, the checkpoints and the tuned model on the same examples.

        ``data``: anything ``tune()`` takes (default: the job's validation set;
        ``"train"``: its training set, to measure how much of it the model recalls);
        each example's last assistant turn is the reference. ``metrics``: names
        (``exact_match``, ``contains``, ``token_f1``, ``rouge_l``, ``valid_json``,
        ``json_equal``), :mod:`~tuning_magics.evaluation.metrics` objects or functions
        ``(answer, reference, example) -> float``; default exact match.
        ``checkpoints``: ``"all"``, a list of names, or None for ``final`` only;
        ``baseline`` adds the model before tuning. Answers are greedy and cached by
        content. ``judge``: a chat model that grades the answers (a
        :class:`~tuning_magics.evaluation.judge.Judge`, a job or endpoint, or an
        OpenAI-compatible base URL): its 1-5 grades become the metric ``judge``,
        and it compares the tuned model with the base pairwise (``win_rate()``).
        ``batch_from``: Gemini on Vertex AI answers online a few at a time, and from
        this many answers not yet cached through one batch prediction job (half the
        price, no rate limit, minutes to start); None: always online.
        Returns an :class:`~tuning_magics.evaluation.Evaluation`.
        """
        from .evaluation import evaluate_job

        return evaluate_job(self, data, metrics, checkpoints=checkpoints, baseline=baseline,
                            max_new_tokens=max_new_tokens, limit=limit, judge=judge, batch_from=batch_from)

    def checkpoint_scores(self):
        """Evaluation during tuning (``tune(evaluation=...)``): a DataFrame, one row per model scored while the
        job trained (``base`` at step 0, then each checkpoint by name), with its ``step`` and a column per
        metric; empty when the job evaluates nothing during tuning."""
        from .evaluation.during import checkpoint_scores

        return checkpoint_scores(self.metrics(), self.checkpoints)

    def best_checkpoint(self, metric: str | None = None) -> str | None:
        """The checkpoint to keep by a task metric scored during tuning (default: the first one), not by loss;
        a tie goes to the earliest. None when the job scored none. ``job.chat(checkpoint=job.best_checkpoint())``."""
        from .evaluation.during import best_checkpoint

        return best_checkpoint(self.checkpoint_scores(), metric)

    def _answerer(self, checkpoint: str, *, batch_size: int = 16, batch_from: int | None = None):
        """What answers evaluation prompts as ``checkpoint`` (``base``, a checkpoint's name, ``final``):
        ``chat()`` one example at a time here; backends that can batch override it (``batch_size`` prompts per
        generate call on the local engine; a batch prediction job from ``batch_from`` prompts on Vertex AI)."""
        from .evaluation import ChatAnswerer

        asked = None if checkpoint == "final" else checkpoint
        return ChatAnswerer(checkpoint, f"job:{self.id}:{checkpoint}",
                            lambda messages, **gen: self.chat(messages, checkpoint=asked, **gen))

    def _validation_file(self) -> str | None:
        """The job's validation data: a Vertex AI job records its gs:// URI; backends with their own copy override."""
        path = (self.config or {}).get("validation_dataset")
        return path if isinstance(path, str) and path.startswith("gs://") else None

    def arena(self, prompts, *, against="base", checkpoint: str = "final", name: str | None = None,
              max_new_tokens: int = 128):
        """Two models answer ``prompts`` side by side, anonymous and in random order, and you vote
        (:class:`~tuning_magics.arena.Arena`): this job's ``checkpoint`` against ``against``, which is another of
        its checkpoints (``"base"``, ``"checkpoint-8"``), another job, ``(job, checkpoint)``, or anything with
        ``chat()``. Votes are kept on disk as they are cast; the same arena again continues where they stop."""
        from .arena import Arena

        other = (self, against) if isinstance(against, (str, int)) else against
        return Arena((self, checkpoint), other, prompts, name=name, max_new_tokens=max_new_tokens)

    def export(self, format: str = "hf", path=None, *, checkpoint: str = "final", quantization: str = "f16",
               verify: bool = True, sample: int = 8, overwrite: bool = False):
        """Write the tuned model (or ``checkpoint``) for another runtime, and prove it answers the same.

        ``format``: ``"hf"`` (a self-contained Hugging Face folder, a LoRA adapter merged in), ``"peft"`` (a
        LoRA job's adapter alone), ``"gguf"`` (one file for llama.cpp, at ``quantization`` ``f16``, ``bf16``,
        ``q8_0`` or ``f32``) or ``"ollama"`` (the GGUF and a Modelfile). ``path``: where (default:
        ``exports/<checkpoint>-<format>`` in a local job's folder; a Vertex AI open-model job's checkpoint is
        downloaded from Cloud Storage into ``exports/<job id>/`` of the data home). The exported model is loaded
        by its runtime on its own and asked ``sample`` of the job's prompts; it is kept only when its answers are
        ``job.chat``'s (all of them; most, for rounded weights; for a Vertex AI job, whose model answers only once
        deployed, a GGUF's must be its checkpoint's in transformers, and an ``"hf"`` folder, which is that
        checkpoint, must load on its own and answer the prompts). Returns an :class:`~tuning_magics.export.Export`.
        """
        from .export import export_job

        return export_job(self, format, path, checkpoint=checkpoint, verify=verify, sample=sample,
                          overwrite=overwrite, quantization=quantization)

    def _check_export(self, format: str, checkpoint: str) -> None:
        """A one-line UserError when this job cannot be exported in ``format``; backends that can override it."""
        from .errors import UserError

        raise UserError(f"job {self.id} cannot be exported from this backend ({self.backend or type(self).__name__})",
                        field="format")

    def _export_reference(self, prompts: list[list[dict]], checkpoint: str, hf: Path | None):
        """The answers an export of ``checkpoint`` must give to ``prompts``, and what gave them: the tuned model
        through the engine (``job.chat``, greedy). ``hf`` is the ``"hf"`` folder a GGUF export was made from."""
        from .export import MAX_NEW_TOKENS

        asked = None if checkpoint == "final" else checkpoint
        return [self.chat(p, checkpoint=asked, temperature=0, max_new_tokens=MAX_NEW_TOKENS) for p in prompts], \
            "job.chat"

    def _export_home(self) -> Path:
        """Where exports go by default."""
        from .paths import data_home

        return data_home() / "exports" / self.id

    def _export_config(self, checkpoint: str) -> dict:
        """The checkpoint's model config (``config.json``), read before anything is written."""
        return {}

    def _export_bytes(self, format: str, checkpoint: str) -> int:
        """About how many bytes the export takes (checked against the disk's free space first)."""
        return 0

    def _write_export(self, format: str, checkpoint: str, folder: Path) -> None:
        """Write the export's files into the empty ``folder``."""
        raise NotImplementedError

    def chat_panel(self, checkpoint: str | None = None, *, compare_base: bool = True):
        """A chat panel with the tuned model (or ``checkpoint``): streamed replies, history, a system prompt.

        ``checkpoint`` is a name from ``job.checkpoints`` (``"final"`` is the
        default), a step, or ``"base"``; the panel's picker switches it later.
        With ``compare_base`` the base model, before tuning, answers each message
        side by side (``chat(checkpoint="base")``); where the backend has no base
        model to ask, the panel says so in one line and the tuned model answers alone.
        The system prompt starts as the one the training data had, and the panel
        says when the conversation grows longer than any training example.
        """
        from .display.chat import AtCheckpoint, ChatPanel

        checkpoint = None if checkpoint == "final" else checkpoint
        self._check_chat_checkpoint(checkpoint)  # a checkpoint the job lacks is refused before the panel opens
        base = None
        if compare_base:
            config = self.config or {}
            base = AtCheckpoint(self, "base", name=str(config.get("custom_base_model") or config.get("base_model")
                                                       or "base model"))
        try:
            trained, unread = self.training_chats(), None
        except (OSError, ValueError, KeyError) as exc:  # UserError is a ValueError: the panel opens, without defaults
            trained, unread = None, f"the training data could not be read ({str(exc).strip() or type(exc).__name__})"
        name = f"{self.display_name} (job {self.id})" if self.display_name else f"job {self.id}"
        return ChatPanel(self, checkpoint=checkpoint, base=base, title=f"Chat with {name}", trained=trained,
                         trained_note=unread, checkpoints=lambda: [c.name for c in self.checkpoints] + ["base"])

    def training_chats(self) -> TrainingChats | None:
        """The shape of the conversations the job trained on (its system prompt, its longest example), or None
        when the job does not record a training file. Read once per job object."""
        if self._training_chats is None:
            path = self._training_file()
            if path is None:
                return None
            self._training_chats = TrainingChats.read(path, (self.config or {}).get("base_model"))
        return self._training_chats

    def _training_file(self) -> str | None:
        """The file the model trained on: a Vertex AI job records its gs:// URI; backends that keep their own
        copy override this."""
        path = (self.config or {}).get("train_dataset")
        return path if isinstance(path, str) and path.startswith("gs://") else None

    def _check_chat_checkpoint(self, checkpoint: str | None) -> None:
        """A one-line UserError when the job has no ``checkpoint`` to chat with; backends that can tell override it."""

    @property
    def can_stop_early(self) -> bool:
        """Whether this backend can end training early and keep the best model so far (see :meth:`stop_early`)."""
        return False

    def stop_early(self) -> Job:
        """End training at the next step and keep the best checkpoint so far as ``final``; the job SUCCEEDS.

        Only backends whose ``can_stop_early`` is True support it.
        """
        from .errors import UserError

        raise UserError(f"stopping early is not supported by the {self.backend or type(self).__name__} backend; "
                        "job.cancel() stops the job instead")

    # -- snapshot ----------------------------------------------------------------
    def refresh(self) -> Job:
        """Fetch the job's current state from the backend now. Returns the job."""
        self._info = self._fetch()
        self._fetched_at = time.monotonic()
        return self

    @property
    def info(self) -> JobInfo:
        """The current snapshot (fetched again when stale and the job has not ended)."""
        if self._info is None or (
            self._info.state not in TERMINAL_STATES and time.monotonic() - self._fetched_at > self.max_age
        ):
            self.refresh()
        return self._info

    @property
    def name(self) -> str:
        """The job's resource name (for the local engine, its short id)."""
        return self.info.name if self._info is None else self._info.name

    @property
    def id(self) -> str:
        """The last part of the job's name: short and readable."""
        return self.name.rsplit("/", 1)[-1]

    @property
    def display_name(self) -> str | None:
        return self.info.display_name

    @property
    def state(self) -> str:
        """One of the ``JOB_STATE_*`` names."""
        return self.info.state

    @property
    def substate(self) -> str | None:
        """What a running job is doing: ``PROCESSING_DATASET``, ``TUNING``, ``POST_PROCESSING`` (or ``DISTILLING``)."""
        return self.info.substate

    @property
    def done(self) -> bool:
        """True once the job has ended: succeeded, failed or cancelled."""
        return self.info.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.info.state == JOB_STATE_SUCCEEDED

    @property
    def error(self) -> str | None:
        """The full error text of a failed job (a traceback when the engine raised)."""
        return self.info.error

    @property
    def error_summary(self) -> str | None:
        """The error in one line: the last line of the text, which for a traceback is the exception itself.

        Backends whose error text ends with something else (Vertex AI's details) say it their own way.
        """
        lines = [line.strip() for line in (self.error or "").splitlines() if line.strip()]
        return lines[-1] if lines else None

    @property
    def note(self) -> str | None:
        """A word on how the job ended (e.g. that it was stopped early, and which checkpoint became ``final``)."""
        return self.info.note

    @property
    def config(self) -> dict:
        """The parameters the job was submitted with."""
        return self.info.config

    @property
    def output_uri(self) -> str | None:
        """The folder (local path or gs:// URI) that holds the job's artifacts."""
        return self.info.output_uri

    @property
    def created(self) -> datetime | None:
        return self.info.created

    @property
    def started(self) -> datetime | None:
        """When the latest attempt started running."""
        return self.info.started

    @property
    def ended(self) -> datetime | None:
        return self.info.ended

    @property
    def attempts(self) -> int:
        """How many times a worker has started on the job (resumes add one each)."""
        return self.info.attempts

    @property
    def queued_seconds(self) -> float | None:
        """Seconds between submission and the start of training (so far, while the job still waits)."""
        info = self.info
        if info.created is None:
            return None
        until = info.started or info.ended or now()
        return max(0.0, (until - info.created).total_seconds())

    def poll_interval(self, looks: int) -> float:
        """Seconds ``wait()`` sleeps after its ``looks``-th look at a job that has not ended."""
        return 1.0

    @property
    def hint(self) -> str | None:
        """Advice for a job that has been waiting a long time for the service, or that it paused; else None."""
        info = self.info
        if info.state == JOB_STATE_PAUSED:
            return ("the service paused this job; it may go on by itself: job.wait() again later, or "
                    "job.cancel() and submit it again")
        if info.substate not in WAITING_SUBSTATES or info.state in TERMINAL_STATES:
            return None
        waited = self.queued_seconds or 0.0
        if waited < LONG_WAIT_SECONDS:
            return None
        what = "quota" if info.substate == WAITING_FOR_QUOTA else "capacity"
        return (f"waiting for {what} for {waited / 3600:.1f} h; waits are unpredictable and cancelling and "
                "submitting again can be faster: job.cancel(), then tune(...) again")

    def progress(self) -> Progress:
        """The step and epoch reached (from the metrics), with the totals where the backend knows them."""
        rows = self.metrics()
        epochs = self.info.config.get("epochs")
        if not len(rows):
            return Progress(epochs=epochs)
        last = rows.iloc[-1]
        epoch = last.get("epoch")
        missing = epoch is None or epoch != epoch  # no epoch column, or NaN on this row
        return Progress(step=int(last["step"]), epoch=None if missing else float(epoch), epochs=epochs)

    def data_stats(self):
        """The dataset as our validator predicted it and as the service counted it, side by side.

        A pandas DataFrame indexed by ``examples``, ``billable_tokens``,
        ``truncated_examples`` and ``dropped_examples`` with columns ``predicted``,
        ``service`` and ``differs``; ``service`` is empty until the service has counted.
        """
        import pandas as pd

        predicted = self.info.config.get("predicted_stats") or {}
        service = self.info.data_stats or {}
        rows = []
        for key in DATA_STAT_NAMES:
            p, s = predicted.get(key), service.get(key)
            rows.append({"predicted": p, "service": s, "differs": p is not None and s is not None and p != s})
        frame = pd.DataFrame(rows, index=list(DATA_STAT_NAMES))
        return frame.astype({"predicted": "Int64", "service": "Int64"})  # counts stay whole; unknown is <NA>

    @property
    def tuned_model(self) -> str | None:
        """Path or URI of the ``final`` checkpoint once it exists, else None."""
        for ckpt in reversed(self.checkpoints):
            if ckpt.name == "final":
                return ckpt.uri
        return None

    # -- waiting -----------------------------------------------------------------
    def wait(self, timeout: float | None = None, poll: float | None = None, *,
             raise_on_failure: bool = False) -> Job:
        """Block until the job ends (or the service pauses it) and return it.

        ``timeout`` (seconds) raises ``TimeoutError`` when the job is still going
        then; the job itself keeps running, as it does on Ctrl-C. A failed or
        cancelled job is returned like a successful one; pass
        ``raise_on_failure=True`` to get a :class:`JobFailedError` for a failure.
        A paused job is returned too (``job.hint`` says what to do). ``poll`` is
        the seconds between looks; by default the backend's own pace.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        looks = 0
        while True:
            self.refresh()
            if self.done or self.state == JOB_STATE_PAUSED:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"tuning job {self.name} is still {self.state} after {timeout:g} s; "
                    f"it keeps running: call job.wait() again or job.cancel()"
                )
            pause = self.poll_interval(looks) if poll is None else poll
            looks += 1
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)
        if self.done:
            from .tracking import log_when_ended

            log_when_ended(self)  # with the setting mlflow = "true"; a failure there is only a warning
        if raise_on_failure and self.state == JOB_STATE_FAILED:
            raise JobFailedError(self)
        return self

    # -- display -------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        """In a notebook a job shows itself as the live job monitor (text where widgets do not render)."""
        from .display.monitor import show

        show(self)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """The job's state, progress and last losses as text and HTML, for frontends without widgets."""
        from .display.monitor import job_bundle

        return job_bundle(self)

    def __repr__(self) -> str:
        info = self.info
        parts = [f"{type(self).__name__} {info.name}", info.state.replace("JOB_STATE_", "")]
        if info.substate and info.state not in TERMINAL_STATES:
            parts.append(info.substate)
        model = info.config.get("base_model")
        if model:
            parts.append(str(model))
        if info.display_name:
            parts.append(repr(info.display_name))
        return f"<{' '.join(parts)}>"


def metrics_frame(rows: list[dict[str, Any]]):
    """A per-step DataFrame from metric records; records of the same step are merged, later values winning.

    Training and evaluation lines of one step arrive as separate records, and a
    resumed job may record a step again: one row per step keeps the curve clean.
    """
    import pandas as pd

    merged: dict[Any, dict[str, Any]] = {}
    for row in rows:
        step = row.get("step")
        if step is None:
            continue
        target = merged.setdefault(step, {})
        target.update({k: v for k, v in row.items() if v is not None and k != "event"})
    frame = pd.DataFrame(list(merged.values()))
    for col in METRIC_COLUMNS:
        if col not in frame.columns:
            frame[col] = pd.Series(dtype="float64")
    extra = [c for c in frame.columns if c not in METRIC_COLUMNS]
    frame = frame[[*METRIC_COLUMNS, *extra]]
    if len(frame):
        frame = frame.sort_values("step", kind="stable").reset_index(drop=True)
        frame["step"] = frame["step"].astype("int64")
    return frame
