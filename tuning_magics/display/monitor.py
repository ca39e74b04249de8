"""The job monitor: a live view of one tuning job on any backend, with a text fallback.

``show(job)`` (and displaying any Job in a notebook) puts a :class:`JobMonitor`
below the cell: state and sub-state in colour, elapsed and queued time, a
progress bar with ETA, the loss and token-accuracy curves, the checkpoints (one
can be picked: ``monitor.selected_checkpoint``, and chatted with: the Chat
button opens ``job.chat_panel(checkpoint=...)`` below), Cancel and, where the
backend can, Stop early, and the full error of a failed job.

It reads only the Job interface (``refresh``, ``info``, ``progress()``,
``metrics()``, ``checkpoints``, ``hint``, ``queued_seconds``, ``cancel()``,
``stop_early()``, ``chat_panel()``), so the local engine and Vertex AI look the same.

Every end says the same thing everywhere: each kind of state (:func:`state_kind`:
active, paused, cancelling, succeeded, stopped early, failed, cancelled,
expired) has its own colour, taken from JupyterLab's theme variables
(:data:`STATE_COLOURS`), and its own words in the progress line; the bar stands
where training stopped, and a button that can no longer act is hidden.

The numbers are honest: a curve is smoothed (bias-corrected, as TensorBoard
does) only when it has points enough to average, a sparse validation curve is
drawn as its points, and the ETA waits until the monitor has seen training go a
few steps and seconds (:class:`StepRate`).

How it behaves, as ``tqdm.notebook`` does: the widget tree is built once and
afterwards only trait values change. Updates come from one daemon thread that
sleeps between looks, so other cells run while a job trains; the thread
re-sets the parent header of the cell that made the monitor (ipykernel 7 would
otherwise lose its messages), fetches the job at the backend's own pace
(``job.poll_interval``), redraws the plot only when new metric rows arrived,
and ends after a last update once the job has ended or the monitor is closed.
Plots are drawn on a bare matplotlib ``Figure`` into PNG bytes with a
transparent background: pyplot and the user's backend are never touched. Where
widgets do not render (nbval, a terminal, GitHub's notebook view) the same
facts show as text and HTML.

DOM classes, for page styles and browser tests: ``tm-monitor`` (the root, with
``tm-state-<kind>`` beside it), ``tm-state`` and ``tm-state-<kind>`` (the state
badge), ``tm-bar``, ``tm-progress``, ``tm-losses``, ``tm-plot``, ``tm-legend``,
``tm-checkpoint``, ``tm-open-chat``, ``tm-cancel``, ``tm-stop-early``, ``tm-message``,
``tm-note``, ``tm-error`` and ``tm-chat-panel`` (where the chat panel opens).
"""

from __future__ import annotations

import html
import io
import math
import sys
import threading
import time
from dataclasses import dataclass, field

#: Seconds between looks at the clock (elapsed time); the job itself is fetched at its own pace.
TICK = 1.0
#: At most this many points of a curve are drawn; longer series are thinned for the picture only.
MAX_DRAWN_POINTS = 600
#: A curve with fewer points than this is drawn as its points, unsmoothed: an average of a handful of
#: points (a validation curve has one per evaluation) is mostly its first ones, far behind the last.
SMOOTH_MIN_POINTS = 10
#: The weight of each new point in the moving average of a long curve (TensorBoard's smoothing 0.9).
EMA_ALPHA = 0.1
#: No ETA before the monitor has seen training go this many steps, over this many seconds: a rate
#: taken from one step would count the model's loading as training.
ETA_MIN_STEPS = 3
ETA_MIN_SECONDS = 5.0
#: The ETA's rate is the average over (about) this many of the latest steps.
ETA_WINDOW_STEPS = 50

_SUCCEEDED = "JOB_STATE_SUCCEEDED"
_CANCELLING = "JOB_STATE_CANCELLING"
#: The states in which a worker trains and Stop early can act.
_TRAINING = ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
_KINDS = {"JOB_STATE_FAILED": "failed", "JOB_STATE_CANCELLED": "cancelled", "JOB_STATE_EXPIRED": "expired",
          "JOB_STATE_PAUSED": "paused", _CANCELLING: "cancelling"}


def _var(name: str, fallback: str) -> str:
    """A JupyterLab theme colour, with the colour to use where the page does not define it."""
    return f"var(--jp-{name}, {fallback})"


