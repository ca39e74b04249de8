"""The dataset report: counts, problems by line and field, a token histogram, cost, one example.

Every piece of text that comes from the data is HTML-escaped: a dataset shows
as text, never as markup.
"""

from __future__ import annotations

import base64
import html
import io


def _themed(prop: str, variable: str, fallback: str, value: str = "{}") -> str:
    """``prop`` in the JupyterLab theme's ``variable`` (light or dark), ``fallback`` where the theme has none.

    The plain declaration comes first: JupyterLab's sanitizer drops a value with var(...) from untrusted
    output, and the plain one then stays; elsewhere the later var(...) wins.
    """
    return f"{prop}:{value.format(fallback)};{prop}:{value.format(f'var({variable},{fallback})')}"


# Inline styles only: JupyterLab drops <style> blocks (and class-based looks with them) from untrusted or
# reopened notebooks, while the style attribute survives its sanitizer for these properties. Text takes the
# theme's own colour (none is set) except in a box that sets its background too; accents are mid-tones
# that read on light and dark backgrounds alike.
_REPORT = "font-family:sans-serif;font-size:13px;max-width:980px"
_TABLE = "border-collapse:collapse;margin:4px 0"
_BORDER = _themed("border", "--jp-border-color2", "#bbb", "1px solid {}")
_CELL = _BORDER + ";padding:2px 8px;text-align:left;vertical-align:top"
# Verdicts keep the theme's text colour (status colours as text read poorly: the light theme's orange on
# white has a contrast of 2.7) and are marked by a line of the status colour under them.
_OK = _themed("border-bottom", "--jp-success-color1", "#1a7f37", "3px solid {}") + ";font-weight:bold"
_BAD = _themed("border-bottom", "--jp-error-color1", "#cf222e", "3px solid {}") + ";font-weight:bold"
_WARN = _themed("border-bottom", "--jp-warn-color1", "#9a6700", "2px solid {}")
_EXAMPLE = ";".join(["white-space:pre-wrap;font-family:monospace;padding:6px", _BORDER,
                     _themed("background-color", "--jp-layout-color2", "#fafafa"),
                     _themed("color", "--jp-ui-font-color1", "#000")])
#: A span of tokens the loss is taken on: its own background and text colour, legible in either theme.
LOSS_STYLE = "background-color:#dafbe1;border-bottom:2px solid #1a7f37;color:#000000"
#: A span of the template and prompt, with no loss: mid-grey, legible on light and dark.
TEMPLATE_STYLE = "color:#888888"
#: Text in the histogram PNG, whose background is transparent: mid-grey, legible on light and dark.
PLOT_TEXT = "#808080"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def histogram_png(report, *, bins: int = 30) -> bytes | None:
    """A PNG of the token-length histogram, or None without data.

    Drawn on a bare ``Figure``: pyplot's global state (the backend of the user's
    own plots) is never touched.
    """
    hist = report.length_histogram(bins)
    if not hist:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 1.9), dpi=96)
    # Fixed margins: tight_layout would draw the figure once more just to measure it (half the time).
    fig.subplots_adjust(left=0.13, right=0.98, top=0.95, bottom=0.27)
    ax = fig.add_subplot()
    ax.bar([lo for lo, _, _ in hist], [c for _, _, c in hist], width=[hi - lo + 1 for lo, hi, _ in hist],
           align="edge", color="#4c72b0")
    # A transparent background and mid-grey text: the notebook's own background shows through, light or dark.
    ax.set_xlabel("tokens per example", color=PLOT_TEXT)
    ax.set_ylabel("examples", color=PLOT_TEXT)
    ax.tick_params(colors=PLOT_TEXT)
    for spine in ax.spines.values():
        spine.set_color(PLOT_TEXT)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", transparent=True)
    return buf.getvalue()


def histogram_text(report, *, bins: int = 8, width: int = 40) -> str:
    """The token-length histogram as text bars, one per integer bin."""
    hist = report.length_histogram(bins)
    if not hist:
        return ""
    top = max(c for _, _, c in hist) or 1
    rows = []
    for lo, hi, c in hist:
        span = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
        rows.append(f"{span:>15} {'#' * int(round(c / top * width)):<{width}} {c:,}")
    return "\n".join(rows)


def _issues_table(issues, count: int, kind: str) -> str:
    if not count:
        return ""
    css = _BAD if kind == "errors" else _WARN
    td = f"<td style='{_CELL}'>"
    rows = "".join(f"<tr>{td}{_e(i.where)}</td>{td}{_e(i.message)}</td></tr>" for i in issues[:50])
    more = f"<div>… {count - min(50, len(issues)):,} more</div>" if count > min(50, len(issues)) else ""
    th = f"<th style='{_CELL}'>"
    return (f"<div><span style='{css}'>{count:,} {kind}</span></div><table style='{_TABLE}'><tr>{th}where</th>"
            f"{th}message</th></tr>{rows}</table>{more}")


