"""The deploy view: a live look at an endpoint being deployed, with a text fallback.

``show(endpoint)`` (and displaying the endpoint ``job.deploy()`` returned) puts a
:class:`DeployMonitor` below the cell: the state in colour, the elapsed time,
the endpoint's name (known from the start, so a deployment is never lost), what
it serves and on which machine, what it waits for, and the error of a failed
deploy. A Model Garden deploy takes 15-30 minutes; other cells run meanwhile.

It reads only the endpoint handle (``name``, ``state``, ``done``, ``elapsed``,
``source``, ``machine``, ``note``, ``error``, ``operation``, ``refresh()``,
``poll_interval()``), never a backend. As the job monitor does: the widget tree
is built once and afterwards only values change, from one daemon thread that
re-sets the parent header of the cell that displayed it, looks at the
deployment at the handle's own pace and ends once it has ended. Where widgets
do not render (nbval, a terminal) the same facts show as text and HTML.
"""

from __future__ import annotations

import threading
import time

from . import monitor
from .monitor import STATE_COLOURS, _e, _set, badge_html, clock
from .monitor import _Parent as CellParent  # the one way a display thread re-sets its cell's parent header

#: Seconds between looks at the clock (elapsed time); the deployment itself is looked at at its own pace.
TICK = 1.0

#: The kind of state (monitor.state_kind's words, so the colours agree) of each endpoint state.
_KINDS = {"READY": "succeeded", "FAILED": "failed", "DELETED": "cancelled", "DEPLOYING": "active"}


def facts(endpoint) -> list[tuple[str, str]]:
    """(label, text) pairs: what the view shows, shared by the widget and the text and HTML fallbacks."""
    state = endpoint.state + (f" ({endpoint.note})" if endpoint.note else "")
    out = [("endpoint", endpoint.name), ("state", state)]
    if endpoint.operation:
        out.append(("time", f"elapsed {clock(endpoint.elapsed)}"))
    if endpoint.source:
        out.append(("serving", endpoint.source))
    if endpoint.machine:
        out.append(("machine", endpoint.machine))
    hint = _hint(endpoint)
    if hint:
        out.append(("hint", hint))
    return out


def _hint(endpoint) -> str | None:
    if endpoint.state == "DEPLOYING":
        return ("a Model Garden deploy takes 15-30 minutes; endpoint.wait() waits for it; its machine is billed "
                "from when it is up until endpoint.delete()")
    if endpoint.state == "READY" and endpoint.kind == "deployed":
        return "endpoint.chat(...) answers; endpoint.delete() stops the billing"
    return None


def endpoint_text(endpoint) -> str:
    """The endpoint's facts (and a failed deploy's error) as plain text."""
    lines = facts(endpoint)
    width = max(len(label) for label, _ in lines)
    out = [f"{label:>{width}}: {value}" for label, value in lines]
    if endpoint.error:
        out.append(f"{'error':>{width}}: {endpoint.error}")
    return "\n".join(out)


def endpoint_html(endpoint) -> str:
    """The same as :func:`endpoint_text`, as escaped HTML."""
    kind = _KINDS.get(endpoint.state, "active")
    colour = STATE_COLOURS[kind]
    rows = "".join(
        f"<tr><th style='text-align:right;padding:1px 8px'>{_e(label)}</th>"
        + (f"<td>{badge_html(value, kind, endpoint.state)}</td>" if label == "state"
           else f"<td>{_e(value)}</td>")
        + "</tr>"
        for label, value in facts(endpoint)
    )
    error = f"<div style='color:{STATE_COLOURS['failed']}'>{_e(endpoint.error)}</div>" if endpoint.error else ""
    return (f"<div class='tm-deploy' style='border-left:4px solid {colour};padding-left:6px'>"
            f"<table>{rows}</table>{error}</div>")


def endpoint_bundle(endpoint) -> dict:
    """``text/plain`` and ``text/html`` of the endpoint, for frontends without widgets."""
    return {"text/plain": endpoint_text(endpoint), "text/html": endpoint_html(endpoint)}