#: The colour of each kind of state (:func:`state_kind`): JupyterLab's theme variables, their shade
#: that reads under white text in the light theme and under dark text in the dark one; the fallbacks
#: (Colab, VS Code, a saved page) are mid tones that read on a light and a dark page alike.
STATE_COLOURS = {
    "active": _var("brand-color0", "#1565c0"),
    "paused": _var("warn-color1", "#ef6c00"),
    "cancelling": _var("layout-color4", "#757575"),
    "succeeded": _var("success-color0", "#2e7d32"),
    "stopped-early": _var("info-color0", "#00838f"),
    "failed": _var("error-color0", "#c62828"),
    "cancelled": _var("layout-color4", "#757575"),
    "expired": _var("warn-color0", "#e65100"),
}
#: Kinds of state that are not over: their badge is outlined, not filled.
_PASSING = ("paused", "cancelling")
#: The ipywidgets bar style of each kind (the exact colour is set beside it, as ``style.bar_color``).
_BAR_STYLES = {"active": "info", "paused": "warning", "cancelling": "", "succeeded": "success",
               "stopped-early": "success", "failed": "danger", "cancelled": "", "expired": "warning"}
#: Text that reads on the page whatever its theme, and softer text (hints, legends, captions).
INK = _var("ui-font-color1", "inherit")
SOFT_INK = _var("ui-font-color2", "#888")
#: The words that start the progress line of a job that ended (or paused) short of its end.
_VERBS = {"paused": "paused", "cancelling": "cancelling", "stopped-early": "stopped early", "failed": "failed",
          "cancelled": "cancelled", "expired": "expired"}


def state_kind(state: str | None, *, stopped_early: bool = False) -> str:
    """The kind of a state, which sets its colour and words: ``active`` (queued, pending, running),
    ``paused``, ``cancelling``, ``succeeded``, ``stopped-early``, ``failed``, ``cancelled`` or ``expired``."""
    if state == _SUCCEEDED:
        return "stopped-early" if stopped_early else "succeeded"
    return _KINDS.get(state, "active")


def state_style(state: str | None) -> str:
    """The ipywidgets bar style of a state: ``success``, ``danger``, ``warning``, ``info`` or ``""`` (grey)."""
    return _BAR_STYLES[state_kind(state)]


def badge_html(text: str, kind: str, title: str = "") -> str:
    """A state as a coloured badge (outlined while the state may pass), classed ``tm-state tm-state-<kind>``."""
    colour = STATE_COLOURS[kind]
    if kind in _PASSING:
        look = f"border:2px solid {colour};color:{INK};padding:0 6px"
    else:
        look = f"background:{colour};border:2px solid {colour};color:{_var('ui-inverse-font-color1', '#fff')};" \
               "padding:0 6px"
    return (f"<span class='tm-state tm-state-{kind}' title='{_e(title)}' style='{look};border-radius:3px;"
            f"font-weight:bold;white-space:nowrap'>{_e(text)}</span>")


