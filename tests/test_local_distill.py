"""Distillation on this machine: a tuned teacher labels the prompts, a fresh student learns its answers.

The bar: a tiny Qwen3 teacher is tuned until it knows 32 invented facts; a
distillation job (``tune(method="distillation")``, real worker process) has it
label the prompts and tunes a fresh tiny Llama on its answers; the student must
give the teacher's answer on at least 90% of the prompts. The same teacher is
also asked through the OpenAI-compatible endpoint of ``serve()`` and must give
the same labels. Endpoint error handling (retry, API key, failure naming the
line) runs against a scripted fake endpoint, without a model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import invented_facts

from tuning_magics.backends.local.distill import (
    LABELLED_FILE,
    PARTIAL_FILE,
    SOURCES_FILE,
    label_dataset,
    read_prompts,
)
from tuning_magics.errors import UserError

STUDENT_BASE = "local/tiny-llama"
# Settings found to make a tiny model learn 32 short facts (100% recall) in ~320 steps.
EPOCHS, BATCH, LR = 80, 8, 3e-3


# The facts the session's shared tuned model (conftest's tuned_tiny_model) knows: it is the teacher.
FACTS = invented_facts()[:32]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# -- prompts and errors, no model ----------------------------------------------------------


def test_prompts_drop_the_final_answer_in_every_format(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "P1", "completion": "old answer"}),
        "",  # blank lines do not count as examples but do count as lines
        json.dumps({"prompt": "P2"}),
        json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                                 {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                                 {"role": "assistant", "content": "A2"}]}),
        json.dumps({"contents": [{"role": "user", "parts": [{"text": "G1"}, {"text": "G2"}]},
                                 {"role": "model", "parts": [{"text": "old"}]}]}),
    ]) + "\n")
    got = read_prompts(path)
    assert [line for line, _ in got] == [1, 3, 4, 5]
    assert got[0][1] == [{"role": "user", "content": "P1"}]
    assert got[1][1] == [{"role": "user", "content": "P2"}]
    # Earlier turns stay as context; only the final answer is the teacher's to write.
    assert [m["content"] for m in got[2][1]] == ["S", "U1", "A1", "U2"]
    assert got[3][1] == [{"role": "user", "content": "G1\nG2"}]


def test_catalog_teacher_asks_for_an_endpoint(tmp_path):
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(UserError, match="endpoint URL") as err:
        label_dataset("deepseek-ai/deepseek-r1-0528-maas", data, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / LABELLED_FILE).exists()


@pytest.fixture
def fake_endpoint(scripted_endpoint):
    """A teacher endpoint with scripted answers: ``answer(prompt_text, attempt) -> str | int (HTTP error) |
    float (stall)``; every request must ask for greedy decoding."""

    def make(answer, models=("teacher-x",), **kw):
        def reply(body, attempt):
            if body["temperature"] != 0.0:
                return 422
            return answer(str(body["messages"][-1]["content"]), attempt)

        return scripted_endpoint(reply, models=models, **kw)

    return make


def test_endpoint_teacher_retries_once_and_sends_the_api_key(tmp_path, fake_endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # "flaky" prompts fail (empty, then a 503) on the first try only.
    ep = fake_endpoint(lambda p, n: ("" if "4" in p else 503) if ("flaky" in p and n == 1) else f"answer to {p}")
    prompts = [{"prompt": f"q{i}" + (" flaky" if i % 4 == 0 else "")} for i in range(12)]
    data = _write_jsonl(tmp_path / "p.jsonl", prompts)
    events = []
    n = label_dataset(ep.url, data, tmp_path, on_event=events.append)
    assert n == 12
    out = _read_jsonl(tmp_path / LABELLED_FILE)
    assert [r["messages"][-1]["content"] for r in out] == [f"answer to {p['prompt']}" for p in prompts]
    assert all(set(r) == {"messages"} for r in out)
    assert _read_jsonl(tmp_path / SOURCES_FILE) == [{"line": i + 1, "source_line": i + 1} for i in range(12)]
    assert {p: c for p, c in ep.calls.items() if c > 1} == {p["prompt"]: 2 for p in prompts if "flaky" in p["prompt"]}
    assert {auth for _, auth in ep.seen} == {"Bearer sk-test"}
    progress = [e for e in events if e.get("event") == "progress"]
    assert progress[0]["done"] == 0 and progress[-1] == {"event": "progress", "stage": "labelling", "done": 12,
                                                         "total": 12}
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)


def test_endpoint_teacher_failing_twice_names_the_line_and_keeps_the_other_answers(tmp_path, fake_endpoint):
    fixed = []
    ep = fake_endpoint(lambda p, n: f"answer to {p}" if fixed else "" if p == "bad" else "fine")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + json.dumps({"prompt": "bad"}) + "\n")
    with pytest.raises(UserError, match="line 3 of p.jsonl") as err:
        label_dataset(ep.url, data, tmp_path / "out" / LABELLED_FILE)
    assert err.value.line == 3 and ep.calls["bad"] == 2
    # No labelled file or sidecar: only the answers obtained, for the next attempt.
    assert [p.name for p in (tmp_path / "out").iterdir()] == [PARTIAL_FILE]
    # With that prompt fixed, the next attempt asks for it alone.
    fixed.append(True)
    ep.calls.clear()
    data.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + json.dumps({"prompt": "better"}) + "\n")
    assert label_dataset(ep.url, data, tmp_path / "out" / LABELLED_FILE) == 2
    assert ep.calls == {"better": 1}
    out = _read_jsonl(tmp_path / "out" / LABELLED_FILE)
    assert [r["messages"][-1]["content"] for r in out] == ["fine", "answer to better"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LABELLED_FILE, SOURCES_FILE]


def test_a_stalled_answer_is_retried_not_fatal(tmp_path, fake_endpoint):
    ep = fake_endpoint(lambda p, n: 2.0 if (p == "slow" and n == 1) else f"answer to {p}")
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "slow"}, {"prompt": "b"}])
    assert label_dataset(ep.url, data, tmp_path, timeout=0.5) == 3
    assert [r["messages"][-1]["content"] for r in _read_jsonl(tmp_path / LABELLED_FILE)] == \
        ["answer to a", "answer to slow", "answer to b"]
    assert ep.calls["slow"] == 2


@pytest.mark.parametrize("options, needle", [
    ({"temperature": -1}, "'temperature' must be between 0.0 and 2.0, not -1"),
    ({"top_p": 1.5}, "'top_p' must be between 0.0 and 1.0"),
    ({"max_new_tokens": 0}, "'max_new_tokens' must be between 1 and 8192"),
    ({"seed": 1.5}, "'seed' must be a whole number"),
])
def test_labelling_options_follow_the_chat_rules(tmp_path, options, needle):
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(UserError, match=re.escape(needle)):
        label_dataset("http://127.0.0.1:9/v1", data, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_local_teacher_names_a_prompt_over_its_context_before_answering_any(tmp_path, capfd):
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "x" * 1500}])
    with pytest.raises(UserError) as err:
        label_dataset("local/tiny-qwen3", data, tmp_path, max_new_tokens=16, batch_size=2)
    assert re.fullmatch(r"the teacher cannot answer line 2 of p\.jsonl: the prompt is \d+ tokens; this model takes at "
                        r"most 1024, including the reply: shorten the messages, or remove that prompt", str(err.value))
    assert err.value.line == 2
    assert not (tmp_path / PARTIAL_FILE).exists() or _answered(tmp_path / PARTIAL_FILE) == {}
    assert capfd.readouterr().err == ""  # no transformers warnings about lengths


def test_endpoint_refusal_and_silence_are_one_line_errors(tmp_path, fake_endpoint):
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    ep = fake_endpoint(lambda p, n: 400)
    with pytest.raises(UserError, match="refused line 1 of p.jsonl: .*scripted 400"):
        label_dataset(ep.url, data, tmp_path)
    ep.close()
    with pytest.raises(UserError, match="does not answer"):
        label_dataset(ep.url, data, tmp_path)


def test_endpoint_hints_name_what_a_tune_user_can_do(tmp_path, fake_endpoint, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    for ep in (fake_endpoint(lambda p, n: "fine", models_status=401), fake_endpoint(lambda p, n: 401)):
        with pytest.raises(UserError) as err:
            label_dataset(ep.url, data, tmp_path)
        message = str(err.value)
        assert "OPENAI_API_KEY" in message and "tune()" in message and "\n" not in message
        assert "api_key" not in message  # tune() has no such option
    # An endpoint serving several models: the model is named at the end of the URL.
    ep = fake_endpoint(lambda p, n: "fine", models=("m1", "m2"))
    with pytest.raises(UserError, match="serves 2 models") as err:
        label_dataset(ep.url, data, tmp_path)
    assert f"base_teacher_model: {ep.url}#m1" in str(err.value)
    assert label_dataset(f"{ep.url}#m2", data, tmp_path) == 1
    assert [body.get("model") for body, _ in ep.seen] == ["m2"]


def _answered(partial: Path) -> dict[int, str]:
    """The answers of a partial file by source line; every line must be whole JSON."""
    return {r["source_line"]: r["answer"] for r in _read_jsonl(partial)}


def test_a_cancelled_labelling_resumes_asking_only_for_the_rest(tmp_path, fake_endpoint):
    prompts = [{"prompt": f"q{i}"} for i in range(40)]
    data = _write_jsonl(tmp_path / "p.jsonl", prompts)
    ep = fake_endpoint(lambda p, n: f"answer to {p}")
    seen = []

    def stop_after_10():
        return len([e for e in seen if e.get("done")]) >= 10

    with pytest.raises(Exception, match="cancelled while the teacher was labelling"):
        label_dataset(ep.url, data, tmp_path, on_event=seen.append, should_stop=stop_after_10, concurrency=2)
    assert not (tmp_path / LABELLED_FILE).exists() and not (tmp_path / SOURCES_FILE).exists()
    kept = _answered(tmp_path / PARTIAL_FILE)
    assert 10 <= len(kept) < 40 and all(a == f"answer to q{line - 1}" for line, a in kept.items())
    first = dict(ep.calls)
    assert set(first) == {f"q{line - 1}" for line in kept}  # every answer paid for was kept

    ep.calls.clear()
    events = []
    assert label_dataset(ep.url, data, tmp_path, on_event=events.append) == 40
    assert ep.calls == {f"q{i}": 1 for i in range(40) if i + 1 not in kept}  # the rest, each once
    assert events[0] == {"event": "progress", "stage": "labelling", "done": len(kept), "total": 40}
    out = _read_jsonl(tmp_path / LABELLED_FILE)
    assert [r["messages"] for r in out] == [[{"role": "user", "content": p["prompt"]},
                                             {"role": "assistant", "content": f"answer to {p['prompt']}"}]
                                            for p in prompts]
    assert _read_jsonl(tmp_path / SOURCES_FILE) == [{"line": i, "source_line": i} for i in range(1, 41)]
    assert not (tmp_path / PARTIAL_FILE).exists()


def test_a_killed_labelling_resumes_past_a_torn_line(tmp_path, fake_endpoint):
    import subprocess
    import sys
    import time

    prompts = [{"prompt": f"q{i}"} for i in range(30)]
    data = _write_jsonl(tmp_path / "p.jsonl", prompts)
    gate = threading.Event()
    answered = []

    def answer(p, n):
        if len(answered) >= 12:
            gate.wait(120)  # the teacher hangs after 12 answers; the labeller is then killed
        answered.append(p)
        return f"answer to {p}"

    ep = fake_endpoint(answer)
    code = ("import sys; from tuning_magics.backends.local.distill import label_dataset; "
            "label_dataset(sys.argv[1], sys.argv[2], sys.argv[3], concurrency=1)")
    proc = subprocess.Popen([sys.executable, "-c", code, ep.url, str(data), str(tmp_path)])
    try:
        partial = tmp_path / PARTIAL_FILE
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not partial.exists() or partial.read_bytes().count(b"\n") < 12):
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(60)
        gate.set()
    assert len(_answered(partial)) == 12
    # A crash in the middle of a write leaves half a line.
    with open(partial, "ab") as fh:
        fh.write(b'{"source_line": 13, "key": "3f2a')

    ep.calls.clear()
    seen = []
    with pytest.raises(Exception, match="cancelled"):
        label_dataset(ep.url, data, tmp_path, on_event=seen.append, concurrency=1,
                      should_stop=lambda: len(seen) > 5)
    kept = _answered(partial)  # whole lines only: the torn one was dropped, the new ones start on their own
    assert 12 < len(kept) < 30
    assert set(ep.calls) == {f"q{line - 1}" for line in kept if line > 12}

    ep.calls.clear()
    assert label_dataset(ep.url, data, tmp_path) == 30
    assert ep.calls == {f"q{i}": 1 for i in range(30) if i + 1 not in kept}
    assert [r["messages"][-1]["content"] for r in _read_jsonl(tmp_path / LABELLED_FILE)] == \
        [f"answer to q{i}" for i in range(30)]


def test_answers_for_other_options_or_another_prompt_are_not_reused(tmp_path, fake_endpoint):
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    refuse = {"c"}
    ep = fake_endpoint(lambda p, n: 400 if p in refuse else f"answer to {p}")
    with pytest.raises(UserError, match="refused line 3 of p.jsonl: .*scripted 400"):
        label_dataset(ep.url, data, tmp_path, concurrency=1)
    assert _answered(tmp_path / PARTIAL_FILE) == {1: "answer to a", 2: "answer to b"}
    ep.calls.clear()
    with pytest.raises(UserError, match="refused line 3"):
        label_dataset(ep.url, data, tmp_path, concurrency=1, max_new_tokens=7)  # other options: ask again
    assert ep.calls == {"a": 1, "b": 1, "c": 1}
    refuse.clear()
    ep.calls.clear()
    _write_jsonl(data, [{"prompt": "a2"}, {"prompt": "b"}, {"prompt": "c"}])  # line 1 changed
    assert label_dataset(ep.url, data, tmp_path) == 3
    assert ep.calls == {"a2": 1, "c": 1}


# -- the real thing: teacher, endpoint, distillation job ----------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private TUNING_MAGICS_HOME for the module, one torch thread (see test_local_server)."""
    import torch

    from tuning_magics.backends.local import scheduler

    h = tmp_path_factory.mktemp("distill-home")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNING_MAGICS_HOME", str(h))
        mp.setenv(scheduler.CONCURRENCY_ENV, "1")
        mp.setenv("OMP_NUM_THREADS", "1")  # inherited by job workers
        torch.set_num_threads(1)
        yield h
        for pid, proc in list(scheduler._children.items()):
            if proc.poll() is None:
                os.killpg(pid, signal.SIGKILL)
                proc.wait(timeout=30)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tuned_tiny_model):
    """The session's tuned tiny Qwen3, which knows FACTS: the path of its final checkpoint."""
    return tuned_tiny_model.final_dir


