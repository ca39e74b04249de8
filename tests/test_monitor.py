"""The job monitor (display/monitor.py): built once, coloured by state, a text fallback, updated from a thread.

Colour and escaping cases use a small Job whose snapshots the test scripts; the
rest runs against real jobs: the local engine training its tiny model, and
the fake Vertex AI API.
"""

from __future__ import annotations

import re
import sys
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
from tuning_magics.jobs import Checkpoint, Job, JobInfo, Progress, now  # noqa: E402

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


END_STATES = [("JOB_STATE_SUCCEEDED", "succeeded", "success"), ("JOB_STATE_FAILED", "failed", "danger"),
              ("JOB_STATE_CANCELLED", "cancelled", ""), ("JOB_STATE_EXPIRED", "expired", "warning"),
              ("JOB_STATE_PAUSED", "paused", "warning")]


@pytest.mark.parametrize("state,kind,style", [*END_STATES, ("JOB_STATE_RUNNING", "active", "info"),
                                              ("JOB_STATE_CANCELLING", "cancelling", "")])
def test_the_bar_and_the_badge_take_the_states_colour(state, kind, style):
    done = state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")
    monitor = JobMonitor(Scripted(info(state=state, ended=now() if done else None)))
    assert monitor.bar.bar_style == style and monitor.bar.style.bar_color == mon.STATE_COLOURS[kind]
    assert f"class='tm-state tm-state-{kind}'" in monitor.state.value
    assert mon.STATE_COLOURS[kind] in monitor.state.value and f"tm-state-{kind}" in monitor.widget._dom_classes
    shown = monitor.cancel_button.layout.display != "none"
    assert shown == (not done and state != "JOB_STATE_CANCELLING")  # a button that cannot act is hidden


def test_progress_and_eta_come_from_the_job():
    # Step 30 of 120 after 60 s of training: the monitor has seen one step go by, so it gives no ETA yet.
    monitor = JobMonitor(ProgressJob(info(), frame(30)))
    snap = monitor.snapshot
    assert snap.eta is None and "ETA" not in monitor.progress_label.value
    assert monitor.bar.value == pytest.approx(0.25)
    assert monitor.progress_label.value == "step 30 of 120 (25%) · epoch 0.7 of 3"
    assert "elapsed 1:05" in monitor.times.value and "queued 0:05" in monitor.times.value
    assert mon.eta_seconds(10, 20, None) is None and mon.eta_seconds(10, 20, 2.0) == 5.0
    assert mon.eta_seconds(20, 20, 2.0) is None  # nothing left to train: post-processing takes what it takes


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


# -- honest curves --------------------------------------------------------------------------


def declining(steps: int, *, start: float = 10.0, end: float = 2.52, evals=()) -> pd.DataFrame:
    """A loss falling geometrically from ``start`` to ``end`` over ``steps`` steps; validation at ``evals``."""
    ratio = (end / start) ** (1 / max(1, steps - 1))
    rows = [{"step": s, "train_loss": start * ratio ** (s - 1)} for s in range(1, steps + 1)]
    for s in evals:
        rows[s - 1]["eval_loss"] = start * ratio ** (s - 1)
    return pd.DataFrame(rows)


def test_a_sparse_validation_curve_is_drawn_as_its_points_with_the_best_one_marked():
    # Eight evaluations falling to 2.52: an average of so few points ended near 3.2, behind every recent point.
    monitor = JobMonitor(Scripted(info(), declining(320, evals=range(40, 321, 40))))
    plot = monitor._plot
    assert len(plot.eval_ema.get_xdata()) == 0
    assert list(plot.eval_raw.get_ydata())[-1] == pytest.approx(2.52) and plot.eval_raw.get_marker() == "o"
    assert plot.eval_raw.get_alpha() == 1.0
    assert list(plot.best.get_xdata()) == [320] and list(plot.best.get_ydata()) == [pytest.approx(2.52)]
    assert "lowest validation loss, 2.52 at step 320" in monitor.legend.value
    # The long training curve is smoothed, and its smoothed line ends near its last points.
    assert plot.train_ema.get_ydata()[-1] == pytest.approx(2.52, rel=0.1)


def test_a_curve_of_a_few_points_shows_no_smoothed_value():
    # At step 2 the text read "8.29 (smoothed 10.08)": an average of two points is no reading.
    monitor = JobMonitor(Scripted(info(), pd.DataFrame({"step": [1, 2], "train_loss": [12.0, 8.29]})))
    assert monitor.snapshot.train_smoothed is None
    assert monitor.losses.value.count("train loss 8.2900") == 1 and "smoothed" not in monitor.losses.value
    assert len(monitor._plot.train_ema.get_xdata()) == 0 and monitor._plot.train_raw.get_marker() == "o"
    assert "smoothed" not in job_text(monitor.job)


