"""The chat panel (tuning_magics.display.chat): a real tuned tiny model on the local engine, streamed into real
ipywidgets from background threads; a tuned Gemini job through google-genai against the fake Vertex AI API.

Model text is always shown as text; mistakes are one line in the panel; the base model answers side by side.
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import invented_facts

from tuning_magics.display import chat
from tuning_magics.display.chat import ChatPanel

QA = invented_facts()[:6]  # facts the session's tuned model knows


# -- a local job whose models are gone or were never made: refused before any model loads --------


def local_job(tmp_path, state, checkpoints=(), *, folder=True, config=None, display_name=None):
    """A local job in ``state`` whose folder holds only ``checkpoint-N`` folders (no final model)."""
    import os

    import psutil

    from tuning_magics.backends.local import registry
    from tuning_magics.backends.local.checkpoints import checkpoints_dir
    from tuning_magics.backends.local.jobs import LocalJob

    out = tmp_path / "job"
    for step in checkpoints:
        (checkpoints_dir(out) / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints_dir(out) / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    if folder:
        out.mkdir(exist_ok=True)
    alive = dict(pid=os.getpid(), pid_started=psutil.Process().create_time()) if state == "JOB_STATE_RUNNING" else {}
    job_id = registry.new_id("chat")
    registry.insert(registry.JobRecord(id=job_id, config={"base_model": "local/tiny-qwen3", **(config or {})},
                                       state=state, output_dir=str(out), created=time.time(), started=time.time(),
                                       display_name=display_name, **alive))
    return LocalJob(job_id)


def test_a_deleted_final_model_is_named_gone_with_the_checkpoints_left(tmp_path):
    from tuning_magics.backends.local.checkpoints import final_dir
    from tuning_magics.errors import UserError

    job = local_job(tmp_path, "JOB_STATE_SUCCEEDED", (8, 16))
    expected = (f"job {job.id}'s final model is gone ({final_dir(job.output_dir)} was deleted); the checkpoints "
                "left there are checkpoint-8, checkpoint-16: chat with checkpoint='checkpoint-16' or another")
    for call in (lambda: job.chat("hi"), job.chat_panel, lambda: job.deploy()):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == expected and err.value.field == "checkpoint"


def test_a_checkpoint_the_job_lacks_is_refused_before_the_panel_opens(tmp_path):
    from tuning_magics.errors import UserError

    job = local_job(tmp_path, "JOB_STATE_SUCCEEDED", (8, 16))
    with pytest.raises(UserError) as err:
        job.chat_panel(checkpoint="checkpoint-999")
    assert str(err.value) == f"job {job.id} has no checkpoint 'checkpoint-999'; choose one of checkpoint-8, checkpoint-16"
    panel = job.chat_panel(checkpoint="checkpoint-8")
    assert panel.title == f"Chat with job {job.id}" and panel.checkpoint == "checkpoint-8"
    assert panel._w_checkpoint.value == "checkpoint-8"
    assert list(panel._w_checkpoint.options) == ["checkpoint-8", "checkpoint-16", "base"]
    assert job.chat_panel(checkpoint="16", compare_base=False) is not None  # a step number names its checkpoint


@pytest.mark.parametrize("state, checkpoints, folder, words", [
    ("JOB_STATE_SUCCEEDED", (), True, "'s final model is gone ({final} was deleted); no checkpoints are left there; "
                                      "tune again"),
    ("JOB_STATE_SUCCEEDED", (), False, "'s folder {out} was deleted, its final model and checkpoints with it; "
                                       "tune again"),
    ("JOB_STATE_FAILED", (8,), True, " ended JOB_STATE_FAILED without a final model; the checkpoints left there are "
                                     "checkpoint-8: chat with checkpoint='checkpoint-8' or another, or job.resume() "
                                     "continues it"),
    ("JOB_STATE_CANCELLED", (), True, " ended JOB_STATE_CANCELLED without a final model; no checkpoints are left "
                                      "there, or job.resume() starts it again"),
])
def test_an_ended_job_without_a_final_model_says_what_is_left(tmp_path, state, checkpoints, folder, words):
    from tuning_magics.backends.local.checkpoints import final_dir
    from tuning_magics.errors import UserError

    job = local_job(tmp_path, state, checkpoints, folder=folder)
    with pytest.raises(UserError) as err:
        job.chat_panel()
    assert str(err.value) == f"job {job.id}" + words.format(final=final_dir(job.output_dir), out=job.output_dir)


def test_a_running_job_opens_its_panel_and_each_reply_says_to_wait_for_the_final_model(tmp_path):
    from tuning_magics.errors import UserError

    job = local_job(tmp_path, "JOB_STATE_RUNNING", (8,))
    panel = job.chat_panel(compare_base=False)
    with pytest.raises(UserError, match=r"has no final model yet \(JOB_STATE_RUNNING\); wait for it, or chat with "
                                        "checkpoint= one of checkpoint-8"):
        job.chat("hi")
    assert panel is not None


# -- a scripted model, for what the panel does with any reply ---------------------------------


class Scripted:
    """Anything with chat(): replies with ``pieces`` one by one and records every request."""

    def __init__(self, pieces=("Hello", " there"), *, fail=None, name="scripted"):
        self.pieces, self.fail, self.name = list(pieces), fail, name
        self.requests: list[tuple[list, dict]] = []

    def chat(self, messages, *, stream=False, **gen):
        self.requests.append((messages, dict(gen, stream=stream)))
        if self.fail is not None:
            raise self.fail

        def pieces():
            for p in self.pieces:
                time.sleep(0.005)
                yield p

        return pieces() if stream else "".join(self.pieces)


def frontend_commits(widget, value) -> None:
    """The frontend syncs the widget's value, as its comm message does (with the echo back)."""
    widget.set_state({"value": value})