@pytest.mark.slow
def test_teacher_knows_the_facts(teacher):
    from tuning_magics.backends.local.generate import LocalChatModel

    chat = LocalChatModel(teacher)
    right = sum(chat.reply(q, max_new_tokens=16) == a for q, a in FACTS)
    assert right >= 0.9 * len(FACTS)


@pytest.mark.slow
def test_endpoint_teacher_gives_the_folder_teachers_labels(teacher, home, tmp_path):
    from tuning_magics.backends.local.server import serve

    # Chat records whose (wrong) final answers must be replaced, one with a system prompt.
    subset = [{"messages": [*([{"role": "system", "content": "Answer briefly."}] if i == 0 else []),
                            {"role": "user", "content": q}, {"role": "assistant", "content": "I do not know."}]}
              for i, (q, _) in enumerate(FACTS[:8])]
    data = _write_jsonl(tmp_path / "subset.jsonl", subset)
    local_n = label_dataset(teacher, data, tmp_path / "local", batch_size=4, max_new_tokens=16)
    events = []
    with serve(teacher) as srv:
        remote_n = label_dataset(srv.url, data, tmp_path / "remote", on_event=events.append, max_new_tokens=16)
    assert local_n == remote_n == 8
    local = _read_jsonl(tmp_path / "local" / LABELLED_FILE)
    remote = _read_jsonl(tmp_path / "remote" / LABELLED_FILE)
    assert remote == local
    assert [r["messages"][:-1] for r in local] == [s["messages"][:-1] for s in subset]
    assert all(r["messages"][-1]["content"] != "I do not know." for r in local)
    assert events[-1]["event"] == "labelled" and [e["done"] for e in events[:-1]][-1] == 8


