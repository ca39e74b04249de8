"""Shared pytest fixtures. Each section is self-contained; add new ones as new sections."""

from __future__ import annotations

import contextlib as _contextlib

# ====================================================================== an isolated data folder
# The suite never touches the user's own jobs, models or datasets: for the whole
# session TUNING_MAGICS_HOME points at a temporary folder (tests that need a
# fresh registry set their own on top of it).
import os as _os
import sys as _sys
import time as _time

import pytest as _pytest

# Application Default Credentials look for a GCE metadata server when nothing else is
# set up; the suite sends traffic only to 127.0.0.1, so that lookup is off (and would
# land on a closed local port). Set before google-auth is imported: it reads them once.
_os.environ["NO_GCE_CHECK"] = "true"
_os.environ["GCE_METADATA_HOST"] = _os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"


@_pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    mp = _pytest.MonkeyPatch()
    mp.setenv("TUNING_MAGICS_HOME", str(tmp_path_factory.mktemp("tuning-magics-home")))
    yield
    mp.undo()


@_pytest.fixture(scope="module", autouse=True)
def _no_worker_outlives_its_module(request):
    """A local job's worker a test module started and left running is stopped when the module ends, and named.

    A worker left behind holds the local engine's one slot and a CPU core: the
    modules and notebooks after it would queue behind it until they time out.
    """
    yield
    scheduler = _sys.modules.get("tuning_magics.backends.local.scheduler")
    if scheduler is None:
        return
    scheduler.poll_children()
    # A worker whose job has just ended exits by itself a moment later (it closes its files and moves the
    # queue on): give each a few seconds to, and stop only those still running then.
    deadline = _time.monotonic() + 10
    left = []
    for pid, proc in list(scheduler._children.items()):
        try:
            proc.wait(timeout=max(0.0, deadline - _time.monotonic()))
        except Exception:
            left.append((pid, proc))
    for pid, proc in left:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
            proc.wait()
    scheduler.poll_children()
    if left:
        import warnings

        warnings.warn(f"{request.node.nodeid} left {len(left)} local worker(s) running (pids "
                      f"{', '.join(str(pid) for pid, _ in left)}); they were stopped", _pytest.PytestWarning)


# ====================================================================== Cloud Storage emulator
# A real gcp-storage-emulator server on 127.0.0.1, started once per session in a
# subprocess and stopped at the end; tests that request ``gcs_emulator`` get
# STORAGE_EMULATOR_HOST set for their duration only, so the real
# google-cloud-storage client (and tuning_magics.storage) talk to it.
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: its URL, a ready bucket and a client for it."""

    host: str  # "http://127.0.0.1:PORT", the value of STORAGE_EMULATOR_HOST
    bucket: str

    def client(self):
        """A google-cloud-storage client talking to this emulator."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        saved = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.host  # read when the client is built
        try:
            return storage.Client(project="test", credentials=AnonymousCredentials())
        finally:
            if saved is None:
                del os.environ["STORAGE_EMULATOR_HOST"]
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = saved

    def uri(self, name: str = "data.jsonl") -> str:
        """A fresh ``gs://`` URI in the bucket, unique to the caller."""
        return f"gs://{self.bucket}/{uuid.uuid4().hex}/{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_gcs_emulator(bucket: str = "tuning-magics-test") -> tuple[GcsEmulator, subprocess.Popen]:
    """Start gcp-storage-emulator (in memory) on a free port of 127.0.0.1 with ``bucket`` made.

    Returns the emulator and its process; stop it with ``stop_gcs_emulator(proc)``.
    Raises RuntimeError, with the emulator's output, when it does not start.
    Shared by the ``gcs_emulator_server`` fixture and the notebooks' harness.
    """
    with tempfile.TemporaryFile() as log:
        for _attempt in range(3):  # the free port may be taken before the server binds it
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "gcp_storage_emulator", "start",
                 "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            host = f"http://127.0.0.1:{port}"
            if _wait_until_up(proc, f"{host}/storage/v1/b"):
                break
            _stop(proc)
        else:
            log.seek(0)
            raise RuntimeError(f"gcp-storage-emulator did not start:\n{log.read().decode(errors='replace')}")
    emulator = GcsEmulator(host=host, bucket=bucket)
    try:
        emulator.client().create_bucket(emulator.bucket)
    except BaseException:
        _stop(proc)
        raise
    return emulator, proc