def values_of(widget) -> list[str]:
    """Every value the widget takes from now on (what the frontend is sent)."""
    seen: list[str] = []
    widget.observe(lambda change: seen.append(change["new"]), "value")
    return seen


# -- the local engine: a real tuned tiny model ---------------------------------------------------


@pytest.fixture(scope="module")
def job(tuned_tiny_model):
    """A succeeded local job whose final checkpoint is the session's tuned tiny model (base: local/tiny-qwen3)."""
    from tuning_magics.backends.local import registry
    from tuning_magics.backends.local.jobs import LocalJob
    from tuning_magics.jobs import JOB_STATE_SUCCEEDED

    job_id = registry.new_id("chat")
    registry.insert(registry.JobRecord(id=job_id, config={"base_model": "local/tiny-qwen3"},
                                       state=JOB_STATE_SUCCEEDED, output_dir=tuned_tiny_model.output_dir,
                                       created=time.time()))
    job = LocalJob(job_id)
    yield job
    job.close()


@pytest.mark.slow
def test_a_reply_streams_piece_by_piece_and_ends_as_the_greedy_reply(job):
    panel = job.chat_panel()
    panel.refresh_seconds = 0
    panel._w_max.value = 24
    tuned_view, base_view = values_of(panel._w_live[0]), values_of(panel._w_live[1])
    tuned, base = panel.send(QA[0][0])
    assert tuned == job.chat(QA[0][0], max_new_tokens=24, temperature=0) == QA[0][1]
    # The tuned model answers in one word; the untuned base rambles on, and its column shows each piece.
    assert base == job.chat(QA[0][0], checkpoint="base", max_new_tokens=24, temperature=0)
    shown = [v for v in base_view if v and "…" not in v]
    assert len(shown) >= 3 and len(set(shown)) == len(shown)  # piece by piece, not all at once
    assert all(len(a) < len(b) for a, b in zip(shown, shown[1:]))
    assert chat.escaped(base) in shown[-1] and chat.escaped(tuned) in tuned_view[-1]
    assert panel.history == [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": tuned}]
    assert chat.escaped(tuned) in panel._w_history.value
    assert panel._w_live_box.layout.display == "none" and panel.status == ""
    assert not panel._w_send.disabled


@pytest.mark.slow
def test_the_base_model_answers_the_same_message_side_by_side(job):
    panel = job.chat_panel()
    panel._w_max.value = 16
    tuned, base = panel.send(QA[1][0])
    assert tuned == QA[1][1] == job.chat(QA[1][0], max_new_tokens=16)
    assert base == job.chat(QA[1][0], checkpoint="base", max_new_tokens=16)
    assert base != tuned  # the untuned model does not know the invented fact
    from tuning_magics.backends.local.generate import LocalChatModel
    from tuning_magics.backends.local.models import tiny_model_path

    assert base == LocalChatModel(tiny_model_path("local/tiny-qwen3")).reply(QA[1][0], max_new_tokens=16)
    assert panel.base_history == [{"role": "user", "content": QA[1][0]}, {"role": "assistant", "content": base}]
    view = panel._w_history.value
    assert chat.escaped(tuned) in view and "local/tiny-qwen3" in view
    # The untuned tiny model answers with new lines until max tokens: the panel says so rather than show them.
    assert base == "\n" * 16 and "(empty reply: 16 tokens of white space) (stopped at max tokens)" in view
    assert job._base_model is not None and len(job._chat_models) == 1  # both stay loaded for the next turn


@pytest.mark.slow
def test_a_streamed_reply_says_why_it_ended_and_the_panel_shows_a_cut_one(job):
    from tuning_magics.jobs import Reply

    reply = job.chat(QA[3][0], stream=True, max_new_tokens=24)
    assert isinstance(reply, Reply) and reply.finish_reason is None  # not read yet
    assert "".join(reply) == QA[3][1] and reply.finish_reason == "stop"  # the tuned model ends its answer
    ids = job._chat_model(job.tuned_model).tokenizer(QA[3][1], add_special_tokens=False)["input_ids"]
    assert reply.tokens == len(ids)  # the end-of-turn token not counted
    enough = len(ids) + 1  # the answer and its end-of-turn token
    cut = job.chat(QA[3][0], checkpoint="base", stream=True, max_new_tokens=enough)
    text = "".join(cut)
    assert (cut.finish_reason, cut.tokens) == ("length", enough)  # the untuned base goes on
    panel = job.chat_panel()
    panel._w_max.value = enough
    assert panel.send(QA[3][0]) == (QA[3][1], text)
    assert panel._w_history.value.count("(stopped at max tokens)") == 1


@pytest.mark.slow
def test_an_endpoint_that_is_gone_is_one_line_in_the_panel(job):
    server = job.deploy()
    panel = server.chat_panel()
    panel._w_max.value = 8
    assert panel.send(QA[2][0]) == job.chat(QA[2][0], max_new_tokens=8)
    server.stop()
    assert panel.send("Are you there?") is None
    assert panel.status and "\n" not in panel.status and "Traceback" not in panel._w_status.value
    assert len(panel.history) == 2  # the failed turn is not kept


# -- what the panel does with any model --------------------------------------------------------------


def test_history_carries_the_conversation_and_the_system_prompt_and_clear_starts_over():
    model = Scripted(["Hi", "!"])
    panel = ChatPanel(model)
    panel._w_system.value = "Be brief."
    panel._w_temperature.value = 0.5
    panel._w_max.value = 12
    assert panel.send("one") == "Hi!"
    assert panel.send("two") == "Hi!"
    messages, gen = model.requests[-1]
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
                        {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "two"}]
    assert gen == {"temperature": 0.5, "max_new_tokens": 12, "stream": True}
    assert [m["role"] for m in panel.history] == ["user", "assistant", "user", "assistant"]
    assert "two" in panel.text() and panel._w_history.value.count("Hi!") == 2
    panel.clear()
    assert panel.history == [] and panel._w_history.value == ""
    assert panel._w_system.value == "Be brief."  # the settings stay
    panel.send("three")
    assert model.requests[-1][0][1:] == [{"role": "user", "content": "three"}]


