"""The local engine's job system with real worker processes and real tiny-model training.

Every test gets its own registry (a temp ``TUNING_MAGICS_HOME``); the built-in
tiny model is built once per session and shared through a symlink. Teardown
kills any worker still running, so no process outlives the test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import psutil
import pytest
from conftest import tmpfs

import tuning_magics as tm
from tuning_magics.backends.local import registry, scheduler
from tuning_magics.errors import UserError
from tuning_magics.jobs import (
    JOB_STATE_CANCELLED,
    JOB_STATE_FAILED,
    JOB_STATE_QUEUED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    METRIC_COLUMNS,
    JobFailedError,
    TUNING,
)

MODEL = "local/tiny-qwen3"


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _shared_models(tmp_path_factory) -> Path:
    """Build the tiny model once; every test's home links to it."""
    home = tmp_path_factory.mktemp("models-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNING_MAGICS_HOME", str(home))
        from tuning_magics.backends.local.models import tiny_model_path

        tiny_model_path(MODEL)
    return home / "models"


@pytest.fixture
def home(tmp_path, monkeypatch, _shared_models) -> Path:
    """A fresh registry for this test; kills every worker it started on the way out."""
    h = tmp_path / "home"
    h.mkdir()
    (h / "models").symlink_to(_shared_models, target_is_directory=True)
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(h))
    monkeypatch.setenv(scheduler.CONCURRENCY_ENV, "1")
    yield h
    _kill_workers()


def _kill_workers() -> None:
    victims = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a test's deliberately broken row is not news here
        found = registry.find()
    for rec in found:
        # Some tests record this very process as a "worker": never kill that one.
        if rec.pid is not None and rec.pid != os.getpid() and scheduler.worker_alive(rec):
            victims.append(rec.pid)
    victims += [pid for pid, proc in scheduler._children.items() if proc.poll() is None]
    for pid in set(victims):
        try:
            os.killpg(pid, signal.SIGKILL)  # workers lead their own session and group
        except (ProcessLookupError, PermissionError):
            pass
    for pid in set(victims):
        proc = scheduler._children.get(pid)
        if proc is not None:
            proc.wait(timeout=30)
        else:
            try:
                psutil.Process(pid).wait(timeout=30)
            except psutil.Error:
                pass
    scheduler.poll_children()


def records(n: int, *, long: bool = False) -> list[dict]:
    """Short prompt/completion pairs; ``long`` makes each step slow enough to interrupt reliably."""
    filler = " and so on" * 20 if long else ""
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}{filler}."} for i in range(n)]


def wait_for(cond, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- real training ---------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_fails_with_reason_and_resume_finishes(home):
    # 16 examples, batch 2: 8 steps (one checkpoint) per epoch; killed once epoch 2 has begun.
    # Three epochs leave the worker enough work that it is still running when the kill lands.
    job = tm.tune(MODEL, records(16, long=True), epochs=3, batch_size=2)
    ckpt_dir = Path(job.output_uri) / "postprocess" / "node-0" / "checkpoints"
    wait_for(lambda: (ckpt_dir / "checkpoint-8").is_dir() and job.metrics()["step"].max() > 8,
             what="the first checkpoint and a step of epoch 2")
    pid = registry.get(job.id).pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid), 30, "the worker to die")

    job.refresh()
    assert job.state == JOB_STATE_FAILED
    first_line = job.error.splitlines()[0]
    assert "ended unexpectedly (signal 9" in first_line, (pid, scheduler._children, scheduler._exited, job.error)
    assert re.search(r"during epoch [23] \(after step", first_line), first_line
    names = [c.name for c in job.checkpoints]
    assert names and "final" not in names
    assert f"job.resume() continues from {names[-1]}" in first_line
    # Only complete checkpoints are listed: each has its trainer state; temp folders are not listed.
    for c in job.checkpoints:
        assert (Path(c.uri) / "trainer_state.json").is_file()
    assert not any(c.name.startswith(".tmp-") for c in job.checkpoints)
    assert registry.get(job.id).pid is None

    job.resume()
    assert job.wait(timeout=180).state == JOB_STATE_SUCCEEDED, job.error
    assert job.attempts == 2
    assert job.error is None
    assert [c.name for c in job.checkpoints] == ["checkpoint-8", "checkpoint-16", "checkpoint-24", "final"]
    m = job.metrics()
    assert list(m.columns[: len(METRIC_COLUMNS)]) == list(METRIC_COLUMNS)
    assert m["step"].tolist() == list(range(1, 25))
    progress = job.progress()
    assert (progress.step, progress.total_steps, progress.epochs, progress.fraction) == (24, 24, 3, 1.0)
    reply = job.chat("What is 3 plus 3?", max_new_tokens=4)
    assert isinstance(reply, str)


