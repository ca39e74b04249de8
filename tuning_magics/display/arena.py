"""The arena in the notebook: a round's prompt, answers A and B side by side, and a button per vote.

A vote is cast (and on disk) when its button is pressed, or its key typed into the vote box
(``a``, ``b``, ``t`` for a tie, ``x`` for both bad, then Enter), and the next round shows; once
every round has a vote, the ranking shows instead. Colours are the theme's; every model
text is escaped. Where widgets cannot render (a plain terminal, nbconvert), the arena
is its text and its HTML: the round and the ``arena.vote(...)`` line that casts a vote.
The buttons answer in the kernel's own thread, so they work in Colab as well.
"""

from __future__ import annotations

import html

from .monitor import INK, SOFT_INK

#: Buttons: what each says, and the vote it casts.
BUTTONS = (("A is better", "A"), ("B is better", "B"), ("Tie", "tie"), ("Both bad", "both bad"))
#: Keys typed into the vote box (then Enter): quicker than the mouse for many rounds.
KEYS = {"a": "A", "b": "B", "t": "tie", "x": "both bad"}


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _answer_html(letter: str, text: str) -> str:
    from ..datasets.validate import is_blank

    shown = "<i>(an empty answer: nothing but white space)</i>" if is_blank(text) else _e(text)
    return (f"<div class='tm-arena-answer' style='border:1px solid {SOFT_INK};border-radius:4px;padding:6px;"
            f"color:{INK};min-height:3em'><b>{letter}</b><div style='white-space:pre-wrap;overflow-wrap:anywhere'>"
            f"{shown}</div></div>")


def round_html(arena, shown: dict | None) -> str:
    """The round as HTML (the prompt, A and B), or the ranking once every round has a vote."""
    n, done = len(arena.prompts), len(arena.voted)
    head = f"<div style='color:{SOFT_INK}'>arena {_e(arena.name)} · {done} of {n} rounds voted</div>"
    if shown is None:
        return head + arena.ranking().to_html(float_format="{:.2f}".format)
    prompt = "".join(f"<div><b>{_e(m['role'])}:</b> <span style='white-space:pre-wrap'>{_e(m['content'])}</span></div>"
                     for m in shown["prompt"])
    same = shown["A"].strip() == shown["B"].strip()
    note = (f"<div style='color:{SOFT_INK}'>the two answers are the same: a vote here makes no preference "
            "pair</div>") if same else ""
    return (f"{head}<div style='color:{INK};margin:4px 0'>round {shown['round'] + 1}{prompt}</div>"
            f"<div style='display:grid;grid-template-columns:1fr 1fr;gap:8px'>"
            f"{_answer_html('A', shown['A'])}{_answer_html('B', shown['B'])}</div>{note}")


class ArenaView:
    """The widget: :func:`round_html` and the vote buttons; ``widget`` is its ipywidgets root."""

    def __init__(self, arena):
        import ipywidgets as w

        self.arena = arena
        self.body = w.HTML()
        self.buttons = []
        for text, choice in BUTTONS:
            button = w.Button(description=text, tooltip=f"arena.vote({choice!r})")
            button.on_click(lambda _b, c=choice: self.cast(c))
            button.add_class("tm-arena-vote")
            self.buttons.append(button)
        self.keys = w.Text(placeholder="or type a, b, t (tie), x (both bad), Enter", continuous_update=False,
                           layout=w.Layout(width="260px"))
        self.keys.add_class("tm-arena-keys")
        self.keys.observe(self._typed, names="value")
        self.message = w.Label()
        self.row = w.HBox(self.buttons + [self.keys, self.message], layout=w.Layout(flex_flow="row wrap"))
        self.widget = w.VBox([self.body, self.row])
        self.widget.add_class("tm-arena")
        self.show()

    def show(self) -> None:
        shown = self.arena.next()
        self.body.value = round_html(self.arena, shown)
        self.row.layout.display = "none" if shown is None else ""

    def _typed(self, change) -> None:
        key = str(change["new"]).strip().lower()
        if not key:
            return
        self.keys.value = ""
        if key not in KEYS:
            self.message.value = f"type a, b, t or x, not {key!r}"
            return
        self.cast(KEYS[key])

    def cast(self, choice: str) -> None:
        from ..errors import UserError

        try:
            self.arena.vote(choice)
        except UserError as exc:
            self.message.value = str(exc)
            return
        self.message.value = ""
        self.show()


def arena_bundle(arena) -> dict:
    """The arena's display: its widget where one can render and update, with its text and HTML beside."""
    shown = arena.next()
    bundle = {"text/plain": arena.text(), "text/html": round_html(arena, shown)}
    # The buttons answer in the kernel's own thread (no background updates): they work in Colab too.
    try:
        view = ArenaView(arena)
    except ImportError:
        return bundle
    arena.view = view
    bundle.update(view.widget._repr_mimebundle_() or {})
    return bundle
