"""The process that runs one local tuning job: ``python -m tuning_magics.backends.local.worker <job id>``.

Started by the scheduler in its own session, it owns the job from PENDING to
an end state: RUNNING with sub-states from the trainer's events, then
SUCCEEDED, FAILED (with the full traceback in ``error``) or CANCELLED. It
watches for a cancel by polling the registry between training steps, and
treats SIGTERM the same way, so a stop always happens at a step boundary and
leaves only complete checkpoints. A request to stop early (the registry's
``stop_early`` flag, read by the same poll) ends training after the current step
instead: the best checkpoint so far becomes ``final``, the job SUCCEEDS, and its
``note`` says where it stopped. Whatever happens, it runs the scheduler
before exiting so the next queued job starts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from ...errors import UserError
from ...jobs import (
    DISTILLING,
    JOB_STATE_CANCELLED,
    JOB_STATE_CANCELLING,
    JOB_STATE_FAILED,
    JOB_STATE_PENDING,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    PROCESSING_DATASET,
)
from . import registry, scheduler
from .metrics import PROGRESS_FILE

#: Seconds between registry reads while watching for a cancel or a request to stop early.
CANCEL_POLL = 0.5
#: progress.json (metrics.PROGRESS_FILE) is rewritten at most every PROGRESS_EVERY seconds.
PROGRESS_EVERY = 0.5


class _Stop(Exception):
    """Raised between phases when a stop was asked for before the trainer could see it."""


class Worker:
    """Runs one job; ``run()`` returns the end state."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.output_dir: str | None = None
        self.signalled: int | None = None
        self._cancel_seen = False
        self._stop_early_seen = False
        self._progress_at = float("-inf")
        self._last_poll = 0.0

    # -- stop requests ---------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self.signalled = signum
        # A second signal is not ignored: the default action ends the process at once.
        signal.signal(signum, signal.SIG_DFL)

    def should_stop(self) -> bool:
        """True once a cancel was asked for (registry CANCELLING, or SIGTERM/SIGINT); cheap to call often."""
        if self.signalled is not None or self._cancel_seen:
            return True
        self._poll()
        return self._cancel_seen

    def should_stop_early(self) -> bool:
        """True once stopping early was asked for (the registry's ``stop_early`` flag); cheap to call often."""
        if not self._stop_early_seen:
            self._poll()
        return self._stop_early_seen

    def _poll(self) -> None:
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL:
            self._last_poll = now
            state, early = registry.requests_of(self.job_id)
            self._cancel_seen = state == JOB_STATE_CANCELLING
            self._stop_early_seen = self._stop_early_seen or early

    def _check_stop(self) -> None:
        self._last_poll = 0.0  # between phases, always look
        if self.should_stop():
            raise _Stop()

    # -- events ----------------------------------------------------------------
    def on_event(self, event: dict) -> None:
        """Trainer and labeller events: sub-state changes go to the registry (metrics are in metrics.jsonl)."""
        if event.get("event") == "substate":
            self._substate(event.get("substate"))
        elif event.get("event") == "progress":
            self._progress(event)
        elif event.get("event") == "failed":  # another process of a data-parallel job failed: the job ends here
            self._end(JOB_STATE_FAILED, error=event["error"])
            print(f"worker {os.getpid()}: job {self.job_id} ended {JOB_STATE_FAILED}: {event['error']}", flush=True)
            os._exit(1)

    def _progress(self, event: dict) -> None:
        """Keep the latest progress in the job folder, at most every PROGRESS_EVERY seconds (and the last step)."""
        now = time.monotonic()
        last_step = event.get("step") == event.get("total_steps")
        if now - self._progress_at < PROGRESS_EVERY and not last_step:
            return
        self._progress_at = now
        from ...storage import atomic_writer

        keep = {k: event.get(k) for k in ("step", "total_steps", "epoch", "epochs")}
        try:
            with atomic_writer(Path(self.output_dir) / PROGRESS_FILE, overwrite=True) as fh:
                fh.write(json.dumps(keep).encode())
        except (OSError, UserError):
            pass  # progress is a convenience: training goes on without it

    def _substate(self, substate: str | None) -> None:
        registry.transition(self.job_id, [JOB_STATE_RUNNING, JOB_STATE_CANCELLING], substate=substate)

    # -- the job ---------------------------------------------------------------
    def run(self) -> str:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        rec = registry.get(self.job_id)
        if rec is None:
            print(f"worker: no job {self.job_id} in {registry.db_path()}", file=sys.stderr)
            return JOB_STATE_FAILED
        self.output_dir = rec.output_dir
        print(f"worker {os.getpid()}: job {self.job_id} (attempt {rec.attempts + 1})", flush=True)
        me = dict(pid=os.getpid(), pid_started=scheduler._create_time(os.getpid()))
        if not registry.transition(self.job_id, JOB_STATE_PENDING, state=JOB_STATE_RUNNING, started=time.time(),
                                   substate=PROCESSING_DATASET, attempts=rec.attempts + 1, error=None, **me):
            # Cancelled between the scheduler's claim and our start: nothing was done yet.
            if registry.transition(self.job_id, JOB_STATE_CANCELLING, state=JOB_STATE_CANCELLED,
                                   ended=time.time(), pid=None, pid_started=None):
                return JOB_STATE_CANCELLED
            print(f"worker: job {self.job_id} is {registry.state_of(self.job_id)}, not PENDING; nothing to do",
                  file=sys.stderr)
            return registry.state_of(self.job_id) or JOB_STATE_FAILED
        try:
            note = self._train(rec)
        except BaseException as exc:  # noqa: BLE001 - every ending must reach the registry
            return self._ended_by(exc)
        return self._end(JOB_STATE_SUCCEEDED, note=note)

    def _train(self, rec: registry.JobRecord) -> str | None:
        """Train the job; the trainer's note (set when it stopped early), else None."""
        # trainer.py imports torch only inside train(), so these names are cheap to import here.
        from .trainer import TrainingCancelled, train

        cfg = dict(rec.config)
        out = Path(rec.output_dir)
        try:
            train_path = self._label(cfg, out) if cfg.get("method") == "distillation" else cfg["train_path"]
            self._check_stop()
            # train() checks that the job fits in memory (a UserError) before it loads any weights.
            config = self._train_config(cfg, train_path, out)
            evaluator = None
            if cfg.get("evaluation"):
                from .answer import CheckpointEvaluator

                evaluator = CheckpointEvaluator(cfg["evaluation"], cfg["base_model"],
                                                cfg.get("custom_base_model") or cfg["base_model"],
                                                should_stop=self.should_stop)
            if cfg.get("method") == "preference":  # DPO on TRL's trainer
                from .preference import train_preference

                result = train_preference(config, beta=cfg.get("beta"), on_event=self.on_event,
                                          should_stop=self.should_stop, should_stop_early=self.should_stop_early,
                                          evaluator=evaluator, resume=rec.resume)
            else:
                result = train(config, on_event=self.on_event, should_stop=self.should_stop,
                               should_stop_early=self.should_stop_early, resume=rec.resume, evaluator=evaluator)
        except TrainingCancelled:
            raise _Stop() from None
        if not out.is_dir():  # removed after the trainer's last look: nothing of the result is left
            raise FileNotFoundError(f"{out} was removed")
        return result.note

    def _label(self, cfg: dict, out: Path) -> str:
        """Distillation: the teacher answers every prompt; the student then trains on its answers."""
        from .distill import LABELLED_FILE, label_dataset
        from .submit import teacher_of

        labelled = out / LABELLED_FILE
        self._substate(DISTILLING)
        # label_dataset writes the file atomically, so one that exists is complete: a resumed
        # job keeps the teacher's answers it already paid for.
        if not labelled.is_file():
            label_dataset(teacher_of(cfg, out), cfg["train_path"], str(labelled), on_event=self.on_event,
                          should_stop=self.should_stop)
        return str(labelled)

    def _train_config(self, cfg: dict, train_path: str, out: Path):
        from .trainer import TrainConfig, check_engine_options

        options = cfg.get("engine_options") or {}
        check_engine_options(options)  # a job queued by another version may carry options this one lacks
        values = dict(
            base_model=cfg["base_model"],
            custom_base_model=cfg.get("custom_base_model"),
            tuning_mode=cfg["tuning_mode"],
            epochs=cfg.get("epochs"),
            learning_rate=cfg.get("learning_rate"),
            learning_rate_multiplier=cfg.get("learning_rate_multiplier"),
            adapter_size=cfg.get("adapter_size"),
            train_path=train_path,
            validation_path=cfg.get("validation_path"),
            output_dir=str(out),
            **options,
        )
        # None means "the trainer's default".
        return TrainConfig(**{k: v for k, v in values.items() if v is not None})

    # -- endings ---------------------------------------------------------------
    def _ended_by(self, exc: BaseException) -> str:
        if isinstance(exc, _Stop) or (isinstance(exc, KeyboardInterrupt) and self.signalled):
            note = None
            # A signal that did not come with a cancel in the registry (e.g. `kill`, a shutdown) is worth a word.
            if self.signalled is not None and registry.state_of(self.job_id) != JOB_STATE_CANCELLING:
                name = signal.Signals(self.signalled).name
                note = f"stopped by {name} at a step boundary; job.resume() continues from the last checkpoint"
            return self._end(JOB_STATE_CANCELLED, error=note)
        if isinstance(exc, Exception) and not isinstance(exc, UserError) and self.output_dir:
            from .trainer import output_failure

            # A vanished job folder or a full disk fails any step (labelling too) in its own words.
            exc = output_failure(exc, Path(self.output_dir)) or exc
        if isinstance(exc, UserError):
            # The user's mistake: the one-line message is the whole story.
            return self._end(JOB_STATE_FAILED, error=str(exc))
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(text, file=sys.stderr, flush=True)
        return self._end(JOB_STATE_FAILED, error=text)

    def _end(self, state: str, *, error: str | None = None, note: str | None = None) -> str:
        end = dict(ended=time.time(), pid=None, pid_started=None)
        if state == JOB_STATE_SUCCEEDED:
            if registry.transition(self.job_id, JOB_STATE_RUNNING, state=state, note=note, **end):
                return state
            # A cancel arrived after the last step: the user asked for it to stop, so it ends cancelled;
            # the trained model stays in the output folder.
            state = JOB_STATE_CANCELLED
        registry.transition(self.job_id, [JOB_STATE_RUNNING, JOB_STATE_CANCELLING], state=state, error=error, **end)
        return state


def main(argv: list[str] | None = None) -> int:
    """Run the job named on the command line; the exit status is 0 unless it failed."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tuning_magics.backends.local.worker <job id>", file=sys.stderr)
        return 2
    # No one waits on a worker: it outlasts another process's long write rather than lose the job's end.
    registry.busy_wait = registry.WORKER_BUSY_WAIT
    state = JOB_STATE_FAILED
    try:
        state = Worker(argv[0]).run()
    finally:
        print(f"worker {os.getpid()}: job {argv[0]} ended {state}", flush=True)
        try:
            scheduler.schedule()  # our slot is free: start the next queued job
        except Exception:  # noqa: BLE001 - the job's own end is recorded; the next refresh schedules again
            traceback.print_exc()
    return 0 if state != JOB_STATE_FAILED else 1


if __name__ == "__main__":
    sys.exit(main())