class DeployMonitor:
    """A live widget view of an endpoint being deployed; ``start()`` begins updating it from a background thread."""

    def __init__(self, endpoint):
        import ipywidgets as w

        self.endpoint = endpoint
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._parent = CellParent()
        self._handle = None
        self.updates = 0
        self.state = w.HTML()
        self.times = w.HTML()
        self.details = w.HTML()
        self.message = w.Label()
        self.error = w.HTML(layout=w.Layout(display="none"))
        self.widget = w.VBox([w.HBox([self.state, self.times]), self.details, self.message, self.error])
        self.widget.add_class("tm-deploy")  # a handle for page styles and browser tests
        self.update(fetch=False)

    def update(self, *, fetch: bool = True) -> None:
        """Look at the deployment again (unless ``fetch`` is False: the clock alone moves on) and set the values."""
        with self._lock:
            endpoint = self.endpoint
            if fetch:
                endpoint.refresh()
            state = endpoint.state + (f" · {endpoint.note}" if endpoint.note else "")
            _set(self.state, "value", badge_html(state, _KINDS.get(endpoint.state, "active"), endpoint.state))
            if endpoint.operation:
                _set(self.times, "value", f"<span style='margin-left:12px'>elapsed {clock(endpoint.elapsed)}</span>")
            rows = [(label, value) for label, value in facts(endpoint) if label not in ("state", "time")]
            _set(self.details, "value", "<table>" + "".join(
                f"<tr><th style='text-align:right;padding:1px 8px'>{_e(label)}</th><td>{_e(value)}</td></tr>"
                for label, value in rows) + "</table>")
            if endpoint.error:
                _set(self.error, "value", f"<div style='color:{STATE_COLOURS['failed']}'>{_e(endpoint.error)}</div>")
                _set(self.error.layout, "display", "")
            self.updates += 1

    # -- the thread --------------------------------------------------------------------------
    def start(self) -> DeployMonitor:
        """Begin updating from a background thread (it ends by itself when the deployment ends)."""
        if self._thread is None and not self.endpoint.done:
            self._thread = threading.Thread(target=self._run, name="tuning-deploy-monitor", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        self._parent.apply()
        looks = 0
        next_look = time.monotonic() + self.endpoint.poll_interval(looks)
        while not self._stop.wait(TICK):
            fetch = time.monotonic() >= next_look
            try:
                self.update(fetch=fetch)
                _set(self.message, "value", "")
            except Exception as exc:  # noqa: BLE001 - a failed look (the network) must not end the view
                _set(self.message, "value", f"could not look at the deployment: {str(exc).splitlines()[0]}"[:300])
            if fetch:
                looks += 1
                next_look = time.monotonic() + self.endpoint.poll_interval(looks)
            if self.endpoint.done:
                self.update(fetch=False)
                if self._handle is not None:  # the text a saved notebook keeps
                    try:
                        self._handle.update(self)
                    except Exception:  # noqa: BLE001 - the widget itself is up to date
                        pass
                break

    def wait(self, timeout: float | None = None) -> DeployMonitor:
        """Block until the update thread has ended (the deployment ended, or the view was stopped)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    def stop(self) -> None:
        """Stop updating; the widget stays as it is."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    # -- display -----------------------------------------------------------------------------
    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle.update(endpoint_bundle(self.endpoint))
        return bundle

    def __repr__(self) -> str:
        return f"<DeployMonitor {self.endpoint.name} {self.endpoint.state}>"


def show(endpoint) -> DeployMonitor | None:
    """Display ``endpoint`` below the cell: a live view while deploy() follows it, else its facts once.

    Returns the view, or None where it shows as text (no kernel, no ipywidgets,
    or an endpoint that was not deployed from here).
    """
    from IPython.display import display

    kernel, _ = monitor._kernel()
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        kernel = None
    if kernel is None or not endpoint.operation:
        display(monitor.TextView(endpoint_bundle(endpoint)))
        return None
    view = DeployMonitor(endpoint)
    view._handle = display(view, display_id=True)
    return view.start()