def test_model_text_is_shown_as_text_never_as_html_or_markdown():
    evil = ["<script>alert(1)</script>", " **bold**", " <b>x</b> & $x^2$"]
    panel = ChatPanel(Scripted(evil), base=Scripted(["<img src=x onerror=alert(2)>"]))
    panel.refresh_seconds = 0
    seen = values_of(panel._w_live[0]) + values_of(panel._w_live[1])
    tuned, base = panel.send("<i>hello</i>")
    assert tuned == "".join(evil) and base == "<img src=x onerror=alert(2)>"
    views = [panel._w_history.value, panel.html(), panel._repr_mimebundle_()["text/html"], *seen]
    for view in views:
        assert "<script" not in view and "<img" not in view and "<b>x" not in view and "<i>hello" not in view
    history = panel._w_history.value
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in history and "**bold**" in history
    assert "&lt;img src=x onerror=alert(2)&gt;" in history and "&lt;i&gt;hello&lt;/i&gt;" in history
    assert "tex2jax_ignore" in history  # no math typesetting of "$x^2$" either
    assert "<script>alert(1)</script> **bold**" in panel._repr_mimebundle_()["text/plain"]


@pytest.mark.parametrize("setting, value, words", [
    ("_w_temperature", -1.0, "'temperature' must be between 0.0 and 2.0"),
    ("_w_temperature", 9.0, "'temperature' must be between 0.0 and 2.0"),
    ("_w_max", 0, "'max_new_tokens' must be between 1 and 8192"),
])
def test_an_invalid_setting_is_one_line_in_the_panel_and_nothing_is_sent(setting, value, words):
    model = Scripted()
    panel = ChatPanel(model)
    getattr(panel, setting).value = value
    panel._w_message.value = "hello"
    panel._submit()  # what the Send button does
    assert words in panel.status and "\n" not in panel.status
    assert chat.escaped(words) in panel._w_status.value and "Traceback" not in panel._w_status.value
    assert model.requests == [] and panel.history == []
    assert panel._w_message.value == "hello"  # kept, to send again once the setting is fixed
    assert panel.send("hello") is None