stop_gcs_emulator = _stop


@pytest.fixture(scope="session")
def gcs_emulator_server() -> Iterator[GcsEmulator]:
    """Start gcp-storage-emulator (in memory) for the session, with one bucket; stop it after."""
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("google.cloud.storage")
    try:
        emulator, proc = start_gcs_emulator()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield emulator
    finally:
        _stop(proc)


@pytest.fixture
def gcs_emulator(gcs_emulator_server: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> GcsEmulator:
    """The session's emulator, with STORAGE_EMULATOR_HOST set for this test only."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator_server.host)
    return gcs_emulator_server


# ====================================================================== an install without an extra
# ``without_extra("local")`` runs Python code in a fresh interpreter in which the
# packages of that extra cannot be imported (as if `pip install tuning_magics` had
# been run without `[local]`), and returns the CompletedProcess. ``modules=[...]``
# blocks only those (one package of the extra missing).
_BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


@_contextlib.contextmanager
def tmpfs(mount, options: str):
    """A real tmpfs mounted at ``mount`` for the block (the test is skipped where mounting is not allowed)."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def without_extra(tmp_path):
    from tuning_magics.errors import EXTRAS

    def run(extra: str, code: str, *args: str, timeout: float = 120, modules=None) -> subprocess.CompletedProcess:
        blocked = {name.split(".")[0] for name in modules or EXTRAS[extra]}
        if extra == "local" and modules is None:
            blocked.add("accelerate")
        site = tmp_path / f"without-{extra}"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(blocked)), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=tmp_path)

    return run


# ====================================================================== a tuned tiny model
# ``tuned_tiny_model``: local/tiny-qwen3 fully tuned, once per session, on
# ``invented_facts()`` (64 made-up capitals, 50 epochs, the first 8 as validation
# set), so it answers them exactly. For tests that need a tuned model rather than
# test training: chat, serving, distillation teachers, continuation. Treat its
# folders as read-only.
import json as _json
import random as _random
from pathlib import Path as _Path

TUNED_FACT_EPOCHS = 50


def invented_facts(n: int = 64, seed: int = 7) -> list[tuple[str, str]]:
    """``n`` made-up countries with made-up capitals (question, answer), the same every time."""
    rng = _random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"

    def word(syllables: int) -> str:
        return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)).capitalize()

    seen: set[str] = set()
    out = []
    while len(out) < n:
        country = word(3)
        if country not in seen:
            seen.add(country)
            out.append((f"What is the capital of {country}?", word(2) + rng.choice(consonants)))
    return out


def write_facts_jsonl(path, facts, fmt: str = "chat") -> str:
    """Write (question, answer) pairs as JSONL: ``chat`` messages, ``prompt``/completion or GenerateContent (``gc``)."""
    with open(path, "w", encoding="utf-8") as fh:
        for q, a in facts:
            if fmt == "chat":
                rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            elif fmt == "prompt":
                rec = {"prompt": q, "completion": a}
            else:
                rec = {"contents": [{"role": "user", "parts": [{"text": q}]}, {"role": "model", "parts": [{"text": a}]}]}
            fh.write(_json.dumps(rec) + "\n")
    return str(path)


@dataclass(frozen=True)
class TunedTinyModel:
    """The session's tuned tiny model: its final checkpoint, its job folder and what it was trained on."""

    final_dir: str  # <output_dir>/postprocess/node-0/checkpoints/final: a Hugging Face folder
    output_dir: str  # the job folder: metrics.jsonl, checkpoints
    facts: list  # the (question, answer) pairs it learned
    config: object  # the TrainConfig
    result: object  # the TrainResult
    events: list  # every on_event dict of the run


