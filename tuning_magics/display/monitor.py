"""The job monitor: a live view of one tuning job on any backend, with a text fallback.

``show(job)`` (and displaying any Job in a notebook) puts a :class:`JobMonitor`
below the cell: state and sub-state in colour, elapsed and queued time, a
progress bar with ETA, the loss and token-accuracy curves, the checkpoints (one
can be picked: ``monitor.selected_checkpoint``), Cancel and, where the backend
can, Stop early, and the full error of a failed job.

It reads only the Job interface (``refresh``, ``info``, ``progress()``,
``metrics()``, ``checkpoints``, ``hint``, ``queued_seconds``, ``cancel()``,
``stop_early()``), so the local engine and Vertex AI look the same.

How it behaves, as ``tqdm.notebook`` does: the widget tree is built once and
afterwards only trait values change. Updates come from one daemon thread that
sleeps between looks, so other cells run while a job trains; the thread
re-sets the parent header of the cell that made the monitor (ipykernel 7 would
otherwise lose its messages), fetches the job at the backend's own pace
(``job.poll_interval``), redraws the plot only when new metric rows arrived,
and ends after a last update once the job has ended or the monitor is closed.
Plots are drawn on a bare matplotlib ``Figure`` into PNG bytes: pyplot and the
user's backend are never touched. Where widgets do not render (nbval, a
terminal, GitHub's notebook view) the same facts show as text and HTML.
"""

from __future__ import annotations

import html
import io
import math
import threading
import time
from dataclasses import dataclass, field

#: Seconds between looks at the clock (elapsed time); the job itself is fetched at its own pace.
TICK = 1.0
#: At most this many points of a curve are drawn; longer series are thinned for the picture only.
MAX_DRAWN_POINTS = 600
#: Smoothing of the loss curves: the weight of each new step in the exponential moving average.
EMA_ALPHA = 0.1

_SUCCEEDED = "JOB_STATE_SUCCEEDED"
_ENDED_BADLY = ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")
_WARNING = ("JOB_STATE_PAUSED", "JOB_STATE_CANCELLING")
#: ipywidgets bar styles and the colours the state badge takes with them.
_COLOURS = {"success": "#1a7f37", "danger": "#cf222e", "warning": "#9a6700", "info": "#0969da"}


def state_style(state: str | None) -> str:
    """The colour class of a state: ``success`` (green), ``danger`` (red), ``warning`` or ``info``."""
    if state == _SUCCEEDED:
        return "success"
    if state in _ENDED_BADLY:
        return "danger"
    if state in _WARNING:
        return "warning"
    return "info"


