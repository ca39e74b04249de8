"""The local engine's queue: start queued jobs, at most N at a time, each in its own worker process.

There is no daemon. :func:`schedule` runs under an exclusive file lock
(``<home>/scheduler.lock``, :func:`registry.lock`) whenever a job is submitted or resumed, whenever a
worker finishes, and whenever someone notices a dead worker. It first marks
jobs whose worker died as failed (:func:`reap`), then starts the oldest
QUEUED jobs while fewer than :func:`concurrency` jobs are active. Because
every change goes through the shared registry, any Python process, not only
the one that submitted a job, keeps the queue moving.

A worker is ``python -m tuning_magics.backends.local.worker <job id>`` in a
new session (a new process group on Windows), so a kernel restart or Ctrl-C
does not reach it, writing to ``<output>/worker.log``. POSIX-only calls stay
behind checks: this module runs on Windows too.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ...params import whole_at_least_1
from ...jobs import (
    ACTIVE_STATES,
    JOB_STATE_CANCELLED,
    JOB_STATE_CANCELLING,
    JOB_STATE_FAILED,
    JOB_STATE_PENDING,
    JOB_STATE_QUEUED,
)
from . import registry
from .checkpoints import list_checkpoints
from .metrics import last_metric

CONCURRENCY_ENV = "TUNING_MAGICS_LOCAL_CONCURRENCY"
#: Lines of ``worker.log`` quoted in the error of a job whose worker died.
LOG_TAIL_LINES = 20

# Workers this process started: polling them reaps the zombie and tells us
# the exit status (a signal number) that psutil alone cannot.
_children: dict[int, subprocess.Popen] = {}
_exited: dict[int, int] = {}  # pid -> return code of those that ended


def concurrency() -> int:
    """How many local jobs may run at once: ``$TUNING_MAGICS_LOCAL_CONCURRENCY``, default 1."""
    raw = os.environ.get(CONCURRENCY_ENV, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = raw
    return whole_at_least_1(CONCURRENCY_ENV, value)


def schedule() -> list[str]:
    """Reap dead workers, then start queued jobs up to the concurrency limit; the ids started."""
    limit = concurrency()
    started: list[str] = []
    with registry.lock():
        reap(locked=True)
        active = len(registry.find(states=ACTIVE_STATES))
        for rec in registry.find(states=[JOB_STATE_QUEUED], oldest_first=True):
            if active >= limit:
                break
            # Claim first: a cancel that lands now finds PENDING and the worker sees it.
            if not registry.transition(rec.id, JOB_STATE_QUEUED, state=JOB_STATE_PENDING, pid=None, pid_started=None,
                                       substate=None, error=None, ended=None):
                continue
            try:
                proc = _spawn(rec)
            except OSError as exc:
                registry.transition(rec.id, ACTIVE_STATES, state=JOB_STATE_FAILED, ended=time.time(),
                                    error=f"the worker process could not be started: {exc}")
                continue
            registry.transition(rec.id, ACTIVE_STATES, pid=proc.pid, pid_started=_create_time(proc.pid))
            started.append(rec.id)
            active += 1
    return started


def _spawn(rec: registry.JobRecord) -> subprocess.Popen:
    out = Path(rec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A local job stays on the machine: the trainers' usage pings to the Hugging Face Hub (TRL sends one per
    # trainer) are off unless the process that starts the worker has HF_HUB_DISABLE_TELEMETRY set otherwise.
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # The worker must find this same registry even if the home came from a default.
    env.setdefault("TUNING_MAGICS_HOME", str(registry.home()))
    with open(out / "worker.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuning_magics.backends.local.worker", rec.id],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            close_fds=True,
            env=env,
            **_detached(),
        )
    _children[proc.pid] = proc
    return proc


def _detached() -> dict:
    """Popen options that keep the worker out of reach of the notebook's Ctrl-C and its process group."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _create_time(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:  # the [local] extra brings it; without it a pid cannot be told apart from a reused one
        return None

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def poll_children() -> None:
    """Collect workers of this process that have exited, so none lingers as a zombie."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            _exited[pid] = proc.returncode
            del _children[pid]


def _collect(pid: int) -> None:
    """Wait for a child that psutil already sees as a zombie: a killed multi-threaded process
    shows as one while its threads still exit, before waitpid can report its status."""
    proc = _children.get(pid)
    if proc is None:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return
    poll_children()



def worker_alive(rec: registry.JobRecord, *, locked: bool = False) -> bool:
    """Whether the job's worker process is still running (a reused pid counts as dead).

    A PENDING job without a pid is being started by a scheduler; only under the
    scheduler lock do we know that no start is in progress, so it is dead then.
    """
    if rec.pid is None:
        return not locked
    poll_children()
    if rec.pid in _exited:
        return False
    try:
        import psutil
    except ImportError:
        return True  # the [local] extra brings psutil; without it we cannot tell, so leave the job alone

    try:
        proc = psutil.Process(rec.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            _collect(rec.pid)
            return False
        if rec.pid_started is not None and abs(proc.create_time() - rec.pid_started) > 1.0:
            return False
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # another user's process holds the pid: it is not ours, but we cannot tell; leave it
    return True


def has_dead_worker(rec: registry.JobRecord) -> bool:
    """True when ``rec`` is active but its worker is gone: the cue to run :func:`schedule`."""
    return rec.state in ACTIVE_STATES and not worker_alive(rec)


def reap(*, locked: bool = False) -> list[str]:
    """Mark active jobs whose worker died as FAILED (CANCELLED when a cancel was pending); their ids."""
    reaped = []
    for rec in registry.find(states=ACTIVE_STATES):
        if worker_alive(rec, locked=locked):
            continue
        now = time.time()
        if rec.state == JOB_STATE_CANCELLING:
            ok = registry.transition(rec.id, JOB_STATE_CANCELLING, state=JOB_STATE_CANCELLED, ended=now,
                                     pid=None, pid_started=None)
        else:
            ok = registry.transition(rec.id, [rec.state], state=JOB_STATE_FAILED, ended=now, error=death_reason(rec),
                                     pid=None, pid_started=None)
        if ok:
            reaped.append(rec.id)
    return reaped


def death_reason(rec: registry.JobRecord) -> str:
    """Why a job whose worker vanished failed, where it was, and how to continue it."""
    code = _exited.get(rec.pid) if rec.pid is not None else None
    if code is None:
        how = "(exit status unknown; killed, or out of memory?)"
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        # SIGKILL is POSIX-only; it is the signal the kernel's out-of-memory killer sends.
        oom = -code == getattr(signal, "SIGKILL", None)
        how = f"(signal {-code}, {name}{'; out of memory?' if oom else ''})"
    else:
        how = f"(exit status {code})"
    where = ""
    last = last_metric(rec.output_dir)
    ckpts = list_checkpoints(rec.output_dir)
    if last.get("epoch") is not None:
        where = f" during epoch {_epoch_number(last, ckpts)} (after step {last.get('step')})"
    elif rec.substate:
        where = f" while {rec.substate}"
    if rec.pid is None:
        first = "the worker process was never started (the scheduler was interrupted)"
    else:
        first = f"the worker process ended unexpectedly {how}{where}"
    if ckpts:
        first += f"; job.resume() continues from {ckpts[-1].name}"
    else:
        first += "; job.resume() starts it again"
    log = Path(rec.output_dir) / "worker.log"
    tail = _tail(log, LOG_TAIL_LINES)
    return first + (f"\n--- last lines of {log} ---\n{tail}" if tail else "")


def _epoch_number(last: dict, ckpts) -> int | str:
    """The 1-based epoch the worker was in after the metrics record ``last``.

    The trainer's epoch is fractional (1.25: a quarter into epoch 2; 1.0: epoch 1
    just finished). At a whole number the worker had moved on to the next epoch
    once the checkpoint of that step was written.
    """
    try:
        epoch = float(last["epoch"])
    except (TypeError, ValueError):
        return last["epoch"]
    if epoch.is_integer() and any(c.name == f"checkpoint-{last.get('step')}" for c in ckpts):
        return int(epoch) + 1
    return max(1, math.ceil(epoch))


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def terminate(rec: registry.JobRecord) -> None:
    """Send SIGTERM to the job's worker (if it is really ours): it stops at its next check.

    Not on Windows, where os.kill ends a process at once: there the worker sees the
    cancel in the registry within ``worker.CANCEL_POLL`` seconds and stops at a step boundary.
    """
    if os.name == "nt" or rec.pid is None or not worker_alive(rec):
        return
    try:
        os.kill(rec.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