@pytest.fixture(scope="session")
def tuned_tiny_model(tmp_path_factory) -> TunedTinyModel:
    """local/tiny-qwen3, FULL, tuned on ``invented_facts()`` for TUNED_FACT_EPOCHS epochs (once per session)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tuning_magics.backends.local.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("tuned-tiny-model")
    facts = invented_facts()
    events: list = []
    cfg = TrainConfig(base_model="local/tiny-qwen3", train_path=write_facts_jsonl(root / "train.jsonl", facts),
                      validation_path=write_facts_jsonl(root / "val.jsonl", facts[:8], fmt="prompt"),
                      output_dir=str(root / "job"), epochs=TUNED_FACT_EPOCHS, batch_size=8)
    result = train(cfg, on_event=events.append)
    return TunedTinyModel(str(_Path(result.final_dir)), cfg.output_dir, facts, cfg, result, events)


# ====================================================================== a scripted OpenAI endpoint
# ``scripted_endpoint(answer)`` serves GET /v1/models and POST /v1/chat/completions on
# 127.0.0.1 from a thread, for client and distillation tests that need no model.
# ``answer(body, attempt)`` returns the reply text, an int (that HTTP error), or a float
# (send the headers and the start of the body, then stall that many seconds); ``attempt``
# counts the requests for the same last message. ``events`` are sent as the server-sent
# events of a streaming request. Each request is recorded in ``seen`` as (body, Authorization).
import threading as _threading
from http.server import BaseHTTPRequestHandler as _BaseHandler
from http.server import ThreadingHTTPServer as _ThreadingHTTPServer


class ScriptedEndpoint:
    """A scripted OpenAI-compatible endpoint; ``url`` is its ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, answer, *, models=("m1",), models_status: int = 200, events: list[str] | None = None):
        self.seen: list[tuple[dict, str | None]] = []
        self.calls: dict[str, int] = {}
        lock = _threading.Lock()
        outer = self

        class Handler(_BaseHandler):
            def log_message(self, *a):
                pass

            def _json(self, status, payload):
                data = _json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if models_status != 200:
                    self._json(models_status, {"error": {"message": f"scripted {models_status} for "
                                                                f"{self.headers.get('Authorization')}"}})
                else:  # a name is a model id; a dict is sent as it is (even a malformed one)
                    self._json(200, {"object": "list",
                                     "data": [m if isinstance(m, dict) else {"id": m} for m in models]})

            def do_POST(self):
                body = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                last = str(body["messages"][-1]["content"])
                with lock:
                    outer.calls[last] = attempt = outer.calls.get(last, 0) + 1
                    outer.seen.append((body, self.headers.get("Authorization")))
                reply = answer(body, attempt)
                if isinstance(reply, float):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b'{"choices"')
                    self.wfile.flush()
                    time.sleep(reply)
                elif isinstance(reply, int):
                    self._json(reply, {"error": {"message": f"scripted {reply}"}})
                elif body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for event in events or []:
                        self.wfile.write(f"data: {event}\n\n".encode())
                    self.close_connection = True
                else:
                    self._json(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

        self.httpd = _ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        _threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted_endpoint():
    """Make ScriptedEndpoints (same arguments); all are stopped after the test."""
    made = []

    def make(answer, **kw):
        made.append(ScriptedEndpoint(answer, **kw))
        return made[-1]

    yield make
    for endpoint in made:
        endpoint.close()


# ====================================================================== Cloud Storage with faults
# ``gcs_faults``: a FaultProxy (tests/gcs_proxy.py) on 127.0.0.1 in front of the
# session's Cloud Storage emulator, with STORAGE_EMULATOR_HOST pointing at the proxy
# for this test only. Script faults with ``gcs_faults.inject("drop" | "reset" |
# "reset_mid_body" | "lose_response" | "delay" | 503, match=..., times=N, skip=K,
# seconds=S)``; read what happened from ``seen``, ``requests(match)``, ``count(match)``
# and ``faults``. ``uri(name)`` gives a fresh gs:// URI in the emulator's bucket. The
# proxy enforces ifGenerationMatch preconditions, which the emulator ignores.


@pytest.fixture
def gcs_faults(gcs_emulator_server, monkeypatch: pytest.MonkeyPatch):
    """A fault-injecting proxy in front of the emulator; the module's Cloud Storage calls go through it."""
    from gcs_proxy import FaultProxy

    proxy = FaultProxy(gcs_emulator_server.host, bucket=gcs_emulator_server.bucket)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.host)
    try:
        yield proxy
    finally:
        proxy.close()