def clock(seconds: float | None) -> str:
    """Seconds as ``m:ss`` or ``h:mm:ss`` (``-`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class Snapshot:
    """What the monitor shows, read from a job in one go (and all the text fallback needs)."""

    name: str
    state: str
    substate: str | None = None
    done: bool = False
    model: str | None = None
    backend: str = ""
    elapsed: float | None = None
    queued: float | None = None
    waiting: bool = False  # still queued: the queued time grows with the clock
    hint: str | None = None
    note: str | None = None
    error: str | None = None
    retrying: str | None = None  # the last look at the job failed for a reason that passes (job.retrying)
    metrics_note: str | None = None  # why there is no curve to show (job.metrics_note)
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    epochs: int | None = None
    fraction: float | None = None
    stopped_early: bool = False
    eta: float | None = None
    train_loss: float | None = None
    train_smoothed: float | None = None
    eval_loss: float | None = None
    token_accuracy: float | None = None
    checkpoints: list[str] = field(default_factory=list)
    taken: float = field(default_factory=time.monotonic)

    def elapsed_now(self) -> float | None:
        """Elapsed seconds, moved on by the clock since the snapshot while the job runs."""
        if self.elapsed is None or self.done:
            return self.elapsed
        return self.elapsed + time.monotonic() - self.taken

    def queued_now(self) -> float | None:
        if self.queued is None or self.done or not self.waiting:
            return self.queued
        return self.queued + time.monotonic() - self.taken

    # -- text ------------------------------------------------------------------------------
    def lines(self) -> list[tuple[str, str]]:
        """(label, text) pairs: the monitor's content, shared by the text and HTML fallbacks."""
        out = [("job", " · ".join(x for x in (self.name, self.model, self.backend) if x))]
        out.append(("state", self.state + (f" ({self.substate})" if self.substate and not self.done else "")))
        times = f"elapsed {clock(self.elapsed_now())}"
        if self.queued is not None:
            times += f" · queued {clock(self.queued_now())}"
        out.append(("time", times))
        if self.step is not None or self.epochs is not None:
            out.append(("progress", self.progress_text()))
        losses = self.losses_text()
        if losses or self.metrics_note:
            out.append(("metrics", losses or self.metrics_note))
        if self.checkpoints:
            out.append(("checkpoints", ", ".join(self.checkpoints)))
        if self.note:
            out.append(("note", self.note))
        if self.hint:
            out.append(("hint", self.hint))
        if self.retrying:
            out.append(("retrying", self.retrying))
        return out

    def progress_text(self) -> str:
        parts = []
        if self.step is not None:
            part = f"step {self.step:,}"
            if self.total_steps:
                part += f" of {self.total_steps:,}"
            if self.stopped_early:
                part = f"stopped early at {part}"
            elif self.fraction is not None:
                part += f" ({self.fraction:.0%})"
            parts.append(part)
        if self.epoch is not None or self.epochs:
            part = "epoch " + ("-" if self.epoch is None else f"{self.epoch:g}")
            if self.epochs:
                part += f" of {self.epochs}"
            parts.append(part)
        if self.eta is not None and not self.done:
            parts.append(f"ETA {clock(self.eta)}")
        return " · ".join(parts)

    def losses_text(self) -> str:
        parts = []
        if self.train_loss is not None:
            smooth = f" (smoothed {self.train_smoothed:.4f})" if self.train_smoothed is not None else ""
            parts.append(f"train loss {self.train_loss:.4f}{smooth}")
        if self.eval_loss is not None:
            parts.append(f"validation loss {self.eval_loss:.4f}")
        if self.token_accuracy is not None:
            parts.append(f"token accuracy {self.token_accuracy:.3f}")
        return " · ".join(parts)

    def text(self) -> str:
        width = max(len(label) for label, _ in self.lines())
        out = [f"{label:>{width}}: {value}" for label, value in self.lines()]
        if self.error:
            out += ["error:", self.error.rstrip()]
        return "\n".join(out)

    def html(self) -> str:
        colour = _COLOURS[state_style(self.state)]
        rows = "".join(
            f"<tr><th style='text-align:right;padding:1px 8px'>{_e(label)}</th>"
            + (f"<td style='color:{colour};font-weight:bold'>{_e(value)}</td>" if label == "state"
               else f"<td>{_e(value)}</td>")
            + "</tr>"
            for label, value in self.lines()
        )
        error = f"<pre style='color:{_COLOURS['danger']};white-space:pre-wrap'>{_e(self.error.rstrip())}</pre>" \
            if self.error else ""
        return (f"<div class='tm-monitor' style='border-left:4px solid {colour};padding-left:6px'>"
                f"<table>{rows}</table>{error}</div>")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


