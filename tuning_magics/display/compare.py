"""The view of a comparison of jobs: their loss curves on one plot, and their configurations side by side.

Drawn on a bare matplotlib ``Figure`` into PNG bytes with a transparent
background and mid-grey axes, which read on a light and a dark notebook alike:
pyplot's global state and the notebook's matplotlib backend are never touched,
so the user's own plots keep working. Every text from a job (ids, names,
options) is escaped. :func:`cell_text` is how every value reads here and in
``%tune_jobs``: one number format, and ``—`` where there is no value.

DOM classes, for page styles and browser tests: ``tuning-magics-compare`` and
``tm-compare`` (the root), ``tm-differs`` (each row whose values differ).
"""

from __future__ import annotations

import base64
import html
import io
import numbers

from .monitor import LABEL_PX, PLOT_INK, SOFT_INK

#: What a table shows where a value is missing (None, NaN, NaT).
MISSING = "\u2014"

#: One colour per job (matplotlib's tab10), repeating after ten jobs.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def loss_figure_png(curves: dict, *, width: float = 7.0, height: float = 3.6) -> bytes:
    """PNG bytes of every job's training (solid) and validation (dashed, dots) loss against the step.

    ``curves`` maps a label to a DataFrame with ``step`` and ``train_loss`` /
    ``eval_loss`` columns; a job without metrics appears in the legend only.
    """
    from matplotlib.figure import Figure

    dpi = 96
    size = LABEL_PX * 72 / dpi  # font sizes are in points: LABEL_PX pixels at this dpi
    fig = Figure(figsize=(width, height), dpi=dpi)
    fig.patch.set_alpha(0.0)  # the notebook's own background, light or dark, shows through
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("none")
    ax.tick_params(labelsize=size, colors=PLOT_INK)
    for spine in ax.spines.values():
        spine.set_color(PLOT_INK)
    drawn = False
    for i, (label, frame) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        plotted = False
        for column, style, suffix in (("train_loss", {"linestyle": "-"}, "train"),
                                      ("eval_loss", {"linestyle": "--", "marker": "o", "markersize": 3}, "eval")):
            if frame is None or column not in frame or "step" not in frame:
                continue
            points = frame[["step", column]].dropna()
            if not len(points):
                continue
            ax.plot(points["step"].to_numpy(dtype=float), points[column].to_numpy(dtype=float), color=colour,
                    label=f"{label} {suffix}", linewidth=1.4, **style)
            plotted = drawn = True
        if not plotted:
            ax.plot([], [], color=colour, label=f"{label} (no metrics yet)")
    ax.set_xlabel("step", fontsize=size, color=PLOT_INK)
    ax.set_ylabel("loss", fontsize=size, color=PLOT_INK)
    ax.grid(True, alpha=0.3, color=PLOT_INK)
    if not drawn:
        ax.text(0.5, 0.5, "no losses recorded yet", ha="center", va="center", transform=ax.transAxes,
                color=PLOT_INK, fontsize=size)
    ax.legend(fontsize=size, loc="upper right", labelcolor=PLOT_INK, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", transparent=True)
    return buf.getvalue()


def missing(value) -> bool:
    """Whether a table value is missing: None, NaN, NaT or pandas' NA."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN and NaT differ from themselves
    except TypeError:  # pandas' NA: comparing it gives NA, which is neither true nor false
        return True


def cell_text(value) -> str:
    """A table value as text, the same in a comparison and in ``%tune_jobs``: 4 significant digits
    (``0.0003``, ``1.224``), whole numbers from 10,000 on with thousands separated, ``—`` where missing."""
    if missing(value):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{value:.4g}"


def comparison_html(table, png: bytes, differs) -> str:
    """The plot and the table as HTML; rows whose values differ are bold. Every value is escaped."""
    differs = set(differs)
    head = "".join(f"<th style='text-align:left'>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for name, row in table.iterrows():
        weight = "font-weight:bold;" if name in differs else ""
        cls = " class='tm-differs'" if name in differs else ""
        cells = "".join(f"<td style='text-align:left;{weight}'>{html.escape(cell_text(v))}</td>" for v in row)
        body.append(f"<tr{cls}><th style='text-align:left;{weight}'>{html.escape(str(name))}</th>{cells}</tr>")
    image = base64.b64encode(png).decode("ascii")
    return (
        "<div class='tuning-magics-compare tm-compare'>"
        f"<img alt='loss curves' src='data:image/png;base64,{image}'/>"
        "<table><thead><tr><th></th>" + head + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>"
        f"<div style='color:{SOFT_INK}'>{len(differs)} of {len(table)} rows differ (bold, first)</div></div>"
    )


def comparison_text(table, differs) -> str:
    """The table as plain text, for frontends without HTML."""
    shown = table.map(cell_text) if hasattr(table, "map") else table.applymap(cell_text)
    return (f"comparison of {len(table.columns)} jobs ({len(differs)} rows differ, listed first)\n"
            + shown.to_string())