def clock(seconds: float | None) -> str:
    """Seconds as ``m:ss`` or ``h:mm:ss`` (``-`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def epoch_text(epoch: float) -> str:
    """An epoch as a whole number or with one decimal, never rounded up: 0.125 is ``0.1``, 2.96 is ``2.9``."""
    tenths = math.floor(epoch * 10 + 1e-9)
    return str(tenths // 10) if tenths % 10 == 0 else f"{tenths / 10:.1f}"


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
    train_smoothed: float | None = None  # None where the curve has too few points to smooth
    eval_loss: float | None = None
    best_eval: tuple[float, int] | None = None  # (lowest validation loss, its step)
    token_accuracy: float | None = None
    #: Preference tuning: how far the chosen answers' reward is above the rejected ones', and how often it is.
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    #: Evaluation during tuning: each task metric's latest score, and the best checkpoint by the first metric
    #: as (checkpoint, metric, score).
    task_scores: dict = field(default_factory=dict)
    best_task: tuple | None = None
    checkpoints: list[str] = field(default_factory=list)
    #: What the checkpoint picker shows for each checkpoint scored during tuning (its score; the best marked).
    checkpoint_labels: dict = field(default_factory=dict)
    taken: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> str:
        """The kind of the state (:func:`state_kind`): what colour and words it takes."""
        return state_kind(self.state, stopped_early=self.stopped_early)

    def elapsed_now(self) -> float | None:
        """Elapsed seconds, moved on by the clock since the snapshot while the job runs."""
        if self.elapsed is None or self.done:
            return self.elapsed
        return self.elapsed + time.monotonic() - self.taken

    def queued_now(self) -> float | None:
        if self.queued is None or self.done or not self.waiting:
            return self.queued
        return self.queued + time.monotonic() - self.taken

    def bar_fraction(self) -> float | None:
        """Where the bar stands: the share of the steps trained (all of them for a job that succeeded
        in full); None where there is nothing to show: a job that ended before training started."""
        if self.kind == "succeeded":
            return 1.0
        if self.fraction is not None:
            return self.fraction
        if self.done or (self.kind in _PASSING and self.step is None):
            return None
        return 0.0

    # -- text ------------------------------------------------------------------------------
    def state_text(self) -> str:
        """The service's state name, with what a running job is doing, or how a job that succeeded ended."""
        if self.substate and not self.done:
            return f"{self.state} ({self.substate})"
        if self.stopped_early:
            return f"{self.state} (stopped early)"
        return self.state

    def lines(self) -> list[tuple[str, str]]:
        """(label, text) pairs: the monitor's content, shared by the text and HTML fallbacks."""
        out = [("job", " · ".join(x for x in (self.name, self.model, self.backend) if x))]
        out.append(("state", self.state_text()))
        times = f"elapsed {clock(self.elapsed_now())}"
        if self.queued is not None:
            times += f" · queued {clock(self.queued_now())}"
        out.append(("time", times))
        progress = self.progress_text()
        if progress:
            out.append(("progress", progress))
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
        """Step, epoch and ETA, in the words of the state: ``step 30 of 120 (25%)`` while training or
        after a full run, ``stopped early at step 12 of 48``, ``cancelled before training started``."""
        kind = self.kind
        verb = _VERBS.get(kind)
        if self.step is None:
            if verb is not None and (self.done or kind in _PASSING):
                return f"{verb} before training started"
            if self.epochs is None or self.done:
                return ""
            return f"epoch - of {self.epochs}"
        parts = []
        part = f"step {self.step:,}"
        if self.total_steps:
            part += f" of {self.total_steps:,}"
        if verb is not None:
            part = f"{verb} at {part}"
        elif self.fraction is not None or kind == "succeeded":
            part += f" ({self.bar_fraction():.0%})"
        parts.append(part)
        if self.epoch is not None or self.epochs:
            part = "epoch " + ("-" if self.epoch is None else epoch_text(self.epoch))
            if self.epochs:
                part += f" of {self.epochs}"
            parts.append(part)
        if self.eta is not None and kind == "active":
            parts.append(f"ETA {clock(self.eta)}")
        return " · ".join(parts)

    def losses_text(self) -> str:
        parts = []
        if self.train_loss is not None:
            smooth = f" (smoothed {self.train_smoothed:.4f})" if self.train_smoothed is not None else ""
            parts.append(f"train loss {self.train_loss:.4f}{smooth}")
        if self.eval_loss is not None:
            part = f"validation loss {self.eval_loss:.4f}"
            if self.best_eval is not None and self.best_eval[0] < self.eval_loss:
                part += f" (best {self.best_eval[0]:.4f} at step {self.best_eval[1]:,})"
            parts.append(part)
        if self.token_accuracy is not None:
            parts.append(f"token accuracy {self.token_accuracy:.3f}")
        if self.reward_margin is not None:
            parts.append(f"reward margin {self.reward_margin:.3f}")
        if self.reward_accuracy is not None:
            parts.append(f"chosen preferred {self.reward_accuracy:.0%}")
        for name, value in self.task_scores.items():
            part = f"{name} {value:.3f}"
            if self.best_task is not None and self.best_task[1] == name:
                part += f" (best {self.best_task[2]:.3f}, {self.best_task[0]})"
            parts.append(part)
        return " · ".join(parts)

    def text(self) -> str:
        width = max(len(label) for label, _ in self.lines())
        out = [f"{label:>{width}}: {value}" for label, value in self.lines()]
        if self.error:
            out += ["error:", self.error.rstrip()]
        return "\n".join(out)

    def html(self) -> str:
        kind = self.kind
        colour = STATE_COLOURS[kind]
        rows = "".join(
            f"<tr><th style='text-align:right;padding:1px 8px'>{_e(label)}</th>"
            + (f"<td>{badge_html(value, kind, self.state)}</td>" if label == "state" else f"<td>{_e(value)}</td>")
            + "</tr>"
            for label, value in self.lines()
        )
        error = (f"<pre class='tm-error' style='color:{STATE_COLOURS['failed']};white-space:pre-wrap'>"
                 f"{_e(self.error.rstrip())}</pre>") if self.error else ""
        return (f"<div class='tm-monitor tm-state-{kind}' style='border-left:4px solid {colour};padding-left:6px;"
                f"color:{INK}'><table>{rows}</table>{error}</div>")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


