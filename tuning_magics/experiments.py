"""Picking between runs: a summary row per job, and ``compare(jobs)``: loss curves overlaid, configs side by side.

Plain Python (no IPython): ``compare`` returns a :class:`Comparison` whose
``table`` is a pandas DataFrame with one column per job, the rows whose values
differ first, and whose ``figure_png`` is the loss curves of every job as PNG
bytes. In a notebook it shows itself (image and table); ``%tune_compare`` is
the magic for it::

    runs = [tm.tune("local/tiny-qwen3", ds, learning_rate=lr) for lr in (1e-4, 3e-4)]
    tm.compare([job.wait() for job in runs])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import UserError
from .jobs import Job, now

#: The configuration rows of a comparison, in this order (engine options follow them).
CONFIG_ROWS = ("state", "base_model", "custom_base_model", "tuning_mode", "method", "base_teacher_model",
               "epochs", "learning_rate", "learning_rate_multiplier", "adapter_size")
#: The result rows of a comparison, after the engine options.
RESULT_ROWS = ("best eval loss", "final train loss", "duration (s)")
#: Rows measured while a job ran, which differ from run to run whatever the settings: shown, never
#: counted as a difference between the jobs.
MEASURED_ROWS = ("duration (s)",)


def duration_seconds(job: Job) -> float | None:
    """Seconds the latest attempt has run (until now for a running job); None for a job that never started."""
    if job.started is None:
        return None
    until = job.ended or now()
    return max(0.0, (until - job.started).total_seconds())


def _metrics(job: Job):
    """The job's metrics, or None where there are none to read (never started, or not readable now)."""
    if job.started is None and job.ended is None:
        return None  # a queued job has not written any
    try:
        frame = job.metrics()
    except (UserError, OSError):
        return None
    return frame if len(frame) else None


def _column_min(frame, column: str) -> float | None:
    if frame is None or column not in frame:
        return None
    values = frame[column].dropna()
    return float(values.min()) if len(values) else None


def _column_last(frame, column: str) -> float | None:
    if frame is None or column not in frame:
        return None
    values = frame[column].dropna()
    return float(values.iloc[-1]) if len(values) else None


def summary(job: Job, metrics=None) -> dict:
    """One job at a glance: id, name, state, model, method, created, duration and the best validation loss.

    The metrics are read only for jobs that have started (``metrics`` passes
    them in when the caller already has them).
    """
    config = job.config or {}
    frame = metrics if metrics is not None else _metrics(job)
    return {
        "id": job.id,
        "display_name": job.display_name,
        "state": job.state.removeprefix("JOB_STATE_"),
        "model": config.get("base_model"),
        "method": config.get("method"),
        "mode": config.get("tuning_mode"),
        "created": job.created,
        "duration_s": duration_seconds(job),
        "best_eval_loss": _column_min(frame, "eval_loss"),
        "final_train_loss": _column_last(frame, "train_loss"),
        "backend": job.backend,
    }


def jobs_frame(jobs) -> "pandas.DataFrame":  # noqa: F821 - pandas is imported lazily
    """A DataFrame of :func:`summary` rows, one per job, in the given order."""
    import pandas as pd

    columns = ["id", "display_name", "state", "model", "method", "mode", "created", "duration_s",
               "best_eval_loss", "final_train_loss", "backend"]
    return pd.DataFrame([summary(job) for job in jobs], columns=columns)


@dataclass
class Comparison:
    """Several jobs side by side: ``table`` (one column per job), ``curves`` and ``figure_png``.

    ``differs`` names the rows of ``table`` whose values differ between the
    jobs (the measured ones, such as the duration, aside); they come first. ``curves`` maps each column label to that job's
    metrics (step, train_loss, eval_loss, ...).
    """

    jobs: list
    labels: list
    table: object  # pandas.DataFrame
    curves: dict
    differs: list = field(default_factory=list)
    _png: bytes | None = field(default=None, repr=False)

    @property
    def figure_png(self) -> bytes:
        """The loss curves of every job on one plot (train solid, validation dashed), as PNG bytes."""
        if self._png is None:
            from .display.compare import loss_figure_png

            self._png = loss_figure_png(self.curves)
        return self._png

    def _repr_html_(self) -> str:
        from .display.compare import comparison_html

        return comparison_html(self.table, self.figure_png, self.differs)

    def __str__(self) -> str:
        from .display.compare import comparison_text

        return comparison_text(self.table, self.differs)

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def _job(item) -> Job:
    if isinstance(item, Job):
        return item
    if isinstance(item, str):
        from .api import get_job

        return get_job(item)
    raise UserError(f"compare takes jobs or job ids, not {type(item).__name__} {item!r}", field="jobs")


def _labels(jobs: list) -> list[str]:
    """A column label per job: its display name where that is unique, else its id."""
    names = [job.display_name or job.id for job in jobs]
    return [name if names.count(name) == 1 else job.id for name, job in zip(names, jobs)]


def _same(values) -> bool:
    def key(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        return repr(v)

    return len({key(v) for v in values}) <= 1


def compare(jobs) -> Comparison:
    """Loss curves of several jobs overlaid and their configurations side by side, to pick between runs.

    ``jobs``: Jobs or job ids (anything ``get_job`` takes). The table has one
    column per job and the rows base_model, tuning_mode, method, epochs,
    learning_rate, learning_rate_multiplier, adapter_size, each engine option,
    best eval loss, final train loss and duration in seconds, those that differ first
    (the duration, measured rather than chosen, is never counted as a difference);
    rows empty for every job are left out.
    """
    import pandas as pd

    if isinstance(jobs, (Job, str)):
        jobs = [jobs]
    try:
        items = list(jobs)
    except TypeError:
        raise UserError(f"compare takes a list of jobs or job ids, not {type(jobs).__name__}", field="jobs") from None
    if not items:
        raise UserError("compare needs at least one job: compare([job1, job2]) or job ids", field="jobs")
    resolved = [_job(item) for item in items]
    seen, unique = set(), []
    for job in resolved:
        if job.name not in seen:
            seen.add(job.name)
            unique.append(job)
    labels = _labels(unique)

    metrics = [_metrics(job) for job in unique]
    options = sorted({key for job in unique for key in ((job.config or {}).get("engine_options") or {})})
    rows: dict[str, list] = {}
    for name in CONFIG_ROWS:
        values = [(job.config or {}).get(name) for job in unique]
        if name == "state":
            values = [job.state.removeprefix("JOB_STATE_") for job in unique]
        rows[name] = values
    for name in options:
        rows[name] = [((job.config or {}).get("engine_options") or {}).get(name) for job in unique]
    rows["best eval loss"] = [_column_min(m, "eval_loss") for m in metrics]
    rows["final train loss"] = [_column_last(m, "train_loss") for m in metrics]
    rows["duration (s)"] = [None if (d := duration_seconds(job)) is None else round(d, 1) for job in unique]

    rows = {name: values for name, values in rows.items() if any(v is not None for v in values)}
    differs = [name for name, values in rows.items() if name not in MEASURED_ROWS and not _same(values)]
    order = differs + [name for name in rows if name not in differs]
    table = pd.DataFrame([rows[name] for name in order], index=order, columns=labels, dtype=object)
    table.index.name = "parameter"
    curves = {label: (m if m is not None else pd.DataFrame(columns=["step", "train_loss", "eval_loss"]))
              for label, m in zip(labels, metrics)}
    return Comparison(jobs=unique, labels=labels, table=table, curves=curves, differs=differs)
