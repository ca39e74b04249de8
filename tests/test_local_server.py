"""The OpenAI-compatible endpoint of a local model: real model, real HTTP on 127.0.0.1.

The session's tuned tiny Qwen3 (conftest's ``tuned_tiny_model``) answers
invented facts, so replies are readable text; the endpoint's replies (plain and
streamed) must equal the chat class's greedy reply token for token. The bounds
(connections, deadlines, disconnects, stop) run on the untuned model, which
trains nothing: those tests are in the fast subset.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import invented_facts

from tuning_magics.errors import UserError

MODEL = "local/tiny-qwen3"
QA = invented_facts()[:6]  # facts the session's tuned model knows


@pytest.fixture(scope="module")
def tuned(tuned_tiny_model):
    """The session's tuned tiny model: the path of its final checkpoint."""
    return tuned_tiny_model.final_dir


@pytest.fixture(scope="module")
def server(tuned):
    from tuning_magics.backends.local.server import serve

    with serve(tuned, model_name="tiny") as srv:
        yield srv


@pytest.fixture(scope="module")
def babbler():
    """The untuned tiny model: it never says end-of-turn, so a reply runs to max_tokens (a long request)."""
    from tuning_magics.backends.local.generate import LocalChatModel

    return LocalChatModel(MODEL)


@pytest.fixture(scope="module")
def plain(babbler):
    """The untuned model served as "tiny": for the rules, which need no sensible replies."""
    from tuning_magics.backends.local.server import serve

    with serve(babbler, model_name="tiny") as srv:
        yield srv


def _post(url: str, body, *, raw: bool = False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            text = resp.read().decode()
            return resp.status, resp.headers.get("Content-Type"), (text if raw else json.loads(text))
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), json.loads(exc.read())