def example_html(segments) -> str:
    """One example in the model's chat template (``report.example_segments``), loss-bearing text highlighted."""
    parts = []
    for text, loss in segments:
        parts.append(f"<span style='{LOSS_STYLE if loss else TEMPLATE_STYLE}'>{_e(text)}</span>")
    return f"<div style='{_EXAMPLE}'>" + "".join(parts) + "</div>"


def example_text(segments) -> str:
    """One example in the model's chat template; loss-bearing text between ⟦ and ⟧."""
    return "".join(f"⟦{t}⟧" if loss else t for t, loss in segments)


def _example_title(found) -> str:
    return "first example, as the model sees it" if found.exact else "first example, approximately"


def _rejected(report) -> str | None:
    """A preference pair's rejected answer, shown under the prompt and its chosen answer."""
    return getattr(report, "example_rejected", None)


def report_html(report, *, epochs: int = 1, cost=None, uri=None, title: str | None = None) -> str:
    """The full report of one validation as HTML."""
    tok = report.tokens
    verdict = f"<span style='{_OK}'>valid</span>" if report.ok else f"<span style='{_BAD}'>invalid</span>"
    est = " (estimated)" if tok["estimated"] else ""
    scope = report.valid_scope()
    rows = [
        ("examples", f"{report.examples:,}"),
        ("format", report.format or "-"),
        ("target", f"{report.model or 'any model'}, {report.method}"),
        (f"tokens{est}{scope}", f"total {tok['total']:,} · max {tok['max']:,} · mean {tok['mean']:,}"),
        (f"billed tokens ({epochs} epoch{'s' if epochs != 1 else ''}){scope}", f"{tok['total'] * epochs:,}"),
    ]
    if cost is not None:
        rows.append(("estimated cost", f"${cost:,.2f} at list price"))
    if report.images:
        rows.append(("examples with images", f"{report.images:,}"))
    if report.dropped:
        rows.append(("dropped by the service", f"<span style='{_WARN}'>{report.dropped:,}</span>"))
    table = "".join(f"<tr><th style='{_CELL}'>{_e(k)}</th><td style='{_CELL}'>{v}</td></tr>" for k, v in rows)
    head = _e(title or uri or report.source)
    out = [f"<div style='{_REPORT}'><div><b>{head}</b>: {verdict}</div><table style='{_TABLE}'>{table}</table>"]
    if report.tokenizer_note:
        out.append(f"<div style='{TEMPLATE_STYLE}'>{_e(report.tokenizer_note)}</div>")
    out.append(_issues_table(report.errors, report.error_count, "errors"))
    out.append(_issues_table(report.warnings, report.warning_count, "warnings"))
    png = histogram_png(report)
    if png:
        out.append(f"<img alt='token length histogram' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>")
    found = report.example_preview
    if found is not None:
        out.append(f"<div>{_e(_example_title(found))}: {_e(found.note)} "
                   f"(<span style='{LOSS_STYLE}'>highlighted</span>: loss taken)</div>")
        out.append(example_html(found.segments))
        if _rejected(report) is not None:
            out.append(f"<div>the pair's rejected answer, in the same place: <code>{_e(_rejected(report))}</code></div>")
    out.append("</div>")
    return "".join(out)


def report_text(report, *, epochs: int = 1, cost=None) -> str:
    """The report as plain text, for terminals and frontends without HTML."""
    lines = [report.summary()]
    tok = report.tokens
    lines.append(f"billed tokens ({epochs} epoch{'s' if epochs != 1 else ''}){report.valid_scope()}: "
                 f"{tok['total'] * epochs:,}"
                 + (f", estimated cost ${cost:,.2f}" if cost is not None else ""))
    hist = histogram_text(report)
    if hist:
        lines.append("token lengths:\n" + hist)
    found = report.example_preview
    if found is not None:
        lines.append(f"{_example_title(found)}: {found.note} (⟦between these⟧: loss taken):\n"
                     + example_text(found.segments))
        if _rejected(report) is not None:
            lines.append(f"the pair's rejected answer, in the same place: {_rejected(report)}")
    return "\n".join(lines)


def dataset_html(ds) -> str:
    """A written Dataset: its training report and, when there is one, its validation report."""
    parts = [report_html(ds.report, epochs=ds.epochs, cost=ds.cost(), uri=ds.uri)]
    if ds.validation is not None:
        parts.append(report_html(ds.validation.report, epochs=1, uri=ds.validation.uri,
                                 title=f"validation: {ds.validation.uri}"))
    return "".join(parts)


def dataset_text(ds) -> str:
    """A written Dataset as plain text."""
    out = [report_text(ds.report, epochs=ds.epochs, cost=ds.cost())]
    if ds.validation is not None:
        out.append("validation: " + ds.validation.report.summary())
    return "\n".join(out)
