"""The chat panel: a conversation with a tuned model, streamed, with the base model side by side.

``ChatPanel(target)`` talks to anything with ``chat(messages, stream=True, **gen)``
(a Job, ``job.deploy()``'s endpoint, a Vertex AI endpoint); ``base=`` adds a
second model that answers the same messages in a column of its own, so what
tuning changed is there to see. ``job.chat_panel()`` opens one for a job.

- A system prompt, temperature and max tokens; the request is checked once by
  :mod:`tuning_magics.chat_request`, and a mistake is one line in the panel.
- Replies stream: each side is read in a background thread that sets the cell's
  parent header (ipykernel 7 routes a thread's messages by it), so the kernel
  stays free and no update goes astray. The widget tree is built once; a
  reply only changes the values of its widgets.
- Model text is always shown as text: escaped into ``<pre>``-like blocks, never
  read as HTML, Markdown or math.
- Without widgets (nbval, a terminal) the panel shows the conversation as text;
  ``panel.send(text)`` works anywhere and returns the reply (or both replies).
"""

from __future__ import annotations

import html
import threading
import time

from ..chat_request import DEFAULT_MAX_TOKENS, chat_request
from ..errors import UserError
from .monitor import _Parent as CellParent  # the one way a display thread re-sets its cell's parent header

_BLOCK = ("margin:2px 0;padding:6px 8px;border-radius:4px;white-space:pre-wrap;word-break:break-word;"
          "font-family:var(--jp-code-font-family, monospace);font-size:12px;")
_STYLE = {"user": "background:#eef3fb;", "tuned": "background:#f2f8ee;", "reply": "background:#f2f8ee;", "base": "background:#f6f6f6;",
          "error": "background:#fdecea;color:#a4262c;"}


def escaped(text: str) -> str:
    """``text`` as HTML that shows exactly these characters (``<script>``, ``**``, ``$`` and all)."""
    return html.escape(text, quote=False)  # only ever element text, never an attribute


def _block(text: str, kind: str, label: str | None = None) -> str:
    # tex2jax_ignore keeps MathJax from typesetting "$...$" in a model's reply.
    head = f"<b>{escaped(label)}</b>\n" if label else ""
    return f'<div class="tex2jax_ignore" style="{_BLOCK}{_STYLE[kind]}">{head}{escaped(text)}</div>'