class _Rate:
    """Steps per second, as this monitor has seen them go by (the last minute or so)."""

    def __init__(self, window: float = 60.0):
        self.window = window
        self.seen: list[tuple[float, int]] = []

    def add(self, step: int | None) -> None:
        if step is None:
            return
        now = time.monotonic()
        if self.seen and step < self.seen[-1][1]:
            self.seen.clear()  # resumed from an earlier checkpoint
        if not self.seen or step != self.seen[-1][1]:
            self.seen.append((now, step))
        while len(self.seen) > 2 and now - self.seen[1][0] > self.window:
            self.seen.pop(0)

    def per_second(self) -> float | None:
        if len(self.seen) < 2:
            return None
        (t0, s0), (t1, s1) = self.seen[0], self.seen[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


def eta_seconds(step: int | None, total: int | None, rate: float | None) -> float | None:
    """Seconds left at ``rate`` steps per second (None while any of them is unknown)."""
    if step is None or not total or not rate:
        return None
    return max(0, total - step) / rate


def _ema(values):
    """The exponential moving average of a 1-d array without gaps, as an array."""
    import pandas as pd

    return pd.Series(values, copy=False).ewm(alpha=EMA_ALPHA).mean().to_numpy()


def _series(frame, column):
    """(steps, values) of one metric as float arrays, the steps without a value left out (None when empty)."""
    if column not in frame or not len(frame):
        return None
    import numpy as np

    y = frame[column].to_numpy(dtype=float, na_value=np.nan)
    keep = ~np.isnan(y)
    if not keep.any():
        return None
    return frame["step"].to_numpy(dtype=float)[keep], y[keep]


def read_snapshot(job, *, frame=None, rate: _Rate | None = None) -> Snapshot:
    """A :class:`Snapshot` of ``job`` as it is now; ``frame`` is its metrics when already read."""
    info = job.info
    progress = job.progress()
    if frame is None:
        frame = job.metrics()
    snap = Snapshot(name=info.name, state=info.state, substate=info.substate, done=job.done,
                    model=(info.config or {}).get("base_model"), backend=getattr(job, "backend", "") or "",
                    hint=job.hint, note=getattr(info, "note", None), error=info.error,
                    retrying=getattr(job, "retrying", None))
    created, started, ended = info.created, info.started, info.ended
    if created is not None:
        from datetime import datetime, timezone

        snap.elapsed = max(0.0, ((ended or datetime.now(timezone.utc)) - created).total_seconds())
        snap.queued = job.queued_seconds
        snap.waiting = started is None and ended is None
    snap.step, snap.total_steps, snap.epoch, snap.epochs = (progress.step, progress.total_steps, progress.epoch,
                                                            progress.epochs)
    snap.stopped_early = progress.stopped_early
    snap.fraction = 1.0 if info.state == _SUCCEEDED and snap.total_steps and not snap.stopped_early \
        else progress.fraction
    if rate is not None:
        rate.add(progress.step)
        per_second = rate.per_second()
    else:
        per_second = None
    if per_second is None and started is not None and progress.step and (info.attempts or 1) == 1:
        from datetime import datetime, timezone

        running = ((ended or datetime.now(timezone.utc)) - started).total_seconds()
        per_second = progress.step / running if running > 0 else None
    snap.eta = eta_seconds(progress.step, progress.total_steps, per_second)
    for column in ("train_loss", "eval_loss", "token_accuracy"):
        found = _series(frame, column)
        if found is not None:
            setattr(snap, column, _num(found[1][-1]))
            if column == "train_loss":
                snap.train_smoothed = _num(_ema(found[1])[-1])
    snap.checkpoints = [c.name for c in job.checkpoints]
    snap.metrics_note = getattr(job, "metrics_note", None)
    return snap


def job_text(job) -> str:
    """The job's state, progress, last losses, checkpoints and error as plain text."""
    return read_snapshot(job).text()


def job_html(job) -> str:
    """The same as :func:`job_text`, as escaped HTML."""
    return read_snapshot(job).html()


def job_bundle(job) -> dict:
    """``text/plain`` and ``text/html`` of the job, for frontends without widgets."""
    snap = read_snapshot(job)
    return {"text/plain": snap.text(), "text/html": snap.html()}


# -- the plot ----------------------------------------------------------------------------------


def _thin(x, y, limit: int = MAX_DRAWN_POINTS):
    """At most ``limit`` evenly spaced points of a curve (the last one always kept)."""
    n = len(x)
    if n <= limit:
        return x, y
    import numpy as np

    keep = np.unique(np.linspace(0, n - 1, limit).astype(int))
    return x[keep], y[keep]


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten that is at least ``value``."""
    if not value or value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * power >= value * (1 - 1e-12):
            return m * power
    return 10 * power


class LossPlot:
    """Training and validation loss (raw and smoothed) and token accuracy, drawn into PNG bytes.

    Text (tick labels) is what costs most to draw, so the axes are drawn only
    when their limits change, and each redraw puts the curves on that saved
    background (blitting). The limits change seldom: the step axis spans the
    planned steps, and the loss axis only grows, to round values. One ``Figure``
    is made and kept; pyplot is never used.
    """

    def __init__(self, width: float = 6.4, height: float = 2.4, dpi: int = 72):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.figure = Figure(figsize=(width, height), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.figure)
        ax = self.loss_axes = self.figure.add_subplot()
        self.acc_axes = ax.twinx()
        for axes in (ax, self.acc_axes):
            axes.yaxis.set_major_locator(MaxNLocator(4))
            axes.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.grid(alpha=0.3)
        colours = _PLOT_COLOURS
        lines = dict(animated=True)  # left out of a full draw: they go on the saved background
        self.train_raw, = ax.plot([], [], color=colours["train"], alpha=0.3, lw=1, **lines)
        self.train_ema, = ax.plot([], [], color=colours["train"], lw=2, **lines)
        self.eval_raw, = ax.plot([], [], color=colours["validation"], alpha=0.35, lw=1, marker=".", **lines)
        self.eval_ema, = ax.plot([], [], color=colours["validation"], lw=2, **lines)
        self.accuracy, = self.acc_axes.plot([], [], color=colours["token accuracy"], lw=1, ls="--", **lines)
        self.acc_axes.set_ylim(0, 1)
        self.figure.subplots_adjust(left=0.08, right=0.93, bottom=0.12, top=0.96)
        self._limits = None
        self._background = None
        self.backgrounds = 0  # how many times the axes were drawn

    def png(self, frame, total_steps: int | None = None) -> bytes:
        """The picture of a metrics DataFrame (columns ``step``, ``train_loss``, ``eval_loss``, ``token_accuracy``).

        ``total_steps`` (the planned steps, when known) fixes the step axis.
        """
        top, last = 0.0, 0.0
        for column, raw, smooth in (("train_loss", self.train_raw, self.train_ema),
                                    ("eval_loss", self.eval_raw, self.eval_ema),
                                    ("token_accuracy", self.accuracy, None)):
            found = _series(frame, column)
            if found is None:
                raw.set_data([], [])
                if smooth is not None:
                    smooth.set_data([], [])
                continue
            x, values = found
            raw.set_data(*_thin(x, values))
            last = max(last, float(x[-1]))
            if smooth is not None:
                smooth.set_data(*_thin(x, _ema(values)))
                top = max(top, float(values.max()))
        limits = (max(float(total_steps or 0), _nice_ceiling(last * 1.25) if last > (total_steps or 0) else 0.0, 1.0),
                  _nice_ceiling(top * 1.05))
        if self._limits is None or limits[0] != self._limits[0] or limits[1] > self._limits[1]:
            self._limits = (limits[0], max(limits[1], self._limits[1] if self._limits else 0.0))
            self.loss_axes.set_xlim(0, self._limits[0])
            self.loss_axes.set_ylim(0, self._limits[1])
            self.canvas.draw()
            self._background = self.canvas.copy_from_bbox(self.figure.bbox)
            self.backgrounds += 1
        self.canvas.restore_region(self._background)
        for line in (self.train_raw, self.eval_raw, self.train_ema, self.eval_ema):
            self.loss_axes.draw_artist(line)
        self.acc_axes.draw_artist(self.accuracy)
        return _encode_png(self.canvas)


def _encode_png(canvas) -> bytes:
    """The canvas's pixels as PNG (fast compression: the picture is small and sent often)."""
    from PIL import Image

    width, height = canvas.get_width_height(physical=True)
    buf = io.BytesIO()
    Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).save(
        buf, format="png", compress_level=1)
    return buf.getvalue()


