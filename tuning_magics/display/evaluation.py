"""An :class:`~tuning_magics.evaluation.Evaluation` as HTML: a bar per model and metric with its interval, the
tuned model against the base in words, the table, and the examples that flipped, each opening to its answers.

Colours are the theme's (text keeps its colour; the bars are mid tones on a transparent picture), every model
text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math

from .monitor import clock

#: Bars: the base model grey, checkpoints a light blue, the final model a strong blue (read on light and dark).
_BASE, _CHECKPOINT, _FINAL = "#9e9e9e", "#64b5f6", "#1e88e5"
_INK = "#808080"
#: The most flipped examples listed.
MAX_FLIPS = 20


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def chart_png(labels: list[str], intervals: dict) -> bytes:
    """One panel per metric: a bar per model at its mean, with its 95 % interval.

    ``intervals``: metric name -> one interval (``mean``, ``low``, ``high``) per label.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(3.2 * len(intervals), 10), 2.4), dpi=100)
    fig.patch.set_alpha(0.0)
    for k, (metric, found) in enumerate(intervals.items()):
        ax = fig.add_subplot(1, len(intervals), k + 1)
        ax.set_facecolor("none")
        means = [0.0 if math.isnan(f.mean) else f.mean for f in found]
        errors = [[0.0 if math.isnan(f.mean) else f.mean - f.low for f in found],
                  [0.0 if math.isnan(f.mean) else f.high - f.mean for f in found]]
        colours = [_BASE if label == "base" else _FINAL if label == "final" else _CHECKPOINT for label in labels]
        ax.bar(range(len(found)), means, yerr=errors, color=colours, capsize=3, ecolor=_INK)
        ax.set_xticks(range(len(found)), [label.replace("checkpoint-", "ckpt ") for label in labels],
                      rotation=30 if len(found) > 3 else 0, ha="right" if len(found) > 3 else "center")
        ax.set_title(metric, fontsize=10, color=_INK)
        ax.set_ylim(0, max(1.0, max((f.high for f in found if not math.isnan(f.high)), default=1.0)))
        ax.tick_params(labelsize=8, colors=_INK)
        for spine in ax.spines.values():
            spine.set_color(_INK)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", transparent=True)
    return buf.getvalue()


def evaluation_html(view: dict) -> str:
    """The evaluation's HTML from its ``view`` (:meth:`Evaluation._view`): title, examples, labels, metric
    names, per label the score texts, intervals, best, summaries, flips (a DataFrame), the pair compared, leaks."""
    png = base64.b64encode(chart_png(view["labels"], view["intervals"])).decode()
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{_e(name)}</th>" for name in view["metrics"])
    rows = []
    for label in view["labels"]:
        cells = "".join(f"<td style='padding:2px 8px'>{_e(text)}</td>" for text in view["scores"][label])
        mark = " <span title='best by the first metric'>★</span>" if label == view["best"] else ""
        rows.append(f"<tr><th style='text-align:left;padding:2px 8px'>{_e(label)}{mark}</th>{cells}</tr>")
    parts = [f"<div class='tm-evaluation'><b>{_e(view['title'])}</b> · {view['examples']} examples",
             f"<div><img alt='scores with 95% intervals' src='data:image/png;base64,{png}'></div>",
             f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"]
    parts += [f"<div>{_e(sentence)}</div>" for sentence in view["summaries"]]
    flips = view["flips"]
    if flips is not None and len(flips):
        a, b = view["pair"]
        items = []
        for _, row in flips.head(MAX_FLIPS).iterrows():
            items.append(f"<details><summary>{_e(row['change'])}: {_e(row['question'])}</summary>"
                         f"<div style='white-space:pre-wrap;padding-left:12px'>reference: {_e(row['reference'])}\n"
                         f"{_e(b)}: {_e(row[f'{b} answer'])}\n{_e(a)}: {_e(row[f'{a} answer'])}</div></details>")
        more = f"<div>… {len(flips) - MAX_FLIPS} more: evaluation.flips()</div>" if len(flips) > MAX_FLIPS else ""
        parts.append(f"<div><b>flips</b> ({_e(a)} vs {_e(b)}, by {_e(view['metrics'][0])}):{''.join(items)}{more}</div>")
    if view["leak_note"]:
        parts.append(f"<div>note: {_e(view['leak_note'])}</div>")
    return "".join(parts) + "</div>"


class EvaluationProgress:
    """A progress bar below the cell while an evaluation runs: the phase (a model, the judge), done of total,
    the rate and the time left. Updated from the cell's own thread, so it shows wherever widgets render."""

    def __init__(self, title: str):
        import time

        import ipywidgets as w

        self._time = time.monotonic
        self.label = w.HTML(f"<b>{_e(title)}</b>")
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                   layout=w.Layout(width="240px", max_width="100%"))
        self.text = w.Label(layout=w.Layout(width="auto"))
        self.widget = w.HBox([self.label, self.bar, self.text], layout=w.Layout(flex_flow="row wrap",
                                                                                align_items="center"))
        self.widget.add_class("tm-eval-progress")
        self._phase, self._started, self._first = None, None, 0
        from IPython.display import display

        self._handle = display(self.widget, display_id=True)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == "done":
            self.widget.layout.display = "none"  # the result shows below; the bar has said all it had to
            return
        now = self._time()
        if phase != self._phase:
            self._phase, self._started, self._first = phase, now, done
        self.bar.value = done / total if total else 1.0
        words = f"{phase}: {done:,} of {total:,}"
        fresh, spent = done - self._first, now - self._started
        if fresh > 0 and spent > 0.5 and done < total:
            rate = fresh / spent
            words += f" · {rate:.1f}/s · {clock((total - done) / rate)} left"
        elif self._first and done == self._first:
            words += f" ({self._first:,} cached)"
        self.text.value = words


def progress_view(title: str):
    """An :class:`EvaluationProgress` where a kernel shows widgets, else False (no progress is shown)."""
    try:
        from IPython import get_ipython

        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    shell = get_ipython()
    if getattr(shell, "kernel", None) is None:
        return False
    return EvaluationProgress(title)
