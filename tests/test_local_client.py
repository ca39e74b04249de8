"""The client for OpenAI-compatible endpoints, against a scripted HTTP server on 127.0.0.1 (no model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuning_magics.backends.local.client import (
    EndpointError,
    EndpointRefused,
    chat_completion,
    chat_url,
    list_models,
    stream_chat_completion,
)


@pytest.fixture
def scripted(scripted_endpoint):
    """A scripted endpoint: HTTP ``status`` for every request, else ``events`` when streaming, a body that
    stalls for ``stall`` seconds, or the reply "hello"; it lists two models and one malformed entry."""

    def make(status: int = 200, events: list[str] | None = None, stall: float = 0.0):
        def answer(body, attempt):
            return status if status != 200 else (float(stall) if stall else "hello")

        return scripted_endpoint(answer, models=("m1", "m2", {"no": "id"}), events=events)

    return make


def _chunk(text):
    return json.dumps({"choices": [{"delta": {"content": text}}]})


def test_chat_url_accepts_a_base_or_a_full_url():
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_completion_models_and_stream(scripted):
    ep = scripted(events=[_chunk("hel"), json.dumps({"choices": []}), _chunk("lo"), "[DONE]", _chunk("late")])
    msgs = [{"role": "user", "content": "hi"}]
    data = chat_completion(ep.url, msgs, model="m1", api_key="sk-1", max_tokens=3, seed=None)
    assert data["choices"][0]["message"]["content"] == "hello"
    assert ep.seen[-1] == ({"messages": msgs, "stream": False, "model": "m1", "max_tokens": 3}, "Bearer sk-1")
    assert list(stream_chat_completion(ep.url, msgs)) == ["hel", "lo"]  # nothing after [DONE]
    assert ep.seen[-1][0]["stream"] is True and ep.seen[-1][1] is None
    assert list_models(ep.url + "/chat/completions") == ["m1", "m2"]


def test_errors_carry_the_status_and_the_servers_message(scripted):
    ep = scripted(status=401)
    with pytest.raises(EndpointError, match="HTTP 401 from .*: scripted 401") as err:
        chat_completion(ep.url, [{"role": "user", "content": "hi"}])
    assert err.value.status == 401
    ep.close()
    with pytest.raises(EndpointError, match="no answer from") as err:
        chat_completion(ep.url, [{"role": "user", "content": "hi"}], timeout=5)
    assert err.value.status is None


def test_a_stalled_or_cut_body_is_an_endpoint_error(scripted):
    ep = scripted(stall=3)
    with pytest.raises(EndpointError, match="stopped before its end") as err:
        chat_completion(ep.url, [{"role": "user", "content": "hi"}], timeout=0.5)
    assert err.value.status is None and "\n" not in str(err.value)


def test_a_stream_error_event_or_a_stream_without_done_raises(scripted):
    msgs = [{"role": "user", "content": "hi"}]
    error = json.dumps({"error": {"message": "generation failed: out of memory", "code": 500}})
    got = []
    with pytest.raises(EndpointError, match="ended the stream with an error: generation failed: out of memory") as err:
        for piece in stream_chat_completion(scripted(events=[_chunk("Hel"), error]).url, msgs):
            got.append(piece)
    assert got == ["Hel"] and err.value.status == 500
    with pytest.raises(EndpointError, match=r"ended before data: \[DONE\]"):
        list(stream_chat_completion(scripted(events=[_chunk("Hel")]).url, msgs))


def test_a_4xx_is_a_user_error_with_the_servers_words(scripted):
    from tuning_magics.errors import UserError

    ep = scripted(status=400)
    with pytest.raises(EndpointRefused) as err:
        chat_completion(ep.url, [{"role": "user", "content": "hi"}])
    assert isinstance(err.value, UserError) and isinstance(err.value, EndpointError)
    assert err.value.status == 400 and err.value.detail == "scripted 400"


def test_a_malformed_stream_event_is_an_endpoint_error(scripted):
    ep = scripted(events=["{broken"])
    with pytest.raises(EndpointError, match="malformed stream event"):
        list(stream_chat_completion(ep.url, [{"role": "user", "content": "hi"}]))


def test_the_client_needs_neither_the_server_nor_the_local_extra(without_extra):
    code = ("import sys, tuning_magics.backends.local.client as c; "
            "assert 'tuning_magics.backends.local.server' not in sys.modules; "
            "assert not {'torch', 'transformers'} & set(sys.modules); print(c.chat_url('http://x/v1'))")
    proc = without_extra("local", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "http://x/v1/chat/completions"


def test_distillation_uses_the_client_not_the_server():
    code = ("import sys; from tuning_magics.backends.local import distill; "
            "t = distill._EndpointTeacher('http://127.0.0.1:9/v1', api_key=None, model='m', timeout=1, "
            "concurrency=1); assert 'tuning_magics.backends.local.server' not in sys.modules, 'server imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