def test_smoothing_is_the_bias_corrected_moving_average():
    import numpy as np

    def debiased(values, alpha):
        out, average = [], 0.0
        for t, value in enumerate(values, 1):
            average = (1 - alpha) * average + alpha * value
            out.append(average / (1 - (1 - alpha) ** t))  # TensorBoard's debiasing
        return out

    values = np.random.default_rng(0).uniform(1, 3, size=400)
    assert mon.smoothed(values) == pytest.approx(debiased(values, mon.EMA_ALPHA))
    assert mon.smoothed(values)[0] == pytest.approx(values[0])  # starts at the first point, not at zero
    assert mon.smoothed(values[:40]) == pytest.approx(debiased(values[:40], 10 / 40))  # a tenth of the curve
    assert mon.smoothed(values[:9]) is None
    # A job with validation every few steps gets its average once there are points enough.
    monitor = JobMonitor(Scripted(info(), declining(200, evals=range(10, 201, 10))))
    assert len(monitor._plot.eval_ema.get_xdata()) == 20 and monitor.snapshot.train_smoothed is not None


def test_the_legend_lists_only_the_curves_drawn_and_the_axes_say_what_they_hold():
    monitor = JobMonitor(Scripted(info(), declining(40)))
    legend = monitor.legend.value
    assert "train loss (faint: each point, bold: smoothed)" in legend
    assert "validation" not in legend and "token accuracy" not in legend and "lowest" not in legend
    plot = monitor._plot
    assert not plot.acc_axes.get_visible()
    assert plot.loss_axes.get_xlabel() == "step" and plot.loss_axes.get_ylabel() == "loss"
    job = Scripted(info(), frame(30, evals=[10, 20, 30]))
    legend = JobMonitor(job).legend.value
    assert "validation loss (each point)" in legend and "token accuracy (dashed, right axis, 0-1)" in legend


def test_the_plot_is_legible_on_a_light_and_a_dark_page():
    from io import BytesIO

    from PIL import Image

    monitor = JobMonitor(Scripted(info(), frame(30, evals=[10, 20, 30])))
    plot = monitor._plot
    plot.canvas.draw()  # tick labels exist once drawn
    dpi = plot.figure.dpi
    labels = [*plot.loss_axes.get_xticklabels(), *plot.loss_axes.get_yticklabels(), *plot.acc_axes.get_yticklabels(),
              plot.loss_axes.xaxis.label, plot.loss_axes.yaxis.label, plot.acc_axes.yaxis.label]
    # The PNG is shown at its own size (no width set on the image): a point is dpi / 72 pixels.
    assert not monitor.plot.width and monitor.plot.layout.width is None
    assert min(label.get_fontsize() * dpi / 72 for label in labels) >= 10
    from matplotlib.colors import to_hex

    assert {to_hex(label.get_color()) for label in labels} == {mon.PLOT_INK}  # mid grey, never black
    picture = Image.open(BytesIO(bytes(monitor.plot.value)))
    assert picture.mode == "RGBA" and picture.getpixel((1, 1))[3] == 0  # transparent: the page shows through


# -- end states -----------------------------------------------------------------------------


class StoppedEarly(Scripted):
    def progress(self):
        return Progress(step=106, total_steps=320, epoch=1.33, epochs=3, stopped_early=True)


def test_each_end_has_its_own_colour_and_words():
    ends = {}
    for state, kind, _ in END_STATES:
        done = state != "JOB_STATE_PAUSED"
        ends[kind] = JobMonitor(Scripted(info(state=state, ended=now() if done else None)))
    ends["stopped-early"] = JobMonitor(StoppedEarly(info(state="JOB_STATE_SUCCEEDED", ended=now())))
    looks = {kind: re.search(r"style='([^']*)'", m.state.value).group(1) for kind, m in ends.items()}
    assert len(set(looks.values())) == len(ends)  # six ends, six looks
    words = {kind: m.progress_label.value for kind, m in ends.items()}
    assert words == {"succeeded": "", "failed": "failed before training started",
                     "cancelled": "cancelled before training started", "expired": "expired before training started",
                     "paused": "paused before training started",
                     "stopped-early": "stopped early at step 106 of 320 · epoch 1.3 of 3"}
    assert "stopped early" in ends["stopped-early"].state.value
    assert mon.STATE_COLOURS["cancelled"] != mon.STATE_COLOURS["failed"]  # cancelling is not failing