def test_a_model_that_fails_is_one_line_and_the_base_that_cannot_answer_is_skipped_with_a_note():
    from tuning_magics.errors import UserError

    tuned = Scripted(fail=ConnectionRefusedError("[Errno 111] Connection refused\nmore detail"))
    panel = ChatPanel(tuned)
    assert panel.send("hi") is None
    assert panel.status == "ConnectionRefusedError: [Errno 111] Connection refused"

    base = Scripted(fail=UserError("job j tuned an open model, whose base model has no endpoint here"))
    panel = ChatPanel(Scripted(["ok"]), base=base)
    assert panel.send("hi") == ("ok", None)
    assert "base model not compared: job j tuned an open model" in panel.status
    assert panel.send("again") == ("ok", None)
    assert len(base.requests) == 1  # not asked again
    assert panel.history[-1] == {"role": "assistant", "content": "ok"} and len(panel.history) == 4


def test_enter_and_the_send_button_ask_without_blocking_and_one_reply_streams_at_a_time():
    gate = threading.Event()

    class Slow(Scripted):
        def chat(self, messages, **gen):
            self.requests.append((messages, gen))

            def pieces():
                yield "a"
                gate.wait(10)
                yield "b"

            return pieces()

    model = Slow()
    panel = ChatPanel(model)
    panel.settle_seconds = 0.05
    panel._w_message._handle_custom_msg({"event": "submit"}, [])  # Enter, as the frontend sends it...
    frontend_commits(panel._w_message, "first")  # ...and then the value it commits
    assert panel._w_message.value == "" and panel._w_send.disabled  # returned at once, still streaming
    frontend_commits(panel._w_message, "second")  # a click on Send blurs the box: its value comes first
    panel._w_send.click()
    panel._settle.join(5)  # the click waits for a value that does not come, then sends the one it has
    assert "still streaming" in panel.status and len(model.requests) == 1
    assert panel._w_message.value == "second"  # kept, to send once the reply is done
    gate.set()
    panel.wait(10)
    assert panel.history[-1]["content"] == "ab" and not panel._w_send.disabled


def test_the_streaming_threads_report_to_the_cell_that_opened_the_panel(monkeypatch):
    from tuning_magics.display import monitor

    cell = {"header": {"msg_id": "cell-7", "msg_type": "execute_request"}}
    kernel_set: list[tuple[str, dict]] = []
    thread_set: list[tuple[str, dict]] = []

    class Kernel:  # the part of ipykernel 7 the panel uses: comm messages go out under its parent
        _parent_ident = {"shell": b"ident"}

        def get_parent(self, channel=None):
            return cell if threading.current_thread() is threading.main_thread() else {}

        def set_parent(self, ident, parent, channel="shell"):
            kernel_set.append((threading.current_thread().name, parent))

    class Shell:
        def set_thread_parent(self, parent):
            thread_set.append((threading.current_thread().name, parent))

    monkeypatch.setattr(monitor, "_kernel", lambda: (Kernel(), Shell()))
    panel = ChatPanel(Scripted(), base=Scripted())
    panel.send("hi")
    for recorded in (kernel_set, thread_set):
        names = sorted(name for name, _ in recorded)
        assert names == ["tuning-magics-chat", "tuning-magics-chat-base", "tuning-magics-chat-tuned"]
        assert all(parent is cell for _, parent in recorded)


def test_without_widgets_the_panel_is_text_and_send_still_works(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets fails
    panel = ChatPanel(Scripted(["<b>", "hi"]), title="Chat <tiny>")
    assert panel.widget is None
    assert panel.send("hello") == "<b>hi"
    bundle = panel._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}
    assert bundle["text/plain"].splitlines() == ["Chat <tiny>", "you: hello", "scripted: <b>hi"]
    assert "&lt;b&gt;hi" in bundle["text/html"] and "Chat &lt;tiny&gt;" in bundle["text/html"]


