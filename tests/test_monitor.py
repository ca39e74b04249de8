"""The job monitor (display/monitor.py): built once, coloured by state, a text fallback, updated from a thread.

Colour and escaping cases use a small Job whose snapshots the test scripts; the
rest runs against real jobs: the local engine training its tiny model, and
the fake Vertex AI API.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import timedelta

import pandas as pd
import pytest

pytest.importorskip("ipywidgets")

import tuning_magics as tm  # noqa: E402
from tuning_magics.display import monitor as mon  # noqa: E402
from tuning_magics.display.monitor import JobMonitor, job_text, show  # noqa: E402
from tuning_magics.errors import UserError  # noqa: E402
from tuning_magics.jobs import Checkpoint, Job, JobInfo, now  # noqa: E402

from test_local_jobs import (  # noqa: E402,F401
    MODEL,
    _fake_active,
    _shared_models,
    busy_message,
    held_by_another_process,
    home,
    records,
    wait_for,
)


class Scripted(Job):
    """A job whose snapshots, metrics and checkpoints the test sets."""

    backend = "scripted"

    def __init__(self, info: JobInfo, frame: pd.DataFrame | None = None, checkpoints=()):
        self.script = info
        self.frame = frame if frame is not None else pd.DataFrame({"step": []})
        self.ckpts = list(checkpoints)
        self.fetches = 0
        super().__init__(None)

    def _fetch(self) -> JobInfo:
        self.fetches += 1
        return self.script

    def cancel(self):
        return self

    def resume(self):
        return self

    def metrics(self):
        return self.frame

    @property
    def checkpoints(self):
        return self.ckpts

    def poll_interval(self, looks: int) -> float:
        return 0.05


def info(state="JOB_STATE_RUNNING", **kw) -> JobInfo:
    started = now() - timedelta(seconds=60)
    values = dict(name="job-1", state=state, substate="TUNING", created=started - timedelta(seconds=5),
                  started=started, config={"base_model": "local/tiny-qwen3", "epochs": 3}, attempts=1)
    values.update(kw)
    return JobInfo(**values)


def frame(steps: int, *, evals=()) -> pd.DataFrame:
    rows = [{"step": s, "epoch": s / 40, "train_loss": 3.0 / s, "token_accuracy": min(1.0, s / 100)}
            for s in range(1, steps + 1)]
    for s in evals:
        rows[s - 1]["eval_loss"] = 2.0 / s
    out = pd.DataFrame(rows)
    if "eval_loss" not in out:
        out["eval_loss"] = float("nan")
    return out


def tree(widget) -> list:
    """Every widget below ``widget``, in order."""
    out = [widget]
    for child in getattr(widget, "children", ()):
        out += tree(child)
    return out


class ProgressJob(Scripted):
    def progress(self):
        from tuning_magics.jobs import Progress

        return Progress(step=30, total_steps=120, epoch=0.75, epochs=3)


# -- one tree, colours, numbers -------------------------------------------------------------


def test_the_tree_is_built_once_and_only_values_change():
    job = Scripted(info(), frame(5))
    monitor = JobMonitor(job)
    before = [id(w) for w in tree(monitor.widget)]
    image = bytes(monitor.plot.value)
    assert image.startswith(b"\x89PNG") and monitor.redraws == 1
    job.frame = frame(9, evals=[8])
    job.ckpts = [Checkpoint("checkpoint-8", 8, "/x/checkpoint-8")]
    job.script = info(state="JOB_STATE_SUCCEEDED", substate=None, ended=now())
    job.ckpts.append(Checkpoint("final", None, "/x/final"))
    monitor.update()
    assert [id(w) for w in tree(monitor.widget)] == before
    assert bytes(monitor.plot.value) != image and monitor.redraws == 2
    assert "JOB_STATE_SUCCEEDED" in monitor.state.value and monitor.bar.bar_style == "success"
    assert list(monitor.checkpoint.options) == ["checkpoint-8", "final"]
    # No new metric rows: the plot is not drawn again.
    monitor.update()
    assert monitor.redraws == 2


@pytest.mark.parametrize("state,style", [("JOB_STATE_SUCCEEDED", "success"), ("JOB_STATE_FAILED", "danger"),
                                         ("JOB_STATE_CANCELLED", "danger"), ("JOB_STATE_EXPIRED", "danger"),
                                         ("JOB_STATE_RUNNING", "info"), ("JOB_STATE_PAUSED", "warning")])
def test_the_bar_and_the_badge_take_the_states_colour(state, style):
    done = state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")
    monitor = JobMonitor(Scripted(info(state=state, ended=now() if done else None)))
    assert monitor.bar.bar_style == style
    assert mon._COLOURS[style] in monitor.state.value
    if done:
        assert monitor.bar.value == 1.0 and monitor.cancel_button.disabled


def test_progress_and_eta_come_from_the_job():
    # Step 30 of 120 after 60 s of training: half a step a second, 90 steps left.
    monitor = JobMonitor(ProgressJob(info(), frame(30)))
    snap = monitor.snapshot
    assert snap.eta == pytest.approx(180, abs=3)
    assert monitor.bar.value == pytest.approx(0.25)
    assert monitor.progress_label.value.startswith("step 30 of 120 (25%) · epoch 0.75 of 3 · ETA 3:0")
    assert "elapsed 1:05" in monitor.times.value and "queued 0:05" in monitor.times.value
    assert mon.eta_seconds(10, 20, None) is None and mon.eta_seconds(10, 20, 2.0) == 5.0


def test_the_text_fallback_carries_state_progress_and_last_losses():
    job = ProgressJob(info(), frame(30, evals=[30]))
    bundle = JobMonitor(job)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    for kind in ("text/plain", "text/html"):
        text = bundle[kind]
        assert "JOB_STATE_RUNNING" in text and "TUNING" in text
        assert "step 30 of 120 (25%)" in text
        assert "train loss 0.1000" in text and "validation loss 0.0667" in text and "token accuracy 0.300" in text
    def timeless(text):
        return re.sub(r"(ETA|elapsed|queued) [\d:]+", r"\1", text)

    assert timeless(job_text(job)) == timeless(bundle["text/plain"])
    # Displaying the job where no kernel runs shows the same, once.
    assert timeless(job._repr_mimebundle_()["text/plain"]) == timeless(bundle["text/plain"])


def test_error_text_is_shown_whole_and_escaped():
    error = "Traceback (most recent call last):\n  ...\nValueError: <script>alert('x')</script> & more"
    job = Scripted(info(state="JOB_STATE_FAILED", error=error, ended=now()))
    monitor = JobMonitor(job)
    assert monitor.error.layout.display == ""
    shown = monitor.error.value
    assert "<script>" not in shown and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in shown
    assert shown.startswith("<pre") and "Traceback (most recent call last):\n" in shown
    html = monitor._repr_mimebundle_()["text/html"]
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert error in job_text(job)
    assert monitor.bar.bar_style == "danger"


def test_a_picked_checkpoint_is_kept_and_final_is_the_default():
    job = Scripted(info(), frame(3), [Checkpoint("checkpoint-8", 8, "/x/8")])
    monitor = JobMonitor(job)
    assert monitor.selected_checkpoint == "checkpoint-8"
    job.ckpts = [*job.ckpts, Checkpoint("checkpoint-16", 16, "/x/16")]
    monitor.update()
    assert monitor.selected_checkpoint == "checkpoint-16"  # the newest, while the user has picked none
    monitor.checkpoint.value = "checkpoint-8"
    job.ckpts = [*job.ckpts, Checkpoint("final", None, "/x/final")]
    monitor.update()
    assert monitor.selected_checkpoint == "checkpoint-8"


def test_a_backend_without_stop_early_says_so_in_one_line_and_shows_no_button():
    job = Scripted(info())
    assert not job.can_stop_early
    with pytest.raises(UserError, match="not supported by the scripted backend") as err:
        job.stop_early()
    assert "\n" not in str(err.value)
    monitor = JobMonitor(job)
    assert monitor.stop_early_button is None
    monitor._act("stop_early")  # a mistake shows as the monitor's message, never a traceback
    assert "not supported" in monitor.message.value


def test_ten_thousand_points_are_thinned_for_drawing():
    monitor = JobMonitor(Scripted(info(), frame(10_000, evals=range(1000, 10_001, 1000))))
    assert len(monitor._plot.train_raw.get_xdata()) <= mon.MAX_DRAWN_POINTS
    assert monitor._plot.train_raw.get_xdata()[-1] == 10_000


# -- the thread -----------------------------------------------------------------------------


class FakeKernel:
    """Records the parent header each thread sets, as ipykernel 7's per-thread parent does."""

    def __init__(self):
        self.header = {"header": {"msg_id": "cell-1"}}
        self.set_in: list[tuple[str, dict]] = []
        self._parent_ident = {"shell": b"ident"}

    def get_parent(self, channel=None):
        return self.header

    def set_parent(self, ident, parent, channel="shell"):
        self.set_in.append((threading.current_thread().name, parent, ident))


