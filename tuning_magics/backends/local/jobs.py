"""LocalJob: a tuning job of the embedded engine, read from the shared registry and its output folder.

Any Python process can build a ``LocalJob`` from a job id and see, cancel or
resume it; nothing lives only in the process that submitted it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...errors import UserError, require_extra
from ...storage import atomic_writer
from ...jobs import (
    ACTIVE_STATES,
    JOB_STATE_CANCELLED,
    JOB_STATE_CANCELLING,
    JOB_STATE_FAILED,
    JOB_STATE_PENDING,
    JOB_STATE_QUEUED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    Checkpoint,
    Job,
    JobInfo,
    Progress,
    Reply,
    metrics_frame,
    timestamp,
)
from . import registry, scheduler
from .checkpoints import final_dir, job_checkpoints
from .metrics import PROGRESS_FILE, last_metric, number, read_metrics, whole

def jobs_root() -> Path:
    """Where job folders go unless ``output_uri`` names one: ``<home>/jobs``."""
    return registry.jobs_root()


@contextmanager
def new_job_folder(output_uri=None, *, prefix: str = "tune") -> Iterator[tuple[str, Path]]:
    """A fresh job id and its output folder, made empty and checked writable: ``output_uri`` or ``<home>/jobs/<id>``.

    If the block raises, what was made for the job goes: the folder, or only its
    files when it existed before (a folder the user made stays), and the parent
    folders that were made for it.
    """
    job_id = registry.new_id(prefix)
    while registry.get(job_id) is not None:
        job_id = registry.new_id(prefix)
    folder = jobs_root() / job_id if output_uri is None else Path(output_uri).expanduser().resolve()
    if output_uri is not None and folder.is_dir() and any(folder.iterdir()):
        raise UserError(
            f"output_uri {str(output_uri)!r} already holds files; give an empty or new folder, or leave output_uri out",
            field="output_uri",
        )
    made = []  # the folders mkdir makes, deepest first
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            break
        made.append(path)
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()  # can we write there? (mkdir succeeds on an existing folder)
        except OSError as exc:
            if output_uri is None:
                raise registry.home_error(exc) from None
            why = registry.unwritable_reason(folder, exc)
            raise UserError(f"output_uri {str(output_uri)!r} cannot be used: {why}; give a folder you can write to, "
                            "or leave output_uri out", field="output_uri") from None
        yield job_id, folder
    except BaseException:
        _unmake(folder, made)
        raise


def _unmake(folder: Path, made: list[Path]) -> None:
    if not made:
        for child in folder.iterdir() if folder.is_dir() else ():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in made[1:]:
        try:
            parent.rmdir()  # only while empty: never what someone else put there meanwhile
        except OSError:
            break


def record(job_id: str, config: dict, output_dir, *, display_name: str | None = None) -> None:
    """Record a new QUEUED job; :func:`start` then lets the scheduler run it when a slot is free.

    ``job.json`` in the folder keeps what :func:`registry.rebuild` needs to list the job again.
    """
    output_dir = Path(output_dir)
    rec = registry.JobRecord(id=job_id, config=config, state=JOB_STATE_QUEUED, output_dir=str(output_dir),
                             created=time.time(), display_name=display_name)
    with atomic_writer(output_dir / registry.JOB_FILE, overwrite=True) as fh:
        fh.write(json.dumps({"id": job_id, "display_name": display_name, "created": rec.created, "config": config},
                            indent=2, default=str).encode())
    registry.insert(rec)


def start(job_id: str) -> LocalJob:
    """Move the queue on (the recorded job starts if a slot is free) and return the job.

    The job is recorded already: a registry too busy to start it now is a warning, and the
    next look at the job (``refresh``, ``wait``, the monitor) starts it.
    """
    try:
        scheduler.schedule()
    except registry.RegistryBusy as exc:
        warnings.warn(f"job {job_id} is queued but not started yet: {exc}; it starts at the next look at it "
                      "(job.refresh(), job.wait() or the monitor)")
    return LocalJob(job_id)


def get(job_id: str) -> LocalJob:
    """The local job with this id or (unique) display name; a UserError when there is none."""
    rec = registry.get(job_id)
    if rec is None:
        named = registry.find(display_name=job_id, limit=2)
        if len(named) == 1:
            rec = named[0]
        elif named:
            raise UserError(f"several local jobs are named {job_id!r}; use the job id (list_jobs() shows them)")
    if rec is None:
        raise UserError(f"there is no local tuning job {job_id!r}; list_jobs() shows the jobs there are", field="name")
    return LocalJob(rec.id)


def find(limit: int | None = None) -> list[LocalJob]:
    """Local jobs, newest first."""
    records = registry.find(limit=limit)
    if any(scheduler.has_dead_worker(r) for r in records) and _move_queue():
        records = registry.find(limit=limit)
    return [LocalJob(r.id, _record=r) for r in records]


class LocalJob(Job):
    """A job of the embedded local engine."""

    backend = "local"

    def __init__(self, job_id: str, *, _record: registry.JobRecord | None = None):
        self._id = job_id
        self._chat_models: dict[str, object] = {}
        self._base_model = None  # the base model chat(checkpoint="base") loaded, kept beside the tuned one
        super().__init__(_info(_record) if _record is not None else None)

    @property
    def name(self) -> str:
        return self._id

    @property
    def output_dir(self) -> Path:
        """The job's folder on this machine."""
        return Path(self.info.output_uri)

    def _record(self) -> registry.JobRecord:
        rec = registry.get(self._id)
        if rec is None:
            raise UserError(f"local tuning job {self._id!r} is no longer in the registry {registry.db_path()}")
        return rec

    def _fetch(self) -> JobInfo:
        scheduler.poll_children()
        rec = self._record()
        if scheduler.has_dead_worker(rec) or _missed_its_start(rec):
            # Liveness: the worker died without a word, or a queued job was not started when a slot was free
            # (the registry was busy then). Mark it (under the lock) and move the queue on.
            if _move_queue():
                rec = self._record()
        return _info(rec)

    def cancel(self) -> LocalJob:
        """Stop the job: a queued one is CANCELLED at once; a running one goes CANCELLING, then CANCELLED.

        A job that has already ended is left as it is.
        """
        now = time.time()
        if registry.transition(self._id, JOB_STATE_QUEUED, state=JOB_STATE_CANCELLED, ended=now):
            return self.refresh()
        if registry.transition(self._id, [JOB_STATE_PENDING, JOB_STATE_RUNNING], state=JOB_STATE_CANCELLING):
            # The worker also polls the registry; the signal makes it notice even between training steps.
            scheduler.terminate(self._record())
        return self.refresh()

    @property
    def can_stop_early(self) -> bool:
        """True: the local engine can end training early and keep the best checkpoint so far."""
        return True

    def stop_early(self) -> LocalJob:
        """End training at the next step boundary; the best checkpoint so far becomes ``final`` and the job SUCCEEDS.

        "Best" is the lowest validation loss when the job has a validation set, else the
        latest. ``job.note`` then says where it stopped and which checkpoint is ``final``.
        At least one step is trained first.
        """
        if registry.transition(self._id, [JOB_STATE_PENDING, JOB_STATE_RUNNING], stop_early=True):
            return self.refresh()
        state = self.refresh().state
        if state == JOB_STATE_QUEUED:
            raise UserError(f"job {self._id} is still queued and has trained nothing to keep; "
                            "job.cancel() removes it from the queue")
        if state == JOB_STATE_CANCELLING:
            raise UserError(f"job {self._id} is already being cancelled; it cannot also stop early")
        raise UserError(f"job {self._id} has already ended ({state}); there is no training to stop")

    def resume(self) -> LocalJob:
        """Queue a FAILED or CANCELLED job again; its worker continues from the last complete checkpoint."""
        rec = self.refresh()._record()
        if rec.state == JOB_STATE_SUCCEEDED:
            raise UserError(
                f"job {self._id} already succeeded; to train further, tune(custom_base_model=job.tuned_model, ...)"
            )
        if rec.state not in (JOB_STATE_FAILED, JOB_STATE_CANCELLED):
            raise UserError(f"job {self._id} is {rec.state}; only a FAILED or CANCELLED job can be resumed")
        if not registry.transition(
            self._id, [JOB_STATE_FAILED, JOB_STATE_CANCELLED],
            state=JOB_STATE_QUEUED, resume=True, error=None, substate=None, ended=None, pid=None, pid_started=None,
            note=None, stop_early=False,
        ):
            raise UserError(f"job {self._id} changed state while resuming; look at job.state and try again")
        scheduler.schedule()
        return self.refresh()

    def metrics(self):
        """Per-step metrics from ``metrics.jsonl``: step, epoch, train_loss, eval_loss, token_accuracy, ..."""
        return metrics_frame(read_metrics(self.output_dir))

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return job_checkpoints(self.output_dir)

    def progress(self) -> Progress:
        """The step of the total steps and the epoch of the epochs, as the worker last wrote them.

        Without a readable progress file (none yet, or not the worker's), from the metrics. The
        worker writes progress at most every ``worker.PROGRESS_EVERY`` seconds, so for a job that has ended
        (stopped early, cancelled, killed) the metrics' last step wins when it is further: never a
        step behind the last checkpoint. ``stopped_early``: it succeeded short of the total.
        """
        try:
            saved = json.loads((self.output_dir / PROGRESS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or whole(saved.get("step")) is None:
            return super().progress()
        step, epoch, total = whole(saved.get("step")), number(saved.get("epoch")), whole(saved.get("total_steps"))
        if self.done:
            last = last_metric(self.output_dir)
            if last.get("step") is not None and last["step"] > step:
                step, epoch = last["step"], last.get("epoch")
        return Progress(step=step, total_steps=total, epoch=None if epoch is None else float(epoch),
                        epochs=whole(saved.get("epochs")),
                        stopped_early=self.succeeded and total is not None and step < total)

    @property
    def log(self) -> str:
        """The worker's output (``worker.log``): useful when a job failed."""
        try:
            return (self.output_dir / "worker.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _checkpoint_path(self, checkpoint: str | None) -> str:
        ckpts = {c.name: c.uri for c in self.checkpoints}
        if checkpoint is None:
            if "final" not in ckpts:
                raise self._no_final(list(ckpts))
            return ckpts["final"]
        if checkpoint in ckpts:
            return ckpts[checkpoint]
        if isinstance(checkpoint, int) or str(checkpoint).isdigit():
            name = f"checkpoint-{int(checkpoint)}"
            if name in ckpts:
                return ckpts[name]
        if ckpts:
            choose = f"choose one of {', '.join(ckpts)}"
        elif not self.done:
            choose = "it has none yet"
        else:
            choose = f"none are left in {self.output_dir}" if self.output_dir.is_dir() else \
                f"its folder {self.output_dir} was deleted"
        raise UserError(f"job {self._id} has no checkpoint {checkpoint!r}; {choose}", field="checkpoint")

    def _no_final(self, names: list[str]) -> UserError:
        """Why there is no final model to chat with, and what is left to chat with instead."""
        state = self.state
        if not self.done:
            return UserError(f"job {self._id} has no final model yet ({state}); wait for it, or chat with "
                             f"checkpoint= one of {', '.join(names) or 'its checkpoints once they exist'}",
                             field="checkpoint")
        if not self.output_dir.is_dir():
            return UserError(f"job {self._id}'s folder {self.output_dir} was deleted, its final model and "
                             "checkpoints with it; tune again", field="checkpoint")
        left = (f"the checkpoints left there are {', '.join(names)}: chat with checkpoint={names[-1]!r} or another"
                if names else "no checkpoints are left there")
        if state == JOB_STATE_SUCCEEDED:
            why = f"job {self._id}'s final model is gone ({final_dir(self.output_dir)} was deleted)"
            return UserError(f"{why}; {left}" + ("" if names else "; tune again"), field="checkpoint")
        again = "job.resume() continues it" if names else "job.resume() starts it again"
        return UserError(f"job {self._id} ended {state} without a final model; {left}, or {again}",
                         field="checkpoint")

    def _check_chat_checkpoint(self, checkpoint: str | None) -> None:
        """Refuse a checkpoint the job lacks, and a final model an ended job lacks (a running one may yet make it)."""
        if checkpoint == "base" or (checkpoint is None and not self.done):
            return
        self._checkpoint_path(checkpoint)

    def chat(self, messages_or_text, *, checkpoint: str | None = None, stream: bool = False, **gen):
        """Reply with the tuned model (or ``checkpoint``: a name such as ``checkpoint-8``, a step, or ``"base"``).

        ``checkpoint="base"`` answers with the model before tuning (the job's
        ``custom_base_model``, else its ``base_model``), to compare with the tuned one.

        ``messages_or_text`` is a string or a list of ``{"role", "content"}`` messages;
        ``gen`` holds generation options (``max_new_tokens``, ``temperature``, ...).
        With ``stream=True`` a :class:`~tuning_magics.jobs.Reply` is returned: the text
        pieces, then its ``finish_reason`` and ``tokens``.
        """
        from ...chat_request import chat_request

        req = chat_request(messages_or_text, stream=stream, **gen)  # a mistake is reported before any model loads
        require_extra("local")
        model = self._base_chat_model() if checkpoint == "base" else \
            self._chat_model(self._checkpoint_path(checkpoint))
        if not stream:
            return model.reply(messages_or_text, **gen)
        req = model.prepare(req)
        ids: list[int] = []

        def ended():
            ends_turn = bool(ids) and ids[-1] in model.stop_ids()
            return model.finish_reason(ids, req["stop"]), len(ids) - ends_turn

        return Reply(model.stream(req, ids=ids), ended)

    def _training_file(self) -> str | None:
        """The job's own copy of its training data; for distillation, the teacher's answers once they exist."""
        from .distill import LABELLED_FILE

        labelled = self.output_dir / LABELLED_FILE
        if (self.config or {}).get("method") == "distillation" and labelled.is_file():
            return str(labelled)
        return (self.config or {}).get("train_path")

    def _validation_file(self) -> str | None:
        """The job's own copy of its validation data, if it had any."""
        return (self.config or {}).get("validation_path")

    def _answerer(self, checkpoint: str, *, batch_size: int = 16, batch_from: int | None = None):
        """The checkpoint answering in batches on the local engine, the model chat() loaded shared with it
        (``batch_from``, Vertex AI's batch prediction, has no meaning here)."""
        from .answer import LocalAnswerer

        if checkpoint == "base":
            config = self.config or {}
            source = str(config.get("custom_base_model") or config.get("base_model"))
            return LocalAnswerer("base", source, loader=self._base_chat_model, batch_size=batch_size)
        path = self._checkpoint_path(None if checkpoint == "final" else checkpoint)
        return LocalAnswerer(checkpoint, path, loader=lambda: self._chat_model(path), batch_size=batch_size)

    def _base_chat_model(self):
        """The job's base model, loaded as the worker loads it (``custom_base_model`` else ``base_model``), once."""
        config = self.config or {}
        source = config.get("custom_base_model") or config.get("base_model")
        if not source:
            raise UserError(f"job {self._id} does not record its base model, so there is none to chat with",
                            field="checkpoint")
        if self._base_model is None or self._base_model.name != str(source):
            from .generate import LocalChatModel

            self._base_model = LocalChatModel(source)  # loads one model at a time (models.load_model_and_tokenizer)
        return self._base_model

    def _check_export(self, format: str, checkpoint: str) -> None:
        from . import export

        require_extra("local")
        self._checkpoint_path(None if checkpoint == "final" else checkpoint)  # one the job lacks: said in one line
        export.check(self._id, self.config or {}, format)

    def _export_home(self) -> Path:
        return self.output_dir / "exports"

    def _export_config(self, checkpoint: str) -> dict:
        from . import export

        return export.config(Path(self._checkpoint_path(None if checkpoint == "final" else checkpoint)))

    def _export_bytes(self, format: str, checkpoint: str) -> int:
        from . import export

        return export.export_bytes(Path(self._checkpoint_path(None if checkpoint == "final" else checkpoint)), format)

    def _write_export(self, format: str, checkpoint: str, folder: Path) -> None:
        from . import export

        export.write(Path(self._checkpoint_path(None if checkpoint == "final" else checkpoint)), format, folder)

    def deploy(self, **options):
        """Serve the tuned model on an OpenAI-compatible local endpoint; returns the endpoint.

        The model chat() loaded is served, not loaded again (unless ``device`` or ``dtype`` is given).
        """
        require_extra("local")
        from . import server

        server.check_deploy_options({k: v for k, v in options.items() if k != "checkpoint"})
        path = self._checkpoint_path(options.pop("checkpoint", None))
        shared = options.get("device") is None and options.get("dtype") is None
        return server.deploy(self._chat_model(path) if shared else path, **options)

    def _chat_model(self, path: str):
        """The loaded model of checkpoint ``path`` for chat() and deploy(); only the last one used stays loaded."""
        model = self._chat_models.pop(path, None)
        if model is None:
            from .generate import LocalChatModel

            self._chat_models.clear()  # the one loaded before goes first: two copies may not fit in memory
            model = LocalChatModel(path)
        self._chat_models[path] = model
        return model

    def close(self) -> None:
        """Free the models chat() or deploy() loaded (a running endpoint keeps serving its own)."""
        self._chat_models.clear()
        self._base_model = None


def _move_queue() -> bool:
    """Run the scheduler for a reader that noticed it is needed; False when the registry was too busy.

    Reading a job never fails on a busy writer: the next look moves the queue on.
    """
    try:
        scheduler.schedule()
    except registry.RegistryBusy:
        return False
    return True


def _missed_its_start(rec: registry.JobRecord) -> bool:
    """A QUEUED job while fewer jobs than the limit are active: the scheduler should have started it."""
    return rec.state == JOB_STATE_QUEUED and len(registry.find(states=ACTIVE_STATES)) < scheduler.concurrency()


def _info(rec: registry.JobRecord) -> JobInfo:
    return JobInfo(
        name=rec.id,
        state=rec.state,
        display_name=rec.display_name,
        substate=rec.substate if rec.state in ACTIVE_STATES else None,
        error=rec.error,
        config=rec.config,
        output_uri=rec.output_dir,
        created=timestamp(rec.created),
        started=timestamp(rec.started),
        ended=timestamp(rec.ended),
        attempts=rec.attempts,
        note=rec.note,
    )