def _sse(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models_lists_the_served_model(plain):
    server = plain
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
    with urllib.request.urlopen(server.url + "/models", timeout=30) as resp:
        data = json.loads(resp.read())
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["tiny"]


@pytest.mark.slow
def test_plain_and_streamed_replies_equal_the_chat_class(server):
    from tuning_magics.backends.local.generate import LocalChatModel

    chat = LocalChatModel(server.chat_model.name)
    for question, answer in QA[:3]:
        messages = [{"role": "user", "content": question}]
        expected = chat.reply(messages, max_new_tokens=24)
        assert expected == answer  # the model learnt it, so the comparison is on real text

        status, ctype, data = _post(server.url + "/chat/completions",
                                    {"model": "tiny", "messages": messages, "max_tokens": 24})
        assert status == 200 and ctype == "application/json"
        choice = data["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": expected}
        assert choice["finish_reason"] == "stop"
        usage = data["usage"]
        prompt_ids = chat.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert usage["prompt_tokens"] == len(chat.tokenizer(prompt_ids, add_special_tokens=False)["input_ids"])
        # The byte tokenizer: one token per byte, plus the end-of-turn token.
        assert usage["completion_tokens"] == len(expected.encode()) + 1
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        status, ctype, text = _post(server.url + "/chat/completions",
                                    {"messages": messages, "max_tokens": 24, "stream": True}, raw=True)
        assert status == 200 and ctype.startswith("text/event-stream")
        events = _sse(text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert streamed == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"] == usage

    # A reply cut by max_tokens says so.
    status, _, data = _post(server.url + "/chat/completions",
                            {"messages": [{"role": "user", "content": QA[0][0]}], "max_tokens": 2})
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 2
    # The convenience client goes through the same HTTP path, whole or streamed.
    assert server.chat(QA[1][0]) == QA[1][1]
    streamed = server.chat(QA[2][0], stream=True)
    assert not isinstance(streamed, str)  # an iterator of pieces as the server sends them
    assert "".join(streamed) == QA[2][1]


def test_stream_with_include_usage_sends_a_usage_chunk(plain):
    server = plain
    status, _, text = _post(server.url + "/chat/completions", {
        "messages": [{"role": "user", "content": QA[0][0]}], "stream": True,
        "stream_options": {"include_usage": True}}, raw=True)
    events = _sse(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not valid JSON"),
    ({"model": "tiny"}, "'messages' is required"),
    ({"messages": []}, "'messages' is required"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "'n'"),
])
def test_bad_requests_get_400_json_errors(plain, body, needle):
    server = plain
    status, ctype, data = _post(server.url + "/chat/completions", body)
    assert status == 400 and ctype == "application/json"
    assert needle in data["error"]["message"] and data["error"]["type"] == "invalid_request_error"


def test_unknown_model_and_route_are_404(plain):
    server = plain
    status, _, data = _post(server.url + "/chat/completions",
                            {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "tiny" in data["error"]["message"]
    status, _, data = _post(server.url + "/completions", {"prompt": "hi"})
    assert status == 404 and "/v1/chat/completions" in data["error"]["message"]


def test_only_loopback_unless_allowed(babbler):
    from tuning_magics.backends.local.server import serve

    with pytest.raises(UserError, match="allow_remote=True"):
        serve(babbler, host="0.0.0.0")


def test_stop_frees_the_port(plain):
    server = plain
    from tuning_magics.backends.local.server import serve

    srv = serve(server.chat_model)  # an already loaded model can be served again
    url = srv.url
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/models", timeout=5)


# -- one set of request rules for job.chat(), LocalChatModel.reply() and the server ----------------

_HI = [{"role": "user", "content": "hi"}]
# (reply(...) arguments, the same request as an HTTP body, a piece of the one message both give)
_SAME_RULES = [
    (("hi \ud800",), {"messages": [{"role": "user", "content": "hi \ud800"}]},
     "lone surrogate '\\ud800' at character 3"),
    ((None,), {"messages": None}, "'messages' is required"),
    ((5,), {"messages": 5}, "'messages' is required"),
    (([{"role": "bogus", "content": "x"}],), {"messages": [{"role": "bogus", "content": "x"}]}, "role 'bogus'"),
    (([{"role": "user", "content": [{"type": "image_url"}]}],),
     {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only"),
    ((_HI,), {"messages": _HI, "temperature": -1}, "'temperature' must be between 0.0 and 2.0, not -1"),
    ((_HI,), {"messages": _HI, "top_p": float("nan")}, "'top_p' must be a number"),
    ((_HI,), {"messages": _HI, "seed": 1.5}, "'seed' must be a whole number"),
    (("x" * 2000,), {"messages": [{"role": "user", "content": "x" * 2000}]}, "this model takes at most 1024"),
]


@pytest.mark.parametrize("args, body, needle", _SAME_RULES)
def test_chat_and_the_server_refuse_the_same_requests_with_the_same_sentence(plain, args, body, needle):
    server = plain
    options = {k: v for k, v in body.items() if k != "messages"}
    with pytest.raises(UserError) as err:
        server.chat_model.reply(*args, **options)
    message = str(err.value)
    assert needle in message and "\n" not in message
    status, _, data = _post(server.url + "/chat/completions", body)
    assert status == 400 and data["error"]["message"] == message


def test_max_tokens_is_named_as_the_caller_spelt_it(plain):
    server = plain
    with pytest.raises(UserError, match="'max_new_tokens' must be between 1 and 8192, not 0"):
        server.chat_model.reply("hi", max_new_tokens=0)
    with pytest.raises(UserError, match="chat\\(\\) has no option 'max_tokens'"):
        server.chat_model.reply("hi", max_tokens=5)
    status, _, data = _post(server.url + "/chat/completions", {"messages": _HI, "max_tokens": 0})
    assert status == 400 and data["error"]["message"] == "'max_tokens' must be between 1 and 8192, not 0"
    # Prompt and reply must fit the context together; the message gives the numbers.
    status, _, data = _post(server.url + "/chat/completions",
                            {"messages": [{"role": "user", "content": "x" * 900}], "max_completion_tokens": 200})
    assert status == 400
    assert re.fullmatch(r"the prompt is \d+ tokens; this model takes at most 1024, including "
                        r"max_completion_tokens=200: shorten the messages or lower max_completion_tokens",
                        data["error"]["message"]), data
    # Without max_tokens, the reply gets the room that is left.
    status, _, data = _post(server.url + "/chat/completions", {"messages": [{"role": "user", "content": "x" * 900}]})
    assert status == 200 and data["usage"]["total_tokens"] <= 1024


@pytest.mark.slow
def test_job_chat_checks_the_request_before_loading_the_model(tuned_tiny_model):
    tuned = tuned_tiny_model.final_dir
    import time

    from tuning_magics.backends.local import registry
    from tuning_magics.backends.local.jobs import LocalJob
    from tuning_magics.jobs import JOB_STATE_SUCCEEDED

    job_id = registry.new_id("chat")
    registry.insert(registry.JobRecord(id=job_id, config={}, state=JOB_STATE_SUCCEEDED,
                                       output_dir=tuned_tiny_model.output_dir, created=time.time()))
    job = LocalJob(job_id)
    for bad, options in [("hi \ud800", {}), (None, {}), (5, {}), ("hi", {"max_new_tokens": 0}),
                         ([{"role": "bogus", "content": "hi"}], {}), ("hi", {"temperature": -1}),
                         ("hi", {"stream": "yes"}), ("hi", {"bogus": 1})]:
        with pytest.raises(UserError) as err:
            job.chat(bad, **options)
        assert "\n" not in str(err.value)
    assert job._chat_models == {}  # refused before any model was loaded
    assert job.chat(QA[0][0], max_new_tokens=24) == QA[0][1]
    assert "".join(job.chat(QA[1][0], stream=True)) == QA[1][1]


# -- bounded resources ----------------------------------------------------------------------------


def _raw(port: int, data: bytes, *, timeout: float = 60) -> bytes:
    """Send raw bytes, return everything the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _status_and_error(reply: bytes) -> tuple[int, str]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]["message"]


_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_bodies_over_the_limit_and_deep_json_are_refused_quietly(plain, capfd):
    server = plain
    from tuning_magics.backends.local.server import serve

    # Content-Length alone decides: nothing is read, nothing allocated.
    status, message = _status_and_error(_raw(server.port, _HEAD + b"Content-Length: 1000000000000\r\n\r\n"))
    assert status == 413 and "over 2000000 bytes" in message
    status, message = _status_and_error(_raw(server.port, _HEAD + b"Content-Length: -5\r\n\r\n"))
    assert status == 400 and "Content-Length" in message
    status, _, data = _post(server.url + "/chat/completions", b"[" * 200_000)
    assert status == 400 and "nests JSON too deeply" in data["error"]["message"]
    with serve(server.chat_model, max_body_bytes=1000) as small:
        # A chunked body is refused as soon as it streams past the limit.
        chunks = b"".join(b"%x\r\n%s\r\n" % (600, b" " * 600) for _ in range(2)) + b"0\r\n\r\n"
        status, message = _status_and_error(_raw(small.port, _HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunks))
        assert status == 413 and "over 1000 bytes" in message
        # A chunked body within the limit is read like any other.
        body = json.dumps({"messages": _HI, "max_tokens": 2}).encode()
        reply = _raw(small.port, _HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        # curl's "Expect: 100-continue" is refused before the body is sent.
        reply = _raw(small.port, _HEAD + b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        assert _status_and_error(reply)[0] == 413
    err = capfd.readouterr().err
    assert not any(word in err for word in ("Traceback", "MemoryError", "RecursionError")), err


def test_a_stalled_client_is_dropped_after_the_request_timeout(plain, capfd):
    server = plain
    from tuning_magics.backends.local.server import serve

    with serve(server.chat_model, request_timeout=0.5) as srv:
        # Ten bytes of a promised hundred, then silence: the handler must not wait forever.
        stalled = _HEAD + b"Content-Length: 100\r\n\r\n{\"messages\""
        status, message = _status_and_error(_raw(srv.port, stalled, timeout=60))
        assert status == 408 and "not received within 0.5 s" in message
        # A connection that never sends a request is closed too.
        assert _raw(srv.port, b"", timeout=60) == b""
        assert srv.chat("hi", max_new_tokens=2)  # and the server still serves
    assert "Traceback" not in capfd.readouterr().err


def _stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """Read a streamed reply in a thread; ``state`` has the pieces so far and ``done`` once [DONE] came."""
    state = {"pieces": [], "done": False, "first": threading.Event(), "error": None}

    def read():
        req = urllib.request.Request(url + "/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    state["done"] = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        state["error"] = event["error"]["message"]
                        continue
                    choices = event["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        state["pieces"].append(choices[0]["delta"]["content"])
                        state["first"].set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, state


@pytest.fixture
def slow_steps(babbler):
    """Every decoding step of the untuned model sleeps 10 ms: a 1000-token reply lasts at least 10 s, however fast
    the machine, so a short request that finishes before it did not wait for it."""
    hook = babbler.model.register_forward_hook(lambda *a: time.sleep(0.01))
    yield babbler
    hook.remove()


def test_requests_take_turns_and_huge_prompts_fail_fast(slow_steps):
    from tuning_magics.backends.local.server import serve

    with serve(slow_steps) as srv:
        long_thread, long = _stream_in_thread(srv.url, {"messages": _HI, "max_tokens": 1000})
        assert long["first"].wait(120)
        # 10,000 messages, 1.7 MB: refused from a bounded prefix, without waiting for the long reply.
        for content in ("hi", "x" * 150):
            many = [{"role": "user" if i % 2 == 0 else "assistant", "content": content} for i in range(10_000)]
            status, _, data = _post(srv.url + "/chat/completions", {"messages": many})
            assert status == 400 and re.match(r"the prompt is at least \d+ tokens; this model takes at most 1024",
                                              data["error"]["message"])
        # A short request is answered in turn with the long one, not after it.
        status, _, data = _post(srv.url + "/chat/completions", {"messages": _HI, "max_tokens": 3})
        assert status == 200 and data["usage"]["completion_tokens"] == 3
        assert not long["done"], "the short request waited for the long one to end"
        # stop() ends the long generation at its next step: its stream ends with an error event, no [DONE].
        srv.stop()
        long_thread.join(60)
        assert not long_thread.is_alive() and not long["done"]
        assert long["error"] and "server stopped" in long["error"]
        assert srv.open_connections == 0


def _forward_counter(chat_model) -> tuple[list, object]:
    calls: list[int] = []
    return calls, chat_model.model.register_forward_hook(lambda *a: calls.append(1))


def _wait_idle(srv, limit: float = 120) -> None:
    import time

    deadline = time.monotonic() + limit
    while srv.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.active_requests == 0


def test_a_full_server_says_429_and_a_gone_client_stops_its_generation(babbler, capfd):
    import time

    from tuning_magics.backends.local.server import serve

    calls, hook = _forward_counter(babbler)
    try:
        with serve(babbler, max_concurrent_requests=1) as srv:
            # Streaming: the client reads one piece and hangs up.
            body = json.dumps({"messages": _HI, "max_tokens": 1000, "stream": True}).encode()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
                sock.sendall(_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                got = b""
                while b"data: " not in got:  # the headers may come in a packet of their own
                    chunk = sock.recv(65536)
                    assert chunk, "the server closed the stream"
                    got += chunk
                # The only slot is taken: the next request is told to come back.
                req = urllib.request.Request(srv.url + "/chat/completions", data=json.dumps({"messages": _HI}).encode())
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(req, timeout=60)
                assert err.value.code == 429 and err.value.headers["Retry-After"] == "1"
            _wait_idle(srv)
            assert len(calls) < 500, f"{len(calls)} decoding steps after the client left"

            # Not streaming: the client sends its request and leaves at once.
            calls.clear()
            body = json.dumps({"messages": _HI, "max_tokens": 1000}).encode()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
                sock.sendall(_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                deadline = time.monotonic() + 60
                while not calls and time.monotonic() < deadline:
                    time.sleep(0.01)
            _wait_idle(srv)
            assert 0 < len(calls) < 500, f"{len(calls)} decoding steps after the client left"
    finally:
        hook.remove()
    assert "Traceback" not in capfd.readouterr().err


# -- the turn lock ------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


@pytest.fixture
def interrupt_main():
    """``interrupt_main(after)``: raise _Interrupted in the main thread after ``after`` seconds, as Ctrl-C would."""
    assert threading.current_thread() is threading.main_thread()
    armed = threading.Event()

    def handler(signum, frame):
        if armed.is_set():
            armed.clear()
            raise _Interrupted()

    previous = signal.signal(signal.SIGUSR1, handler)
    timers = []

    def arm(after: float) -> None:
        armed.set()
        timers.append(threading.Timer(after, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1)))
        timers[-1].start()

    yield arm
    for t in timers:
        t.cancel()
        t.join()
    armed.clear()
    signal.signal(signal.SIGUSR1, previous)


def _in_thread(fn) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run():
        fn()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_an_interrupted_waiter_leaves_the_queue(interrupt_main):
    from tuning_magics.backends.local.generate import _Turns

    turns = _Turns()
    held, go_on = threading.Event(), threading.Event()

    def holder():
        turns.acquire()
        held.set()
        go_on.wait(30)
        turns.pass_turn()  # nobody waits any more: returns at once
        turns.release()

    thread, done = _in_thread(holder)
    assert held.wait(30)
    interrupt_main(0.2)
    with pytest.raises(_Interrupted):
        turns.acquire()  # waits behind the holder; interrupted
    go_on.set()
    assert done.wait(30), "the holder is stuck behind the interrupted waiter's ticket"
    _, third = _in_thread(lambda: (turns.acquire(), turns.release()))
    assert third.wait(30)


def test_only_the_holder_releases_the_turn(interrupt_main):
    from tuning_magics.backends.local.generate import _Turns

    turns = _Turns()
    turns.acquire()  # the main thread holds the turn
    second_holds, second_may_go = threading.Event(), threading.Event()

    def second():
        turns.acquire()
        second_holds.set()
        second_may_go.wait(30)
        turns.release()

    second_thread, _ = _in_thread(second)
    while not turns.waiting():
        time.sleep(0.01)
    interrupt_main(0.3)
    with pytest.raises(_Interrupted):
        turns.pass_turn()  # the second thread takes the turn; the main thread is interrupted waiting for it back
    assert second_holds.wait(30)
    turns.release()  # as _generate's finally does: the main thread no longer holds the turn, so nothing happens
    _, third = _in_thread(lambda: (turns.acquire(), turns.release()))
    assert not third.wait(0.5), "a third thread ran beside the holder"
    second_may_go.set()
    second_thread.join(30)
    assert third.wait(30)


def test_a_stream_and_a_reply_interrupted_in_turn_leave_the_model_usable(babbler, interrupt_main):
    pieces = babbler.reply("hi", stream=True, max_new_tokens=400)
    next(pieces)  # the stream's generation holds or waits for turns from now on
    interrupt_main(0.5)
    with pytest.raises(_Interrupted):
        babbler.reply("hello", max_new_tokens=900)
    drained, done = _in_thread(lambda: list(pieces))
    assert done.wait(120), "the stream never got its turn back"
    _, again = _in_thread(lambda: babbler.reply("hi", max_new_tokens=3))
    assert again.wait(60)


# -- connections -----------------------------------------------------------------------------------


def _ask_raw(port: int, body: dict, *, half_close: bool = False) -> dict:
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(_HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
        if half_close:
            sock.shutdown(socket.SHUT_WR)  # legal HTTP: the client still reads the reply
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # an interim answer, as HTTP/1.1 allows
        head, _, payload = payload.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    return json.loads(payload)


def test_a_half_closed_client_gets_its_whole_reply(plain):
    data = _ask_raw(plain.port, {"messages": _HI, "max_tokens": 20}, half_close=True)
    assert data["usage"]["completion_tokens"] == 20


def test_replies_are_whole_with_more_than_1024_descriptors_open(plain):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the descriptor limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    fds = []
    try:
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        # The connection's descriptor is now above select()'s FD_SETSIZE of 1024.
        data = _ask_raw(plain.port, {"messages": _HI, "max_tokens": 20})
        assert data["usage"]["completion_tokens"] == 20
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _wait_for(condition, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


def test_connections_over_the_cap_are_answered_503_at_once(babbler):
    from tuning_magics.backends.local.server import serve

    with serve(babbler, max_connections=2) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(2)]
        _wait_for(lambda: srv.open_connections == 2)
        status, message = _status_and_error(_raw(srv.port, b"", timeout=30))
        assert status == 503 and "2 connections open" in message
        for sock in idle:
            sock.close()
        _wait_for(lambda: srv.open_connections == 0)
        assert srv.chat("hi", max_new_tokens=2)


def test_stop_closes_kept_alive_connections(babbler):
    import http.client

    from tuning_magics.backends.local.server import serve

    srv = serve(babbler)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    body = json.dumps({"messages": _HI, "max_tokens": 2})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Connection") != "close"
    resp.read()
    _wait_for(lambda: srv.open_connections == 1)
    srv.stop()
    assert srv.open_connections == 0
    with pytest.raises((http.client.HTTPException, OSError)):  # closed, not served
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        conn.getresponse()
    conn.close()


def test_a_trickled_request_is_cut_at_its_deadline(babbler):
    from tuning_magics.backends.local.server import serve

    with serve(babbler, request_timeout=1.0) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            sock.sendall(_HEAD + b"Content-Length: 40\r\n\r\n")
            start = time.monotonic()
            reply = b""
            try:
                for _ in range(40):  # a byte every 0.3 s: each read is quick, the whole is not
                    sock.sendall(b" ")
                    time.sleep(0.3)
            except OSError:
                pass  # closed after the 408
            sock.settimeout(30)
            try:
                while chunk := sock.recv(65536):
                    reply += chunk
            except OSError:
                pass
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - start < 11  # well before the 12 s the whole trickle takes


# -- Server.chat, predict and deploy follow the shared rules -------------------------------------------


def test_server_chat_predict_and_deploy_follow_the_shared_rules(plain):
    from tuning_magics.chat_request import BadRequest
    from tuning_magics.backends.local.server import deploy

    for args, options, needle in [((None,), {}, "'messages' is required"), ((5,), {}, "'messages' is required"),
                                  (("hi",), {"max_new_tokens": 0}, "'max_new_tokens' must be between 1"),
                                  (("hi",), {"temprature": 5}, "no option 'temprature'"),
                                  (("hi",), {"stream": "yes"}, "'stream'")]:
        with pytest.raises(UserError, match=needle) as err:
            plain.chat(*args, **options)
        assert "\n" not in str(err.value)
    # A refusal of the server itself (the context) is a UserError with the server's sentence, in the caller's words.
    with pytest.raises(UserError) as err:
        plain.chat("x" * 900, max_new_tokens=200)
    assert isinstance(err.value, BadRequest) and err.value.status == 400
    assert re.fullmatch(r"the prompt is \d+ tokens; this model takes at most 1024, including max_new_tokens=200: "
                        r"shorten the messages or lower max_new_tokens", str(err.value))
    with pytest.raises(UserError, match="max_new_tokens"):
        list(plain.chat("x" * 900, max_new_tokens=200, stream=True))
    assert len(plain.predict([{"prompt": "hi", "max_tokens": 2}, {"messages": _HI, "max_tokens": 1}])) == 2
    for instances, needle in [("hi", "instances must be a list"), (["hi"], r"instances\[0\] must be an object"),
                              ([{"prompt": "hi", "max_tokens": 0}], r"instances\[0\]: 'max_tokens' must be"),
                              ([{"prompt": "hi", "bogus": 1}], r"instances\[0\] has no field 'bogus'")]:
        with pytest.raises(UserError, match=needle):
            plain.predict(instances)
    for options, needle in [({"prot": 8000}, "no option 'prot'"), ({"port": 99999}, "port must be"),
                            ({"port": -1}, "port must be"), ({"port": "abc"}, "port must be")]:
        with pytest.raises(UserError, match=needle):
            deploy(plain.chat_model, **options)


def test_job_chat_without_the_local_extra_names_it(without_extra):
    code = ("from tuning_magics.backends.local.jobs import LocalJob\n"
            "from tuning_magics.errors import MissingExtra\n"
            "try:\n    LocalJob('no-such-job').chat('hi')\n"
            "except MissingExtra as exc:\n    print('MISSING', exc)\n")
    proc = without_extra("local", code)
    assert proc.returncode == 0, proc.stderr
    assert "MISSING" in proc.stdout and 'pip install "tuning_magics[local]"' in proc.stdout, proc.stdout


# -- the real openai client ------------------------------------------------------------------------


def _openai(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
def test_the_openai_client_stops_at_a_stop_sequence(server, tuned_tiny_model):
    client = _openai(server)
    question, answer = QA[0]
    stop = answer[2:4]
    expected = answer[:answer.index(stop)]
    messages = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, stop=stop)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    # Generation ended as the stop sequence was complete (the byte tokenizer: a token a character).
    assert reply.usage.completion_tokens == len(expected) + len(stop)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, stream=True,
                                                 stop=["no such text", stop], stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(expected) + len(stop)
    # job.chat(), the chat class and Server.chat take the same option.
    assert server.chat(question, stop=[stop]) == expected
    assert "".join(server.chat(question, stop=stop, stream=True)) == expected
    assert server.chat_model.reply(question, stop=stop) == expected
    from tuning_magics.backends.local import registry
    from tuning_magics.backends.local.jobs import LocalJob
    from tuning_magics.jobs import JOB_STATE_SUCCEEDED

    job_id = registry.new_id("chat")
    registry.insert(registry.JobRecord(id=job_id, config={}, state=JOB_STATE_SUCCEEDED,
                                       output_dir=tuned_tiny_model.output_dir, created=time.time()))
    assert "".join(LocalJob(job_id).chat(question, stop=stop, stream=True)) == expected


def test_a_stop_sequence_ends_generation_at_once_and_held_text_is_sent_at_the_end(plain):
    client = _openai(plain)
    # The untuned model answers newlines only.
    reply = client.chat.completions.create(model="tiny", messages=_HI, max_tokens=50, stop="\n")
    assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 1
    chunks = list(client.chat.completions.create(model="tiny", messages=_HI, max_tokens=6, stop="\n\n\n\n\n\nx",
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "\n" * 6
    assert chunks[-1].choices[0].finish_reason == "length"
    for bad in (["a", "b", "c", "d", "e"], "", [""], 5, [5]):
        with pytest.raises(UserError, match="'stop' must be a non-empty string or a list of up to 4"):
            plain.chat_model.reply("hi", stop=bad)
        _refused(client, {"stop": bad}, "stop", "'stop' must be")


def _refused(client, options: dict, param: str, needle: str, messages=_HI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, **options)
    error = err.value
    assert error.status_code == 400 and error.type == "invalid_request_error", error.body
    assert error.param == param and needle in error.body["message"] and "\n" not in error.body["message"], error.body


_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("options, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [_TOOL]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"10": 5}}, "logit_bias"),
    ({"functions": [_TOOL["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
])
def test_options_the_server_lacks_are_refused_by_name(plain, options, param):
    _refused(_openai(plain), options, param, f"'{param}'")


def test_options_at_values_that_change_nothing_are_accepted(plain):
    reply = _openai(plain).chat.completions.create(
        model="tiny", messages=_HI, max_tokens=2, presence_penalty=0, frequency_penalty=0.0, logprobs=False,
        response_format={"type": "text"}, tool_choice="none", logit_bias={}, user="someone",
        extra_body={"store": False, "metadata": {"run": "1"}})
    assert reply.usage.completion_tokens == 2


@pytest.mark.parametrize("messages, param, needle", [
    ("hello", "messages", "must be a list"),
    ([{"role": "user", "content": "hi"}, "oops"], "messages[1]", "messages[1] must be an object"),
    ([{"content": "hi"}], "messages[0].role", "role is required"),
    ([{"role": "tool", "content": "hi", "tool_call_id": "1"}], "messages[0].role", "role 'tool'"),
    ([{"role": "user"}], "messages[0].content", "content is required"),
    ([{"role": "user", "content": 5}], "messages[0].content", "a string or a list of text parts"),
    ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content", "not dict"),
    ([{"role": "user", "content": [{"type": "text", "text": 7}]}], "messages[0].content", "content[0]"),
    ([{"role": "user", "parts": [{"text": "hi"}]}], "messages[0].content", "content is required"),
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "messages[2].content", "required"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
     "messages[1].tool_calls", "not supported"),
    ([{"role": "user", "content": "hi", "name": "ann"}], "messages[0].name", "not supported"),
])
def test_malformed_messages_are_refused_naming_the_field(plain, messages, param, needle):
    _refused(_openai(plain), {}, param, needle, messages=messages)


def test_a_reply_message_echoed_back_is_accepted(plain):
    client = _openai(plain)
    first = client.chat.completions.create(model="tiny", messages=_HI, max_tokens=2)
    echoed = first.choices[0].message.model_dump()  # role and content, with refusal, tool_calls... as null
    reply = client.chat.completions.create(model="tiny", messages=[*_HI, echoed, *_HI], max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


def test_the_openai_client_retrieves_a_model_whose_id_has_a_slash(plain):
    import openai

    from tuning_magics.backends.local.server import serve

    with serve(plain.chat_model, model_name="tune-1/final") as srv:
        client = _openai(srv)
        assert [m.id for m in client.models.list()] == ["tune-1/final"]
        model = client.models.retrieve("tune-1/final")  # sent as /v1/models/tune-1%2Ffinal
        assert model.id == "tune-1/final" and model.object == "model" and model.owned_by == "tuning_magics"
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve("tune-1/other")
        assert "'tune-1/other' is not served here" in err.value.body["message"] and err.value.param == "model"
        reply = client.chat.completions.create(model="tune-1/final", messages=_HI, max_tokens=2)
        assert reply.model == "tune-1/final"