@pytest.mark.slow
def test_three_jobs_with_limit_one_run_one_after_another(home):
    jobs = [tm.tune(MODEL, records(8), epochs=1, batch_size=4, tuned_model_display_name=f"seq-{i}")
            for i in range(3)]
    # Right after submission at most one is past QUEUED.
    assert sum(j.refresh().state != JOB_STATE_QUEUED for j in jobs) <= 1
    for j in jobs:
        assert j.wait(timeout=180).state == JOB_STATE_SUCCEEDED, j.error
    spans = [(j.started, j.ended) for j in jobs]
    # Oldest first, and each starts only after the previous one ended.
    for (s1, e1), (s2, e2) in itertools.pairwise(spans):
        assert s1 < e1 <= s2 < e2
    assert all(j.tuned_model and Path(j.tuned_model, "config.json").is_file() for j in jobs)
    # The serving hook: the tuned model behind a local OpenAI-compatible endpoint.
    from tuning_magics.backends.local.client import chat_completion

    with jobs[0].deploy() as endpoint:
        answer = chat_completion(endpoint.url, [{"role": "user", "content": "What is 1 plus 1?"}], max_tokens=4)
    assert answer["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.slow
def test_a_local_job_looks_up_no_host_but_loopback(home, tmp_path, monkeypatch):
    """Tuning stays on the machine: the worker (TRL's trainer inside it) names no host on the network, even
    where nothing in the user's environment turned the libraries' usage pings off (TRL skips its own under CI)."""
    for name in ("CI", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import socket
        open({str(tmp_path / "spied.txt")!r}, "a").close()
        _lookup = socket.getaddrinfo
        def getaddrinfo(host, *args, **kwargs):
            if host not in ("127.0.0.1", "localhost", "::1", "", None):
                with open({str(tmp_path / "hosts.txt")!r}, "a") as f:
                    f.write(f"{{host}}\\n")
            return _lookup(host, *args, **kwargs)
        socket.getaddrinfo = getaddrinfo
    """))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(spy), os.environ.get("PYTHONPATH")])))
    job = tm.tune(MODEL, records(8), epochs=1, batch_size=4, wait=True)
    assert job.state == JOB_STATE_SUCCEEDED, job.error
    assert (tmp_path / "spied.txt").is_file(), "the worker ran with the spy in place"
    assert not (tmp_path / "hosts.txt").exists(), (tmp_path / "hosts.txt").read_text()


@pytest.mark.slow
def test_cancel_queued_and_running_jobs(home):
    running = tm.tune(MODEL, records(16, long=True), epochs=3, batch_size=2)
    queued = tm.tune(MODEL, records(8), epochs=1)
    assert queued.state == JOB_STATE_QUEUED

    queued.cancel()
    assert queued.state == JOB_STATE_CANCELLED and queued.ended is not None
    assert queued.attempts == 0 and queued.started is None

    wait_for(lambda: running.refresh().state == JOB_STATE_RUNNING and running.substate == TUNING
             and len(running.metrics()) > 0, what="training to start")
    pid = registry.get(running.id).pid
    running.cancel()
    assert running.wait(timeout=60).state == JOB_STATE_CANCELLED
    wait_for(lambda: pid_gone(pid), 30, "the cancelled worker to exit")
    assert running.tuned_model is None
    assert "JOB_STATE_CANCELLED" in (Path(running.output_uri) / "worker.log").read_text()
    # The cancelled queued job was never started, even after the running one freed the slot.
    assert queued.refresh().state == JOB_STATE_CANCELLED and queued.attempts == 0


@pytest.mark.slow
def test_sigterm_stops_worker_cleanly(home):
    job = tm.tune(MODEL, records(16, long=True), epochs=3, batch_size=2)
    wait_for(lambda: len(job.metrics()) > 0, what="training to start")
    pid = registry.get(job.id).pid
    os.kill(pid, signal.SIGTERM)
    assert job.wait(timeout=60).state == JOB_STATE_CANCELLED
    assert "stopped by SIGTERM" in job.error
    wait_for(lambda: pid_gone(pid), 30, "the worker to exit")
    # Stopped at a step boundary: no half-written checkpoint folder is left behind.
    ckpt_dir = Path(job.output_uri) / "postprocess" / "node-0" / "checkpoints"
    assert not ckpt_dir.exists() or not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_stop_early_keeps_the_best_checkpoint_as_final_and_succeeds(home):
    # 16 examples, batch 2: 8 steps per epoch, 24 planned; stopped once epoch 2 has begun.
    validation = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(20, 24)]
    job = tm.tune(MODEL, records(16, long=True), validation_dataset=validation, epochs=3, batch_size=2)
    assert job.can_stop_early
    ckpt_dir = Path(job.output_uri) / "postprocess" / "node-0" / "checkpoints"
    wait_for(lambda: (ckpt_dir / "checkpoint-8").is_dir() and job.metrics()["step"].max() > 8,
             what="the first checkpoint and a step of epoch 2")
    job.stop_early()
    assert job.wait(timeout=120).state == JOB_STATE_SUCCEEDED, job.error
    m = re.fullmatch(r"stopped early at step (\d+) of 24; final is (checkpoint-\d+) \(lowest validation loss, (\S+)\)",
                     job.note or "")
    assert m, job.note
    stopped, kept = int(m.group(1)), m.group(2)
    assert 8 < stopped < 24
    frame = job.metrics()
    assert frame["step"].max() == stopped
    # The step it stopped at was evaluated and checkpointed, so the choice is among all it trained.
    evaluated = sorted({s for s in (8, 16) if s <= stopped} | {stopped})
    evals = frame.dropna(subset=["eval_loss"]).set_index("step")["eval_loss"]
    assert sorted(evals.index) == evaluated
    assert kept == f"checkpoint-{evals.idxmin()}"
    assert [c.name for c in job.checkpoints] == [f"checkpoint-{s}" for s in evaluated] + ["final"]
    assert isinstance(job.chat("What is 1 plus 1?", max_new_tokens=4), str)
    with pytest.raises(UserError, match="already ended"):
        job.stop_early()


@pytest.mark.slow
def test_stop_early_without_validation_keeps_the_latest_and_is_refused_for_a_queued_job(home):
    running = tm.tune(MODEL, records(16, long=True), epochs=3, batch_size=2)
    queued = tm.tune(MODEL, records(8), epochs=1)
    with pytest.raises(UserError, match="still queued.*job.cancel"):
        queued.stop_early()
    queued.cancel()
    wait_for(lambda: len(running.metrics()) > 1, what="training to start")
    running.stop_early()
    assert running.wait(timeout=120).state == JOB_STATE_SUCCEEDED, running.error
    m = re.fullmatch(r"stopped early at step (\d+) of 24; final is checkpoint-(\d+)", running.note or "")
    assert m and m.group(1) == m.group(2), running.note
    assert int(m.group(1)) < 24 and running.tuned_model is not None


@pytest.mark.slow
def test_a_new_process_lists_and_reattaches(home):
    # One process submits and exits at once, as a restarted kernel would.
    submit = textwrap.dedent(f"""
        import tuning_magics as tm
        recs = [{{"prompt": f"q{{i}}", "completion": f"a{{i}}"}} for i in range(16)]
        print(tm.tune({MODEL!r}, recs, epochs=2, batch_size=4, tuned_model_display_name="reattach").id)
    """)
    out = subprocess.run([sys.executable, "-c", submit], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().splitlines()[-1]

    # Another process finds the job by listing, then by name, and waits for it to finish.
    watch = textwrap.dedent("""
        import json, tuning_magics as tm
        listed = [j.id for j in tm.list_jobs()]
        job = tm.get_job("reattach").wait(timeout=150)
        print(json.dumps({"listed": listed, "id": job.id, "state": job.state, "steps": len(job.metrics())}))
    """)
    out = subprocess.run([sys.executable, "-c", watch], capture_output=True, text=True, timeout=200, env=os.environ)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["listed"] == [job_id]
    assert seen == {"listed": [job_id], "id": job_id, "state": JOB_STATE_SUCCEEDED, "steps": 8}
    assert tm.get_job(job_id).state == JOB_STATE_SUCCEEDED


# -- liveness, without training --------------------------------------------------------


def _fake_active(job_id: str, pid: int, pid_started: float | None, out: Path, *, state=JOB_STATE_RUNNING):
    out.mkdir(parents=True, exist_ok=True)
    registry.insert(registry.JobRecord(id=job_id, config={"base_model": MODEL}, state=state, output_dir=str(out),
                                       created=time.time(), pid=pid, pid_started=pid_started, started=time.time()))


def test_dead_worker_is_noticed_on_refresh(home, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    _fake_active("tune-dead", proc.pid, None, tmp_path / "dead")
    (tmp_path / "dead" / "metrics.jsonl").write_text(
        '{"step": 3, "epoch": 1.5, "train_loss": 1.0}\n{"step": 4, "ep'  # torn last line
    )
    job = tm.get_job("tune-dead")
    assert job.state == JOB_STATE_FAILED
    first = job.error.splitlines()[0]
    assert "ended unexpectedly" in first and "during epoch 2 (after step 3)" in first
    assert "job.resume() starts it again" in first
    assert job.ended is not None


def test_reused_pid_counts_as_dead(home, tmp_path):
    me = psutil.Process()
    _fake_active("tune-reused", me.pid, me.create_time() - 1000, tmp_path / "reused")
    _fake_active("tune-alive", me.pid, me.create_time(), tmp_path / "alive")
    assert tm.get_job("tune-reused").state == JOB_STATE_FAILED
    assert tm.get_job("tune-alive").state == JOB_STATE_RUNNING


def test_metrics_and_checkpoints_tolerate_partial_writes(home, tmp_path):
    out = tmp_path / "partial"
    ck = out / "postprocess" / "node-0" / "checkpoints"
    for name in ("checkpoint-10", "checkpoint-2", ".tmp-checkpoint-20-x", "checkpoint-30"):
        (ck / name).mkdir(parents=True)
    for name in ("checkpoint-10", "checkpoint-2"):
        (ck / name / "trainer_state.json").write_text("{}")
    (out / "metrics.jsonl").write_text(
        '{"step": 1, "epoch": 0.5, "train_loss": 2.0}\n'
        '{"step": 2, "epoch": 1.0, "train_loss": 1.5}\n'
        '{"step": 2, "epoch": 1, "eval_loss": 1.7}\n'
        '{"step": 3, "epoch": 1.5, "train_lo'
    )
    _fake_active("tune-partial", os.getpid(), psutil.Process().create_time(), out)
    job = tm.get_job("tune-partial")
    assert [c.name for c in job.checkpoints] == ["checkpoint-2", "checkpoint-10"]
    assert job.tuned_model is None
    m = job.metrics()
    assert m["step"].tolist() == [1, 2]
    assert m.loc[1, "train_loss"] == 1.5 and m.loc[1, "eval_loss"] == 1.7
    assert list(m.columns[:7]) == list(METRIC_COLUMNS)
    with pytest.raises(UserError, match="no final model yet"):
        job.chat("hi")


@pytest.mark.parametrize("progress", ['[1, 2, 3]', 'garbage', '{"step": "x", "total_steps": 24}', None])
def test_metric_rows_and_progress_of_the_wrong_types_never_break_a_view(home, tmp_path, progress):
    from tuning_magics.display.monitor import JobMonitor, job_text
    from tuning_magics.experiments import jobs_frame

    out = tmp_path / "edited"
    _fake_active("tune-edited", os.getpid(), psutil.Process().create_time(), out)
    (out / "metrics.jsonl").write_text(
        '{"step": 1, "epoch": 0.5, "train_loss": 2.0}\n'
        '{"step": "2", "epoch": 1.0, "train_loss": "1.5"}\n'          # numbers written as text: read as numbers
        '{"step": 3, "epoch": 1.5, "train_loss": [1, 2], "token_accuracy": "high"}\n'  # values left out
        '{"step": "three", "train_loss": 1.0}\n'                       # no whole step: the row is skipped
        '[1, 2, 3]\n"a string"\nnot json\n\n'
        '{"step": 4.0, "epoch": 2.0, "train_loss": 1.2, "eval_loss": {"x": 1}, "grad_norm": true}\n'
    )
    if progress is not None:
        (out / "progress.json").write_text(progress)
    job = tm.get_job("tune-edited")
    with pytest.warns(UserWarning) as caught:
        m = job.metrics()
        assert m["step"].tolist() == [1, 2, 3, 4]
        assert m["train_loss"].tolist()[:2] == [2.0, 1.5] and math.isnan(m.loc[2, "train_loss"])
        assert m["eval_loss"].isna().all() and m["token_accuracy"].isna().all() and "grad_norm" not in m
        p = job.progress()
        assert (p.step, p.epoch) == (4, 2.0)  # from the metrics: the progress file is not the worker's
        monitor = JobMonitor(job)
        assert "step 4" in monitor.progress_label.value and "train loss 1.2000" in monitor.losses.value
        assert "step 4" in job_text(job)
        assert jobs_frame([job]).loc[0, "final_train_loss"] == 1.2
    (warning,) = caught  # one warning, however often the job is read
    assert str(warning.message) == (f"{out / 'metrics.jsonl'} holds values that are not numbers (line 3: "
                                    "train_loss = [1, 2] and 7 more); they are left out of the job's metrics")


def test_progress_written_as_text_is_read_as_numbers(home, tmp_path):
    out = tmp_path / "texty"
    _fake_active("tune-texty", os.getpid(), psutil.Process().create_time(), out)
    (out / "progress.json").write_text('{"step": "5", "total_steps": "24", "epoch": "x", "epochs": 3}')
    p = tm.get_job("tune-texty").progress()
    assert (p.step, p.total_steps, p.epoch, p.epochs) == (5, 24, None, 3)


def test_resume_and_cancel_rules(home, tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    registry.insert(registry.JobRecord(id="tune-done", config={}, state=JOB_STATE_SUCCEEDED, output_dir=str(out),
                                       created=time.time(), ended=time.time()))
    job = tm.get_job("tune-done")
    with pytest.raises(UserError, match="already succeeded"):
        job.resume()
    assert job.cancel().state == JOB_STATE_SUCCEEDED  # an ended job is left as it is


def test_concurrency_setting(monkeypatch):
    monkeypatch.setenv(scheduler.CONCURRENCY_ENV, "3")
    assert scheduler.concurrency() == 3
    monkeypatch.setenv(scheduler.CONCURRENCY_ENV, "zero")
    with pytest.raises(UserError, match=scheduler.CONCURRENCY_ENV):
        scheduler.concurrency()


def test_wait_timeout_and_raise_on_failure(home, tmp_path):
    out = tmp_path / "f"
    out.mkdir()
    registry.insert(registry.JobRecord(id="tune-failed", config={}, state=JOB_STATE_FAILED, output_dir=str(out),
                                       created=time.time(), error="Traceback ...\nValueError: boom"))
    job = tm.get_job("tune-failed")
    assert job.wait() is job
    with pytest.raises(JobFailedError, match="ValueError: boom"):
        job.wait(raise_on_failure=True)
    # Queued behind a running job (this process), so it stays queued.
    _fake_active("tune-busy", os.getpid(), psutil.Process().create_time(), tmp_path / "b")
    _fake_active("tune-slow", os.getpid(), psutil.Process().create_time(), tmp_path / "s", state=JOB_STATE_QUEUED)
    with pytest.raises(TimeoutError, match="still JOB_STATE_QUEUED"):
        tm.get_job("tune-slow").wait(timeout=0.2, poll=0.05)


# -- user errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(train_dataset=records(4)), "base_model"),
        (dict(base_model="no-such-model", train_dataset=records(4)), "base_model"),
        (dict(base_model=MODEL), "train_dataset"),
        (dict(base_model=MODEL, train_dataset="/nonexistent/train.jsonl"), "train_dataset"),
        (dict(base_model=MODEL, train_dataset=42), "train_dataset"),
        (dict(base_model=MODEL, train_dataset=[]), "train_dataset"),
        (dict(base_model=MODEL, train_dataset=records(4), epochs=0), "epochs"),
        (dict(base_model=MODEL, train_dataset=records(4), epochs=1.5), "epochs"),
        (dict(base_model=MODEL, train_dataset=records(4), learning_rate=-1), "learning_rate"),
        (dict(base_model=MODEL, train_dataset=records(4), learning_rate=1e-3, learning_rate_multiplier=2.0),
         "learning_rate"),
        (dict(base_model=MODEL, train_dataset=records(4), tuning_mode="QLORA"), "tuning_mode"),
        (dict(base_model="qwen3-4b", train_dataset=records(4), tuning_mode="PEFT_ADAPTER"), "tuning_mode"),
        (dict(base_model=MODEL, train_dataset=records(4), adapter_size=8), "adapter_size"),
        (dict(base_model=MODEL, train_dataset=records(4), method="rlhf"), "method"),
        (dict(base_model=MODEL, train_dataset=records(4), method="distillation"), "base_teacher_model"),
        (dict(base_model="llama-3.1-8b", train_dataset=records(4), method="distillation",
              base_teacher_model="deepseek-ai/deepseek-v3.2-maas"), "base_model"),
        (dict(base_model=MODEL, train_dataset=records(4), base_teacher_model="deepseek-ai/deepseek-v3.2-maas"),
         "base_teacher_model"),
        (dict(base_model="gemini-2.5-flash", train_dataset=records(4), backend="local"), "base_model"),
        (dict(base_model=MODEL, train_dataset=records(4), backend="vertex"), "backend"),
        (dict(base_model=MODEL, train_dataset=records(4), output_uri="gs://b/out"), "output_uri"),
        (dict(base_model=MODEL, train_dataset=records(4), custom_base_model="/nonexistent"), "custom_base_model"),
        (dict(base_model=MODEL, train_dataset=records(4), batch_sise=4), "batch_sise"),
        (dict(base_model=MODEL, train_dataset=records(4), batch_size=0), "batch_size"),
        (dict(base_model=MODEL, source_model=MODEL, train_dataset=records(4)), "base_model"),
        (dict(base_model=MODEL, train_dataset=[{"prompt": "no answer"}]), "train_dataset"),
    ],
)
def test_tune_user_errors_are_one_line_and_name_the_parameter(home, kwargs, field):
    with pytest.raises(UserError) as info:
        tm.tune(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert field in message, message
    assert registry.find() == []
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())


def test_tune_rejects_a_non_empty_output_folder(home, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(UserError, match="output_uri .* already holds files"):
        tm.tune(MODEL, records(4), output_uri=str(tmp_path / "used"))
    assert (tmp_path / "used" / "x").exists()


def test_a_refused_submission_removes_only_what_it_made(home, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    no_answers = [{"prompt": "no answer"}]
    with pytest.raises(UserError, match="train_dataset"):
        tm.tune(MODEL, no_answers, output_uri=str(mine))
    assert mine.is_dir() and list(mine.iterdir()) == []  # the user's own (empty) folder stays
    with pytest.raises(UserError, match="validation_dataset"):
        tm.tune(MODEL, records(4), validation_dataset=records(4), output_uri=str(tmp_path / "new" / "run" / "1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "mine"]  # with the parents it made
    assert registry.find() == []


def test_get_job_unknown_name(home):
    with pytest.raises(UserError, match="no local tuning job 'tune-nope'"):
        tm.get_job("tune-nope")
    with pytest.raises(UserError, match="not a Vertex AI tuning job name"):
        tm.get_job("projects/p/locations/us-central1/models/1")


def test_api_import_is_light():
    heavy = ("torch", "transformers", "pandas", "google.genai", "vertexai", "google.cloud.storage")
    code = f"import sys, tuning_magics.api; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# -- submission details, with the only slot held so nothing starts --------------------------


@pytest.fixture
def slot_taken(home, tmp_path):
    """A live 'running' job (this process) fills the one slot: new submissions stay QUEUED."""
    _fake_active("tune-busy", os.getpid(), psutil.Process().create_time(), tmp_path / "busy")
    return home


def test_submission_records_config_and_copies_datasets(slot_taken, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records(6)))
    val = records(3)
    job = tm.tune(source_model=MODEL, training_dataset=str(train), validation_dataset=val, epoch_count=2,
                  tuning_mode="lora", adapter_size=4, learning_rate=1e-3, tuned_model_display_name="copy-test",
                  batch_size=2, seed=7, output_uri=str(tmp_path / "out"))
    assert job.state == JOB_STATE_QUEUED and job.attempts == 0
    assert job.output_uri == str((tmp_path / "out").resolve())
    cfg = job.config
    assert cfg["base_model"] == MODEL and cfg["tuning_mode"] == "PEFT_ADAPTER" and cfg["adapter_size"] == 4
    assert cfg["epochs"] == 2 and cfg["learning_rate"] == 1e-3
    assert cfg["engine_options"] == {"batch_size": 2, "seed": 7}
    assert cfg["train_dataset"] == str(train) and cfg["validation_dataset"] == "list of 3 records"
    # The data is copied into the job folder: a resumed job trains on what it started with.
    assert Path(cfg["train_path"]).read_text() == train.read_text()
    assert len(Path(cfg["validation_path"]).read_text().splitlines()) == 3
    assert tm.get_job("copy-test").id == job.id
    assert [j.id for j in tm.list_jobs()] == [job.id, "tune-busy"]
    assert [j.id for j in tm.list_jobs(limit=1)] == [job.id]
    text = repr(job)
    assert "\n" not in text and job.id in text and "QUEUED" in text and "copy-test" in text
    assert job.cancel().state == JOB_STATE_CANCELLED


def test_source_model_object_and_dataset_object(slot_taken, tmp_path):
    from types import SimpleNamespace

    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records(4)))
    source = SimpleNamespace(base_model=MODEL, custom_base_model=None)
    job = tm.tune(source, SimpleNamespace(uri=str(train)))
    assert job.config["base_model"] == MODEL and job.config["tuning_mode"] == "FULL"
    assert Path(job.config["train_path"]).is_file()
    with pytest.raises(UserError, match="train_dataset .*line"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "x"}\n')
        tm.tune(MODEL, str(bad))


@pytest.fixture
def teacher_endpoint():
    """A minimal OpenAI-compatible endpoint on 127.0.0.1 that answers every prompt the same way."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._send({"object": "list", "data": [{"id": "teacher", "object": "model"}]})

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send({"choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "Step by step: 42."}}]})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_distillation_labels_with_the_teacher_then_trains(home, teacher_endpoint):
    job = tm.tune(MODEL, [{"prompt": f"Explain {i}"} for i in range(8)], method="distillation",
                  base_teacher_model=teacher_endpoint, epochs=1, batch_size=4)
    assert job.id.startswith("distill-")
    assert job.wait(timeout=180).state == JOB_STATE_SUCCEEDED, job.error
    labelled = Path(job.output_uri) / "distillation_labelled_dataset.jsonl"
    rows = [json.loads(line) for line in labelled.read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["messages"][-1] == {"role": "assistant", "content": "Step by step: 42."}
    assert job.tuned_model is not None and len(job.metrics()) == 2


@pytest.mark.slow
def test_gs_dataset_is_fetched_into_the_job_folder(home, gcs_emulator, tmp_path):
    import pandas as pd

    uri = gcs_emulator.uri("train.jsonl")
    df = pd.DataFrame(records(8))
    ds = tm.dataset(df, out=uri, prompt="prompt", completion="completion")
    job = tm.tune(MODEL, uri, epochs=1)
    job.wait(timeout=180)
    assert job.state == JOB_STATE_SUCCEEDED, job.error
    from tuning_magics import storage

    copied = Path(job.config["train_path"])
    assert copied.parent == Path(job.output_dir)
    assert copied.read_bytes() == storage.read_bytes(ds.uri)


def test_a_job_that_cannot_fit_is_refused_at_submission(home, monkeypatch):
    from tuning_magics.backends.local import memory

    # A fixed machine size, so the verdict does not depend on where the test runs.
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 16 * 2**30)
    with pytest.raises(UserError) as err:
        tm.tune("meta/llama3-3@llama-3.3-70b-instruct", records(4), tuning_mode="FULL")
    message = str(err.value)
    assert "\n" not in message and "needs ~" in message and "16 GiB" in message
    assert "use " in message  # says what would fit
    assert registry.find() == []
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())


@pytest.mark.parametrize("kwargs, needle", [
    (dict(learning_rate=float("inf")), "learning_rate must be a finite number above 0"),
    (dict(warmup_ratio=5), "warmup_ratio must be a number from 0 up to"),
    (dict(lr_scheduler="foo"), "lr_scheduler must be cosine, linear or constant"),
    (dict(max_grad_norm="x"), "max_grad_norm must be a finite number above 0"),
    (dict(bf16="no"), "bf16 must be True, False or None"),
    (dict(device="tpu"), "device must be cpu, cuda, cuda:N, mps or auto"),
])
def test_engine_options_are_checked_before_queueing(home, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        tm.tune(MODEL, records(4), **kwargs)
    assert registry.find() == []


def test_validation_set_rules_apply_to_tune(home):
    with pytest.raises(UserError, match="validation_dataset: the validation set is identical to the training set"):
        tm.tune(MODEL, records(4), validation_dataset=records(4))
    assert registry.find() == []


def test_a_dataset_built_for_another_model_is_checked_again(home, tmp_path):
    import pandas as pd

    df = pd.DataFrame({"q": ["Describe it"], "a": ["A cat."], "img": ["gs://bucket/cat.jpg"]})
    ds = tm.dataset(df, out=str(tmp_path / "img.jsonl"), prompt="q", completion="a", images="img")
    with pytest.raises(UserError, match="has an image but local/tiny-qwen3 is text-only"):
        tm.tune(MODEL, ds)
    assert registry.find() == []


# -- a damaged registry ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_a_damaged_registry_is_named_never_overwritten_and_rebuilt(slot_taken, tmp_path, capsys, damage):
    job = tm.tune(MODEL, records(4), tuned_model_display_name="survivor")
    elsewhere = tm.tune(MODEL, records(4), output_uri=str(tmp_path / "elsewhere"))
    path = registry.db_path()
    with registry.connect() as conn:  # fold the WAL into the file, as a closed registry would be
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    broken = {"empty": b"", "garbage": b"this is not a database at all" * 100, "truncated": data[:200]}[damage]
    path.write_bytes(broken)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)

    for call in (tm.list_jobs, lambda: tm.get_job(job.id),
                 lambda: tm.tune(MODEL, records(4), output_uri=str(tmp_path / "new"))):
        with pytest.raises(registry.RegistryDamaged) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "tuning-magics rebuild-registry" in message
        assert path.read_bytes() == broken  # never written over, never truncated
    assert not (tmp_path / "new").exists()

    from tuning_magics.cli import main

    assert main(["rebuild-registry", str(tmp_path / "elsewhere")]) == 0
    (aside,) = [p for p in path.parent.glob(f"{path.name}.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert capsys.readouterr().out == f"rebuilt {path} with 2 jobs; the damaged file is kept as {aside}\n"
    assert aside.read_bytes() == broken
    found = {j.id: j for j in tm.list_jobs()}
    assert set(found) >= {job.id, elsewhere.id}
    assert found[job.id].display_name == "survivor" and found[job.id].config == job.config
    # Its last state was lost with the registry: FAILED, and resume() takes it from there.
    assert found[job.id].state == JOB_STATE_FAILED and "job.resume()" in found[job.id].error
    again = tm.rebuild_registry()
    assert again.added == [] and again.aside is None and str(again).endswith("nothing to add")


def _remove_registry() -> None:
    path = registry.db_path()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_a_missing_registry_is_made_again_from_the_job_folders(slot_taken, tmp_path):
    job = tm.tune(MODEL, records(4), tuned_model_display_name="kept")
    elsewhere = tm.tune(MODEL, records(4), output_uri=str(tmp_path / "elsewhere"))
    _remove_registry()
    with pytest.warns(UserWarning, match=r"registry .* was missing; 1 job listed again .*rebuild_registry\(folder\)"):
        listed = tm.list_jobs()
    assert [j.id for j in listed] == [job.id]
    assert listed[0].display_name == "kept" and listed[0].config == job.config
    assert listed[0].state == JOB_STATE_FAILED and "job.resume()" in listed[0].error
    # A job given its own output_uri is found from its folder; the registry keeps what it has.
    done = tm.rebuild_registry(tmp_path / "elsewhere")
    assert done.added == [elsewhere.id] and done.aside is None
    assert str(done) == f"added 1 job from their folders to {registry.db_path()}"
    assert [j.id for j in tm.list_jobs()] == [elsewhere.id, job.id]
    assert tm.get_job(job.id).state == JOB_STATE_FAILED
    assert tm.rebuild_registry(tmp_path / "elsewhere").added == []


def test_rebuild_adds_only_the_jobs_a_readable_registry_lacks(slot_taken, tmp_path):
    known = tm.tune(MODEL, records(4))
    forgotten = tm.tune(MODEL, records(4))
    with registry.connect() as conn:
        conn.execute("DELETE FROM jobs WHERE id = ?", (forgotten.id,))
    assert tm.rebuild_registry().added == [forgotten.id]
    found = {j.id: j.state for j in tm.list_jobs()}
    assert found == {known.id: JOB_STATE_QUEUED, forgotten.id: JOB_STATE_FAILED, "tune-busy": JOB_STATE_RUNNING}


def test_a_crash_while_rebuilding_never_leaves_no_registry(slot_taken, tmp_path, monkeypatch):
    job = tm.tune(MODEL, records(4))
    path = registry.db_path()
    path.write_bytes(b"garbage" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)

    class Crash(BaseException):
        pass

    real_replace, seen = os.replace, []

    def replace(src, dst):
        if Path(dst) == path:  # the rebuilt file's last step: the process dies just before it
            seen.append(path.exists())
            raise Crash()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        tm.rebuild_registry()
    monkeypatch.setattr(os, "replace", real_replace)
    assert seen == [True] and path.read_bytes() == b"garbage" * 100
    with pytest.raises(registry.RegistryDamaged):  # still named as damaged, not silently empty
        tm.list_jobs()
    assert tm.rebuild_registry().aside is not None
    assert job.id in {j.id for j in tm.list_jobs()}


def test_a_read_only_home_is_one_line(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "read-only", "ro,size=1M") as mount:
        monkeypatch.setenv("TUNING_MAGICS_HOME", str(mount))
        for call in (tm.list_jobs, lambda: tm.tune(MODEL, records(4)), tm.rebuild_registry):
            with pytest.raises(UserError) as err:
                call()
            assert str(err.value) == (f"TUNING_MAGICS_HOME {mount} cannot be used (read-only file system); "
                                      "set TUNING_MAGICS_HOME to a folder you can write to")


@pytest.mark.parametrize("home_at", ["afile", "afile/home"])
def test_a_home_that_cannot_be_a_folder_is_one_line(tmp_path, monkeypatch, home_at):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path / home_at))
    for call in (tm.list_jobs, lambda: tm.get_job("tune-x"), lambda: tm.tune(MODEL, records(4)),
                 tm.rebuild_registry):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == (f"TUNING_MAGICS_HOME {tmp_path / home_at} cannot be used ({tmp_path / 'afile'} is "
                                  "a file, not a folder); set TUNING_MAGICS_HOME to a folder you can write to")
    assert (tmp_path / "afile").read_text() == "x"


def test_a_relative_home_is_taken_from_the_current_folder(home, tmp_path, monkeypatch):
    monkeypatch.chdir(home.parent)
    monkeypatch.setenv("TUNING_MAGICS_HOME", home.name)  # e.g. TUNING_MAGICS_HOME=home jupyter lab
    assert registry.db_path() == home / "jobs.sqlite3"
    _fake_active("tune-busy", os.getpid(), psutil.Process().create_time(), tmp_path / "busy")  # nothing starts
    job = tm.tune(MODEL, records(4), tuned_model_display_name="relative")
    assert Path(job.output_uri) == home / "jobs" / job.id
    assert [j.id for j in tm.list_jobs()] == [job.id, "tune-busy"]
    assert tm.get_job("relative").id == job.id
    monkeypatch.chdir(tmp_path / "busy")  # an absolute path was recorded: the job is still found whole
    assert Path(tm.get_job(job.id).output_uri) == home / "jobs" / job.id


def test_a_broken_row_hides_no_other_job(slot_taken, tmp_path):
    kept = tm.tune(MODEL, records(4))
    mended = tm.tune(MODEL, records(4))
    lost = tm.tune(MODEL, records(4))
    (Path(lost.output_uri) / "job.json").unlink()
    with registry.connect() as conn:
        conn.execute("UPDATE jobs SET config = '{not json' WHERE id IN (?, ?)", (mended.id, lost.id))

    with pytest.warns(UserWarning, match=f"job {lost.id} in the registry .* cannot be read"):
        listed = [j.id for j in tm.list_jobs()]
    assert listed == [mended.id, kept.id, "tune-busy"]
    assert tm.get_job(mended.id).config == kept.config | {"train_path": mended.config["train_path"],
                                                          "output_uri": mended.output_uri}
    with pytest.raises(UserError, match=f"job {lost.id} in the registry .* cannot be read"):
        tm.get_job(lost.id)


# -- another process writing the registry ----------------------------------------------------


@contextlib.contextmanager
def held_by_another_process(what: str = "registry"):
    """A second process holds the registry's write lock (``BEGIN IMMEDIATE``), or the scheduler's lock."""
    registry.connect().close()  # the registry exists
    take = ("import sqlite3; conn = sqlite3.connect(path, isolation_level=None); conn.execute('BEGIN IMMEDIATE')"
            if what == "registry" else "from filelock import FileLock; held = FileLock(path); held.acquire()")
    path = registry.db_path() if what == "registry" else registry.home() / "scheduler.lock"
    code = f"import sys; path = {str(path)!r}; {take}; print('held', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()  # the holder ends, and its lock with it
        proc.wait(30)


def busy_message() -> str:
    return f"the job registry {registry.db_path()} is busy (another process is writing it); try again in a moment"


def test_a_registry_another_process_is_writing_is_one_line_after_a_short_wait(slot_taken, tmp_path):
    queued = tm.tune(MODEL, records(4))
    with held_by_another_process():
        for call in (lambda: tm.tune(MODEL, records(4)), queued.cancel):
            start = time.monotonic()
            with pytest.raises(registry.RegistryBusy) as err:
                call()
            assert time.monotonic() - start < 15  # a few seconds, not sqlite's 30 s
            assert str(err.value) == busy_message()
        # Readers go on meanwhile, and the refused submission left nothing behind.
        assert [j.id for j in tm.list_jobs()] == [queued.id, "tune-busy"]
        assert [p.name for p in (slot_taken / "jobs").iterdir()] == [queued.id]
    assert queued.cancel().state == JOB_STATE_CANCELLED


def test_a_worker_outlasts_a_write_longer_than_a_notebook_would_wait(slot_taken, tmp_path):
    # A worker started for a job that is not PENDING changes nothing, but must write to find that out.
    registry.insert(registry.JobRecord(id="tune-waiting", config={"base_model": MODEL}, state=JOB_STATE_QUEUED,
                                       output_dir=str(tmp_path / "w"), created=time.time()))
    with held_by_another_process():
        worker = subprocess.Popen([sys.executable, "-m", "tuning_magics.backends.local.worker", "tune-waiting"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(registry.busy_wait + 3)  # longer than %tune or the monitor would wait
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    assert "is JOB_STATE_QUEUED, not PENDING; nothing to do" in out and "busy" not in out


def test_a_job_whose_start_met_a_busy_scheduler_starts_at_the_next_look(home):
    with held_by_another_process("scheduler"):
        with pytest.warns(UserWarning) as caught:
            job = tm.tune(MODEL, records(4), epochs=1)
        assert job.state == JOB_STATE_QUEUED
    (warning,) = caught
    assert str(warning.message) == (f"job {job.id} is queued but not started yet: {busy_message()}; it starts at "
                                    "the next look at it (job.refresh(), job.wait() or the monitor)")
    assert job.refresh().state != JOB_STATE_QUEUED
    job.cancel()


# -- the job folder and the disk ---------------------------------------------------------


def test_output_uri_that_cannot_be_a_folder_is_one_line(home, tmp_path):
    (tmp_path / "somefile.txt").write_text("x")
    for bad in (tmp_path / "somefile.txt" / "run", tmp_path / "somefile.txt"):
        with pytest.raises(UserError) as err:
            tm.tune(MODEL, records(4), output_uri=str(bad))
        message = str(err.value)
        assert "\n" not in message and "output_uri" in message and "somefile.txt is a file" in message
    assert registry.find() == []
    assert (tmp_path / "somefile.txt").read_text() == "x"


@pytest.mark.slow
def test_removing_the_job_folder_while_it_trains_fails_the_job(home, tmp_path):
    job = tm.tune(MODEL, records(16, long=True), epochs=3, batch_size=2, output_uri=str(tmp_path / "doomed"))
    wait_for(lambda: len(job.metrics()) > 0, what="training to start")
    import shutil

    shutil.rmtree(job.output_uri)
    job.wait(timeout=120)
    assert job.state == JOB_STATE_FAILED
    assert job.error.splitlines() == [job.error]
    assert f"{job.output_uri} was removed while the job was running" in job.error


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs): too small for a checkpoint of the tiny model."""
    with tmpfs(tmp_path / "disk", "size=2M") as mount:
        try:
            yield mount
        finally:
            _kill_workers()  # nothing may hold a file on it


@pytest.mark.slow
def test_a_full_disk_fails_the_job_saying_so(home, small_disk):
    job = tm.tune(MODEL, records(8), epochs=1, batch_size=4, output_uri=str(small_disk / "job"))
    job.wait(timeout=120)
    assert job.state == JOB_STATE_FAILED
    assert job.error == (f"no space left on device in {small_disk / 'job'}; free some space, then job.resume() "
                         "continues from the last checkpoint")
    ckpts = small_disk / "job" / "postprocess" / "node-0" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.iterdir())  # the half-written checkpoint is gone


# -- installs and platforms -------------------------------------------------------------


def test_without_the_local_extra_tune_names_it_and_jobs_still_list(home, tmp_path, without_extra):
    _fake_active("tune-listed", os.getpid(), psutil.Process().create_time(), tmp_path / "listed")
    code = textwrap.dedent(f"""
        import tuning_magics as tm
        from tuning_magics.errors import MissingExtra
        print([j.id for j in tm.list_jobs()], tm.get_job("tune-listed").state)
        try:
            tm.get_job("tune-listed").deploy()
        except MissingExtra as exc:
            print(exc)
        tm.tune({MODEL!r}, [{{"prompt": "q", "completion": "a"}}], output_uri={str(tmp_path / "out")!r})
    """)
    done = without_extra("local", code)
    assert done.stdout.splitlines()[0] == "['tune-listed'] JOB_STATE_RUNNING", done.stderr
    assert 'pip install "tuning_magics[local]"' in done.stdout.splitlines()[1]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tuning_magics.errors.MissingExtra: ") and 'pip install "tuning_magics[local]"' in last
    assert not (tmp_path / "out").exists() and [r.id for r in registry.find()] == ["tune-listed"]


@pytest.mark.parametrize("module", ["filelock", "psutil"])
def test_tune_without_filelock_or_psutil_names_the_extra_before_writing_anything(home, tmp_path, without_extra,
                                                                                 module):
    # The queue's lock needs filelock; telling a live worker from a dead one needs psutil.
    code = textwrap.dedent(f"""
        import tuning_magics as tm
        try:
            tm.tune({MODEL!r}, [{{"prompt": "q", "completion": "a"}}], output_uri={str(tmp_path / "out")!r})
        except tm.UserError as exc:
            print(exc)
    """)
    done = without_extra("local", code, modules=[module])
    assert done.stdout.strip() == f'this needs {module}, which is not installed: pip install "tuning_magics[local]"', \
        done.stderr
    assert registry.find() == [] and not (tmp_path / "out").exists()


def test_the_scheduler_runs_without_fcntl(home, tmp_path):
    # As on Windows: no fcntl module. A dead worker makes list_jobs() take the scheduler's lock.
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    _fake_active("tune-gone", proc.pid, None, tmp_path / "gone")
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["fcntl"] = None
        warnings.simplefilter("ignore")  # filelock says it falls back to a soft lock
        import tuning_magics as tm
        print(tm.list_jobs()[0].state)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.stdout.split() == [JOB_STATE_FAILED], done.stderr


def test_death_reason_needs_no_posix_only_signal(home, tmp_path, monkeypatch):
    _fake_active("tune-killed", 424242, None, tmp_path / "killed")
    monkeypatch.delattr(signal, "SIGKILL")
    monkeypatch.setitem(scheduler._exited, 424242, -9)
    assert "ended unexpectedly (signal 9" in scheduler.death_reason(registry.get("tune-killed"))


def test_scheduler_and_jobs_do_not_import_each_other(home, tmp_path):
    _fake_active("tune-x", 424243, None, tmp_path / "x")
    code = textwrap.dedent("""
        import sys
        from tuning_magics.backends.local import registry, scheduler
        scheduler.death_reason(registry.get("tune-x"))
        print("tuning_magics.backends.local.jobs" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ)
    assert done.stdout.split() == ["False"], done.stderr


# -- which backend: a Cloud project or a broken pyproject.toml does not stop local work --------


@pytest.mark.parametrize("setup", ["cloud project", "broken pyproject"])
def test_builtin_models_tune_locally_whatever_the_settings(slot_taken, tmp_path, monkeypatch, setup):
    if setup == "cloud project":  # every Vertex AI Workbench and Colab Enterprise kernel
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "my-project")
    else:
        (tmp_path / "pyproject.toml").write_text("[tool.tuning_magics\nproject = \n")
        monkeypatch.chdir(tmp_path)

    def listed():
        # With a project and no credentials, the local jobs are listed and one line says why Vertex AI's are not.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = [j.name for j in tm.list_jobs()]
        if setup == "cloud project" and importlib.util.find_spec("google.genai"):
            assert [str(w.message) for w in caught] == [
                "Vertex AI jobs are not listed: no Google Cloud credentials found for project "
                "my-project: run `gcloud auth application-default login`, or pass "
                "tuning_magics.settings.update(credentials=...)"]
        else:
            assert caught == []
        return names

    assert listed() == ["tune-busy"]
    workers = set(scheduler._children)
    job = tm.tune(MODEL, records(4), epochs=1)
    assert job.backend == "local" and job.state == JOB_STATE_QUEUED
    assert set(scheduler._children) == workers  # queued behind the busy slot: no worker (a fast test)
    assert listed() == [job.name, "tune-busy"]
    assert tm.get_job(job.name).name == job.name
    job.cancel()
    if setup == "broken pyproject":
        # A catalog model's backend depends on the settings: the broken file is named in one line.
        with pytest.raises(UserError) as info:
            tm.tune("qwen3-4b", records(4), epochs=1)
        assert "pyproject.toml" in str(info.value) and "\n" not in str(info.value)


def test_an_explicit_backend_wins(home, monkeypatch):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    with pytest.raises(UserError, match="local/tiny-qwen3 is built into the local engine") as info:
        tm.tune(MODEL, records(4), epochs=1, backend="vertex")
    assert info.value.field == "backend"
    assert tm.list_jobs() == []
