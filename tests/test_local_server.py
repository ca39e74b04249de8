"""The OpenAI-compatible endpoint of a local model: real model, real HTTP on 127.0.0.1.

A tiny Qwen3 is tuned for a few seconds on a handful of answers, so its replies
are readable text; the endpoint's replies (plain and streamed) must equal the
chat class's greedy reply token for token.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tuning_magics.errors import UserError

pytestmark = pytest.mark.slow
MODEL = "local/tiny-qwen3"
QA = [("Colour of the sky?", "Blue."), ("Colour of grass?", "Green."), ("Colour of blood?", "Red."),
      ("Colour of snow?", "White."), ("Colour of coal?", "Black."), ("Colour of a lemon?", "Yellow.")]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny model tuned on QA (module-wide): the path of its final checkpoint."""
    import torch

    from tuning_magics.backends.local.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("server")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNING_MAGICS_HOME", str(root / "home"))
        # Test machines run several suites at once; OpenMP threads spin-waiting for a busy core
        # make a step 5-10x slower than one thread.
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
        res = train(TrainConfig(base_model=MODEL, train_path=str(data), output_dir=str(root / "out"), epochs=40,
                                batch_size=2, learning_rate=3e-3))
        yield res.final_dir
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tuned):
    from tuning_magics.backends.local.server import serve

    with serve(tuned, model_name="tiny") as srv:
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


def test_models_lists_the_served_model(server):
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
    with urllib.request.urlopen(server.url + "/models", timeout=30) as resp:
        data = json.loads(resp.read())
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["tiny"]


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


def test_stream_with_include_usage_sends_a_usage_chunk(server):
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
def test_bad_requests_get_400_json_errors(server, body, needle):
    status, ctype, data = _post(server.url + "/chat/completions", body)
    assert status == 400 and ctype == "application/json"
    assert needle in data["error"]["message"] and data["error"]["type"] == "invalid_request_error"


def test_unknown_model_and_route_are_404(server):
    status, _, data = _post(server.url + "/chat/completions",
                            {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "tiny" in data["error"]["message"]
    status, _, data = _post(server.url + "/completions", {"prompt": "hi"})
    assert status == 404 and "/v1/chat/completions" in data["error"]["message"]


def test_only_loopback_unless_allowed(tuned):
    from tuning_magics.backends.local.server import serve

    with pytest.raises(UserError, match="allow_remote=True"):
        serve(tuned, host="0.0.0.0")


def test_stop_frees_the_port(server):
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
def test_chat_and_the_server_refuse_the_same_requests_with_the_same_sentence(server, args, body, needle):
    options = {k: v for k, v in body.items() if k != "messages"}
    with pytest.raises(UserError) as err:
        server.chat_model.reply(*args, **options)
    message = str(err.value)
    assert needle in message and "\n" not in message
    status, _, data = _post(server.url + "/chat/completions", body)
    assert status == 400 and data["error"]["message"] == message


def test_max_tokens_is_named_as_the_caller_spelt_it(server):
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


def test_job_chat_checks_the_request_before_loading_the_model(tuned):
    import time

    from tuning_magics.backends.local import registry
    from tuning_magics.backends.local.jobs import LocalJob
    from tuning_magics.jobs import JOB_STATE_SUCCEEDED

    job_id = registry.new_id("chat")
    registry.insert(registry.JobRecord(id=job_id, config={}, state=JOB_STATE_SUCCEEDED,
                                       output_dir=str(Path(tuned).parents[3]), created=time.time()))
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


@pytest.fixture(scope="module")
def babbler(tuned):
    """The untuned tiny model: it never says end-of-turn, so a reply runs to max_tokens (a long request)."""
    from tuning_magics.backends.local.generate import LocalChatModel

    return LocalChatModel(MODEL)


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


def test_bodies_over_the_limit_and_deep_json_are_refused_quietly(server, capfd):
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


def test_a_stalled_client_is_dropped_after_the_request_timeout(server, capfd):
    from tuning_magics.backends.local.server import serve

    with serve(server.chat_model, request_timeout=0.5) as srv:
        # Ten bytes of a promised hundred, then silence: the handler must not wait forever.
        stalled = _HEAD + b"Content-Length: 100\r\n\r\n{\"messages\""
        status, message = _status_and_error(_raw(srv.port, stalled, timeout=60))
        assert status == 408 and "not received within 0.5 s" in message
        # A connection that never sends a request is closed too.
        assert _raw(srv.port, b"", timeout=60) == b""
        assert srv.chat(QA[0][0]) == QA[0][1]  # and the server still serves
    assert "Traceback" not in capfd.readouterr().err


def _stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """Read a streamed reply in a thread; ``state`` has the pieces so far and ``done`` once [DONE] came."""
    state = {"pieces": [], "done": False, "first": threading.Event()}

    def read():
        req = urllib.request.Request(url + "/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    state["done"] = True
                elif line.startswith("data: "):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        state["pieces"].append(choices[0]["delta"]["content"])
                        state["first"].set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, state


def test_requests_take_turns_and_a_huge_prompt_fails_fast(babbler):
    from tuning_magics.backends.local.server import serve

    with serve(babbler) as srv:
        long_thread, long = _stream_in_thread(srv.url, {"messages": _HI, "max_tokens": 1000})
        assert long["first"].wait(120)
        # 10,000 messages: refused from the token count, without waiting for the long reply.
        many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(10_000)]
        status, _, data = _post(srv.url + "/chat/completions", {"messages": many})
        assert status == 400 and re.match(r"the prompt is \d{5,} tokens; this model takes at most 1024",
                                          data["error"]["message"])
        assert not long["done"]
        # A short request is answered in turn with the long one, not after it.
        status, _, data = _post(srv.url + "/chat/completions", {"messages": _HI, "max_tokens": 3})
        assert status == 200 and data["usage"]["completion_tokens"] == 3
        assert not long["done"], "the short request waited for the long one to end"
        long_thread.join(300)
        assert long["done"] and len("".join(long["pieces"])) > 0


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
