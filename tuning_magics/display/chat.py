"""The chat panel: a conversation with a tuned model, streamed, with the base model side by side.

``ChatPanel(target)`` talks to anything with ``chat(messages, stream=True, **gen)``
(a Job, ``job.deploy()``'s endpoint, a Vertex AI endpoint); ``base=`` adds a
second model that answers the same messages in a column of its own, so what
tuning changed is there to see. ``job.chat_panel()`` opens one for a job.

- A system prompt (for a job, the one its training data had, and it says so),
  temperature, max tokens and whether earlier turns are sent; a job's panel has a
  checkpoint picker. The request is checked once by :mod:`tuning_magics.chat_request`,
  and a mistake is one line in the panel.
- Replies stream: each side is read in a background thread that sets the cell's
  parent header (ipykernel 7 routes a thread's messages by it), so the kernel
  stays free and no update goes astray. The widget tree is built once; a
  reply only changes the values of its widgets.
- The conversation scrolls in a box of bounded height that keeps the newest
  text in view, the message box always visible below it. A reply cut at max
  tokens, or of white space only, says so; so does a conversation longer than
  any the model trained on.
- The message sent is what the box holds when Enter (or Send) is pressed; see
  :meth:`ChatPanel._on_submit` for how the frontend's messages are ordered.
- Model text is always shown as text: escaped into ``<pre>``-like blocks, never
  read as HTML, Markdown or math. Every colour is a JupyterLab theme variable with
  a fallback, in inline styles, so dark themes and other frontends stay readable.
- Without widgets (nbval, a terminal) the panel shows the conversation as text;
  ``panel.send(text)`` works anywhere and returns the reply (or both replies).

Stable class names, for page styles and browser tests: ``tm-chat`` (the panel),
``tm-title``, ``tm-system`` (its textarea), ``tm-system-source``, ``tm-checkpoint``
(its select), ``tm-temperature``, ``tm-max-tokens``, ``tm-keep-history`` (its checkbox),
``tm-scroll`` (the bounded conversation), ``tm-history`` (finished turns), ``tm-live``
and ``tm-reply`` (the replies streaming now), ``tm-note``, ``tm-input`` (its text input),
``tm-send``, ``tm-clear`` and ``tm-status``. In the HTML, each message is a ``tm-msg``
block (``tm-msg-user``, ``tm-msg-tuned``, ``tm-msg-base``, ``tm-msg-reply``) and what
the panel adds to a reply is a ``tm-finish`` span.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass

from ..chat_request import DEFAULT_MAX_TOKENS, chat_request
from ..errors import UserError
from .monitor import _Parent as CellParent  # the one way a display thread re-sets its cell's parent header

# Colours are JupyterLab's theme variables, each with a light fallback for frontends without them (VS Code,
# Colab): a theme sets background and text together, so text stays readable on every background.
_TEXT = "color:var(--jp-ui-font-color1, #212121);"
_BLOCK = ("margin:2px 0;padding:6px 8px;border-radius:4px;white-space:pre-wrap;overflow-wrap:anywhere;"
          "line-height:1.4;font-family:var(--jp-code-font-family, monospace);"
          "font-size:var(--jp-code-font-size, 12px);" + _TEXT)
_ANSWER = "background:var(--jp-layout-color1, #ffffff);border-left:3px solid "
_STYLE = {
    "user": "background:var(--jp-layout-color2, #eeeeee);",
    "tuned": _ANSWER + "var(--jp-brand-color1, #1976d2);",
    "reply": _ANSWER + "var(--jp-brand-color1, #1976d2);",
    "base": _ANSWER + "var(--jp-border-color1, #bdbdbd);",
    "error": _ANSWER + "var(--jp-error-color1, #d32f2f);",
}
_QUIET = "color:var(--jp-ui-font-color2, #616161);font-size:var(--jp-ui-font-size1, 13px);line-height:1.4;"
# A warning is marked by a bar of the theme's warning colour beside text of its text colour: orange text
# on the light theme's white reads at 2.7:1, under the 4.5:1 text needs.
_WARN = ("color:var(--jp-ui-font-color1, #212121);border-left:3px solid var(--jp-warn-color1, #e65100);"
         "padding-left:6px;font-size:var(--jp-ui-font-size1, 13px);line-height:1.4;")
_BORDER = "1px solid var(--jp-border-color1, #bdbdbd)"
#: The most height the conversation takes before it scrolls.
HISTORY_MAX_HEIGHT = "420px"


def escaped(text: str) -> str:
    """``text`` as HTML that shows exactly these characters (``<script>``, ``**``, ``$`` and all)."""
    return html.escape(text, quote=False)  # only ever element text, never an attribute


def _block(text: str, kind: str, label: str | None = None, note: str = "") -> str:
    # tex2jax_ignore keeps MathJax from typesetting "$...$" in a model's reply.
    head = f"<b>{escaped(label)}</b>\n" if label else ""
    tail = f'<span class="tm-finish" style="{_QUIET}font-style:italic">{escaped(note)}</span>' if note else ""
    if note and text:
        tail = "\n" + tail
    return (f'<div class="tex2jax_ignore tm-msg tm-msg-{kind}" style="{_BLOCK}{_STYLE[kind]}">'
            f"{head}{escaped(text)}{tail}</div>")


def _line(text: str, style: str = _QUIET) -> str:
    return f'<div style="{style}">{escaped(text)}</div>' if text else ""


def _one_line(exc: BaseException) -> str:
    """An error as one line: a UserError's sentence, else the exception's type and first line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, UserError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _name_of(target, checkpoint=None) -> str:
    name = (getattr(target, "model_name", None) or getattr(target, "display_name", None)
            or getattr(target, "id", None) or getattr(target, "name", None) or type(target).__name__)
    return f"{name} ({checkpoint})" if checkpoint is not None else str(name)


