"""The harness that runs the Vertex AI tutorials (``vertex_*.ipynb``) under nbval without a cloud project.

The tutorials are written for a real Google Cloud project: they read the project,
location and staging bucket from the environment and sign in with Application
Default Credentials. For each such notebook, before nbval starts its kernel, this
harness starts, all on 127.0.0.1:

- the Cloud Storage emulator (``tests/conftest.py``'s ``start_gcs_emulator``),
- a fake Vertex AI REST API (``tests/fake_vertex.py``) whose jobs move quickly,
- the notebook VM's metadata server, which hands out the fake's token, as the
  metadata server of a Vertex AI Workbench or Colab Enterprise VM hands out
  the VM's service account token,

and sets the environment the kernel inherits (``GOOGLE_CLOUD_PROJECT``,
``GOOGLE_CLOUD_LOCATION``, ``TUNING_MAGICS_STAGING_BUCKET``,
``TUNING_MAGICS_API_ENDPOINT``, ``STORAGE_EMULATOR_HOST``, ``GCE_METADATA_HOST``
and ``GCE_METADATA_IP``, an empty ``CLOUDSDK_CONFIG``, a fresh
``TUNING_MAGICS_HOME``; no ``GOOGLE_APPLICATION_CREDENTIALS``, no ``NO_GCE_CHECK``),
so the notebooks go through the product's real Application Default Credentials
path, the one it takes on a notebook VM (``tm.check_setup()``, their first cell,
finds the project, the bucket, the VM's service account and the fake API). (An ``authorized_user`` credentials file
cannot stand in: google-auth always sends its refresh to oauth2.googleapis.com,
whatever ``token_uri`` the file names.) After the notebook's last cell (its kernel
stopped), the harness fails the notebook if an endpoint it deployed is still
there (a tutorial deletes what bills by the hour in its last cell, so Run All leaves
nothing running), then the servers are stopped and the environment is restored:
other notebooks (the quickstart) never see any of it.

The quickstart runs with a Cloud project set and no credentials at all, as on a
Workbench kernel whose user never signed in: local work must not need the cloud.
Every notebook starts with a ``TUNING_MAGICS_HOME`` of its own, as a new user's: a job
the test run left behind never holds up a tutorial's queue.

``vertex_environment()`` is the same as a context manager, for executing the
tutorials outside pytest (``jupyter nbconvert --execute`` under it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
#: The notebooks this harness serves.
PATTERN = "vertex_*.ipynb"
#: The names the tutorials' own text uses as examples, so what the stand-ins print reads the same.
PROJECT, LOCATION, BUCKET = "my-project", "us-central1", "my-bucket"
#: Seconds per phase of a fake job (quota, dataset, capacity, tuning, post-processing) and per deployment.
STEP_SECONDS, DEPLOY_SECONDS = 0.3, 0.2


def _tests_module(name: str, filename: str):
    """A module of tests/ loaded under its own name (tests/conftest.py would clash with this conftest's name)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class MetadataServer:
    """The Compute Engine metadata server of a notebook VM, on 127.0.0.1: it hands out ``token`` for ``project``.

    On Vertex AI Workbench and Colab Enterprise, Application Default Credentials
    come from the VM's metadata server; google-auth finds this one through
    ``GCE_METADATA_HOST`` / ``GCE_METADATA_IP``, exactly as it finds the real one.
    """

    def __init__(self, token: str, project: str, email: str):
        outer = self
        self.tokens = 0
        account = {"email": email, "aliases": ["default"],
                   "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, content_type: str = "application/json"):
                data = (json.dumps(body) if content_type == "application/json" else str(body)).encode()
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._send(403, "Missing Metadata-Flavor:Google header.", "text/html")
                elif path in ("", "/"):
                    self._send(200, "computeMetadata/", "application/text")
                elif path == "/computeMetadata/v1/project/project-id":
                    self._send(200, project, "application/text")
                elif path == "/computeMetadata/v1/universe/universe-domain":
                    self._send(200, "googleapis.com", "application/text")
                elif path in ("/computeMetadata/v1/instance/service-accounts/default/",
                              f"/computeMetadata/v1/instance/service-accounts/{email}/"):
                    self._send(200, account)
                elif path in ("/computeMetadata/v1/instance/service-accounts/default/token",
                              f"/computeMetadata/v1/instance/service-accounts/{email}/token"):
                    outer.tokens += 1
                    self._send(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})
                else:
                    self._send(404, "Not Found", "text/html")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, name="metadata-server", daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def vertex_environment():
    """Start the emulator, the fake API and the metadata server, set the environment; undo it all on exit.

    Yields the FakeVertex (``.url``, ``.jobs``, ``.requests``, ``.bucket``).
    """
    saved = dict(os.environ)  # importing the helpers sets variables too: all are restored
    helpers = _tests_module("_tm_tests_conftest", "conftest.py")
    stack = contextlib.ExitStack()
    try:
        emulator, proc = helpers.start_gcs_emulator(BUCKET)
        stack.callback(helpers.stop_gcs_emulator, proc)
        fake_vertex = _tests_module("_tm_fake_vertex", "fake_vertex.py")
        fake = fake_vertex.FakeVertex(emulator.host, step_seconds=STEP_SECONDS, deploy_seconds=DEPLOY_SECONDS)
        fake.bucket = emulator.bucket
        fake.start()
        stack.callback(fake.stop)
        metadata = MetadataServer(fake.token, PROJECT, f"notebook@{PROJECT}.iam.gserviceaccount.com")
        stack.callback(metadata.close)
        scratch = Path(tempfile.mkdtemp(prefix="tuning-magics-vertex-notebook-"))
        stack.callback(shutil.rmtree, scratch, True)
        (scratch / "gcloud").mkdir()
        (scratch / "home").mkdir()
        for name in ("GOOGLE_APPLICATION_CREDENTIALS", "NO_GCE_CHECK", "TUNING_MAGICS_BACKEND",
                     "GOOGLE_CLOUD_QUOTA_PROJECT", "GCE_METADATA_MTLS_MODE"):
            os.environ.pop(name, None)
        os.environ.update({
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "GOOGLE_CLOUD_LOCATION": LOCATION,
            "TUNING_MAGICS_STAGING_BUCKET": f"gs://{BUCKET}/tuning",
            "TUNING_MAGICS_API_ENDPOINT": fake.url,
            "STORAGE_EMULATOR_HOST": emulator.host,
            # Application Default Credentials as on a notebook VM: no credentials file, no gcloud login
            # (an empty gcloud folder), the VM's metadata server.
            "CLOUDSDK_CONFIG": str(scratch / "gcloud"),
            "GCE_METADATA_HOST": metadata.host,
            "GCE_METADATA_IP": metadata.host,
            "TUNING_MAGICS_HOME": str(scratch / "home"),
        })
        yield fake
    finally:
        try:
            stack.close()
        finally:
            os.environ.clear()
            os.environ.update(saved)


@contextlib.contextmanager
def project_without_credentials():
    """A kernel with a Cloud project set (as on every Workbench) and no credentials at all.

    The quickstart runs on the local engine there unchanged: a Cloud project must
    not stop local work.
    """
    saved = dict(os.environ)
    scratch = Path(tempfile.mkdtemp(prefix="tuning-magics-no-credentials-"))
    try:
        os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        os.environ.update({"GOOGLE_CLOUD_PROJECT": PROJECT, "CLOUDSDK_CONFIG": str(scratch), "NO_GCE_CHECK": "true",
                           "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"})
        with fresh_home():
            yield
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def fresh_home():
    """A ``TUNING_MAGICS_HOME`` of the notebook's own, as a new user has: no job of the test run holds its queue."""
    saved = os.environ.get("TUNING_MAGICS_HOME")
    home = Path(tempfile.mkdtemp(prefix="tuning-magics-notebook-home-"))
    os.environ["TUNING_MAGICS_HOME"] = str(home)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TUNING_MAGICS_HOME", None)
        else:
            os.environ["TUNING_MAGICS_HOME"] = saved
        shutil.rmtree(home, ignore_errors=True)


def _environment_for(node):
    """The environment a notebook's kernel starts in, or None for the test run's own."""
    path = Path(str(getattr(node, "path", None) or getattr(node, "fspath", "")))
    if path.suffix != ".ipynb":
        return None
    if path.match(PATTERN):
        pytest.importorskip("gcp_storage_emulator")
        pytest.importorskip("google.genai")
        return vertex_environment()
    if path.name == "quickstart.ipynb":
        return project_without_credentials()
    return fresh_home()


_RUNNING: dict = {}  # notebook file collector -> (its open environment, the FakeVertex or None)


def left_deployed(fake) -> list[str]:
    """The endpoints a notebook deployed (Model Garden, billed by the hour) that are still there."""
    return sorted(name for name, info in fake.endpoints.items() if info.get("kind") == "open")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the first cell of a notebook (whose setup starts the kernel), set up its environment."""
    notebook = item.parent
    if notebook is None or notebook in _RUNNING:
        return
    env = _environment_for(notebook)
    if env is None:
        return
    _RUNNING[notebook] = (env, env.__enter__())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the notebook's last cell and its kernel have stopped: nothing left billing, then stop its servers."""
    left: list[str] = []
    try:
        result = yield
    finally:
        notebook = item.parent
        if notebook in _RUNNING and (nextitem is None or nextitem.parent is not notebook):
            env, fake = _RUNNING.pop(notebook)
            left = left_deployed(fake) if fake is not None else []
            env.__exit__(None, None, None)
    if left:
        pytest.fail(f"{Path(str(item.parent.path)).name} left {len(left)} endpoint(s) deployed after its last cell "
                    f"({', '.join(left)}): a tutorial deletes what it deploys in its last cell", pytrace=False)
    return result


def pytest_sessionfinish(session):
    """Whatever stopped the run early, nothing is left running."""
    while _RUNNING:
        _RUNNING.popitem()[1][0].__exit__(None, None, None)