@pytest.mark.slow
def test_local_teacher_keeps_its_answers_across_a_cancel(teacher, tmp_path):
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": q} for q, _ in FACTS[:8]])
    seen = []
    with pytest.raises(Exception, match="cancelled"):
        label_dataset(teacher, data, tmp_path, batch_size=2, max_new_tokens=16, on_event=seen.append,
                      should_stop=lambda: seen[-1]["done"] >= 4)
    kept = _answered(tmp_path / PARTIAL_FILE)
    assert len(kept) == 4 and all(kept.values())
    events = []
    assert label_dataset(teacher, data, tmp_path, batch_size=2, max_new_tokens=16, on_event=events.append) == 8
    assert [e["done"] for e in events[:-1]] == [4, 5, 6, 7, 8]  # the first four come from the partial file
    out = _read_jsonl(tmp_path / LABELLED_FILE)
    assert {line: out[line - 1]["messages"][-1]["content"] for line in kept} == kept
    assert all(r["messages"][-1]["content"].strip() for r in out)
    assert not (tmp_path / PARTIAL_FILE).exists()


@pytest.mark.slow
def test_distillation_job_student_gives_the_teachers_answers(teacher, home):
    import tuning_magics as tm
    from tuning_magics.jobs import JOB_STATE_SUCCEEDED

    # A prompt-only JSONL file: the teacher writes every answer.
    prompts = _write_jsonl(home / "prompts.jsonl", [{"prompt": q} for q, _ in FACTS])
    job = tm.tune(STUDENT_BASE, str(prompts), method="distillation", base_teacher_model=teacher, epochs=EPOCHS,
                  batch_size=BATCH, learning_rate=LR)
    job.wait(timeout=600)
    assert job.state == JOB_STATE_SUCCEEDED, job.error

    out = Path(job.output_uri)
    labelled = _read_jsonl(out / LABELLED_FILE)
    assert len(labelled) == len(FACTS)
    assert [r["messages"][:-1] for r in labelled] == [[{"role": "user", "content": q}] for q, _ in FACTS]
    assert tm.validate(str(out / LABELLED_FILE)).ok  # a plain chat file: reusable as an SFT dataset
    assert [s["source_line"] for s in _read_jsonl(out / SOURCES_FILE)] == list(range(1, len(FACTS) + 1))
    assert not (out / PARTIAL_FILE).exists()
    teacher_said = {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in labelled}
    # The teacher knew the facts, so the labels are the facts (batched greedy = one-by-one greedy).
    assert sum(teacher_said[q] == a for q, a in FACTS) >= 0.9 * len(FACTS)

    student_agrees = sum(job.chat(q, max_new_tokens=16) == teacher_said[q] for q, _ in FACTS)
    assert student_agrees >= 0.9 * len(FACTS), f"student matched the teacher on {student_agrees}/{len(FACTS)}"