class StepRate:
    """Steps per second, as this monitor has seen training go: the average over the latest steps.

    Known only once the monitor has seen at least :data:`ETA_MIN_STEPS` steps
    over :data:`ETA_MIN_SECONDS`, and taken over the last
    :data:`ETA_WINDOW_STEPS` steps or so, so the ETA it gives settles as
    training goes on. ``clock`` is the time source (seconds).
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.seen: list[tuple[float, int]] = []  # (time, step) each time the step was seen to change

    def add(self, step: int | None) -> None:
        if step is None:
            return
        now = self.clock()
        if self.seen and step < self.seen[-1][1]:
            self.seen.clear()  # resumed from an earlier checkpoint
        if not self.seen or step != self.seen[-1][1]:
            self.seen.append((now, step))
        while len(self.seen) > 2 and self.seen[-1][1] - self.seen[1][1] >= ETA_WINDOW_STEPS:
            self.seen.pop(0)

    def per_second(self) -> float | None:
        if len(self.seen) < 2:
            return None
        (t0, s0), (t1, s1) = self.seen[0], self.seen[-1]
        if s1 - s0 < ETA_MIN_STEPS or t1 - t0 < ETA_MIN_SECONDS:
            return None
        return (s1 - s0) / (t1 - t0)


def eta_seconds(step: int | None, total: int | None, rate: float | None) -> float | None:
    """Seconds left at ``rate`` steps per second (None while any of them is unknown, or no step is left)."""
    if step is None or not total or not rate or step >= total:
        return None
    return (total - step) / rate


def smoothed(values):
    """The bias-corrected exponential moving average of a curve, as TensorBoard draws it; None when too short.

    Bias-corrected (debiased): the average of the first ``t`` points is divided
    by ``1 - w**t`` (``w`` the weight of the past), so it starts at the first
    point rather than at zero; pandas' ``ewm(adjust=True)`` is exactly that.
    Under :data:`SMOOTH_MIN_POINTS` points there is nothing to smooth; above,
    the window is about a tenth of the curve, down to ``1 / EMA_ALPHA`` points.
    """
    n = len(values)
    if n < SMOOTH_MIN_POINTS:
        return None
    import pandas as pd

    alpha = max(EMA_ALPHA, min(1.0, SMOOTH_MIN_POINTS / n))
    return pd.Series(values, copy=False).ewm(alpha=alpha, adjust=True).mean().to_numpy()


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


def _best(found) -> tuple[float, int] | None:
    """The lowest value of a (steps, values) series and its step (the first such step)."""
    if found is None:
        return None
    x, y = found
    i = int(y.argmin())
    return float(y[i]), int(x[i])


def read_snapshot(job, *, frame=None, rate: StepRate | None = None) -> Snapshot:
    """A :class:`Snapshot` of ``job`` as it is now; ``frame`` is its metrics when already read.

    ``rate`` (the monitor's :class:`StepRate`) gives the ETA; without it there is none.
    """
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
    snap.fraction = progress.fraction
    if rate is not None and info.state in _TRAINING:
        rate.add(progress.step)
        snap.eta = eta_seconds(progress.step, progress.total_steps, rate.per_second())
    for column in ("train_loss", "eval_loss", "token_accuracy", "reward_margin", "reward_accuracy"):
        found = _series(frame, column)
        if found is not None:
            setattr(snap, column, _num(found[1][-1]))
            if column == "train_loss":
                average = smoothed(found[1])
                snap.train_smoothed = None if average is None else _num(average[-1])
            elif column == "eval_loss":
                snap.best_eval = _best(found)
    checkpoints = job.checkpoints
    snap.checkpoints = [c.name for c in checkpoints]
    _task_scores(snap, frame, checkpoints)
    snap.metrics_note = getattr(job, "metrics_note", None)
    return snap


def _marked_best(scores) -> str | None:
    """The checkpoint the monitor marks (in its picker, its text and its plot): ``best_checkpoint``'s by the first
    task metric, unless every checkpoint scored the same, when none is the one to keep."""
    from ..evaluation.during import best_checkpoint

    first = next((c for c in scores.columns if c != "step"), None)
    if first is None or scores[first].drop("base", errors="ignore").dropna().nunique() < 2:
        return None
    return best_checkpoint(scores)


def _task_scores(snap: Snapshot, frame, checkpoints) -> None:
    """Evaluation during tuning: the latest score of each task metric, the best checkpoint by the first, and
    the picker's label of each checkpoint scored."""
    from ..evaluation.during import checkpoint_scores

    scores = checkpoint_scores(frame, checkpoints)
    names = [c for c in scores.columns if c != "step"]
    if not names:
        return
    for name in names:
        found = scores[name].dropna()
        if len(found):
            snap.task_scores[name] = float(found.iloc[-1])
    best = _marked_best(scores)
    if best is not None:
        snap.best_task = (best, names[0], float(scores.loc[best, names[0]]))
    for label, value in scores[names[0]].items():
        if label in snap.checkpoints and not math.isnan(value):
            snap.checkpoint_labels[label] = f"{label} · {names[0]} {value:.3f}" + (" ★ best" if label == best else "")


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
    """Training and validation loss and token accuracy, drawn into PNG bytes with a transparent background.

    A curve with points enough to average is drawn faint with its smoothed line
    bold (:func:`smoothed`); a sparse one (validation, a short run) as its
    points. A star marks the lowest validation loss. The axes say what they
    hold (step, loss, token accuracy), their labels at least
    :data:`LABEL_PX` pixels high in the PNG, which is shown at its own size,
    and in a mid grey that reads on a light and a dark notebook alike.

    Text (tick labels) is what costs most to draw, so the axes are drawn only
    when their limits change, and each redraw puts the curves on that saved
    background (blitting). The limits change seldom: the step axis spans the
    planned steps, and the loss axis only grows, to round values. One ``Figure``
    is made and kept; pyplot is never used.
    """

    def __init__(self, width: float = 6.4, height: float = 2.6, dpi: int = 72):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.figure = Figure(figsize=(width, height), dpi=dpi)
        self.figure.patch.set_alpha(0.0)  # the notebook's own background, light or dark, shows through
        self.canvas = FigureCanvasAgg(self.figure)
        points = LABEL_PX * 72 / dpi  # font sizes are in points: LABEL_PX pixels at this dpi
        ax = self.loss_axes = self.figure.add_subplot()
        self.acc_axes = ax.twinx()
        for axes in (ax, self.acc_axes):
            axes.set_facecolor("none")
            axes.yaxis.set_major_locator(MaxNLocator(4))
            axes.tick_params(labelsize=points, colors=PLOT_INK)
            for spine in axes.spines.values():
                spine.set_color(PLOT_INK)
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.grid(alpha=0.3, color=PLOT_INK)
        ax.set_xlabel("step", fontsize=points, color=PLOT_INK, labelpad=1)
        ax.set_ylabel("loss", fontsize=points, color=PLOT_INK)
        self.acc_axes.set_ylabel("token accuracy", fontsize=points, color=PLOT_INK)
        colours = PLOT_COLOURS
        lines = dict(animated=True)  # left out of a full draw: they go on the saved background
        self.train_raw, = ax.plot([], [], color=colours["train loss"], lw=1, ms=3, **lines)
        self.train_ema, = ax.plot([], [], color=colours["train loss"], lw=2, **lines)
        self.eval_raw, = ax.plot([], [], color=colours["validation loss"], lw=1, ms=4, **lines)
        self.eval_ema, = ax.plot([], [], color=colours["validation loss"], lw=2, **lines)
        self.best, = ax.plot([], [], ls="", marker="*", ms=14, color=colours["validation loss"],
                             markeredgecolor=PLOT_INK, **lines)
        self.accuracy, = self.acc_axes.plot([], [], color=colours["token accuracy"], lw=1, ls="--", **lines)
        # Evaluation during tuning: the first task metric at each checkpoint, on the same 0-1 axis.
        self.task, = self.acc_axes.plot([], [], color=colours["task metric"], lw=1.5, marker="D", ms=4, **lines)
        self.task_best, = self.acc_axes.plot([], [], ls="", marker="*", ms=14, color=colours["task metric"],
                                             markeredgecolor=PLOT_INK, **lines)
        self.points = points
        self.acc_axes.set_ylim(0, 1)
        self.figure.subplots_adjust(left=0.1, right=0.9, bottom=0.19, top=0.96)
        self._limits = None
        self._background = None
        self.backgrounds = 0  # how many times the axes were drawn
        #: What the last picture holds, for its legend: (name, smoothed) of each curve drawn, and the
        #: lowest validation loss with its step (or None).
        self.drawn: list[tuple[str, bool]] = []
        self.best_point: tuple[float, int] | None = None
        #: The task metric drawn (evaluation during tuning) and its best score with its step, or None.
        self.task_name: str | None = None
        self.task_point: tuple[float, int] | None = None

    def png(self, frame, total_steps: int | None = None) -> bytes:
        """The picture of a metrics DataFrame (columns ``step``, ``train_loss``, ``eval_loss``, ``token_accuracy``).

        ``total_steps`` (the planned steps, when known) fixes the step axis.
        """
        top, last = 0.0, 0.0
        self.drawn = []
        # The right axis's rate: token accuracy, or for preference tuning how often the chosen answer wins.
        rate = ("token_accuracy", "token accuracy") if _series(frame, "token_accuracy") is not None or \
            _series(frame, "reward_accuracy") is None else ("reward_accuracy", "chosen preferred")
        for column, name, raw, smooth in (("train_loss", "train loss", self.train_raw, self.train_ema),
                                          ("eval_loss", "validation loss", self.eval_raw, self.eval_ema),
                                          (*rate, self.accuracy, None)):
            found = _series(frame, column)
            if found is None:
                raw.set_data([], [])
                if smooth is not None:
                    smooth.set_data([], [])
                continue
            x, values = found
            raw.set_data(*_thin(x, values))
            last = max(last, float(x[-1]))
            average = None
            if smooth is not None:
                average = smoothed(values)
                # Averaged: the raw curve faint under its average. Sparse: the points themselves.
                raw.set_alpha(0.3 if average is not None else 1.0)
                raw.set_marker("o" if average is None else "." if column == "eval_loss" else "")
                smooth.set_data(*(_thin(x, average) if average is not None else ([], [])))
                top = max(top, float(values.max()))
            self.drawn.append((name, average is not None))
        self.best_point = _best(_series(frame, "eval_loss"))
        self.best.set_data(*(([self.best_point[1]], [self.best_point[0]]) if self.best_point else ([], [])))
        from ..evaluation.during import PREFIX, checkpoint_scores, task_metrics

        self.task_name = next(iter(task_metrics(frame.columns)), None)
        found = _series(frame, PREFIX + self.task_name) if self.task_name else None
        self.task.set_data(*(found if found is not None else ([], [])))
        self.task_point = None
        if found is not None:
            last = max(last, float(found[0][-1]))
            scores = checkpoint_scores(frame, [])  # by step: the picture needs no checkpoint's name
            best = _marked_best(scores)
            if best is not None:
                self.task_point = (float(scores.loc[best, self.task_name]), int(scores.loc[best, "step"]))
        self.task_best.set_data(*(([self.task_point[1]], [self.task_point[0]]) if self.task_point else ([], [])))
        right = ("score, 0-1" if self.task_name else rate[1]) \
            if any(name == rate[1] for name, _ in self.drawn) or self.task_name else None
        accuracy = right
        limits = (max(float(total_steps or 0), _nice_ceiling(last * 1.25) if last > (total_steps or 0) else 0.0, 1.0),
                  _nice_ceiling(top * 1.05))
        if (self._limits is None or limits[0] != self._limits[0] or limits[1] > self._limits[1]
                or accuracy != self._limits[2]):
            self._limits = (limits[0], max(limits[1], self._limits[1] if self._limits else 0.0), accuracy)
            self.loss_axes.set_xlim(0, self._limits[0])
            self.loss_axes.set_ylim(0, self._limits[1])
            self.acc_axes.set_visible(bool(accuracy))  # no right axis for a curve that is not there
            if accuracy:
                self.acc_axes.set_ylabel(accuracy, fontsize=self.points, color=PLOT_INK)
            self.canvas.draw()
            self._background = self.canvas.copy_from_bbox(self.figure.bbox)
            self.backgrounds += 1
        self.canvas.restore_region(self._background)
        for line in (self.train_raw, self.eval_raw, self.train_ema, self.eval_ema, self.best):
            self.loss_axes.draw_artist(line)
        for line in (self.accuracy, self.task, self.task_best):
            self.acc_axes.draw_artist(line)
        return _encode_png(self.canvas)

    def legend_html(self) -> str:
        """The legend of the last picture, as HTML beside it: only the curves it holds."""
        entries = []
        for name, averaged in self.drawn:
            colour = PLOT_COLOURS[name]
            if name in ("token accuracy", "chosen preferred"):
                how = "dashed, right axis, 0-1"
            else:
                how = "faint: each point, bold: smoothed" if averaged else "each point"
            entries.append(f"<span style='color:{colour};font-weight:bold'>&#9644;</span> {_e(name)} ({how})")
        if self.best_point is not None:
            entries.append(f"<span style='color:{PLOT_COLOURS['validation loss']}'>&#9733;</span> lowest validation "
                           f"loss, {self.best_point[0]:.4g} at step {self.best_point[1]:,}")
        if self.task_name:
            entries.append(f"<span style='color:{PLOT_COLOURS['task metric']};font-weight:bold'>&#9670;</span> "
                           f"{_e(self.task_name)} on the evaluation data (right axis, 0-1, at each checkpoint)")
        if self.task_point is not None:
            entries.append(f"<span style='color:{PLOT_COLOURS['task metric']}'>&#9733;</span> best {_e(self.task_name)}"
                           f", {self.task_point[0]:.3g} at step {self.task_point[1]:,}")
        return (f"<div class='tm-legend' style='font-size:12px;line-height:1.6;color:{INK}'>"
                + "<br>".join(entries) + "</div>")


def _encode_png(canvas) -> bytes:
    """The canvas's pixels as PNG (fast compression: the picture is small and sent often)."""
    from PIL import Image

    width, height = canvas.get_width_height(physical=True)
    buf = io.BytesIO()
    Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).save(
        buf, format="png", compress_level=1)
    return buf.getvalue()