_PLOT_COLOURS = {"train": "#4c72b0", "validation": "#dd8452", "token accuracy": "#55a868"}
#: The plot's legend and axes, as HTML beside the picture (faint: raw; bold: smoothed).
LEGEND_HTML = (
    "<div style='font-size:11px;line-height:1.6'>loss (left axis), step (bottom)<br>"
    + "<br>".join(f"<span style='color:{c};font-weight:bold'>&#9644;</span> {name}"
                  + (" (faint: raw, bold: smoothed)" if name != "token accuracy" else " (right axis, 0-1)")
                  for name, c in _PLOT_COLOURS.items())
    + "</div>"
)


# -- the kernel -------------------------------------------------------------------------------


def _kernel():
    """The running ipykernel (and its shell), or (None, None) outside a kernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None, None
    shell = get_ipython()
    return getattr(shell, "kernel", None), shell


class _Parent:
    """The parent header of the cell that made the monitor, to re-set in the update thread.

    ipykernel 7 keeps the parent per thread (a context variable): a thread's
    messages otherwise go out under whatever cell runs last, or none, and a
    frontend drops them.
    """

    def __init__(self):
        self.kernel, self.shell = _kernel()
        self.header = self.ident = None
        if self.kernel is None:
            return
        try:
            self.header = self.kernel.get_parent("shell")
        except TypeError:  # ipykernel < 6
            self.header = self.kernel.get_parent()
        try:
            self.ident = self.kernel._parent_ident["shell"]
        except (AttributeError, KeyError, TypeError):
            self.ident = b""

    def apply(self) -> None:
        """Make the captured header the current thread's parent."""
        if self.kernel is None or not self.header:
            return
        try:
            self.kernel.set_parent(self.ident, self.header, channel="shell")
        except TypeError:
            self.kernel.set_parent(self.ident, self.header)
        set_thread_parent = getattr(self.shell, "set_thread_parent", None)
        if set_thread_parent is not None:  # display and print from the thread go to the same cell
            set_thread_parent(self.header)