class FakeShell:
    def __init__(self, kernel):
        self.kernel = kernel
        self.thread_parents = []

    def set_thread_parent(self, parent):
        self.thread_parents.append((threading.current_thread().name, parent))


@pytest.fixture
def kernel(monkeypatch):
    k = FakeKernel()
    shell = FakeShell(k)
    monkeypatch.setattr(mon, "_kernel", lambda: (k, shell))
    return k


def test_the_thread_resets_the_cells_parent_header_and_ends_with_the_job(kernel, monkeypatch):
    monkeypatch.setattr(mon, "TICK", 0.02)
    job = Scripted(info(), frame(3))
    monitor = JobMonitor(job)
    kernel.header = {"header": {"msg_id": "a-later-cell"}}  # the kernel moved on to another cell
    monitor.start()
    assert monitor.running
    wait_for(lambda: job.fetches >= 4, 10, "a few updates")
    assert monitor.running
    job.script = info(state="JOB_STATE_SUCCEEDED", substate=None, ended=now())
    monitor.wait(10)
    assert not monitor.running
    name, parent, ident = kernel.set_in[0]
    assert name.startswith("tuning-monitor-") and parent == {"header": {"msg_id": "cell-1"}} and ident == b"ident"
    assert monitor.bar.bar_style == "success"  # the last update was made before the thread ended