def finish_note(text: str, finish_reason: str | None, tokens: int | None) -> str:
    """What the panel says under a reply: that it was white space only, or cut at max tokens ("" otherwise)."""
    notes = []
    if not text.strip():
        notes.append("(empty reply)" if not text and not tokens else
                     f"(empty reply: {tokens} tokens of white space)" if tokens else "(empty reply: white space only)")
    if finish_reason == "length":
        notes.append("(stopped at max tokens)")
    return " ".join(notes)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# -- a model at a checkpoint ---------------------------------------------------------------------


class AtCheckpoint:
    """``target`` answering from ``checkpoint`` (``"base"``: the model before tuning): a side of the panel."""

    def __init__(self, target, checkpoint, *, name: str | None = None):
        self.target, self.checkpoint = target, checkpoint
        self.name = name or _name_of(target, checkpoint)

    def chat(self, messages_or_text, **options):
        return self.target.chat(messages_or_text, checkpoint=self.checkpoint, **options)


@dataclass
class _Answer:
    text: str
    label: str  # who answered, as the panel named them then
    note: str = ""  # what the panel adds: cut at max tokens, white space only


class _Side:
    """One column of the conversation: who answers, their answers so far, and the reply streaming now."""

    def __init__(self, model, label: str):
        self.model, self.label = model, label
        self.replies: list[_Answer | None] = []  # one per turn; None where this side did not answer
        self.live = ""  # the reply streaming now
        self.asked = ""  # the label of who answers it
        self.finish: tuple[str | None, int | None] = (None, None)  # its finish_reason and tokens, where told
        self.error: str | None = None  # this turn's one-line error
        self.note: str | None = None  # why this side no longer answers
        self.updates = 0  # how many times the live view changed (streaming shows piece by piece)


