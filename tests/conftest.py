"""Shared pytest fixtures. Each section is self-contained; add new ones as new sections."""

from __future__ import annotations

# ====================================================================== an isolated data folder
# The suite never touches the user's own jobs, models or datasets: for the whole
# session TUNING_MAGICS_HOME points at a temporary folder (tests that need a
# fresh registry set their own on top of it).
import pytest as _pytest


@_pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    mp = _pytest.MonkeyPatch()
    mp.setenv("TUNING_MAGICS_HOME", str(tmp_path_factory.mktemp("tuning-magics-home")))
    yield
    mp.undo()


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


@pytest.fixture(scope="session")
def gcs_emulator_server() -> Iterator[GcsEmulator]:
    """Start gcp-storage-emulator (in memory) for the session, with one bucket; stop it after."""
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("google.cloud.storage")
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
            pytest.fail(f"gcp-storage-emulator did not start:\n{log.read().decode(errors='replace')}")
        try:
            emulator = GcsEmulator(host=host, bucket="tuning-magics-test")
            emulator.client().create_bucket(emulator.bucket)
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
# been run without `[local]`), and returns the CompletedProcess.
_BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture
def without_extra(tmp_path):
    from tuning_magics.errors import EXTRAS

    def run(extra: str, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        blocked = {name.split(".")[0] for name in EXTRAS[extra]}
        if extra == "local":
            blocked.add("accelerate")
        site = tmp_path / f"without-{extra}"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(blocked)), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=tmp_path)

    return run
