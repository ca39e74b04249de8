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
