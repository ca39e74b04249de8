"""``tuning_magics.check_setup()``: what a Vertex AI tutorial needs, checked before anything is spent.

Against the fake Vertex AI and the Cloud Storage emulator with the real SDKs: each
missing piece stops it with one line that names it, the fix and the page that
explains it, and the check only reads. Also: an open model that tunes on the local
engine because no project is set says so (the dry run's note, a warning at submission).
"""

from __future__ import annotations

import os
import time

import pandas as pd
import pytest

import tuning_magics as tm
from tuning_magics.errors import UserError

pytest.importorskip("google.genai")
pytest.importorskip("gcp_storage_emulator")

from tuning_magics.backends.vertex import client, setup  # noqa: E402

FRAME = pd.DataFrame({"prompt": [f"What is the capital of land {i}?" for i in range(12)],
                      "completion": [f"The capital of land {i} is City {i}." for i in range(12)]})


def _only_read(fake) -> None:
    """The check sent nothing but reads: one page of one tuning job."""
    assert all(r.method == "GET" for r in fake.requests), [(r.method, r.path) for r in fake.requests]
    listed = [r for r in fake.requests if r.path.endswith("/tuningJobs")]
    assert len(listed) <= 1 and all(r.query.get("pageSize") == ["1"] for r in listed)


def _stops(fake, page: str, *, field: str) -> str:
    """check_setup's one line, which ends with the page that explains the fix."""
    with pytest.raises(UserError) as info:
        tm.check_setup()
    message = str(info.value)
    assert "\n" not in message and message.endswith(f"(how: {page})"), message
    assert page.startswith("https://cloud.google.com/") and info.value.field == field
    _only_read(fake)
    return message


def test_a_ready_kernel_says_where_jobs_run_and_as_whom(vertex):
    found = tm.check_setup()
    assert (found.project, found.location) == ("fake-project", "us-central1")
    assert found.staging_bucket == f"gs://{vertex.bucket}/{vertex.staging}" and found.notes == ()
    text = str(found)
    assert text.startswith("ready for Vertex AI: project fake-project, location us-central1")
    assert found.staging_bucket in text and "google.oauth2.credentials.Credentials" in text
    assert vertex.token not in text and "roles/aiplatform.user" in text
    _only_read(vertex)
    assert [r.path for r in vertex.requests] == ["/v1beta1/projects/fake-project/locations/us-central1/tuningJobs"]
    assert vertex.bodies() == []


def test_no_project_is_one_line_before_anything_is_asked(vertex, monkeypatch):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT")
    message = _stops(vertex, setup.DOCS["project"], field="project")
    assert message.startswith("no Cloud project is set: tuning_magics.settings.update(project='my-project')")
    assert "open models tune on the local engine" in message and vertex.requests == []


def test_no_staging_bucket_is_one_line(vertex, monkeypatch):
    monkeypatch.delenv("TUNING_MAGICS_STAGING_BUCKET")
    message = _stops(vertex, setup.DOCS["staging_bucket"], field="staging_bucket")
    assert "no staging bucket is set" in message and "staging_bucket='gs://my-bucket/tuning'" in message
    assert vertex.requests == []


def test_no_credentials_names_the_command_and_the_page(vertex, monkeypatch):
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_adc(*args, **kwargs):
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", no_adc)  # whatever this machine has
    monkeypatch.setattr(client, "_ADC", {})
    tm.settings.update(credentials=None)
    message = _stops(vertex, setup.DOCS["credentials"], field="credentials")
    assert message.startswith("no Google Cloud credentials found for project fake-project: run `gcloud auth "
                              "application-default login`")
    assert vertex.requests == []


def test_refused_credentials_are_the_credentials_page(vertex):
    from google.oauth2.credentials import Credentials

    tm.settings.update(credentials=Credentials(token="ya29.not-the-fakes-token"))
    message = _stops(vertex, setup.DOCS["credentials"], field="credentials")
    assert "refused the credentials" in message and "not-the-fakes-token" not in message


def test_a_disabled_vertex_ai_api_names_the_command_that_enables_it(vertex):
    vertex.disable_api()
    message = _stops(vertex, setup.DOCS["vertex_api"], field="project")
    assert "the Vertex AI API is not enabled in project fake-project" in message
    assert "`gcloud services enable aiplatform.googleapis.com --project fake-project`" in message


def test_a_missing_role_names_roles_aiplatform_user(vertex):
    vertex.deny("aiplatform.tuningJobs.list")
    message = _stops(vertex, setup.DOCS["vertex_role"], field="credentials")
    assert "permission denied to list tuning jobs" in message and "roles/aiplatform.user" in message


def test_a_staging_bucket_that_does_not_exist_says_how_to_create_it(vertex, monkeypatch):
    monkeypatch.setenv("TUNING_MAGICS_STAGING_BUCKET", "gs://no-such-bucket-here/tuning")
    message = _stops(vertex, setup.DOCS["staging_bucket"], field="staging_bucket")
    assert message.startswith("staging_bucket: the bucket gs://no-such-bucket-here does not exist")
    assert "`gcloud storage buckets create gs://no-such-bucket-here --location=us-central1`" in message


