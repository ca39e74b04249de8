"""The view of a comparison of jobs: their loss curves on one plot, and their configurations side by side.

Drawn on a bare matplotlib ``Figure`` into PNG bytes: pyplot's global state and
the notebook's matplotlib backend are never touched, so the user's own plots
keep working. Every text from a job (ids, names, options) is escaped.
"""

from __future__ import annotations

import base64
import html
import io

#: One colour per job (matplotlib's tab10), repeating after ten jobs.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def loss_figure_png(curves: dict, *, width: float = 7.0, height: float = 3.6) -> bytes:
    """PNG bytes of every job's training (solid) and validation (dashed, dots) loss against the step.

    ``curves`` maps a label to a DataFrame with ``step`` and ``train_loss`` /
    ``eval_loss`` columns; a job without metrics appears in the legend only.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96)
    ax = fig.add_subplot(1, 1, 1)
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
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no losses recorded yet", ha="center", va="center", transform=ax.transAxes,
                color="#666666")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def comparison_html(table, png: bytes, differs) -> str:
    """The plot and the table as HTML; rows whose values differ are bold. Every value is escaped."""
    differs = set(differs)
    head = "".join(f"<th style='text-align:left'>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for name, row in table.iterrows():
        weight = "font-weight:bold;" if name in differs else ""
        cells = "".join(f"<td style='text-align:left;{weight}'>{html.escape(_cell(v))}</td>" for v in row)
        body.append(f"<tr><th style='text-align:left;{weight}'>{html.escape(str(name))}</th>{cells}</tr>")
    image = base64.b64encode(png).decode("ascii")
    return (
        "<div class='tuning-magics-compare'>"
        f"<img alt='loss curves' src='data:image/png;base64,{image}'/>"
        "<table><thead><tr><th></th>" + head + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>"
        f"<div style='color:#666'>{len(differs)} of {len(table)} rows differ (bold, first)</div></div>"
    )


def comparison_text(table, differs) -> str:
    """The table as plain text, for frontends without HTML."""
    shown = table.map(_cell) if hasattr(table, "map") else table.applymap(_cell)
    return (f"comparison of {len(table.columns)} jobs ({len(differs)} rows differ, listed first)\n"
            + shown.to_string())
