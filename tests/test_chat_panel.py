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


def local_job(tmp_path, state, checkpoints=(), *, folder=True):
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
    registry.insert(registry.JobRecord(id=job_id, config={"base_model": "local/tiny-qwen3"}, state=state,
                                       output_dir=str(out), created=time.time(), started=time.time(), **alive))
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
    assert job.chat_panel(checkpoint="checkpoint-8").title == f"Chat with job {job.id} (checkpoint-8)"
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
    assert chat.escaped(tuned) in view and chat.escaped(base) in view and "local/tiny-qwen3" in view
    assert job._base_model is not None and len(job._chat_models) == 1  # both stay loaded for the next turn


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
    panel._w_message.value = "first"
    panel._w_message._handle_custom_msg({"event": "submit"}, [])  # Enter, as the frontend sends it
    assert panel._w_message.value == "" and panel._w_send.disabled  # returned at once, still streaming
    panel._w_message.value = "second"
    panel._w_send.click()
    assert "still streaming" in panel.status and len(model.requests) == 1
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


# -- Vertex AI: a tuned Gemini job against the fake API -----------------------------------------------


@pytest.fixture
def gemini(vertex):
    pytest.importorskip("google.genai")
    import re

    import tuning_magics as tm
    from fake_vertex import CHAT, Recorded, reply_to

    vertex.step_seconds = 60
    vertex.deploy_seconds = 0.05
    handle = vertex.handle

    def with_base_models(method, path, query, body, headers):
        # The service's own Gemini models answer generateContent at publishers/google/models/<id>.
        hit = re.fullmatch(r"/v1beta1/projects/[^/]+/locations/[^/]+/publishers/google/models/(gemini-[\w.-]+):"
                           r"(generateContent|streamGenerateContent)", path)
        if not hit or method != "POST":
            return handle(method, path, query, body, headers)
        vertex.requests.append(Recorded(method, path, query, body, headers))
        prompt = body["contents"][-1]["parts"][0]["text"]
        words = f"base {hit.group(1)}: {reply_to(prompt)}".split(" ")

        def chunk(text):
            return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}]}

        if hit.group(2) == "generateContent":
            return 200, chunk(" ".join(words))
        return 200, [chunk(w + (" " if k < len(words) - 1 else "")) for k, w in enumerate(words)]

    vertex.handle = with_base_models
    train = vertex.put(vertex.uri("train.jsonl"), CHAT)
    job = tm.tune("gemini-2.5-flash", train, epochs=2)
    for _ in range(30):
        if job.refresh().done:
            return job
        vertex.advance(vertex.step_seconds)
    raise AssertionError(job.state)


def test_a_gemini_job_streams_through_generate_content_beside_its_base_model(vertex, gemini):
    panel = gemini.chat_panel()
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