#: The least height, in pixels of the PNG as shown, of the plot's tick and axis labels.
LABEL_PX = 11
#: Axes, ticks and labels of the PNG plots: a mid grey that reads on a light and a dark notebook alike.
PLOT_INK = "#8c8c8c"
#: The curves' colours: mid tones that stand out on a light and a dark page.
PLOT_COLOURS = {"train loss": "#4a86d4", "validation loss": "#e8772e", "token accuracy": "#3fa34d",
                "chosen preferred": "#3fa34d", "task metric": "#b05cc9"}


# -- the kernel -------------------------------------------------------------------------------


#: Why a live view cannot work in Colab: widget values set from a background thread never reach its page
#: (googlecolab/colabtools#3373, open), so a monitor or chat panel there would stand still.
COLAB_NOTE = "Colab shows no widget updates sent from a background thread (googlecolab/colabtools#3373)"


def live_unavailable() -> str | None:
    """Why live widget views cannot work in this kernel (Colab), or None where they can."""
    return COLAB_NOTE if "google.colab" in sys.modules else None


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
    dropdown, for ``job.chat(checkpoint=...)`` or ``job.deploy(checkpoint=...)``;
    the Chat button beside it opens :meth:`open_chat`), ``chat`` (the chat panel
    opened last) and ``widget`` (the ipywidgets root).
    """

    def __init__(self, job):
        import ipywidgets as w

        self.job = job
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._parent = _Parent()
        self._rate = StepRate()
        self._plot: LossPlot | None = None
        self._drawn: tuple | None = None  # (rows, last step) of the metrics last drawn
        self._picked: str | None = None  # the checkpoint the user chose, kept across updates
        self._setting_options = False
        self._stopping = False  # Stop early was asked for: the button has done what it can
        self._kind: str | None = None
        self._handle = None
        self.snapshot: Snapshot | None = None
        self.chat = None
        self.updates = 0
        self.redraws = 0

        hidden = dict(display="none")
        self.title = w.HTML()
        self.state = w.HTML()
        self.times = w.HTML()
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                   layout=w.Layout(width="320px", max_width="100%"))
        self.progress_label = w.Label(layout=w.Layout(width="auto", max_width="100%"))
        self.losses = w.HTML()
        self.plot = w.Image(format="png")
        self.legend = w.HTML()
        self.plot_box = w.HBox([self.plot, self.legend], layout=w.Layout(**hidden))
        self.checkpoint = w.Dropdown(options=[], description="Checkpoint", layout=w.Layout(width="320px", **hidden))
        self.checkpoint.observe(self._on_pick, names="value")
        self._can_chat = bool(getattr(job, "can_chat", False))
        self.chat_button = w.Button(description="Chat", icon="comments", layout=w.Layout(**hidden),
                                    tooltip="chat with the picked checkpoint (job.chat_panel(checkpoint=...))")
        self.chat_button.on_click(lambda _: self.open_chat())
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
        self.note = w.HTML(layout=w.Layout(**hidden))
        self.error = w.HTML(layout=w.Layout(**hidden))
        self.chat_box = w.Output(layout=w.Layout(**hidden))
        # Rows wrap where the cell is narrow (a side panel open, a 1,000 px window): nothing is cut off.
        row = dict(flex_flow="row wrap", align_items="center")
        self.plot_box.layout.flex_flow = "row wrap"
        self.widget = w.VBox([
            self.title,
            w.HBox([self.state, self.times], layout=w.Layout(**row)),
            w.HBox([self.bar, self.progress_label], layout=w.Layout(**row)),
            self.losses,
            self.plot_box,
            w.HBox([self.checkpoint, self.chat_button, *buttons, self.message], layout=w.Layout(**row)),
            self.note,
            self.error,
            self.chat_box,
        ])
        # Handles for page styles and browser tests (tm-state-<kind> follows the job on the root).
        for widget, name in ((self.widget, "tm-monitor"), (self.bar, "tm-bar"), (self.progress_label, "tm-progress"),
                             (self.losses, "tm-losses"), (self.plot, "tm-plot"), (self.checkpoint, "tm-checkpoint"),
                             (self.chat_button, "tm-open-chat"), (self.cancel_button, "tm-cancel"),
                             (self.stop_early_button, "tm-stop-early"), (self.message, "tm-message"),
                             (self.note, "tm-note"), (self.error, "tm-error"), (self.chat_box, "tm-chat-panel")):
            if widget is not None:
                widget.add_class(name)
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
        except UserError as exc:
            self.message.value = str(exc)
            return
        if action == "stop_early":
            self._stopping = True
            self.message.value = "stopping early: the best checkpoint so far becomes final"
        else:
            self.message.value = "cancelling"
        try:
            self.update()  # the new state at once, without waiting for the thread's next look
        except Exception:  # noqa: BLE001 - a failed look (network, a busy file): the thread looks again
            pass
        self._wake.set()

    def open_chat(self):
        """Open the chat panel on the picked checkpoint below the monitor, and return it.

        ``job.chat_panel(checkpoint=...)`` makes it (``final`` is the job's own
        default); where the job cannot chat, the reason is the monitor's
        message, in one line, and None is returned.
        """
        from IPython.display import display

        from ..errors import UserError

        picked = self.selected_checkpoint
        try:
            panel = self.job.chat_panel(checkpoint=None if picked in (None, "final") else picked)
        except UserError as exc:
            self.message.value = str(exc)
            return None
        self.chat = panel
        self.chat_box.clear_output()
        with self.chat_box:
            display(panel)
        _set(self.chat_box.layout, "display", "")
        return panel

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
        value = f"<span style='margin-left:12px;color:{INK}'>{_e(times)}</span>"
        for text in (snap.hint, snap.retrying and f"retrying: {snap.retrying}"):
            if text:
                value += f"<div style='color:{STATE_COLOURS['paused']}'>{_e(text)}</div>"
        _set(self.times, "value", value)

    def _show(self, snap: Snapshot, frame) -> None:
        kind = snap.kind
        colour = STATE_COLOURS[kind]
        if kind != self._kind:
            if self._kind is not None:
                self.widget.remove_class(f"tm-state-{self._kind}")
            self.widget.add_class(f"tm-state-{kind}")
            self._kind = kind
        _set(self.title, "value", f"<b>{_e(snap.name)}</b> " + _e(" · ".join(x for x in (snap.model, snap.backend)
                                                                           if x)))
        state = snap.state  # the service's own name, as job.state and the docs spell it
        if snap.substate and not snap.done:
            state += f" · {snap.substate}"
        elif snap.stopped_early:
            state += " · stopped early"
        _set(self.state, "value", badge_html(state, kind, snap.state))
        self._show_times(snap)
        fraction = snap.bar_fraction()
        _set(self.bar.layout, "display", "none" if fraction is None else "")
        _set(self.bar, "value", float(fraction or 0.0))
        _set(self.bar, "bar_style", _BAR_STYLES[kind])
        _set(self.bar.style, "bar_color", colour)
        _set(self.progress_label, "value", snap.progress_text())
        _set(self.losses, "value", f"<span style='color:{INK}'>{_e(snap.losses_text() or snap.metrics_note or '')}"
                                   "</span>")
        key = (len(frame), int(frame["step"].iloc[-1]) if len(frame) else None)
        if len(frame) and key != self._drawn:
            if self._plot is None:
                self._plot = LossPlot()
            self.plot.value = self._plot.png(frame, snap.total_steps)
            _set(self.legend, "value", self._plot.legend_html())
            _set(self.plot_box.layout, "display", "")
            self._drawn = key
            self.redraws += 1
        self._show_checkpoints(snap.checkpoints, snap.checkpoint_labels)
        # A button that can no longer act is not shown.
        _set(self.cancel_button.layout, "display", "none" if snap.done or kind == "cancelling" else "")
        if self.stop_early_button is not None:
            _set(self.stop_early_button.layout, "display",
                 "" if snap.state in _TRAINING and not self._stopping else "none")
        if snap.done or kind == "cancelling":
            _set(self.message, "value", "")  # what was asked has happened: the state says it now
        if snap.note:
            _set(self.note, "value", f"<div style='color:{colour}'>{_e(snap.note)}</div>")
            _set(self.note.layout, "display", "")
        if snap.error:
            _set(self.error, "value", f"<pre style='color:{STATE_COLOURS['failed']};white-space:pre-wrap;"
                                      f"max-height:24em;overflow:auto'>{_e(snap.error.rstrip())}</pre>")
            _set(self.error.layout, "display", "")
        else:
            _set(self.error.layout, "display", "none")

    def _show_checkpoints(self, names: list[str], labels: dict | None = None) -> None:
        """The picker's checkpoints, each labelled with its score where it was evaluated during tuning."""
        options = [(labels.get(name, name), name) for name in names] if labels else list(names)
        if list(self.checkpoint.options) != options:
            keep = self._picked if self._picked in names else (names[-1] if names else None)
            self._setting_options = True
            try:
                self.checkpoint.options = options
                self.checkpoint.value = keep
            finally:
                self._setting_options = False
        _set(self.checkpoint.layout, "display", "" if names else "none")
        _set(self.chat_button.layout, "display", "" if names and self._can_chat else "none")

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
    why = live_unavailable()
    if why is not None:  # the job as it is now, and the one line that says why it stands still
        note = f"{why}: this is the job as it is now; show it again to refresh, or job.wait() to follow it"
        bundle = job_bundle(job)
        display(TextView({"text/plain": f"{bundle['text/plain']}\n{note}",
                          "text/html": f"{bundle['text/html']}<div class='tm-note'>{_e(note)}</div>"}))
        return None
    monitor = JobMonitor(job)
    monitor._handle = display(monitor, display_id=True)
    return monitor.start()