def test_a_cancelled_queued_job_shows_no_full_red_bar(home, tmp_path):  # noqa: F811
    import os

    import psutil

    _fake_active("tune-busy", os.getpid(), psutil.Process().create_time(), tmp_path / "busy")  # nothing starts
    job = tm.tune(MODEL, records(4), epochs=40)
    monitor = JobMonitor(job)
    assert monitor.progress_label.value == "epoch - of 40" and monitor.bar.value == 0.0
    monitor.cancel_button.click()
    assert monitor.snapshot.state == "JOB_STATE_CANCELLED"
    assert monitor.bar.layout.display == "none" and monitor.bar.bar_style != "danger"
    assert monitor.progress_label.value == "cancelled before training started"
    assert monitor.message.value == "" and monitor.cancel_button.layout.display == "none"
    assert "tm-state-cancelled" in monitor.state.value and mon.STATE_COLOURS["failed"] not in monitor.state.value
    text = job_text(job)
    assert "progress: cancelled before training started" in text and "epoch - of 40" not in text


def test_stopped_early_the_bar_the_step_and_the_note_agree(home, tmp_path):  # noqa: F811
    # The worker's last progress file said step 105; training stopped at step 106, as the note says.
    job = ended_local_job(tmp_path, "JOB_STATE_SUCCEEDED", steps=106, checkpoints=(100, 106),
                          progress={"step": 105, "total_steps": 320, "epoch": 0.98, "epochs": 3},
                          note="stopped early at step 106 of 320; final is checkpoint-106")
    monitor = JobMonitor(job)
    assert monitor.progress_label.value.startswith("stopped early at step 106 of 320 · epoch")
    assert monitor.bar.value == pytest.approx(106 / 320) and "100%" not in job_text(job)
    assert "stopped early at step 106 of 320" in monitor.note.value
    assert "tm-state-stopped-early" in monitor.state.value
    assert monitor.bar.style.bar_color == mon.STATE_COLOURS["stopped-early"]


class Stoppable(Scripted):
    can_stop_early = True
    asked = 0

    def stop_early(self):
        self.asked += 1
        return self


def test_stop_early_hides_its_button_once_asked():
    job = Stoppable(info())
    monitor = JobMonitor(job)
    assert monitor.stop_early_button.layout.display == ""
    monitor.stop_early_button.click()
    assert job.asked == 1 and monitor.stop_early_button.layout.display == "none"
    assert monitor.message.value.startswith("stopping early")
    assert monitor.cancel_button.layout.display == ""  # cancelling still can act
    queued = JobMonitor(Stoppable(info(state="JOB_STATE_QUEUED", started=None)))
    assert queued.stop_early_button.layout.display == "none"  # a queued job has trained nothing to keep


# -- ETA ------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Stepping(Scripted):
    """A job whose step the test moves on."""

    step = 1

    def progress(self):
        return Progress(step=self.step, total_steps=320, epoch=self.step / 107, epochs=3)


def test_no_eta_until_the_rate_is_known_then_one_that_settles():
    # 40 s went into loading the model before step 1: the old ETA, step / time since start, said 3:32:40 here
    # for a job that then trained its 320 steps at 8 a second.
    job = Stepping(info(started=now() - timedelta(seconds=40)))
    monitor = JobMonitor(job)
    clock = monitor._rate.clock = Clock()
    monitor._rate.seen.clear()
    etas = []
    for _ in range(30):
        monitor.update()
        etas.append(monitor.snapshot.eta)
        clock.now += 0.5
        job.step += 4
    # The first 5 s (a few steps): no ETA at all.
    assert etas[:10] == [None] * 10 and "ETA" not in job_text(job)
    # Then the remaining steps at 8 a second, from the first ETA on.
    for k, eta in enumerate(etas[10:], 10):
        assert eta == pytest.approx((320 - (1 + 4 * k)) / 8, rel=0.02)
    assert monitor.progress_label.value.endswith(f"ETA {mon.clock(etas[-1])}")


def test_the_eta_follows_the_latest_steps():
    rate = mon.StepRate(clock=Clock())
    for step in range(0, 200, 2):  # 4 steps a second at first
        rate.add(step)
        rate.clock.now += 0.5
    for step in range(200, 400, 1):  # then 2 a second
        rate.add(step)
        rate.clock.now += 0.5
    assert rate.per_second() == pytest.approx(2.0, rel=0.05)
    rate.add(3)  # resumed from an earlier checkpoint: the rate is measured again
    assert rate.per_second() is None


def test_epochs_read_as_whole_numbers_or_one_decimal():
    assert [mon.epoch_text(e) for e in (0.0, 0.125, 0.75, 1.0, 2.96, 3.0, 12.34)] == \
        ["0", "0.1", "0.7", "1", "2.9", "3", "12.3"]


# -- the chat panel from the checkpoint picker ---------------------------------------------