class ChatPanel:
    """A chat with ``target`` (anything with ``chat(messages, stream=True, ...)``), streamed, with history.

    ``base``: a second model that answers the same messages side by side (for a
    job, ``AtCheckpoint(job, "base")``). ``checkpoint`` is passed to
    ``target.chat`` (a job's ``checkpoint-N``); ``checkpoints`` (names, or a function
    that lists them) adds a picker to switch it. ``title`` heads the panel.
    ``trained`` (a :class:`~tuning_magics.jobs.TrainingChats`) gives the system prompt
    the model trained with, and the longest conversation it saw; ``trained_note``
    says why there is none.

    ``send(text)`` asks and waits (the Send button and Enter ask without
    waiting); ``history`` is the conversation as ``{"role", "content"}``
    messages; ``clear()`` starts over.
    """

    #: Least seconds between two updates of a streaming reply's view (pieces in between are shown together).
    refresh_seconds = 0.05
    #: Seconds Enter or Send waits for the box's value when the frontend has not sent it yet (see _on_submit).
    settle_seconds = 0.3

    def __init__(self, target, *, base=None, checkpoint=None, title=None, checkpoints=None, trained=None,
                 trained_note: str | None = None):
        if not callable(getattr(target, "chat", None)):
            raise UserError(f"the chat panel needs something with a chat() method, not {type(target).__name__}",
                            field="target")
        if base is not None and not callable(getattr(base, "chat", None)):
            raise UserError(f"base must have a chat() method (a job or an endpoint), not {type(base).__name__}",
                            field="base")
        self._target, self._checkpoints = target, checkpoints
        self.title = title or f"Chat with {_name_of(target, checkpoint)}"
        self._sides = [_Side(None, "tuned" if base is not None else "reply")]
        self._checkpoint = None
        self.checkpoint = checkpoint
        if base is not None:
            self._sides.append(_Side(base, "base"))
        self._users: list[str] = []
        self._status = ""
        self._length_note = ""
        self._trained, self._trained_note = trained, trained_note
        self._busy = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._asking = threading.Lock()  # guards _armed: Enter or Send waiting for the box's value
        self._armed = 0
        self._asks = 0
        self._settle: threading.Timer | None = None
        self._parent = CellParent()  # the cell that opened the panel: its replies are reported there
        self.system_prompt = (trained.system_prompt if trained is not None else None) or ""
        self.temperature = 0.0
        self.max_new_tokens = DEFAULT_MAX_TOKENS
        self.keep_history = True
        self._frozen = ""  # why no live panel is shown, where none can work
        self.widget = self._build()

    # -- the checkpoint answering ----------------------------------------------------------------
    @property
    def checkpoint(self) -> str | None:
        """The checkpoint the (tuned) model answers from (None: the target's default, a job's final model)."""
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, name: str | None) -> None:
        name = None if name == "final" and self._checkpoints is not None else name
        self._checkpoint = name
        if name is None and self._checkpoints is None:
            self._sides[0].model = self._target
        else:
            self._sides[0].model = AtCheckpoint(self._target, name, name=_name_of(self._target, name or "final"))
        picker = getattr(self, "_w_checkpoint", None)
        if picker is not None and picker.value != (name or "final"):
            self._show_checkpoints()

    def _checkpoint_names(self) -> list[str]:
        names = list(self._w_checkpoint.options) if getattr(self, "_w_checkpoint", None) is not None else []
        try:
            names = list(self._checkpoints() if callable(self._checkpoints) else self._checkpoints or [])
        except Exception:  # noqa: BLE001 - a job that cannot list them now keeps the names it had
            pass
        current = self._checkpoint or "final"
        if current not in names:  # e.g. final, while the job still trains
            names.insert(len([n for n in names if n != "base"]), current)
        return names

    def _show_checkpoints(self) -> None:
        names = self._checkpoint_names()
        self._showing = True  # what the panel sets in the picker is not a pick
        try:
            if list(self._w_checkpoint.options) != names:
                self._w_checkpoint.options = names
            self._w_checkpoint.value = self._checkpoint or "final"
        finally:
            self._showing = False

    # -- the widget tree, built once ---------------------------------------------------------
    def _build(self):
        from .monitor import live_unavailable

        why = live_unavailable()
        if why is not None:  # a panel would stand still: the text view, and the one line that says how to chat
            self._frozen = f"{why}: panel.send('...') asks the model and shows the reply"
            return None
        try:
            import ipywidgets as w
        except ImportError:
            return None
        # description_width "initial": labels are as wide as their words, never cut to "Temperat..."; widths
        # are flex and "auto", never px or 100% (which, with the widgets' margins, overflows and scrolls).
        initial = {"description_width": "initial"}
        self._w_title = w.HTML(f"<b>{escaped(self.title)}</b>")
        self._w_system = w.Textarea(value=self.system_prompt, placeholder="System prompt (optional)",
                                    description="System prompt", style=initial, continuous_update=False,
                                    layout=w.Layout(width="auto", height="52px"))
        self._w_system_source = w.HTML("")
        self._w_system.observe(lambda _c: self._show_system_source(), "value")
        self._show_system_source()
        settings = []
        self._w_checkpoint, self._showing = None, False
        if self._checkpoints is not None:
            self._w_checkpoint = w.Dropdown(description="Checkpoint", style=initial,
                                            layout=w.Layout(width="auto", flex="2 1 220px"))
            self._show_checkpoints()
            self._w_checkpoint.observe(self._on_pick, "value")
            settings.append(self._w_checkpoint)
        self._w_temperature = w.FloatText(value=self.temperature, step=0.1, description="Temperature", style=initial,
                                          layout=w.Layout(width="auto", flex="1 1 150px"))
        self._w_max = w.IntText(value=self.max_new_tokens, description="Max tokens", style=initial,
                                layout=w.Layout(width="auto", flex="1 1 150px"))
        self._w_keep = w.Checkbox(value=self.keep_history, description="Send earlier turns", indent=False,
                                  style=initial, layout=w.Layout(width="auto", flex="0 0 auto"))
        settings += [self._w_temperature, self._w_max, self._w_keep]
        self._w_history = w.HTML("", layout=w.Layout(flex="0 0 auto"))
        self._w_live = [w.HTML("", layout=w.Layout(flex="1 1 0", min_width="0")) for _ in self._sides]
        self._w_live_user = w.HTML("")
        self._w_live_box = w.VBox([self._w_live_user, w.HBox(self._w_live, layout=w.Layout(overflow="visible"))],
                                  layout=w.Layout(display="none", overflow="visible", flex="0 0 auto"))
        # column-reverse: the box scrolls from its end, so the newest text stays in view as replies grow and
        # turns are added (no script needed), while the reader can still scroll back.
        self._w_scroll = w.Box([self._w_live_box, self._w_history],
                               layout=w.Layout(flex_flow="column-reverse", max_height=HISTORY_MAX_HEIGHT,
                                               overflow="auto"))
        self._w_note = w.HTML("")
        self._w_message = w.Text(value="", placeholder="Message (Enter sends)", continuous_update=False,
                                 layout=w.Layout(width="auto", flex="1 1 auto"))
        self._w_send = w.Button(description="Send", button_style="primary", layout=w.Layout(width="auto"))
        self._w_clear = w.Button(description="Clear", layout=w.Layout(width="auto"))
        self._w_status = w.HTML("")
        self._w_send.on_click(lambda _b: self._on_submit())
        self._w_clear.on_click(lambda _b: self.clear())
        # Enter in a Text sends {"event": "submit"}; listening for it directly avoids the deprecated on_submit.
        self._w_message.on_msg(lambda _w, content, _buffers: content.get("event") == "submit" and self._on_submit())
        self._w_message.observe(self._on_value, "value")
        for widget, name in [(self._w_title, "tm-title"), (self._w_system, "tm-system"),
                             (self._w_system_source, "tm-system-source"), (self._w_temperature, "tm-temperature"),
                             (self._w_max, "tm-max-tokens"), (self._w_keep, "tm-keep-history"),
                             (self._w_scroll, "tm-scroll"), (self._w_history, "tm-history"),
                             (self._w_live_box, "tm-live"), (self._w_note, "tm-note"), (self._w_message, "tm-input"),
                             (self._w_send, "tm-send"), (self._w_clear, "tm-clear"), (self._w_status, "tm-status"),
                             *[(live, "tm-reply") for live in self._w_live]]:
            widget.add_class(name)
        if self._w_checkpoint is not None:
            self._w_checkpoint.add_class("tm-checkpoint")
        panel = w.VBox([
            self._w_title, self._w_system, self._w_system_source,
            w.HBox(settings, layout=w.Layout(flex_flow="row wrap", align_items="center", overflow="visible")),
            self._w_scroll, self._w_note,
            w.HBox([self._w_message, self._w_send, self._w_clear], layout=w.Layout(overflow="visible")),
            self._w_status,
        ], layout=w.Layout(border=_BORDER, padding="6px"))
        panel.add_class("tm-chat")
        return panel

    def _settings(self) -> tuple[str, object, object, bool]:
        """(system prompt, temperature, max tokens, keep history) as the controls hold them now."""
        if self.widget is None:
            return self.system_prompt, self.temperature, self.max_new_tokens, self.keep_history
        return self._w_system.value, self._w_temperature.value, self._w_max.value, self._w_keep.value

    def _on_pick(self, change) -> None:
        if not self._showing and change["new"] is not None:
            self.checkpoint = change["new"]

    def _show_system_source(self) -> None:
        """Where the system prompt comes from: the training data, when it is the one the model trained with."""
        trained, now = self._trained, self._w_system.value
        if trained is None:
            text = self._trained_note or ""
        elif trained.system_prompt is None:
            text = "the training data had no system prompt"
        elif now == trained.system_prompt:
            some = trained.with_system_prompt < trained.examples
            text = "from the training data" + (f" ({trained.with_system_prompt} of "
                                               f"{_plural(trained.examples, 'example')} had it)" if some else "")
        else:
            text = f"the training data had another system prompt: {trained.system_prompt!r}"
        self._w_system_source.value = _line(text)

    # -- what the user sees --------------------------------------------------------------------
    def _turn_html(self, k: int) -> str:
        cells = []
        for side in self._sides:
            answer = side.replies[k] if k < len(side.replies) else None
            if answer is None:
                continue
            shown = answer.text if answer.text.strip() else ""  # a reply of white space: its note says so
            cells.append(f'<div style="flex:1 1 0;min-width:0">'
                         f'{_block(shown, side.label, answer.label, answer.note)}</div>')
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
            self._w_live[k].value = _block(side.error, "error", side.asked)
        elif side.note is not None:
            self._w_live[k].value = ""
        else:
            self._w_live[k].value = _block(side.live or "…", side.label, side.asked)

    def _set_status(self, text: str) -> None:
        self._status = text
        if self.widget is not None:
            self._w_status.value = _block(text, "error") if text else ""

    def _set_length_note(self, text: str) -> None:
        self._length_note = text
        if self.widget is not None:
            self._w_note.value = _line(text, _WARN)

    @property
    def status(self) -> str:
        """The panel's one-line message: the last error or note ("" when all went well)."""
        return self._status

    @property
    def length_note(self) -> str:
        """Said when the conversation is longer than any the model trained on ("" otherwise)."""
        return self._length_note

    # -- asking ----------------------------------------------------------------------------------
    def _on_submit(self) -> None:
        """Enter or the Send button: send what the box holds, once the frontend has said what that is.

        The frontend sends the box's value only when it commits it (``continuous_update=False``:
        on Enter or when the box loses focus), and ipywidgets 8 sends Enter's ``submit`` event
        *before* that value (TextView.handleKeypress, ipywidgets PR #4034), so the value the
        kernel holds at ``submit`` may lack the last keys typed. So Enter arms the panel and the
        value that arrives next is sent; when none comes within ``settle_seconds`` (the value was
        committed before: a click on Send blurs the box first, or nothing changed), the value
        held is sent. Keystrokes are never synced, so the box's clear cannot fight the next
        message being typed, and nothing arriving unarmed (a blur) sends anything.
        """
        with self._asking:
            self._asks += 1
            self._armed = ask = self._asks
        self._settle = threading.Timer(self.settle_seconds, self._settled, args=(ask,))
        self._settle.daemon = True
        self._settle.start()

    def _on_value(self, change) -> None:
        with self._asking:
            if not self._armed:
                return
            self._armed = 0
        if self._settle is not None:
            self._settle.cancel()  # the value came: no wait
        self._submit(change["new"])

    def _settled(self, ask: int) -> None:
        self._parent.apply()  # a timer thread: its widget updates go to the panel's cell
        with self._asking:
            if self._armed != ask:
                return
            self._armed = 0
        self._submit()

    def _submit(self, text: str | None = None) -> None:
        """Ask ``text`` (the box's value) without waiting for the reply; the box is cleared once it is asked."""
        text = self._w_message.value if text is None else text
        if self._start(text) is not None:
            self._w_message.value = ""

    def _turns(self, side: _Side) -> list[dict]:
        messages = []
        for user, answer in zip(self._users, side.replies):
            if answer is not None:  # a turn this side did not answer is left out of its conversation
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer.text}]
        return messages

    def _messages(self, side: _Side, system: str, text: str, keep: bool) -> list[dict]:
        messages = [{"role": "system", "content": system}] if system.strip() else []
        return messages + (self._turns(side) if keep else []) + [{"role": "user", "content": text}]

    def _start(self, text: str):
        """Check the request and start streaming each side's reply in a thread; the threads, or None on a mistake."""
        if not isinstance(text, str) or not text.strip():
            self._set_status("type a message first")
            return None
        if not self._busy.acquire(blocking=False):
            self._set_status("a reply is still streaming; wait for it to finish")
            return None
        try:
            system, temperature, max_new, keep = self._settings()
            gen = {"temperature": temperature, "max_new_tokens": max_new}
            sides = [s for s in self._sides if s.note is None]
            asks = [self._messages(s, system, text, keep) for s in sides]
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
                side.live, side.error, side.updates, side.finish = "", None, 0, (None, None)
                side.asked = self._label(side)
            if self.widget is not None:
                self._w_live_user.value = _block(text, "user", "you")
                for k, side in enumerate(self._sides):
                    self._w_live[k].value = "" if side.note else _block("…", side.label, side.asked)
                self._w_live_box.layout.display = "flex"
                self._w_send.disabled = self._w_clear.disabled = True
            parent = self._parent if self._parent.header else CellParent()
            threads = [threading.Thread(target=self._stream, args=(s, m, gen, parent), daemon=True,
                                        name=f"tuning-magics-chat-{s.label}") for s, m in zip(sides, asks)]
            done = threading.Thread(target=self._finish, args=(threads, parent, asks[0]), daemon=True,
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
            # A Job's streamed Reply says why it ended once read to the end; other streams do not.
            side.finish = (getattr(reply, "finish_reason", None), getattr(reply, "tokens", None))
        except Exception as exc:  # the reader is a person: one line in the panel, never a traceback
            side.error = _one_line(exc)
        self._render_live(side)

    def _finish(self, threads: list[threading.Thread], parent, asked: list[dict]) -> None:
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
                    side.replies.append(_Answer(side.live, side.asked, finish_note(side.live, *side.finish)))
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
                if self._w_checkpoint is not None and callable(self._checkpoints):
                    self._show_checkpoints()  # a job still training has made new ones
            if tuned.error is None:
                self._check_length(asked + [{"role": "assistant", "content": tuned.live}])
        finally:
            self._busy.release()

    def _check_length(self, conversation: list[dict]) -> None:
        """Say so when ``conversation`` is longer, in turns or tokens, than every example the model trained on."""
        trained = self._trained
        if trained is None or not trained.examples:
            return
        turns = sum(m["role"] == "user" for m in conversation)
        tokens = trained.tokens(conversation)
        if turns <= trained.longest_turns and tokens <= trained.longest_tokens:
            self._set_length_note("")
            return
        about = "about " if trained.tokens_estimated else ""
        self._set_length_note(
            f"This conversation ({_plural(turns, 'turn')}, {about}{_plural(tokens, 'token')}) is longer than any "
            f"the model trained on (at most {_plural(trained.longest_turns, 'turn')}, {about}"
            f"{_plural(trained.longest_tokens, 'token')}): replies may drift. Clear starts over; unticking "
            "'Send earlier turns' sends each message alone.")

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the message being sent (Enter, Send) and the reply streaming now (if any) have finished."""
        settle = self._settle
        if settle is not None:
            settle.join(timeout)
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
            self._set_length_note("")
            self._render_history()
        finally:
            self._busy.release()

    @property
    def history(self) -> list[dict]:
        """The conversation with the (tuned) model: ``{"role", "content"}`` messages, oldest first."""
        return self._turns(self._sides[0])

    @property
    def base_history(self) -> list[dict] | None:
        """The same conversation with the base model (None without one)."""
        return self._turns(self._sides[1]) if len(self._sides) > 1 else None

    # -- display -----------------------------------------------------------------------------------
    def text(self) -> str:
        """The conversation as plain text."""
        lines = [self.title]
        for k, user in enumerate(self._users):
            lines.append(f"you: {user}")
            for side in self._sides:
                answer = side.replies[k] if k < len(side.replies) else None
                if answer is not None:
                    lines.append(f"{answer.label}: {answer.text}" + (f" {answer.note}" if answer.note else ""))
        lines += [text for text in (self._length_note, self._status) if text]
        if len(lines) == 1:
            lines.append("(no messages yet: panel.send('...') asks)")
        return "\n".join(lines + ([self._frozen] if self._frozen else []))

    def html(self) -> str:
        """The conversation as HTML, every model text escaped."""
        turns = "".join(self._turn_html(k) for k in range(len(self._users)))
        status = _block(self._status, "error") if self._status else ""
        frozen = _line(self._frozen) if self._frozen else ""
        return f"<div><b>{escaped(self.title)}</b>{turns}{_line(self._length_note, _WARN)}{status}{frozen}</div>"

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": self.text(), "text/html": self.html()}
        if self.widget is not None:
            view = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
            if "application/vnd.jupyter.widget-view+json" in view:
                bundle["application/vnd.jupyter.widget-view+json"] = view["application/vnd.jupyter.widget-view+json"]
        return bundle

    def __repr__(self) -> str:
        return f"<ChatPanel {self.title!r}, {len(self._users)} turns>"
