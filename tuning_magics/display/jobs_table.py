"""The table of jobs that ``%tune_jobs`` shows: one row per job, clickable where widgets render.

In JupyterLab, VS Code and Colab each row's job id is a button that shows that
job (its monitor) below the table. Everywhere else (nbval, a terminal,
GitHub's notebook view) the same rows appear as an HTML table and as text.
Every text from a job is escaped; model text is never rendered as HTML.
Values read as in a comparison (:func:`compare.cell_text`: ``—`` where there
is none), and each state wears the monitor's badge, in the theme's colours.

DOM classes, for page styles and browser tests: ``tuning-magics-jobs`` and
``tm-jobs`` (the table, or the widget's root), ``tm-state`` and
``tm-state-<kind>`` (each state badge, as in the monitor).
"""

from __future__ import annotations

import html

from .compare import MISSING, cell_text, missing
from .monitor import badge_html, state_kind

#: The columns shown, in order: (title, key of the summary row).
COLUMNS = (("job", "job"), ("state", "state"), ("model", "model"), ("method", "method"),
           ("created", "created"), ("duration", "duration"), ("best eval loss", "best_eval_loss"))



def _duration(seconds) -> str:
    if missing(seconds):
        return MISSING
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _when(created) -> str:
    """A creation time in the notebook's local time zone, to the minute; ``—`` when unknown (None or NaT)."""
    if missing(created):
        return MISSING
    if hasattr(created, "to_pydatetime"):  # a pandas Timestamp from the summary frame
        created = created.to_pydatetime()
    return created.astimezone().strftime("%Y-%m-%d %H:%M")


def _text(row: dict) -> dict:
    """The shown text of each column of a summary row."""
    name = row.get("display_name")
    named = not missing(name) and name and name != row["id"]
    return {
        "job": f"{row['id']} ({name})" if named else str(row["id"]),
        "state": cell_text(row.get("state") or None),
        "model": cell_text(row.get("model") or None),
        "method": cell_text(row.get("method") or None),
        "created": _when(row.get("created")),
        "duration": _duration(row.get("duration_s")),
        "best_eval_loss": cell_text(row.get("best_eval_loss")),
    }


def _state_html(state: str) -> str:
    """A summary row's state (``SUCCEEDED``) as the monitor's badge for that state."""
    if state == MISSING:
        return html.escape(state)
    return badge_html(state, state_kind(f"JOB_STATE_{state}"), f"JOB_STATE_{state}")


def _widgets_render() -> bool:
    """True inside a kernel with ipywidgets installed: a frontend may render the clickable table."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class JobsTable:
    """Jobs and their summary rows (``frame``, a DataFrame), shown as a table.

    ``jobs[i]`` is the job of ``frame.iloc[i]``; ``selected`` is the job last
    clicked in the widget view.
    """

    def __init__(self, jobs, frame):
        self.jobs = list(jobs)
        self.frame = frame
        self.selected = None
        self._rows = [_text(row) for row in frame.to_dict("records")]
        self._widget = None

    def __len__(self) -> int:
        return len(self.jobs)

    # -- text and HTML --------------------------------------------------------------
    def __str__(self) -> str:
        if not self._rows:
            return "no tuning jobs match"
        widths = {key: max(len(title), *(len(r[key]) for r in self._rows)) for title, key in COLUMNS}
        lines = ["  ".join(title.ljust(widths[key]) for title, key in COLUMNS).rstrip()]
        lines += ["  ".join(r[key].ljust(widths[key]) for _, key in COLUMNS).rstrip() for r in self._rows]
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        if not self._rows:
            return "<div class='tuning-magics-jobs tm-jobs'>no tuning jobs match</div>"
        head = "".join(f"<th style='text-align:left'>{html.escape(title)}</th>" for title, _ in COLUMNS)
        body = []
        for r in self._rows:
            cells = "".join(f"<td style='text-align:left'>"
                            f"{_state_html(r[key]) if key == 'state' else html.escape(r[key])}</td>"
                            for _, key in COLUMNS)
            body.append(f"<tr>{cells}</tr>")
        return ("<table class='tuning-magics-jobs tm-jobs'><thead><tr>" + head + "</tr></thead><tbody>"
                + "".join(body) + "</tbody></table>")

    # -- widgets --------------------------------------------------------------------
    def widget(self):
        """The clickable table (ipywidgets): a button per job that shows the job below the table."""
        if self._widget is not None:
            return self._widget
        import ipywidgets as w

        cells = [w.HTML(f"<b>{html.escape(title)}</b>") for title, _ in COLUMNS]
        self.output = w.Output()
        self.buttons = []
        for job, r in zip(self.jobs, self._rows):
            button = w.Button(description=r["job"], tooltip=f"show {r['job']}",
                              layout=w.Layout(width="auto", justify_content="flex-start"))
            button.on_click(lambda _b, job=job: self._select(job))
            self.buttons.append(button)
            cells.append(button)
            # Label shows text as text: nothing a job holds is rendered as HTML (the state is ours, escaped).
            cells += [w.HTML(_state_html(r[key])) if key == "state" else w.Label(r[key]) for _, key in COLUMNS[1:]]
        grid = w.GridBox(cells, layout=w.Layout(
            grid_template_columns=f"max-content repeat({len(COLUMNS) - 1}, max-content)", grid_gap="2px 14px"))
        self._widget = w.VBox([grid, self.output])
        self._widget.add_class("tm-jobs")
        return self._widget

    def _select(self, job) -> None:
        from IPython.display import display

        self.selected = job
        self.output.clear_output()
        with self.output:
            display(job)

    def _repr_mimebundle_(self, include=None, exclude=None):
        data = {"text/plain": str(self), "text/html": self._repr_html_()}
        if self._rows and _widgets_render():
            view = self.widget()._repr_mimebundle_()
            key = "application/vnd.jupyter.widget-view+json"
            if key in view:
                data[key] = view[key]
        return data
