"""The dataset report: counts, problems by line and field, a token histogram, cost, one example.

Every piece of text that comes from the data is HTML-escaped: a dataset shows
as text, never as markup.
"""

from __future__ import annotations

import base64
import html
import io

_STYLE = (
    "<style>.tm-report{font-family:var(--jp-ui-font-family,sans-serif);font-size:13px;max-width:980px}"
    ".tm-report table{border-collapse:collapse;margin:4px 0}"
    ".tm-report td,.tm-report th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}"
    ".tm-ok{color:#1a7f37;font-weight:bold}.tm-bad{color:#cf222e;font-weight:bold}.tm-warn{color:#9a6700}"
    ".tm-example{white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace);border:1px solid #ddd;"
    "padding:6px;background:#fafafa}.tm-loss{background:#dafbe1;border-bottom:2px solid #1a7f37}"
    ".tm-tmpl{color:#888}</style>"
)


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
    ax = fig.add_subplot()
    ax.bar([lo for lo, _, _ in hist], [c for _, _, c in hist], width=[hi - lo + 1 for lo, hi, _ in hist],
           align="edge", color="#4c72b0")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
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
    css = "tm-bad" if kind == "errors" else "tm-warn"
    rows = "".join(
        f"<tr><td>{_e(i.line) if i.line is not None else ''}</td><td>{_e(i.field or '')}</td><td>{_e(i.message)}</td></tr>"
        for i in issues[:50]
    )
    more = f"<div>… {count - min(50, len(issues)):,} more</div>" if count > min(50, len(issues)) else ""
    return (f"<div class='{css}'>{count:,} {kind}</div><table><tr><th>line</th><th>field</th><th>message</th></tr>"
            f"{rows}</table>{more}")


def example_html(segments) -> str:
    """One example in the model's chat template (``report.example_segments``), loss-bearing text highlighted."""
    parts = []
    for text, loss in segments:
        cls = "tm-loss" if loss else "tm-tmpl"
        parts.append(f"<span class='{cls}'>{_e(text)}</span>")
    return "<div class='tm-example'>" + "".join(parts) + "</div>"


def example_text(segments) -> str:
    """One example in the model's chat template; loss-bearing text between ⟦ and ⟧."""
    return "".join(f"⟦{t}⟧" if loss else t for t, loss in segments)


def report_html(report, *, epochs: int = 1, cost=None, uri=None, title: str | None = None) -> str:
    """The full report of one validation as HTML."""
    tok = report.tokens
    verdict = "<span class='tm-ok'>valid</span>" if report.ok else "<span class='tm-bad'>invalid</span>"
    est = " (estimated)" if tok["estimated"] else ""
    rows = [
        ("examples", f"{report.examples:,}"),
        ("format", report.format or "-"),
        ("target", f"{report.model or 'any model'}, {report.method}"),
        (f"tokens{est}", f"total {tok['total']:,} · max {tok['max']:,} · mean {tok['mean']:,}"),
        (f"billed tokens ({epochs} epoch{'s' if epochs != 1 else ''})", f"{tok['total'] * epochs:,}"),
    ]
    if cost is not None:
        rows.append(("estimated cost", f"${cost:,.2f} at list price"))
    if report.images:
        rows.append(("examples with images", f"{report.images:,}"))
    if report.dropped:
        rows.append(("dropped by the service", f"<span class='tm-warn'>{report.dropped:,}</span>"))
    table = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    head = _e(title or uri or report.source)
    out = [f"<div class='tm-report'>{_STYLE}<div><b>{head}</b>: {verdict}</div><table>{table}</table>"]
    if report.tokenizer_note:
        out.append(f"<div class='tm-tmpl'>{_e(report.tokenizer_note)}</div>")
    out.append(_issues_table(report.errors, report.error_count, "errors"))
    out.append(_issues_table(report.warnings, report.warning_count, "warnings"))
    png = histogram_png(report)
    if png:
        out.append(f"<img alt='token length histogram' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>")
    if report.example:
        out.append("<div>first example, as the model sees it (<span class='tm-loss'>highlighted</span>: "
                   "the tokens the loss is taken on)</div>")
        out.append(example_html(report.example_segments))
    out.append("</div>")
    return "".join(out)


def report_text(report, *, epochs: int = 1, cost=None) -> str:
    """The report as plain text, for terminals and frontends without HTML."""
    lines = [report.summary()]
    tok = report.tokens
    lines.append(f"billed tokens ({epochs} epochs): {tok['total'] * epochs:,}"
                 + (f", estimated cost ${cost:,.2f}" if cost is not None else ""))
    hist = histogram_text(report)
    if hist:
        lines.append("token lengths:\n" + hist)
    if report.example:
        lines.append("first example (⟦loss-bearing⟧):\n" + example_text(report.example_segments))
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