def test_closing_the_monitor_ends_the_thread(kernel, monkeypatch):
    monkeypatch.setattr(mon, "TICK", 0.02)
    monitor = JobMonitor(Scripted(info())).start()
    assert monitor.running
    monitor.close()
    assert not monitor.running


def test_show_without_a_kernel_prints_the_text_once(capsys, monkeypatch):
    monkeypatch.setattr(mon, "_kernel", lambda: (None, None))
    assert show(Scripted(info(state="JOB_STATE_SUCCEEDED", ended=now()))) is None
    assert "JOB_STATE_SUCCEEDED" in capsys.readouterr().out


def test_import_tuning_magics_stays_light():
    import subprocess
    import sys

    code = ("import sys, tuning_magics, tuning_magics.jobs; "
            "print(sorted(m for m in ('ipywidgets', 'matplotlib', 'IPython') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# -- real jobs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_local_job_is_followed_to_success_and_can_stop_early(home, kernel):  # noqa: F811
    # Enough steps (96) that the stop request lands before training would end by itself on a fast machine.
    job = tm.tune(MODEL, records(64, long=True), epochs=3, batch_size=2)
    monitor = JobMonitor(job).start()
    assert monitor.stop_early_button is not None
    # The step comes from the worker's progress file, the curve from the metrics file: wait for both.
    wait_for(lambda: monitor.snapshot.step is not None and monitor.snapshot.step > 2 and bytes(monitor.plot.value),
             what="training and its loss curve in the monitor")
    assert "TUNING" in monitor.state.value and monitor.bar.bar_style == "info"
    assert bytes(monitor.plot.value).startswith(b"\x89PNG")
    assert re.search(r"step \d+ of 96", monitor.progress_label.value)
    monitor.stop_early_button.click()
    monitor.wait(120)
    assert not monitor.running and job.state == "JOB_STATE_SUCCEEDED"
    stopped = job.progress().step
    assert monitor.bar.bar_style == "success" and monitor.bar.value == pytest.approx(stopped / 96)
    assert monitor.progress_label.value.startswith(f"stopped early at step {stopped} of 96")
    assert monitor.selected_checkpoint == "final"
    assert job.note.startswith("stopped early") and job.note in monitor.note.value
    assert monitor.stop_early_button.disabled and monitor.cancel_button.disabled
    assert "train loss" in job_text(job)


def ended_local_job(tmp_path, state, *, progress: dict, steps: int, checkpoints=(), note=None):
    """A local job that ended in ``state``: the worker's last progress file, ``steps`` metric rows, checkpoints."""
    import json

    from tuning_magics.backends.local import registry
    from tuning_magics.backends.local.checkpoints import checkpoints_dir
    from tuning_magics.backends.local.jobs import LocalJob

    out = tmp_path / "ended"
    out.mkdir()
    (out / "progress.json").write_text(json.dumps(progress))
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "epoch": round(s / 8, 4), "train_loss": 2.0 / s}) + "\n" for s in range(1, steps + 1)))
    for step in checkpoints:
        (checkpoints_dir(out) / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints_dir(out) / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    registry.insert(registry.JobRecord(id="tune-ended", config={"base_model": MODEL, "epochs": 3}, state=state,
                                       output_dir=str(out), created=time.time(), started=time.time(),
                                       ended=time.time(), note=note))
    return LocalJob("tune-ended")


def test_a_job_stopped_early_at_step_1_reads_stopped_early_not_100_percent(home, tmp_path):  # noqa: F811
    job = ended_local_job(tmp_path, "JOB_STATE_SUCCEEDED", steps=1, checkpoints=(1,),
                          progress={"step": 1, "total_steps": 24, "epoch": 0.125, "epochs": 3},
                          note="stopped early at step 1 of 24; final is checkpoint-1")
    monitor = JobMonitor(job)
    assert monitor.progress_label.value == "stopped early at step 1 of 24 · epoch 0.125 of 3"
    assert monitor.bar.value == pytest.approx(1 / 24) and monitor.bar.bar_style == "success"
    assert "progress: stopped early at step 1 of 24" in job_text(job) and "100%" not in job_text(job)


def test_a_job_that_ran_to_its_end_reads_100_percent(home, tmp_path):  # noqa: F811
    job = ended_local_job(tmp_path, "JOB_STATE_SUCCEEDED", steps=24, checkpoints=(8, 16, 24),
                          progress={"step": 24, "total_steps": 24, "epoch": 3.0, "epochs": 3})
    monitor = JobMonitor(job)
    assert monitor.progress_label.value == "step 24 of 24 (100%) · epoch 3 of 3" and monitor.bar.value == 1.0


def test_a_killed_worker_shows_no_step_behind_its_last_checkpoint(home, tmp_path):  # noqa: F811
    # The worker wrote progress at step 7 (it writes at most every half second), then trained on to step 9,
    # saving checkpoint-8, and was killed.
    job = ended_local_job(tmp_path, "JOB_STATE_FAILED", steps=9, checkpoints=(8,),
                          progress={"step": 7, "total_steps": 24, "epoch": 0.875, "epochs": 3})
    progress = job.progress()
    assert (progress.step, progress.epoch, progress.stopped_early) == (9, 1.125, False)
    assert JobMonitor(job).progress_label.value == "step 9 of 24 (38%) · epoch 1.125 of 3"


def test_cancel_while_another_process_writes_the_registry_says_so_beside_the_button(home, tmp_path):  # noqa: F811
    import os

    import psutil

    _fake_active("tune-busy", os.getpid(), psutil.Process().create_time(), tmp_path / "busy")  # nothing starts
    job = tm.tune(MODEL, records(4))
    monitor = JobMonitor(job)
    with held_by_another_process():
        start = time.monotonic()
        monitor.cancel_button.click()
        assert time.monotonic() - start < 15  # the kernel was held a few seconds, not sqlite's 30
        assert monitor.message.value == busy_message()
        assert monitor.update().state == "JOB_STATE_QUEUED"  # reading goes on meanwhile
    monitor.cancel_button.click()
    assert monitor.message.value == "cancelling" and job.refresh().state == "JOB_STATE_CANCELLED"


@pytest.mark.slow
def test_a_vertex_job_shows_the_services_state_and_substate(vertex):
    from fake_vertex import CHAT

    vertex.step_seconds = 60
    job = tm.tune("gemini-2.5-flash", vertex.put(vertex.uri("train.jsonl"), CHAT), epochs=1)
    monitor = JobMonitor(job)
    assert monitor.stop_early_button is None and not job.can_stop_early
    seen = set()
    for _ in range(30):
        vertex.advance(vertex.step_seconds)
        snap = monitor.update()
        seen.add((snap.state, snap.substate))
        if snap.done:
            break
    assert ("JOB_STATE_RUNNING", "TUNING") in seen
    assert any(s == "WAITING_FOR_QUOTA" or s == "PROCESSING_DATASET" for _, s in seen)
    assert job.state == "JOB_STATE_SUCCEEDED" and monitor.bar.bar_style == "success"
    assert "final" in monitor.checkpoint.options or monitor.checkpoint.options
    assert "JOB_STATE_SUCCEEDED" in monitor._repr_mimebundle_()["text/plain"]