class Chatty(Scripted):
    """A job that can chat: the panels it opened are recorded."""

    opened: list

    def chat(self, messages_or_text, *, checkpoint=None, stream=False, **gen):
        return "hello"

    def chat_panel(self, checkpoint=None, **options):
        self.opened.append(checkpoint)
        if checkpoint == "checkpoint-404":
            raise UserError("job job-1 has no checkpoint-404; choose one of checkpoint-8")
        return f"panel at {checkpoint}"


def test_the_checkpoint_picker_opens_the_chat_panel_on_the_picked_checkpoint(monkeypatch):
    job = Chatty(info())
    job.opened = []
    monitor = JobMonitor(job)
    assert monitor.chat_button.layout.display == "none"  # nothing to chat with yet
    assert monitor.checkpoint.layout.display == "none"
    job.ckpts = [Checkpoint("checkpoint-8", 8, "/x/8"), Checkpoint("final", None, "/x/final")]
    monitor.update()
    assert monitor.chat_button.layout.display == "" and monitor.selected_checkpoint == "final"
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    monitor.chat_button.click()
    monitor.checkpoint.value = "checkpoint-8"
    monitor.chat_button.click()
    assert job.opened == [None, "checkpoint-8"] and shown == ["panel at None", "panel at checkpoint-8"]
    assert monitor.chat == "panel at checkpoint-8" and monitor.chat_box.layout.display == ""
    job.ckpts = [*job.ckpts, Checkpoint("checkpoint-404", 404, "/x/404")]
    monitor.update()
    monitor.checkpoint.value = "checkpoint-404"
    assert monitor.open_chat() is None and monitor.message.value.startswith("job job-1 has no checkpoint-404")
    # A backend that cannot chat shows no Chat button.
    plain = JobMonitor(Scripted(info(), checkpoints=[Checkpoint("final", None, "/x/final")]))
    assert plain.checkpoint.layout.display == "" and plain.chat_button.layout.display == "none"


# -- theme ----------------------------------------------------------------------------------


def fixed_colours(markup: str) -> list[str]:
    """Colours in ``markup`` that do not come from a JupyterLab theme variable (its fallbacks aside)."""
    markup = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", markup)
    markup = re.sub(r"var\(--jp-[\w-]+, [^)]*\)", "", markup)
    return re.findall(r"#[0-9a-fA-F]{3,8}\b|\b(?:white|black)\b(?!-)|rgba?\(", markup)  # not white-space


class Hinted(Scripted):
    hint = "waiting for capacity for 2.0 h"
    retrying = "Vertex AI answered 503"


def test_every_colour_follows_the_theme():
    import ipywidgets as w

    assert all(c.startswith("var(--jp-") for c in mon.STATE_COLOURS.values())
    for state in ("JOB_STATE_RUNNING", "JOB_STATE_FAILED", "JOB_STATE_PAUSED", "JOB_STATE_SUCCEEDED"):
        ended = now() if state in ("JOB_STATE_FAILED", "JOB_STATE_SUCCEEDED") else None
        job = Hinted(info(state=state, error="boom", note="a note", ended=ended), frame(30, evals=[10, 20, 30]))
        monitor = JobMonitor(job)
        # The legend's swatches are the picture's own curve colours, which no theme variable can name.
        html = [x.value for x in tree(monitor.widget) if isinstance(x, w.HTML) and x is not monitor.legend]
        html.append(monitor._repr_mimebundle_()["text/html"])
        assert [fixed_colours(h) for h in html] == [[]] * len(html)
        assert monitor.bar.style.bar_color.startswith("var(--jp-")


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


def test_in_colab_show_is_the_job_now_with_one_line_saying_why_it_stands_still(monkeypatch):
    import types

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setattr(mon, "_kernel", lambda: (FakeKernel(), None))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert show(Scripted(info())) is None  # no monitor thread: its updates would never reach the page
    bundle = shown[0]._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" not in bundle and "JOB_STATE_RUNNING" in bundle["text/plain"]
    last = bundle["text/plain"].splitlines()[-1]
    assert "googlecolab/colabtools#3373" in last and "job.wait()" in last
    assert "googlecolab/colabtools#3373" in bundle["text/html"]


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
    assert monitor.stop_early_button.layout.display == "none" and monitor.cancel_button.layout.display == "none"
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
    assert monitor.progress_label.value == "stopped early at step 1 of 24 · epoch 0.1 of 3"
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
    assert JobMonitor(job).progress_label.value == "failed at step 9 of 24 · epoch 1.1 of 3"


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
    assert job.refresh().state == "JOB_STATE_CANCELLED"
    # The monitor shows it at once, and no longer says "cancelling" beside CANCELLED.
    assert monitor.snapshot.state == "JOB_STATE_CANCELLED" and monitor.message.value == ""


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