def _one_line(exc: BaseException) -> str:
    """An error as one line: a UserError's sentence, else the exception's type and first line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, UserError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _name_of(target, checkpoint=None) -> str:
    name = (getattr(target, "model_name", None) or getattr(target, "id", None) or getattr(target, "name", None)
            or type(target).__name__)
    return f"{name} ({checkpoint})" if checkpoint is not None else str(name)


# -- a model at a checkpoint ---------------------------------------------------------------------


class AtCheckpoint:
    """``target`` answering from ``checkpoint`` (``"base"``: the model before tuning): a side of the panel."""

    def __init__(self, target, checkpoint, *, name: str | None = None):
        self.target, self.checkpoint = target, checkpoint
        self.name = name or _name_of(target, checkpoint)

    def chat(self, messages_or_text, **options):
        return self.target.chat(messages_or_text, checkpoint=self.checkpoint, **options)


class _Side:
    """One column of the conversation: who answers, their messages so far, and the reply streaming now."""

    def __init__(self, model, label: str):
        self.model, self.label = model, label
        self.replies: list[str | None] = []  # one per turn; None where this side did not answer
        self.live = ""  # the reply streaming now
        self.error: str | None = None  # this turn's one-line error
        self.note: str | None = None  # why this side no longer answers
        self.updates = 0  # how many times the live view changed (streaming shows piece by piece)


class ChatPanel:
    """A chat with ``target`` (anything with ``chat(messages, stream=True, ...)``), streamed, with history.

    ``base``: a second model that answers the same messages side by side (for a
    job, ``AtCheckpoint(job, "base")``). ``checkpoint`` is passed to
    ``target.chat`` (a job's ``checkpoint-N``). ``title`` heads the panel.

    ``send(text)`` asks and waits (the Send button and Enter ask without
    waiting); ``history`` is the conversation as ``{"role", "content"}``
    messages; ``clear()`` starts over.
    """

    #: Least seconds between two updates of a streaming reply's view (pieces in between are shown together).
    refresh_seconds = 0.05

    def __init__(self, target, *, base=None, checkpoint=None, title=None):
        if not callable(getattr(target, "chat", None)):
            raise UserError(f"the chat panel needs something with a chat() method, not {type(target).__name__}",
                            field="target")
        if base is not None and not callable(getattr(base, "chat", None)):
            raise UserError(f"base must have a chat() method (a job or an endpoint), not {type(base).__name__}",
                            field="base")
        model = target if checkpoint is None else AtCheckpoint(target, checkpoint)
        self.title = title or f"Chat with {_name_of(target, checkpoint)}"
        self._sides = [_Side(model, "tuned" if base is not None else "reply")]
        if base is not None:
            self._sides.append(_Side(base, "base"))
        self._users: list[str] = []
        self._status = ""
        self._busy = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._parent = CellParent()  # the cell that opened the panel: its replies are reported there
        self.system_prompt = ""
        self.temperature = 0.0
        self.max_new_tokens = DEFAULT_MAX_TOKENS
        self.widget = self._build()

    # -- the widget tree, built once ---------------------------------------------------------
    def _build(self):
        try:
            import ipywidgets as w
        except ImportError:
            return None
        self._w_title = w.HTML(f"<b>{escaped(self.title)}</b>")
        self._w_system = w.Textarea(value="", placeholder="System prompt (optional)", description="System",
                                    layout=w.Layout(width="100%", height="48px"))
        self._w_temperature = w.FloatText(value=self.temperature, step=0.1, description="Temperature",
                                          layout=w.Layout(width="190px"))
        self._w_max = w.IntText(value=self.max_new_tokens, description="Max tokens",
                                layout=w.Layout(width="190px"))
        self._w_history = w.HTML("", layout=w.Layout(width="100%"))
        self._w_live = [w.HTML("", layout=w.Layout(flex="1 1 0", min_width="0")) for _ in self._sides]
        self._w_live_user = w.HTML("")
        self._w_live_box = w.VBox([self._w_live_user, w.HBox(self._w_live, layout=w.Layout(width="100%"))],
                                  layout=w.Layout(width="100%", display="none"))
        self._w_message = w.Text(value="", placeholder="Message (Enter sends)", layout=w.Layout(flex="1 1 auto"))
        self._w_send = w.Button(description="Send", button_style="primary", layout=w.Layout(width="80px"))
        self._w_clear = w.Button(description="Clear", layout=w.Layout(width="80px"))
        self._w_status = w.HTML("")
        self._w_send.on_click(lambda _b: self._submit())
        self._w_clear.on_click(lambda _b: self.clear())
        # Enter in a Text sends {"event": "submit"}; listening for it directly avoids the deprecated on_submit.
        self._w_message.on_msg(lambda _w, content, _buffers: content.get("event") == "submit" and self._submit())
        # Handles for page styles and browser tests: the panel, its history, the replies being streamed.
        self._w_history.add_class("tm-history")
        for live in self._w_live:
            live.add_class("tm-reply")
        panel = w.VBox([
            self._w_title, self._w_system, w.HBox([self._w_temperature, self._w_max]),
            self._w_history, self._w_live_box,
            w.HBox([self._w_message, self._w_send, self._w_clear], layout=w.Layout(width="100%")),
            self._w_status,
        ], layout=w.Layout(width="100%", border="1px solid #ddd", padding="6px"))
        panel.add_class("tm-chat")
        return panel

    def _settings(self) -> tuple[str, object, object]:
        """(system prompt, temperature, max tokens) as the controls hold them now."""
        if self.widget is None:
            return self.system_prompt, self.temperature, self.max_new_tokens
        return self._w_system.value, self._w_temperature.value, self._w_max.value

    # -- what the user sees --------------------------------------------------------------------
    def _turn_html(self, k: int) -> str:
        cells = []
        for side in self._sides:
            reply = side.replies[k] if k < len(side.replies) else None
            if reply is None:
                continue
            cells.append(f'<div style="flex:1 1 0;min-width:0">{_block(reply, side.label, self._label(side))}</div>')
        return (_block(self._users[k], "user", "you") +
                f'<div style="display:flex;gap:6px">{"".join(cells)}</div>')

    def _label(self, side: _Side) -> str:
        return f"{side.label}: {_name_of(side.model)}" if len(self._sides) > 1 else _name_of(side.model)

    def _render_history(self) -> None:
        if self.widget is not None:
            self._w_history.value = "".join(self._turn_html(k) for k in range(len(self._users)))

    def _render_live(self, side: _Side) -> None:
        side.updates += 1
        if self.widget is None:
            return
        k = self._sides.index(side)
        if side.error is not None:
            self._w_live[k].value = _block(side.error, "error", self._label(side))
        elif side.note is not None:
            self._w_live[k].value = ""
        else:
            self._w_live[k].value = _block(side.live or "…", side.label, self._label(side))

    def _set_status(self, text: str) -> None:
        self._status = text
        if self.widget is not None:
            self._w_status.value = _block(text, "error") if text else ""

    @property
    def status(self) -> str:
        """The panel's one-line message: the last error or note ("" when all went well)."""
        return self._status

    # -- asking ----------------------------------------------------------------------------------
    def _submit(self) -> None:
        """The Send button and Enter: ask without waiting for the reply."""
        text = self._w_message.value
        if self._start(text) is not None:
            self._w_message.value = ""

    def _messages(self, side: _Side, system: str, text: str) -> list[dict]:
        messages = [{"role": "system", "content": system}] if system.strip() else []
        for user, reply in zip(self._users, side.replies):
            if reply is not None:  # a turn this side did not answer is left out of its conversation
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return messages + [{"role": "user", "content": text}]

    def _start(self, text: str):
        """Check the request and start streaming each side's reply in a thread; the threads, or None on a mistake."""
        if not isinstance(text, str) or not text.strip():
            self._set_status("type a message first")
            return None
        if not self._busy.acquire(blocking=False):
            self._set_status("a reply is still streaming; wait for it to finish")
            return None
        try:
            system, temperature, max_new = self._settings()
            gen = {"temperature": temperature, "max_new_tokens": max_new}
            sides = [s for s in self._sides if s.note is None]
            asks = [self._messages(s, system, text) for s in sides]
            chat_request(asks[0], stream=True, **gen)  # the one set of rules: a mistake is one line, nothing is sent
        except UserError as exc:
            self._busy.release()
            self._set_status(_one_line(exc))
            return None
        except BaseException:
            self._busy.release()
            raise
        try:
            self._set_status("")
            for side in self._sides:
                side.live, side.error, side.updates = "", None, 0
            if self.widget is not None:
                self._w_live_user.value = _block(text, "user", "you")
                for k, side in enumerate(self._sides):
                    self._w_live[k].value = "" if side.note else _block("…", side.label, self._label(side))
                self._w_live_box.layout.display = "flex"
                self._w_send.disabled = self._w_clear.disabled = True
            parent = self._parent if self._parent.header else CellParent()
            threads = [threading.Thread(target=self._stream, args=(s, m, gen, parent), daemon=True,
                                        name=f"tuning-magics-chat-{s.label}") for s, m in zip(sides, asks)]
            done = threading.Thread(target=self._finish, args=(threads, parent), daemon=True,
                                    name="tuning-magics-chat")
            self._users.append(text)
            for t in threads:
                t.start()
        except BaseException:
            self._busy.release()  # nothing is streaming: the panel stays usable
            raise
        self._threads = [*threads, done]
        done.start()
        return self._threads

    def _stream(self, side: _Side, messages: list[dict], gen: dict, parent) -> None:
        """A background thread: read one side's reply piece by piece into its view."""
        parent.apply()
        shown = 0.0
        try:
            reply = side.model.chat(messages, stream=True, **gen)
            for piece in [reply] if isinstance(reply, str) else reply:
                side.live += piece
                now = time.monotonic()
                if now - shown >= self.refresh_seconds:
                    shown = now
                    self._render_live(side)
        except Exception as exc:  # the reader is a person: one line in the panel, never a traceback
            side.error = _one_line(exc)
        self._render_live(side)

    def _finish(self, threads: list[threading.Thread], parent) -> None:
        """A background thread: once every side has answered, move the turn into the history."""
        parent.apply()
        try:
            for t in threads:
                t.join()
            tuned, *others = self._sides
            for side in self._sides:
                if side.note is not None:
                    side.replies.append(None)
                elif side.error is not None:
                    side.replies.append(None)
                    if side is not tuned and not side.live and not any(side.replies):
                        # Refused before its first word on its first turn: it cannot answer here.
                        side.note = f"{side.label} model not compared: {side.error}"
                else:
                    side.replies.append(side.live)
            if tuned.error is not None:  # no reply: the turn is forgotten, the message can be sent again
                for side in self._sides:
                    side.replies.pop()
                self._users.pop()
            errors = [f"{s.label}: {s.error}" if len(self._sides) > 1 else s.error
                      for s in self._sides if s.error is not None and s.note is None]
            notes = [s.note for s in self._sides if s.note is not None]
            self._set_status("; ".join(errors + notes))
            self._render_history()
            if self.widget is not None:
                self._w_live_box.layout.display = "none"
                self._w_send.disabled = self._w_clear.disabled = False
        finally:
            self._busy.release()

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the reply streaming now (if any) has finished."""
        for t in list(self._threads):
            t.join(timeout)

    def send(self, text: str):
        """Ask ``text``, wait for the answer and return it: the reply, or ``(tuned, base)`` with a base model.

        A side that failed gives None, and its one-line error is in the panel
        (and in ``status``); so does a mistake in the request.
        """
        started = self._start(text)
        if started is not None:
            for t in started:
                t.join()
        replies = []
        for side in self._sides:
            ok = started is not None and side.error is None and side.note is None
            replies.append(side.live if ok else None)
        return replies[0] if len(replies) == 1 else tuple(replies)

    def clear(self) -> None:
        """Start the conversation over (the system prompt and settings stay)."""
        if not self._busy.acquire(blocking=False):
            self._set_status("a reply is still streaming; clear once it has finished")
            return
        try:
            self._users.clear()
            for side in self._sides:
                side.replies.clear()
                side.live, side.error = "", None
            self._set_status("; ".join(s.note for s in self._sides if s.note))
            self._render_history()
        finally:
            self._busy.release()

    @property
    def history(self) -> list[dict]:
        """The conversation with the (tuned) model: ``{"role", "content"}`` messages, oldest first."""
        return self._messages(self._sides[0], "", "")[:-1]

    @property
    def base_history(self) -> list[dict] | None:
        """The same conversation with the base model (None without one)."""
        return self._messages(self._sides[1], "", "")[:-1] if len(self._sides) > 1 else None

    # -- display -----------------------------------------------------------------------------------
    def text(self) -> str:
        """The conversation as plain text."""
        lines = [self.title]
        for k, user in enumerate(self._users):
            lines.append(f"you: {user}")
            for side in self._sides:
                reply = side.replies[k] if k < len(side.replies) else None
                if reply is not None:
                    lines.append(f"{self._label(side)}: {reply}")
        if self._status:
            lines.append(self._status)
        if len(lines) == 1:
            lines.append("(no messages yet: panel.send('...') asks)")
        return "\n".join(lines)

    def html(self) -> str:
        """The conversation as HTML, every model text escaped."""
        turns = "".join(self._turn_html(k) for k in range(len(self._users)))
        status = _block(self._status, "error") if self._status else ""
        return f"<div><b>{escaped(self.title)}</b>{turns}{status}</div>"

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": self.text(), "text/html": self.html()}
        if self.widget is not None:
            view = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
            if "application/vnd.jupyter.widget-view+json" in view:
                bundle["application/vnd.jupyter.widget-view+json"] = view["application/vnd.jupyter.widget-view+json"]
        return bundle

    def __repr__(self) -> str:
        return f"<ChatPanel {self.title!r}, {len(self._users)} turns>"