# ====================================================================== a fake Vertex AI
# ``fake_vertex``: a tests/fake_vertex.FakeVertex on 127.0.0.1 for one test (fresh jobs,
# recorded requests and scripted failures each time), reading datasets from and writing
# outputs to the Cloud Storage emulator. tuning_magics is pointed at it through the
# environment: TUNING_MAGICS_API_ENDPOINT, GOOGLE_CLOUD_PROJECT=fake-project,
# GOOGLE_CLOUD_LOCATION=us-central1 and TUNING_MAGICS_STAGING_BUCKET=gs://<bucket>/staging.
# Credentials for the SDKs: ``fake_vertex.credentials()`` (a static bearer token).


def finish(fake, job, limit=30):
    """A Vertex AI job on the fake run to its end: refresh it, moving the fake's clock a step each time, until it ends."""
    for _ in range(limit):
        if job.refresh().done:
            return job
        fake.advance(fake.step_seconds)
    raise AssertionError(f"{job.name} did not end: {job.state}")


@pytest.fixture
def fake_vertex(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch):
    """A running FakeVertex for this test, with the environment pointing tuning_magics at it."""
    from fake_vertex import FakeVertex

    fake = FakeVertex(gcs_emulator.host).start()
    fake.bucket = gcs_emulator.bucket
    monkeypatch.setenv("TUNING_MAGICS_API_ENDPOINT", fake.url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "fake-project")
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "us-central1")
    monkeypatch.setenv("TUNING_MAGICS_STAGING_BUCKET", f"gs://{gcs_emulator.bucket}/staging")
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def vertex(fake_vertex, monkeypatch: pytest.MonkeyPatch):
    """``fake_vertex`` with tuning_magics signed in to it (its static token) and a staging folder of the test's own.

    ``vertex.staging`` names that folder under the emulator's bucket, which outlives the test.
    """
    import tuning_magics as tm

    fake_vertex.staging = f"staging-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TUNING_MAGICS_STAGING_BUCKET", f"gs://{fake_vertex.bucket}/{fake_vertex.staging}")
    tm.settings.update(credentials=fake_vertex.credentials())
    try:
        yield fake_vertex
    finally:
        tm.settings.update(credentials=None)


# ====================================================================== a Hugging Face cache with a tokenizer
# ``hf_cache(repo_id, chat_template)``: a Hugging Face hub cache in the test's folder holding the
# project's byte tokenizer under ``repo_id`` (with that chat template), the way a downloaded catalog
# model's tokenizer sits in the cache; the hub's cache path points at it and the token counter's
# tokenizer cache is cleared before and after. Returns the tokenizer loaded from its snapshot.


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from huggingface_hub import constants

    from tuning_magics.datasets import tokenizer as T
    from tuning_magics.datasets import tokens

    def make(repo_id: str, chat_template: str | None = None):
        repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / "0123456789abcdef"
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123456789abcdef")
        tok = T.build_tokenizer()
        if chat_template is not None:
            tok.chat_template = chat_template
        tok.save_pretrained(snapshot)
        (snapshot / "config.json").write_text("{}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        tokens._tokenizer_for.cache_clear()
        return T.load_offline(str(snapshot))

    yield make
    tokens._tokenizer_for.cache_clear()


# ====================================================================== a fresh virtualenv with the repository
# ``fresh_venv(tmp_path)``: the repository's tracked files copied to ``tmp_path/repo`` (no .venv, no
# outputs: what a clone or Binder sees) and a new virtualenv at ``tmp_path/venv``; returns
# ``(repo, bin folder, environment)`` with the venv first on PATH and its own TUNING_MAGICS_HOME.
# ``run_ok(command, cwd=, env=, timeout=)`` runs a command there and fails the test with its output.

REPO_ROOT = _Path(__file__).resolve().parent.parent


def run_ok(command, *, cwd, env, timeout):
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
    return done


def fresh_venv(tmp_path):
    import shutil

    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, (f.decode() for f in files.split(b"\0"))):
        if (REPO_ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, repo / name)
    venv = tmp_path / "venv"
    run_ok([sys.executable, "-m", "venv", str(venv)], cwd=repo, env=os.environ, timeout=120)
    bin_ = venv / "bin"
    env = dict(os.environ, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv),
               TUNING_MAGICS_HOME=str(tmp_path / "home"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    return repo, bin_, env