def test_in_colab_the_panel_is_text_with_one_line_saying_why_and_send_still_works(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    panel = ChatPanel(Scripted(["hi"]), title="Chat")
    assert panel.widget is None  # a panel updated from a thread would stand still there
    assert panel.send("hello") == "hi"
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" not in bundle
    last = bundle["text/plain"].splitlines()[-1]
    assert "googlecolab/colabtools#3373" in last and "panel.send('...')" in last
    assert "googlecolab/colabtools#3373" in bundle["text/html"]


def test_with_widgets_the_bundle_holds_the_view_and_the_text_fallback():
    panel = ChatPanel(Scripted())
    panel.send("hello")
    bundle = panel._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    assert "you: hello" in bundle["text/plain"] and "Hello there" in bundle["text/html"]
    assert "no messages yet" in ChatPanel(Scripted())._repr_mimebundle_()["text/plain"]


def test_the_widget_tree_is_built_once_and_a_reply_only_changes_values():
    panel = ChatPanel(Scripted(["x"] * 5), base=Scripted(["y"]))
    tree = []

    def walk(widget):
        tree.append(widget)
        for child in getattr(widget, "children", ()):
            walk(child)

    walk(panel.widget)
    before = [id(w) for w in tree]
    panel.send("one")
    panel.send("two")
    tree.clear()
    walk(panel.widget)
    assert [id(w) for w in tree] == before


# -- as a careful user finds it: theme, typing, runaway replies, defaults, checkpoints, layout ---------


def widgets_of(widget) -> list:
    out = [widget]
    for child in getattr(widget, "children", ()):
        out += widgets_of(child)
    return out


def html_of(panel) -> str:
    """Every HTML the panel's widgets hold now."""
    import ipywidgets as w

    return "".join(x.value for x in widgets_of(panel.widget) if isinstance(x, w.HTML))


def trained_shape(**kw):
    from tuning_magics.datasets.tokens import TokenCounter
    from tuning_magics.jobs import TrainingChats

    shape = dict(examples=4, system_prompt="Be brief.", with_system_prompt=4, longest_turns=1, longest_tokens=5,
                 tokens_estimated=True, counter=TokenCounter(None))
    return TrainingChats(**{**shape, **kw})


def test_every_colour_of_the_panel_follows_the_theme_with_a_fallback_in_inline_styles():
    import re

    from tuning_magics.errors import UserError

    panel = ChatPanel(Scripted(["<b>hi</b>"]), base=Scripted(fail=UserError("no base model here")),
                      trained=trained_shape(), checkpoints=["checkpoint-8", "base"])
    panel.refresh_seconds = 0
    seen = values_of(panel._w_live[0]) + values_of(panel._w_live[1])
    panel.send("hello")  # a reply, the base model's note, the length note (the training examples were short)
    panel._w_max.value = 0
    panel._submit("again")  # an error
    assert panel.length_note and panel.status
    views = html_of(panel) + "".join(seen) + panel.html()
    assert "<style" not in views  # JupyterLab strips <style> from untrusted output: inline styles only
    styles = re.findall(r'style="([^"]*)"', views)
    styles += [f"border:{x.layout.border}" for x in widgets_of(panel.widget) if x.layout.border]
    themed = re.compile(r"var\(--jp-[\w-]+, [^()]+\)")
    colours = 0
    for style in styles:
        assert "var(" not in themed.sub("", style), style  # every theme variable has a fallback
        for prop, value in re.findall(r"(?:^|;)\s*([\w-]+)\s*:\s*([^;]+)", style):
            bare = themed.sub("", value)
            assert not re.search(r"#|rgb|hsl|\b(white|black|gr[ae]y|red|blue|green)\b", bare), (prop, value)
            if prop in ("color", "background", "background-color") or prop.startswith("border"):
                colours += prop in ("color", "background", "background-color")
                assert prop == "border-radius" or themed.search(value), (prop, value)
    assert colours >= 6  # text and backgrounds were checked, not nothing


def test_enter_sends_the_value_the_frontend_commits_after_its_submit_event_and_clears_the_box():
    model = Scripted(["ok"])
    panel = ChatPanel(model)
    panel.settle_seconds = 30  # a value that comes is sent at once, not after a wait
    box = panel._w_message
    # Keys are not synced one by one (their updates can trail Enter's submit event, and a late one would
    # refill the box after it was cleared): the value comes only when the frontend commits it.
    assert box.continuous_update is False
    frontend_commits(box, "hell")  # committed when the box lost focus: nothing is sent
    assert model.requests == [] and box.value == "hell"
    box._handle_custom_msg({"event": "submit"}, [])  # Enter: ipywidgets 8 sends submit first...
    frontend_commits(box, "hello")  # ...then the value, with the last key typed
    panel.wait(10)
    assert [m[-1]["content"] for m, _ in model.requests] == ["hello"] and box.value == ""
    box._handle_custom_msg({"event": "submit"}, [])
    frontend_commits(box, "world")  # the next message is the next message, not glued to the last
    panel.wait(10)
    assert [m[-1]["content"] for m, _ in model.requests] == ["hello", "world"] and box.value == ""
    assert [m["content"] for m in panel.history] == ["hello", "ok", "world", "ok"]


def test_enter_or_send_with_the_value_committed_before_sends_it_when_no_other_comes():
    model = Scripted(["ok"])
    panel = ChatPanel(model)
    panel.settle_seconds = 0.05
    box = panel._w_message
    frontend_commits(box, "hello")  # a click on Send blurs the box first: its value comes before the click
    panel._w_send.click()
    panel.wait(10)
    assert [m[-1]["content"] for m, _ in model.requests] == ["hello"] and box.value == ""
    frontend_commits(box, "again")  # committed, then Enter without a change: no value follows the submit
    box._handle_custom_msg({"event": "submit"}, [])
    panel.wait(10)
    assert [m[-1]["content"] for m, _ in model.requests] == ["hello", "again"] and box.value == ""
    box._handle_custom_msg({"event": "submit"}, [])  # Enter in the empty box
    panel.wait(10)
    assert panel.status == "type a message first" and len(model.requests) == 2


def test_replies_scroll_in_a_bounded_box_that_keeps_the_newest_in_view_above_the_message_box():
    from tuning_magics.display.chat import HISTORY_MAX_HEIGHT

    panel = ChatPanel(Scripted(["word " * 100] * 4), base=Scripted(["w " * 100] * 4))
    scroll = panel._w_scroll
    assert scroll.layout.max_height == HISTORY_MAX_HEIGHT and scroll.layout.overflow == "auto"
    # A column-reverse box starts scrolled to its end: the last turn and the reply streaming now stay in view.
    assert scroll.layout.flex_flow == "column-reverse"
    assert scroll.children == (panel._w_live_box, panel._w_history)  # shown bottom up: the live reply last
    rows = panel.widget.children
    below = [row for row in rows if panel._w_message in getattr(row, "children", ())]
    assert len(below) == 1 and rows.index(below[0]) > rows.index(scroll)
    assert panel._w_message not in widgets_of(scroll) and panel._w_send not in widgets_of(scroll)
    panel.send("one")
    panel.send("two")
    assert panel._w_history.value.count("word ") == 800  # all of it is there, to scroll back to


class Told(Scripted):
    """Replies as a Job's stream does: a Reply that says why it ended."""

    def __init__(self, pieces, finish_reason, tokens, **kw):
        super().__init__(pieces, **kw)
        self.ended = (finish_reason, tokens)

    def chat(self, messages, *, stream=False, **gen):
        from tuning_magics.jobs import Reply

        return Reply(super().chat(messages, stream=stream, **gen), lambda: self.ended)


def test_a_reply_of_white_space_or_cut_at_max_tokens_says_so():
    panel = ChatPanel(Told(["\n"] * 12, "length", 12), base=Told(["Mellt."], "stop", 3))
    assert panel.send("hi") == ("\n" * 12, "Mellt.")
    view = panel._w_history.value
    assert "(empty reply: 12 tokens of white space) (stopped at max tokens)" in view
    assert view.count("tm-finish") == 1  # the base model's reply ended by itself: nothing added
    assert panel.history[-1] == {"role": "assistant", "content": "\n" * 12}  # the model's text, as it was
    panel = ChatPanel(Told(["The capital", " of Zorvia is"], "length", 5))
    panel.send("hi")
    assert "The capital of Zorvia is\n<span" in panel._w_history.value
    assert "(stopped at max tokens)" in panel._w_history.value
    assert panel.text().splitlines()[-1] == "scripted: The capital of Zorvia is (stopped at max tokens)"
    assert panel.history[-1]["content"] == "The capital of Zorvia is"
    panel = ChatPanel(Scripted([" ", "\n"]))  # a stream that does not say how it ended
    panel.send("hi")
    assert "(empty reply: white space only)" in panel._w_history.value
    assert "max tokens" not in panel._w_history.value


def write_chats(path, chats) -> str:
    import json

    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    return str(path)


def qa(q, a, system="Answer in one sentence."):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_the_system_prompt_starts_as_the_training_datas_and_long_conversations_are_named(tmp_path):
    train = write_chats(tmp_path / "train.jsonl", [
        qa("What is the capital of Zorvia?", "Mellt."), qa("What is the capital of Borduk?", "Tavek."),
        qa("Hi", "Hello.", system="Be brief."),
        qa("What is the capital of Kemla?", "Soru, on the coast.") + [
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, Soru is its capital."}],
    ])
    job = local_job(tmp_path, "JOB_STATE_RUNNING", (8,), config={"train_path": train})
    trained = job.training_chats()
    assert (trained.examples, trained.system_prompt, trained.with_system_prompt) == (4, "Answer in one sentence.", 3)
    assert trained.longest_turns == 2 and trained.tokens_estimated is False  # the tiny model's exact counts
    from tuning_magics.datasets.formats import read_conversations

    assert trained.longest_tokens == max(map(trained.tokens, read_conversations(train)))
    panel = job.chat_panel(checkpoint="checkpoint-8", compare_base=False)
    assert panel._w_system.value == "Answer in one sentence."
    assert "from the training data (3 of 4 examples had it)" in panel._w_system_source.value

    model = Scripted(["Mellt."])
    panel = ChatPanel(model, trained=trained)
    panel.send("What is the capital of Zorvia?")
    assert model.requests[-1][0][0] == {"role": "system", "content": "Answer in one sentence."}
    panel.send("Sure?")  # two turns, as the longest example
    assert panel.length_note == "" and panel._w_note.value == ""
    panel.send("And of Borduk?")
    tokens = trained.tokens(model.requests[-1][0] + [{"role": "assistant", "content": "Mellt."}])
    assert panel.length_note == (
        f"This conversation (3 turns, {tokens} tokens) is longer than any the model trained on (at most 2 turns, "
        f"{trained.longest_tokens} tokens): replies may drift. Clear starts over; unticking 'Send earlier turns' "
        "sends each message alone.")
    assert chat.escaped(panel.length_note) in panel._w_note.value and panel.length_note in panel.text()
    panel._w_keep.value = False  # history off: each message alone
    panel.send("And of Kemla?")
    assert model.requests[-1][0] == [{"role": "system", "content": "Answer in one sentence."},
                                     {"role": "user", "content": "And of Kemla?"}]
    assert panel.length_note == "" and len(panel.history) == 8  # the panel still shows every turn
    panel._w_system.value = "Be long."
    assert "the training data had another system prompt: 'Answer in one sentence.'" in panel._w_system_source.value


def test_without_a_system_prompt_in_the_data_or_with_the_data_gone_the_panel_says_so(tmp_path):
    import os

    train = write_chats(tmp_path / "train.jsonl", [qa("Hi", "Hello.", system=None)])
    job = local_job(tmp_path, "JOB_STATE_RUNNING", (8,), config={"train_path": train})
    panel = job.chat_panel(compare_base=False)
    assert panel._w_system.value == "" and "the training data had no system prompt" in panel._w_system_source.value
    os.remove(train)
    job = local_job(tmp_path / "again", "JOB_STATE_RUNNING", (8,), config={"train_path": train})
    panel = job.chat_panel(compare_base=False)
    assert panel._w_system.value == ""
    assert f"the training data could not be read ({train} not found; check the path)" in \
        panel._w_system_source.value


def test_a_distilled_job_is_measured_by_the_teachers_answers_it_trained_on(tmp_path):
    import json

    from tuning_magics.backends.local.distill import LABELLED_FILE
    from tuning_magics.backends.local.jobs import LocalJob

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Why is 2 even?"}) + "\n")
    job = local_job(tmp_path, "JOB_STATE_RUNNING", (8,), config={"train_path": str(prompts), "method": "distillation"})
    asked = job.training_chats()  # the teacher has not answered yet: the prompts are all there is
    assert asked.longest_tokens == asked.tokens([{"role": "user", "content": "Why is 2 even?"}])
    write_chats(job.output_dir / LABELLED_FILE, [qa("Why is 2 even?", "Because 2 = 2 x 1, a whole number of twos.")])
    answered = LocalJob(job.id).training_chats()
    assert answered.system_prompt == "Answer in one sentence." and answered.longest_tokens > asked.longest_tokens


def test_the_checkpoint_picker_switches_who_answers_and_each_reply_keeps_its_name():
    class Job(Scripted):
        display_name = "quickstart-facts"

        def chat(self, messages, *, checkpoint=None, **gen):
            self.requests.append((messages, {"checkpoint": checkpoint}))
            return iter([f"from {checkpoint}"])

    job = Job()
    names = ["checkpoint-8"]
    panel = ChatPanel(job, checkpoints=lambda: list(names) + ["base"])
    picker = panel._w_checkpoint
    assert list(picker.options) == ["checkpoint-8", "final", "base"] and picker.value == "final"
    panel.send("a")
    picker.value = "checkpoint-8"
    panel.send("b")
    assert [gen["checkpoint"] for _, gen in job.requests] == [None, "checkpoint-8"]
    view = panel._w_history.value
    assert "quickstart-facts (final)" in view and "quickstart-facts (checkpoint-8)" in view
    names.append("checkpoint-16")  # the job went on training: the picker lists what it made after the turn
    panel.send("c")
    assert list(picker.options) == ["checkpoint-8", "checkpoint-16", "base"]  # no final model yet
    panel.checkpoint = "final"  # what the monitor's picker does with an open panel
    assert picker.value == "final" and panel.checkpoint is None
    assert list(picker.options) == ["checkpoint-8", "checkpoint-16", "final", "base"]
    panel.send("d")
    assert job.requests[-1][1]["checkpoint"] is None


def test_a_jobs_panel_is_titled_by_its_display_name_and_opens_on_the_monitors_pick(tmp_path):
    job = local_job(tmp_path, "JOB_STATE_RUNNING", (8,), display_name="quickstart-facts")
    panel = job.chat_panel(checkpoint="final")  # the monitor passes its selected_checkpoint, "final" included
    assert panel.title == f"Chat with quickstart-facts (job {job.id})" and panel.checkpoint is None
    assert list(panel._w_checkpoint.options) == ["checkpoint-8", "final", "base"]
    assert panel._label(panel._sides[0]) == "tuned: quickstart-facts (final)"
    panel = job.chat_panel(checkpoint="checkpoint-8")
    assert panel._w_checkpoint.value == "checkpoint-8"
    assert panel._label(panel._sides[0]) == "tuned: quickstart-facts (checkpoint-8)"


def test_no_label_is_cut_and_no_width_is_fixed_so_nothing_scrolls_sideways():
    panel = ChatPanel(Scripted(), base=Scripted(), checkpoints=["checkpoint-8", "base"])
    described = [x for x in widgets_of(panel.widget) if getattr(x, "description", "")]
    assert {x.description for x in described} >= {"System prompt", "Checkpoint", "Temperature", "Max tokens",
                                                   "Send earlier turns", "Send", "Clear"}
    for x in described:
        if hasattr(x.style, "description_width"):
            assert x.style.description_width == "initial", x.description  # as wide as its words
    for x in widgets_of(panel.widget):
        assert x.layout.width in (None, "auto"), (type(x).__name__, x.layout.width)  # flex, never px or 100%
    settings = [row for row in panel.widget.children if panel._w_temperature in getattr(row, "children", ())]
    assert settings[0].layout.flex_flow == "row wrap"  # a narrow page wraps the settings, never scrolls them


# -- Vertex AI: a tuned Gemini job against the fake API -----------------------------------------------


@pytest.fixture
def gemini(vertex):
    pytest.importorskip("google.genai")
    import tuning_magics as tm
    from fake_vertex import CHAT

    vertex.step_seconds = 60
    vertex.deploy_seconds = 0.05
    train = vertex.put(vertex.uri("train.jsonl"), CHAT)
    job = tm.tune("gemini-2.5-flash", train, epochs=2)
    for _ in range(30):
        if job.refresh().done:
            return job
        vertex.advance(vertex.step_seconds)
    raise AssertionError(job.state)


def test_a_gemini_job_streams_through_generate_content_beside_its_base_model(vertex, gemini):
    panel = gemini.chat_panel()
    # What it trained on is read from the job's gs:// training file (converted for Gemini when it was uploaded).
    assert (panel._trained.examples, panel._trained.longest_turns) == (20, 1)
    assert "the training data had no system prompt" in panel._w_system_source.value
    panel.refresh_seconds = 0
    live = values_of(panel._w_live[0])
    tuned, base = panel.send("Why is the sky blue?")
    assert tuned == gemini.chat("Why is the sky blue?")
    assert base.startswith("base gemini-2.5-flash: ") and base == gemini.chat("Why is the sky blue?",
                                                                              checkpoint="base")
    streamed = [r for r in vertex.requests if r.path.endswith(":streamGenerateContent")]
    assert any(r.path.endswith(f"{gemini.endpoint}:streamGenerateContent") for r in streamed)
    assert any("/publishers/google/models/gemini-2.5-flash:streamGenerateContent" in r.path for r in streamed)
    assert len([v for v in live if v and "…" not in v]) > 1  # piece by piece
    assert panel.status == ""
    assert gemini.chat("Why is the sky blue?", stream=False) == tuned


def test_an_open_model_on_vertex_has_no_base_to_compare_with(vertex, gemini):
    from tuning_magics.backends.vertex import endpoints
    from tuning_magics.errors import UserError

    class OpenJob:
        name, config = "projects/p/locations/l/tuningJobs/1", {"base_model": "meta/llama3_1@llama-3.1-8b"}
        tuned_model_name, is_gemini = None, False

    with pytest.raises(UserError, match="tuned an open model, whose base model has no endpoint here"):
        endpoints.chat_with_job(OpenJob(), "hi", checkpoint="base")