@pytest.mark.slow
def test_the_api_key_is_never_written_to_the_job(home, fake_endpoint, monkeypatch):
    import sqlite3

    import tuning_magics as tm

    key = "sk-fake-4f9c2a7e1b"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    # A server that echoes the key it refuses, as some do.
    ep = fake_endpoint(lambda p, n: "fine", models_status=401)
    prompts = _write_jsonl(home / "key-prompts.jsonl", [{"prompt": "hi"}])
    # Refused at submission (the endpoint is asked first), not by a job minutes later.
    before = len(tm.list_jobs())
    with pytest.raises(tm.UserError) as refused:
        tm.tune(STUDENT_BASE, str(prompts), method="distillation", base_teacher_model=ep.url, epochs=1)
    assert "OPENAI_API_KEY" in str(refused.value) and key not in str(refused.value)
    assert len(tm.list_jobs()) == before
    # A key the endpoint refuses only once the job asks it: the job fails, and its files never hold the key.
    ep_later = fake_endpoint(lambda p, n: 401)
    job = tm.tune(STUDENT_BASE, str(prompts), method="distillation", base_teacher_model=ep_later.url, epochs=1)
    job.wait(timeout=300)
    assert job.state == "JOB_STATE_FAILED" and "OPENAI_API_KEY" in (job.error or "")
    for path in [*Path(job.output_uri).rglob("*"), *home.glob("jobs.sqlite3*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    with sqlite3.connect(home / "jobs.sqlite3") as conn:
        assert key not in json.dumps(conn.execute("SELECT * FROM jobs").fetchall())


@pytest.mark.slow
def test_a_credential_in_the_teacher_url_is_used_but_never_shown_or_stored(home, fake_endpoint, monkeypatch):
    import base64
    import sqlite3

    import tuning_magics as tm
    from tuning_magics.backends.local.submit import TEACHER_SECRET_FILE

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ep = fake_endpoint(lambda p, n: "fine")
    url = ep.url.replace("http://", "http://bob:pw-s3cret@") + "?api_key=qk-s3cret"
    prompts = _write_jsonl(home / "url-prompts.jsonl", [{"prompt": "hi"}, {"prompt": "there"}])
    plan = tm.tune(STUDENT_BASE, str(prompts), method="distillation", base_teacher_model=url, epochs=1,
                   dry_run=True)
    assert "s3cret" not in str(plan) and "bob:***@" in str(plan) and "api_key=***" in str(plan)
    job = tm.tune(STUDENT_BASE, str(prompts), method="distillation", base_teacher_model=url, epochs=1)
    assert "s3cret" not in json.dumps(job.config) and "s3cret" not in repr(job)
    job.wait(timeout=300)
    assert job.succeeded, job.error
    # The teacher was asked with the credential: the user and password as Basic authorization.
    assert {auth for _, auth in ep.seen} == {"Basic " + base64.b64encode(b"bob:pw-s3cret").decode()}
    holders = [p for p in Path(job.output_uri).rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()]
    secret = Path(job.output_uri) / TEACHER_SECRET_FILE
    assert holders == [secret] and secret.stat().st_mode & 0o077 == 0  # only its owner reads it
    with sqlite3.connect(home / "jobs.sqlite3") as conn:
        assert "s3cret" not in json.dumps(conn.execute("SELECT * FROM jobs").fetchall())


@pytest.mark.slow
def test_an_unreachable_teacher_endpoint_is_refused_before_a_job_is_queued(home):
    import socket

    import tuning_magics as tm

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prompts = _write_jsonl(home / "p.jsonl", [{"prompt": "hi"}])
    before = len(tm.list_jobs())
    for dry_run in (True, False):
        with pytest.raises(tm.UserError, match=f"the endpoint http://127.0.0.1:{port}/v1 does not answer") as info:
            tm.tune(STUDENT_BASE, str(prompts), method="distillation",
                    base_teacher_model=f"http://127.0.0.1:{port}/v1", epochs=1, dry_run=dry_run)
        assert info.value.field == "base_teacher_model" and "\n" not in str(info.value)
    assert len(tm.list_jobs()) == before
