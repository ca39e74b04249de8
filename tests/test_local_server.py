"""The OpenAI-compatible endpoint of a local model: real model, real HTTP on 127.0.0.1.

A tiny Qwen3 is tuned for a few seconds on a handful of answers, so its replies
are readable text; the endpoint's replies (plain and streamed) must equal the
chat class's greedy reply token for token.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

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