@pytest.fixture
def storage_refusing(monkeypatch):
    """A Cloud Storage stand-in on 127.0.0.1 that answers every request 403 with ``refusing.message``.

    The body is Cloud Storage's JSON error shape ({"error": {"code", "message", "errors"}},
    cloud.google.com/storage/docs/json_api/v1/status-codes).
    """
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace

    refusing = SimpleNamespace(message="", seen=[])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            refusing.seen.append(self.path)
            body = json.dumps({"error": {"code": 403, "message": refusing.message,
                                         "errors": [{"message": refusing.message, "reason": "forbidden"}]}}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield refusing
    finally:
        server.shutdown()
        server.server_close()


def test_a_bucket_that_cannot_be_read_is_a_note_and_a_disabled_storage_api_a_stop(vertex, storage_refusing):
    """Cloud Storage answers 403 to a bucket read for a missing role and for a disabled API; only the API stops.

    An identity with roles/storage.objectAdmin alone may write objects but not read the
    bucket itself (storage.buckets.get), so that 403 cannot tell whether uploads work.
    """
    storage_refusing.message = ("notebook@fake-project.iam.gserviceaccount.com does not have storage.buckets.get "
                                "access to the Google Cloud Storage bucket.")
    found = tm.check_setup()
    assert len(found.notes) == 1 and "roles/storage.objectAdmin" in found.notes[0]
    assert "note: " + found.notes[0] in str(found) and storage_refusing.seen
    _only_read(vertex)
    vertex.requests.clear()  # the second check is counted on its own
    storage_refusing.message = ("Cloud Storage JSON API has not been used in project 123 before or it is disabled. "
                                "Enable it by visiting https://console.developers.google.com/apis/api/"
                                "storage-api.googleapis.com/overview?project=123 then retry.")
    message = _stops(vertex, setup.DOCS["storage_api"], field="project")
    assert "the Cloud Storage API is not enabled in project fake-project" in message
    assert "`gcloud services enable storage.googleapis.com --project fake-project`" in message


def test_without_the_vertex_extra_it_says_what_to_install(without_extra):
    done = without_extra("vertex", "import tuning_magics as tm\ntry:\n    tm.check_setup()\n"
                                   "except tm.UserError as err:\n    print(err)\n")
    assert done.returncode == 0, done.stderr
    assert 'pip install "tuning_magics[vertex]"' in done.stdout


# ====================================================================== open models without a project


@pytest.fixture
def no_project(monkeypatch, tmp_path):
    for name in ("GOOGLE_CLOUD_PROJECT", "TUNING_MAGICS_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no pyproject.toml with settings
    tm.settings.reset()
    return monkeypatch


def test_a_dry_run_that_goes_local_for_want_of_a_project_says_so(no_project):
    plan = tm.tune("llama-3.2-1b-instruct", FRAME, epochs=1, batch_size=1, dry_run=True)  # fits in 24 GiB
    assert plan.backend == "local"
    assert plan.notes[0] == ("meta/llama3-2@llama-3.2-1b-instruct runs on the local engine, not Vertex AI: no Cloud "
                             "project is set (tuning_magics.settings.update(project='my-project') or "
                             "GOOGLE_CLOUD_PROJECT); backend='local' keeps it there without this note")
    assert plan.notes[0] in str(plan).splitlines()
    # Said only where the choice was left to auto, and only for a model Vertex AI would take with a project.
    kept = tm.tune("llama-3.2-1b-instruct", FRAME, epochs=1, batch_size=1, backend="local", dry_run=True)
    assert not any("runs on the local engine" in n for n in kept.notes)
    assert not any("runs on" in n for n in tm.tune("local/tiny-qwen3", FRAME, epochs=1, dry_run=True).notes)
    no_project.setenv("TUNING_MAGICS_BACKEND", "local")
    assert not any("runs on" in n for n in tm.tune("llama-3.2-1b-instruct", FRAME, epochs=1, batch_size=1,
                                                   dry_run=True).notes)


def test_a_submission_that_goes_local_for_want_of_a_project_warns_in_one_line(no_project, tmp_path):
    import psutil

    from tuning_magics.backends.local import registry, scheduler
    from tuning_magics.jobs import JOB_STATE_QUEUED, JOB_STATE_RUNNING

    # One local slot, held by this very process: the job stays queued and no worker starts.
    no_project.setenv("TUNING_MAGICS_HOME", str(tmp_path / "home"))
    no_project.setenv(scheduler.CONCURRENCY_ENV, "1")
    registry.insert(registry.JobRecord(id="tune-busy", config={"base_model": "local/tiny-qwen3"},
                                       state=JOB_STATE_RUNNING, output_dir=str(tmp_path / "busy"),
                                       created=time.time(), pid=os.getpid(),
                                       pid_started=psutil.Process().create_time(), started=time.time()))
    with pytest.warns(UserWarning) as caught:
        job = tm.tune("llama-3.2-1b-instruct", FRAME, epochs=1, batch_size=1)
    try:
        assert job.backend == "local" and job.state == JOB_STATE_QUEUED
        said = [str(w.message) for w in caught if "runs on the local engine" in str(w.message)]
        assert len(said) == 1 and "\n" not in said[0] and "no Cloud project is set" in said[0]
    finally:
        job.cancel()