# -- the widget ---------------------------------------------------------------------------


class JobMonitor:
    """A live widget view of ``job``; ``start()`` begins updating it from a background thread.

    Attributes of interest: ``selected_checkpoint`` (the name picked in the
    dropdown, for ``job.chat(checkpoint=...)`` or ``job.deploy(checkpoint=...)``)
    and ``widget`` (the ipywidgets root).
    """

    def __init__(self, job):
        import ipywidgets as w

        self.job = job
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._parent = _Parent()
        self._rate = _Rate()
        self._plot: LossPlot | None = None
        self._drawn: tuple | None = None  # (rows, last step) of the metrics last drawn
        self._picked: str | None = None  # the checkpoint the user chose, kept across updates
        self._setting_options = False
        self._handle = None
        self.snapshot: Snapshot | None = None
        self.updates = 0
        self.redraws = 0

        self.title = w.HTML()
        self.state = w.HTML()
        self.times = w.HTML()
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                   layout=w.Layout(width="320px"))
        self.progress_label = w.Label()
        self.losses = w.HTML()
        self.plot = w.Image(format="png")
        self.plot_box = w.HBox([self.plot, w.HTML(LEGEND_HTML)], layout=w.Layout(display="none"))
        self.checkpoint = w.Dropdown(options=[], description="Checkpoint", layout=w.Layout(width="320px"),
                                     disabled=True)
        self.checkpoint.observe(self._on_pick, names="value")
        self.cancel_button = w.Button(description="Cancel", icon="stop", tooltip="job.cancel()")
        self.cancel_button.on_click(lambda _: self._act("cancel"))
        buttons = [self.cancel_button]
        self.stop_early_button = None
        if getattr(job, "can_stop_early", False):
            self.stop_early_button = w.Button(
                description="Stop early", icon="flag-checkered",
                tooltip="end training now and keep the best checkpoint so far as final (job.stop_early())")
            self.stop_early_button.on_click(lambda _: self._act("stop_early"))
            buttons.append(self.stop_early_button)
        self.message = w.Label()
        self.note = w.HTML(layout=w.Layout(display="none"))
        self.error = w.HTML(layout=w.Layout(display="none"))
        self.widget = w.VBox([
            self.title,
            w.HBox([self.state, self.times]),
            w.HBox([self.bar, self.progress_label]),
            self.losses,
            self.plot_box,
            w.HBox([self.checkpoint, *buttons, self.message]),
            self.note,
            self.error,
        ])
        self.widget.add_class("tm-monitor")  # a handle for page styles and browser tests
        self.update()

    # -- the user's actions ----------------------------------------------------------------
    @property
    def selected_checkpoint(self) -> str | None:
        """The name of the checkpoint picked in the dropdown (``final`` once it exists, unless another was picked)."""
        return self.checkpoint.value or None

    def _on_pick(self, change) -> None:
        if not self._setting_options and change["new"]:
            self._picked = change["new"]

    def _act(self, action: str) -> None:
        from ..errors import UserError

        try:
            getattr(self.job, action)()
            self.message.value = "stopping early: the best checkpoint so far becomes final" \
                if action == "stop_early" else "cancelling"
        except UserError as exc:
            self.message.value = str(exc)
        self._wake.set()

    # -- updating ----------------------------------------------------------------------------
    def update(self, *, fetch: bool = True) -> Snapshot:
        """Read the job (unless ``fetch`` is False: the clock alone moves on) and set the widgets' values."""
        with self._lock:
            if fetch or self.snapshot is None:
                self.job.refresh()
                frame = self.job.metrics()
                self.snapshot = read_snapshot(self.job, frame=frame, rate=self._rate)
                self._show(self.snapshot, frame)
            else:
                self._show_times(self.snapshot)
            self.updates += 1
            return self.snapshot

    def _show_times(self, snap: Snapshot) -> None:
        times = f"elapsed {clock(snap.elapsed_now())}"
        if snap.queued is not None:
            times += f" · queued {clock(snap.queued_now())}"
        value = f"<span style='margin-left:12px'>{_e(times)}</span>"
        for text in (snap.hint, snap.retrying and f"retrying: {snap.retrying}"):
            if text:
                value += f"<div style='color:{_COLOURS['warning']}'>{_e(text)}</div>"
        _set(self.times, "value", value)

    def _show(self, snap: Snapshot, frame) -> None:
        style = state_style(snap.state)
        colour = _COLOURS[style]
        _set(self.title, "value", f"<b>{_e(snap.name)}</b> " + _e(" · ".join(x for x in (snap.model, snap.backend)
                                                                           if x)))
        state = snap.state  # the service's own name, as job.state and the docs spell it
        if snap.substate and not snap.done:
            state += f" · {snap.substate}"
        _set(self.state, "value", f"<span style='background:{colour};color:white;padding:2px 8px;"
                                  f"border-radius:3px;font-weight:bold' title='{_e(snap.state)}'>{_e(state)}</span>")
        self._show_times(snap)
        fraction = snap.fraction
        if fraction is None:
            fraction = 1.0 if snap.done else 0.0
        if snap.done and style == "danger" and fraction == 0.0:
            fraction = 1.0  # a failed job's bar is red all along, as tqdm's is
        _set(self.bar, "value", float(fraction))
        _set(self.bar, "bar_style", style)
        _set(self.progress_label, "value", snap.progress_text())
        _set(self.losses, "value", _e(snap.losses_text() or snap.metrics_note or ""))
        key = (len(frame), int(frame["step"].iloc[-1]) if len(frame) else None)
        if len(frame) and key != self._drawn:
            if self._plot is None:
                self._plot = LossPlot()
            self.plot.value = self._plot.png(frame, snap.total_steps)
            _set(self.plot_box.layout, "display", "")
            self._drawn = key
            self.redraws += 1
        self._show_checkpoints(snap.checkpoints)
        _set(self.cancel_button, "disabled", snap.done or snap.state == "JOB_STATE_CANCELLING")
        if self.stop_early_button is not None:
            _set(self.stop_early_button, "disabled", snap.done or snap.state == "JOB_STATE_CANCELLING")
        if snap.note:
            _set(self.note, "value", f"<div style='color:{colour}'>{_e(snap.note)}</div>")
            _set(self.note.layout, "display", "")
        if snap.error:
            _set(self.error, "value", f"<pre style='color:{_COLOURS['danger']};white-space:pre-wrap;"
                                      f"max-height:24em;overflow:auto'>{_e(snap.error.rstrip())}</pre>")
            _set(self.error.layout, "display", "")
        else:
            _set(self.error.layout, "display", "none")

    def _show_checkpoints(self, names: list[str]) -> None:
        if list(self.checkpoint.options) == names:
            return
        keep = self._picked if self._picked in names else (names[-1] if names else None)
        self._setting_options = True
        try:
            self.checkpoint.options = names
            self.checkpoint.value = keep
        finally:
            self._setting_options = False
        self.checkpoint.disabled = not names

    # -- the thread --------------------------------------------------------------------------
    def start(self) -> JobMonitor:
        """Begin updating from a background thread (it ends by itself when the job ends)."""
        if self._thread is None and not (self.snapshot and self.snapshot.done):
            self._thread = threading.Thread(target=self._run, name=f"tuning-monitor-{self.snapshot.name}",
                                            daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the update thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        self._parent.apply()
        looks = 0
        next_fetch = time.monotonic() + self.job.poll_interval(looks)
        while not self._stop.is_set():
            woken = self._wake.wait(TICK)
            self._wake.clear()
            if self._stop.is_set():
                break
            fetch = woken or time.monotonic() >= next_fetch
            try:
                snap = self.update(fetch=fetch)
            except Exception as exc:  # noqa: BLE001 - a failed look (network, a busy file) must not end the view
                self.message.value = f"could not read the job: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                snap, fetch = self.snapshot, True
            if fetch:
                looks += 1
                next_fetch = time.monotonic() + self.job.poll_interval(looks)
            if snap is not None and snap.done:
                self._finish()
                break

    def _finish(self) -> None:
        """The job ended: refresh the text fallback a saved notebook keeps."""
        if self._handle is not None:
            try:
                self._handle.update(self)
            except Exception:  # noqa: BLE001 - the widget itself is already up to date
                pass

    def wait(self, timeout: float | None = None) -> JobMonitor:
        """Block until the update thread has ended (the job ended, or the monitor was closed)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    def stop(self) -> None:
        """Stop updating; the widget stays as it is."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def close(self) -> None:
        """Stop updating and remove the widget."""
        self.stop()
        self.widget.close()

    # -- display -----------------------------------------------------------------------------
    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        snap = self.snapshot
        bundle["text/plain"] = snap.text()
        bundle["text/html"] = snap.html()
        return bundle

    def __repr__(self) -> str:
        return f"<JobMonitor {self.snapshot.name} {self.snapshot.state}>"


def _set(obj, name: str, value) -> None:
    """Set a trait only when it changes: an unchanged value sends the frontend nothing."""
    if getattr(obj, name) != value:
        setattr(obj, name, value)


class TextView:
    """Text and HTML only, from a bundle: what displays where ipywidgets is not installed or no kernel runs."""

    def __init__(self, bundle: dict):
        self.bundle = bundle

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return self.bundle

    def __repr__(self) -> str:
        return self.bundle["text/plain"]


def show(job) -> JobMonitor | None:
    """Display the live monitor of ``job`` below the cell and start updating it; returns the monitor.

    Without a kernel (a terminal, plain Python) or without ipywidgets the job
    shows once as text, and None is returned.
    """
    from IPython.display import display

    kernel, _ = _kernel()
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        kernel = None
    if kernel is None:
        display(TextView(job_bundle(job)))
        return None
    monitor = JobMonitor(job)
    monitor._handle = display(monitor, display_id=True)
    return monitor.start()
