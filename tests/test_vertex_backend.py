"""The Vertex AI backend, end to end: tuning_magics' tune() / get_job() / list_jobs() through the real
google-genai client against the fake Vertex AI API (tests/fake_vertex.py) and the Cloud Storage emulator."""

from __future__ import annotations

import io
import re
import json
import time
import warnings
from types import SimpleNamespace
from contextlib import redirect_stderr, redirect_stdout

import pandas as pd
import pytest

import tuning_magics as tm
from tuning_magics.errors import UserError
from tuning_magics.jobs import JobFailedError

pytest.importorskip("google.genai")

from fake_vertex import CHAT, PROMPTS, TEACHER, hand_written_bodies  # noqa: E402

FRAME = pd.DataFrame({"question": [f"What is the capital of land {i}?" for i in range(12)],
                      "answer": [f"City {i}." for i in range(12)]})  # fmt: skip


@pytest.fixture
def data(vertex):
    return {"train": vertex.put(vertex.uri("train.jsonl"), CHAT),
            "validation": vertex.put(vertex.uri("validation.jsonl"), CHAT[:4]),
            "prompts": vertex.put(vertex.uri("prompts.jsonl"), PROMPTS),
            "output": f"gs://{vertex.bucket}/out-{time.time_ns()}",
            "custom": f"gs://{vertex.bucket}/custom-llama"}  # fmt: skip


def staged(fake, prefix=""):
    """The objects the test staged, under its own staging folder."""
    prefix = f"{fake.staging}/{prefix}"
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials())
    return sorted(b.name for b in client.list_blobs(fake.bucket, prefix=prefix))


def walk(fake, job, limit=30):
    """Refresh the job, moving the fake's clock a step each time, until it ends; returns the (state, substate) seen.

    A look the fake answered 429 (every 5th GET of a job) leaves the last snapshot and says so in
    ``job.retrying``: the clock moves on only after a look that got through.
    """
    seen = []
    for _ in range(limit):
        job.refresh()
        if job.retrying:
            continue
        seen.append((job.state, job.substate))
        if job.done or job.state == "JOB_STATE_PAUSED":
            break
        fake.advance(fake.step_seconds)
    return seen


# ====================================================================== the seeds' calls


def test_the_seed_calls_send_exactly_what_google_genai_sends_for_them_by_hand(vertex, data):
    hand = hand_written_bodies(vertex, train_uri=data["train"], validation_uri=data["validation"],
                               output_uri=data["output"], custom_base_model=data["custom"])  # fmt: skip
    # The first seed's sft.train call, unchanged: SourceModel carries the custom checkpoint.
    source = SimpleNamespace(base_model="meta/llama3_1@llama-3.1-8b", custom_base_model=data["custom"])
    llama = tm.tune(source_model=source, tuning_mode="FULL", epochs=3, train_dataset=data["train"],
                    validation_dataset=data["validation"], output_uri=data["output"])
    qwen = tm.tune(base_model="qwen/qwen3@qwen3-4b", training_dataset=data["train"], method="DISTILLATION",
                   base_teacher_model=TEACHER, epoch_count=3, validation_dataset=data["validation"],
                   output_uri=data["output"])
    gemini = tm.tune("gemini-2.5-flash", data["train"], epochs=3, adapter_size=4, learning_rate_multiplier=1.0,
                     validation_dataset=data["validation"])
    ours = vertex.bodies()[-3:]
    for key, body, job in zip(("llama_sft", "qwen_distillation", "gemini_sft"), ours, (llama, qwen, gemini)):
        labels = body.pop("labels")
        assert body == hand[key], key  # field by field: the SDK built both
        assert labels["tuning-magics"] == tm.__version__.replace(".", "-")
        assert job.backend == "vertex" and re.fullmatch(r"projects/\d+/locations/us-central1/tuningJobs/\d+", job.name)


def test_dry_run_shows_the_body_it_would_send_and_uploads_and_submits_nothing(vertex):
    plan = tm.tune("gemini-2.5-flash", FRAME, epochs=2, adapter_size=4, tuned_model_display_name="capitals",
                   labels={"team": "geo"}, dry_run=True)
    assert vertex.bodies() == [] and staged(vertex) == []
    assert plan.backend == "vertex" and plan.model == "gemini-2.5-flash"
    assert plan.request["baseModel"] == "gemini-2.5-flash"
    assert plan.request["supervisedTuningSpec"]["hyperParameters"] == {"epochCount": 2, "adapterSize": "ADAPTER_SIZE_FOUR"}
    uri = plan.request["supervisedTuningSpec"]["trainingDatasetUri"]
    assert uri.startswith(f"gs://{vertex.bucket}/{vertex.staging}/datasets/sha256-") and uri.endswith(".jsonl")
    assert plan.billed_tokens == plan.predicted_stats["billable_tokens"] > 0
    assert plan.cost_usd == round(plan.billed_tokens / 1e6 * tm.catalog.get("gemini-2.5-flash").price_per_million_tokens, 2)
    assert "nothing was uploaded or submitted" in str(plan) and uri in str(plan)

    job = tm.tune("gemini-2.5-flash", FRAME, epochs=2, adapter_size=4, tuned_model_display_name="capitals",
                  labels={"team": "geo"})
    assert vertex.bodies() == [plan.request]  # what the dry run showed is what was sent
    assert staged(vertex) == [uri.split("/", 3)[3]]
    assert job.display_name == "capitals"


def test_a_dry_run_looks_at_the_buckets_it_would_write_to(vertex, monkeypatch):
    monkeypatch.setenv("TUNING_MAGICS_STAGING_BUCKET", "gs://no-such-bucket-here/staging")
    with pytest.raises(UserError) as info:
        tm.tune("gemini-2.5-flash", FRAME, epochs=1, dry_run=True)
    assert info.value.field == "staging_bucket" and "gs://no-such-bucket-here does not exist" in str(info.value)
    monkeypatch.setenv("TUNING_MAGICS_STAGING_BUCKET", f"gs://{vertex.bucket}/{vertex.staging}")
    with pytest.raises(UserError) as info:
        tm.tune("qwen3-4b", FRAME, epochs=1, output_uri="gs://no-output-bucket/out", dry_run=True)
    assert info.value.field == "output_uri" and "gs://no-output-bucket does not exist" in str(info.value)
    assert tm.tune("qwen3-4b", FRAME, epochs=1, dry_run=True).backend == "vertex"
    assert vertex.bodies() == [] and staged(vertex) == []


def test_an_open_models_validation_set_over_a_quarter_of_the_training_bytes_is_refused_before_upload(vertex):
    held_out = FRAME.head(4).assign(answer=lambda f: f["answer"] + " And a much longer answer than before.")
    for dry_run in (True, False):
        with pytest.raises(UserError) as info:
            tm.tune("qwen3-4b", FRAME, validation_dataset=held_out, epochs=1, dry_run=dry_run)
        assert info.value.field == "validation_dataset" and "at most 25%" in str(info.value)
    assert vertex.bodies() == [] and staged(vertex) == []
    tm.tune("qwen3-4b", FRAME, validation_dataset=FRAME.head(2), epochs=1)  # 2 of 12 rows: well under
    assert len(vertex.bodies()) == 1


def test_local_data_is_uploaded_once_under_a_name_made_from_its_content(vertex):
    first = tm.tune("gemini-2.5-flash", FRAME, epochs=1)
    again = tm.tune("gemini-2.5-flash", FRAME.copy(), epochs=1)
    other = tm.tune("gemini-2.5-flash", FRAME.head(6), epochs=1)
    uris = [b["supervisedTuningSpec"]["trainingDatasetUri"] for b in vertex.bodies()]
    assert uris[0] == uris[1] != uris[2]
    assert len(staged(vertex, "datasets/")) == 2
    digest = uris[0].rsplit("/sha256-", 1)[1][:32]
    assert first.config["labels"]["tm-dataset"] == digest == again.config["labels"]["tm-dataset"]
    assert other.config["labels"]["tm-dataset"] != digest


# ====================================================================== watching


def test_an_open_model_job_is_watched_through_the_services_substates_to_its_checkpoints(vertex, data):
    vertex.step_seconds = 60  # the job moves only when the test moves the fake's clock
    job = tm.tune("meta/llama3_1@llama-3.1-8b", data["train"], tuning_mode="PEFT_ADAPTER", epochs=3,
                  output_uri=data["output"])
    assert job.state in ("JOB_STATE_PENDING", "JOB_STATE_QUEUED") and job.checkpoints == []
    seen = walk(vertex, job)
    substates = [s for _, s in seen if s]
    for expected in ("WAITING_FOR_QUOTA", "PROCESSING_DATASET", "TUNING", "POST_PROCESSING"):
        assert expected in substates
    assert job.state == "JOB_STATE_SUCCEEDED" and job.substate is None and job.succeeded
    assert job.queued_seconds > 0
    progress = job.progress()
    assert progress.step == progress.total_steps > 0 and progress.fraction == 1.0 and progress.epochs == 3
    names = [c.name for c in job.checkpoints]
    assert names[-1] == "final" and len(names) == 4 and all(n.startswith("checkpoint-") for n in names[:-1])
    steps = [c.step for c in job.checkpoints[:-1]]
    assert steps == sorted(steps)
    assert job.tuned_model == f"{data['output']}/postprocess/node-0/checkpoints/final"
    stats = job.data_stats()
    assert stats.loc["examples", "service"] == len(CHAT)
    assert stats.loc["examples", "predicted"] == len(CHAT) and not stats.loc["examples", "differs"]
    assert stats.loc["billable_tokens", "service"] > 0
    assert stats.loc["truncated_examples", "service"] == 0  # counted: proto3 JSON leaves the 0 out
    frame = job.metrics()
    assert list(frame.columns[:3]) == ["step", "epoch", "train_loss"] and frame["train_loss"].notna().any()
    # A job read back by name in another session says the same.
    again = tm.get_job(job.name)
    assert again.config["base_model"] == "meta/llama3_1@llama-3.1-8b" and again.config["tuning_mode"] == "PEFT_ADAPTER"
    assert again.data_stats().loc["examples", "predicted"] == len(CHAT)


def test_an_open_model_job_with_a_registered_tuned_model_stays_an_open_model_job(vertex, data):
    from tuning_magics.backends.vertex import endpoints

    vertex.step_seconds = 60
    job = tm.tune("meta/llama3_1@llama-3.1-8b", data["train"], tuning_mode="FULL", epochs=2,
                  output_uri=data["output"])
    walk(vertex, job)
    assert job.succeeded and job.tuned_model_name.endswith("@1")  # the service registered it in the Model Registry
    assert job.is_gemini is False and job.endpoint is None
    folder = f"{data['output']}/postprocess/node-0/checkpoints"
    assert [(c.name, c.uri) for c in job.checkpoints] == [
        ("checkpoint-3", f"{folder}/checkpoint-3"), ("checkpoint-6", f"{folder}/checkpoint-6"),
        ("final", f"{folder}/final")]  # fmt: skip
    with pytest.raises(UserError, match="answers once it is deployed: call job.deploy"):
        job.chat("Hello?")
    with pytest.raises(UserError, match="tuned an open model"):
        endpoints.batch_predict(job, data["train"], f"gs://{vertex.bucket}/predictions")
    with pytest.raises(UserError, match="tuned an open model"):
        job.chat("Hello?", checkpoint="base")
    with pytest.raises(UserError, match="does not continue tuning meta/llama3_1@llama-3.1-8b"):
        tm.tune(job, data["train"], epochs=1)
    gemini = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    walk(vertex, gemini)
    assert gemini.is_gemini and [c.name for c in gemini.checkpoints] == ["checkpoint-1", "final"]


@pytest.mark.parametrize("outcome,state", [("failed", "JOB_STATE_FAILED"), ("expired", "JOB_STATE_EXPIRED")])
def test_a_job_that_fails_or_expires_ends_with_the_services_error(vertex, data, outcome, state):
    vertex.step_seconds = 60
    message = "The image gs://b/cat.png could not be opened: unsupported format."
    vertex.next_outcome(outcome, error={"code": 3, "message": message} if outcome == "failed" else None)
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    walk(vertex, job)
    assert job.state == state and job.done
    if outcome == "failed":
        assert message in job.error
        with pytest.raises(JobFailedError, match="could not be opened"):
            job.wait(raise_on_failure=True)


def test_a_failed_job_is_summed_up_by_the_services_message_not_the_details_after_it(vertex, data, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    message = "Example 7 has no model turn. Add one to every example and submit the job again."
    details = [{"@type": "type.googleapis.com/google.rpc.DebugInfo", "detail": "Details: trace abc"}]
    for _ in range(2):
        vertex.next_outcome("failed", error={"code": 3, "message": message, "details": details})
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    with pytest.raises(JobFailedError) as info:
        job.wait(raise_on_failure=True)
    assert "trace abc" in job.error  # the full text keeps the details
    assert job.error_summary == "Example 7 has no model turn"
    assert str(info.value) == (f"tuning job {job.name} failed: Example 7 has no model turn (job.error has the "
                               "full text)")
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "tuning_magics")
    capsys.readouterr()
    shell.run_cell_magic("tune", "--as failed --wait", f"model: gemini-2.5-flash\ndata: {data['train']}\nepochs: 1\n")
    failed = shell.user_ns.pop("failed")
    assert capsys.readouterr().out.splitlines()[-1] == f"job {failed.id}: JOB_STATE_FAILED: Example 7 has no model turn"


def test_data_stats_count_from_the_services_totals_and_keep_its_sample_of_indices(vertex, data):
    long = [{"messages": [{"role": "user", "content": "word " * 9000}, {"role": "assistant", "content": "Yes."}]}
            for _ in range(7)]  # fmt: skip
    train = vertex.put(vertex.uri("long.jsonl"), CHAT[:3] + long)
    vertex.step_seconds = 60
    job = tm.tune("qwen3-4b", train, epochs=1, output_uri=data["output"])
    walk(vertex, job)
    stats = job.info.data_stats
    assert stats["truncated_examples"] == 7  # the service's total, not the length of its sample
    assert stats["truncated_example_indices"] == [4, 5, 6, 7, 8]  # a partial sample, counted from 1
    assert len(stats["dropped_example_reasons"]) == 5
    assert stats["dropped_examples"] is None  # the service has no such total
    frame = job.data_stats()
    assert frame.loc["truncated_examples", "service"] == 7 and pd.isna(frame.loc["dropped_examples", "service"])


def test_polling_survives_429_5xx_and_dropped_connections_and_says_it_is_retrying(vertex, data):
    from tuning_magics.backends.vertex.jobs import MAX_BACKOFF
    from tuning_magics.display.monitor import job_text

    vertex.step_seconds = 60
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    job.refresh()
    seen, usual = (job.state, job.substate), job.poll_interval(0)
    vertex.fail_next(503, "The service is currently unavailable.", method="GET", path=r"/tuningJobs/")
    job.refresh()
    assert (job.state, job.substate) == seen and not job.done  # the last snapshot stands; never FAILED
    assert job.retrying.startswith("Vertex AI answered 503 UNAVAILABLE to the last look (1 in a row)")
    assert "retrying: Vertex AI answered 503" in job_text(job)  # the monitor says so
    vertex.drop_next(method="GET", path=r"/tuningJobs/")
    job.refresh()
    assert "the connection to Vertex AI failed" in job.retrying and "(2 in a row)" in job.retrying
    assert job.poll_interval(0) == 4.0 > usual  # backing off
    vertex.fail_next(429, "Quota exceeded.", method="GET", path=r"/tuningJobs/", times=8)
    for _ in range(8):
        job.refresh()
    assert job.poll_interval(0) == MAX_BACKOFF and "(10 in a row)" in job.retrying  # bounded
    job.refresh()
    assert job.retrying is None and job.poll_interval(0) == usual and "retrying" not in job_text(job)
    # A first read, with nothing to show meanwhile, asks again quickly.
    vertex.fail_next(503, "The service is currently unavailable.", method="GET", path=r"/tuningJobs/", times=2)
    assert tm.get_job(job.name).state == job.state
    # Errors that do not pass are one line at once.
    vertex.deny("aiplatform.tuningJobs.get")
    with pytest.raises(UserError, match="permission denied to read tuning job") as info:
        job.refresh()
    assert "\n" not in str(info.value)


def test_wait_goes_through_transient_errors_to_the_jobs_end(vertex, data):
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)  # the fake's 0.2 s steps: done in about a second
    vertex.fail_next(429, "Quota exceeded.", method="GET", path=r"/tuningJobs/", times=2)
    vertex.drop_next(method="GET", path=r"/tuningJobs/")
    vertex.fail_next(502, "Bad gateway.", method="GET", path=r"/tuningJobs/")
    assert job.wait(timeout=120, poll=0.05, raise_on_failure=True).state == "JOB_STATE_SUCCEEDED"
    assert job.retrying is None


def test_queued_updating_and_partially_succeeded_become_our_states(vertex, data):
    vertex.step_seconds = 60
    vertex.next_outcome("partially_succeeded", error={"code": 13, "message": "The last checkpoint could not be "
                                                                             "exported. Trace 7f3a."},
                        states={"TUNING_JOB_STATE_WAITING_FOR_QUOTA": "JOB_STATE_QUEUED",
                                "TUNING_JOB_STATE_TUNING": "JOB_STATE_UPDATING"})  # fmt: skip
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=2)
    seen = walk(vertex, job)
    assert seen[0] == ("JOB_STATE_QUEUED", "WAITING_FOR_QUOTA")  # QUEUED is one of ours, and wait() goes on
    assert ("JOB_STATE_RUNNING", "TUNING") in seen  # UPDATING goes back to RUNNING
    assert job.state == "JOB_STATE_SUCCEEDED" and job.done and job.substate is None
    assert job.note == ("the service reports JOB_STATE_PARTIALLY_SUCCEEDED: some results may be missing (The last "
                        "checkpoint could not be exported); check the checkpoints before using them")
    assert [c.name for c in job.checkpoints] == ["checkpoint-1", "checkpoint-2", "final"]


def test_cancel_goes_through_cancelling_to_cancelled(vertex, data):
    vertex.step_seconds = 60
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    job.cancel()
    walk(vertex, job)
    assert job.state == "JOB_STATE_CANCELLED"
    assert job.cancel().state == "JOB_STATE_CANCELLED"  # an ended job is left as it is


def test_a_long_wait_for_quota_suggests_resubmitting(vertex, data, monkeypatch):
    from datetime import datetime, timezone

    import tuning_magics.jobs as jobs

    monkeypatch.setattr(jobs, "now", lambda: datetime.fromtimestamp(vertex.now(), tz=timezone.utc))
    vertex.step_seconds = 60
    vertex.next_outcome("running", at="TUNING_JOB_STATE_WAITING_FOR_QUOTA")
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    assert job.refresh().substate == "WAITING_FOR_QUOTA" and job.hint is None
    vertex.advance(2 * 3600)
    job.refresh()
    assert job.substate == "WAITING_FOR_QUOTA" and job.queued_seconds >= 7200
    assert "cancelling and submitting again can be faster" in job.hint


def test_list_jobs_lists_both_backends_and_still_lists_local_ones_without_credentials(vertex, data):
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    listed = tm.list_jobs()
    assert job.name in [j.name for j in listed]
    assert {j.backend for j in listed} >= {"vertex"}
    assert [j.name for j in tm.list_jobs(backend="vertex")] == [job.name]
    tm.settings.update(credentials=None)  # no Application Default Credentials on this machine
    with pytest.warns(UserWarning, match="Vertex AI jobs are not listed: no Google Cloud credentials "
                                         "found") as caught:
        listed = tm.list_jobs()
    assert job.name not in [j.name for j in listed]
    assert all("\n" not in str(w.message) for w in caught)


# ====================================================================== choosing the backend and its rules


def test_open_models_go_to_vertex_where_a_project_is_set_and_local_models_never_do(vertex, monkeypatch):
    assert tm.tune("qwen3-4b", FRAME, epochs=1, dry_run=True).backend == "vertex"
    assert tm.tune("local/tiny-qwen3", FRAME, epochs=1, dry_run=True).backend == "local"
    monkeypatch.setenv("TUNING_MAGICS_BACKEND", "local")
    assert tm.tune("gemini-2.5-flash", FRAME, epochs=1, dry_run=True).backend == "vertex"  # Gemini has one home
    with pytest.raises(UserError, match="tuned only by Vertex AI") as info:
        tm.tune("gemini-2.5-flash", FRAME, epochs=1, backend="local")
    assert info.value.field == "base_model"
    with pytest.raises(UserError, match="built into the local engine") as info:
        tm.tune("local/tiny-qwen3", FRAME, epochs=1, backend="vertex")
    assert vertex.bodies() == []


@pytest.mark.parametrize(
    "kwargs,field,text",
    [
        (dict(base_model="gemini-2.5-flash", learning_rate=1e-4), "learning_rate", "learning_rate_multiplier"),
        (dict(base_model="gemini-2.5-flash", batch_size=8), "batch_size", "batch_size is for open models"),
        (dict(base_model="qwen3-32b", tuning_mode="PEFT_ADAPTER", adapter_size=4), "adapter_size", "Gemini"),
        (dict(base_model="qwen3-4b", learning_rate_multiplier=2.0), "learning_rate_multiplier", "learning_rate"),
        (dict(base_model="qwen3-4b", method="distillation", base_teacher_model="http://127.0.0.1:9/v1"),
         "base_teacher_model", "not a Vertex AI teacher"),
        (dict(base_model="qwen3-4b", custom_base_model="/tmp/model"), "custom_base_model", "gs:// folder"),
        (dict(base_model="qwen3-4b", output_uri="/tmp/out"), "output_uri", "gs:// folder"),
        (dict(base_model="qwen3-4b", max_seq_len=512), "max_seq_len", "not an option of Vertex AI"),
        (dict(base_model="gemini-2.5-flash", labels={"Team": "x"}), "labels", "lower-case"),
        (dict(base_model="gemini-2.5-flash", labels={"tm-dataset": "mine"}), "labels", "lineage"),
        (dict(base_model="gemini-2.5-flash", labels={f"k{i}": "v" for i in range(59)}), "labels", "at most 58"),
        (dict(base_model="gemini-2.5-flash", pre_tuned_model_checkpoint_id="2"), "pre_tuned_model_checkpoint_id",
         "needs the tuned model"),
    ],
)
def test_vertex_rules_are_checked_before_anything_is_uploaded(vertex, kwargs, field, text):
    with pytest.raises(UserError, match=text) as info:
        tm.tune(train_dataset=FRAME, epochs=1, **kwargs)
    assert info.value.field == field and "\n" not in str(info.value)
    assert vertex.bodies() == [] and staged(vertex) == []


def test_a_region_that_does_not_tune_the_model_is_refused_before_upload(vertex):
    tm.settings.update(location="asia-southeast1")
    try:
        with pytest.raises(UserError, match="asia-southeast1") as info:
            tm.tune("gemini-3.1-flash-lite", FRAME, epochs=1)
    finally:
        tm.settings.update(location=None)
    assert info.value.field == "location" and staged(vertex) == []


def test_local_data_needs_a_staging_bucket(vertex, monkeypatch):
    monkeypatch.delenv("TUNING_MAGICS_STAGING_BUCKET")
    with pytest.raises(UserError, match="TUNING_MAGICS_STAGING_BUCKET=gs://") as info:
        tm.tune("gemini-2.5-flash", FRAME, epochs=1)
    assert info.value.field == "staging_bucket"


def test_a_gs_dataset_is_validated_where_it_is_before_submission(vertex):
    bad = vertex.put(vertex.uri("bad.jsonl"), [{"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(UserError, match=r"train_dataset gs://.*line 1") as info:
        tm.tune("gemini-2.5-flash", bad, epochs=1)
    assert info.value.field == "train_dataset" and vertex.bodies() == []


def test_a_validation_set_must_not_be_the_training_set(vertex, data):
    with pytest.raises(UserError, match="validation_dataset") as info:
        tm.tune("gemini-2.5-flash", data["train"], validation_dataset=data["train"], epochs=1)
    assert info.value.field == "validation_dataset" and vertex.bodies() == []


# ====================================================================== errors: one line, no token


def _one_line_error(call, fake):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as info:
            call()
    text = str(info.value)
    everything = text + out.getvalue() + err.getvalue() + "".join(str(w.message) for w in caught)
    assert "\n" not in text
    assert fake.token not in everything and "ya29" not in everything
    assert info.value.__cause__ is None and info.value.__suppress_context__
    return text


def test_service_errors_are_one_line_naming_the_project_and_the_fix_and_never_a_token(vertex, data):
    tune = lambda: tm.tune("gemini-2.5-flash", data["train"], epochs=1)  # noqa: E731

    vertex.exhaust_quota()
    text = _one_line_error(tune, vertex)
    assert text.startswith("quota exceeded in project fake-project, us-central1")

    vertex.fail_next(400, "Dataset gs://b/x.jsonl: line 3 has an image that cannot be opened.", method="POST",
                     path=r"/tuningJobs$", status="INVALID_ARGUMENT")
    text = _one_line_error(tune, vertex)
    assert "rejected the request" in text and "line 3 has an image that cannot be opened" in text

    vertex.deny("aiplatform.tuningJobs.create")
    text = _one_line_error(tune, vertex)
    assert "permission denied" in text and "fake-project" in text and "roles/aiplatform.user" in text

    text = _one_line_error(lambda: tm.get_job("projects/fake-project/locations/us-central1/tuningJobs/404"), vertex)
    assert text.startswith("not found") and "fake-project" in text

    vertex.disable_api()
    text = _one_line_error(tune, vertex)
    assert "not enabled in project fake-project" in text and "gcloud services enable aiplatform.googleapis.com" in text


def test_without_credentials_the_error_names_the_command_that_fixes_it(vertex, data, monkeypatch):
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    from tuning_magics.backends.vertex import client

    def no_adc(*args, **kwargs):
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", no_adc)  # whatever this machine has
    monkeypatch.setattr(client, "_ADC", {})
    tm.settings.update(credentials=None)
    text = _one_line_error(lambda: tm.tune("gemini-2.5-flash", data["train"], epochs=1), vertex)
    assert text == ("no Google Cloud credentials found for project fake-project: run `gcloud auth "
                    "application-default login`, or pass tuning_magics.settings.update(credentials=...)")
    assert vertex.bodies() == []


def test_refused_credentials_and_a_silent_api_are_one_line(vertex, data, monkeypatch):
    from google.oauth2.credentials import Credentials

    tm.settings.update(credentials=Credentials(token="ya29.not-the-fakes-token"))
    text = _one_line_error(lambda: tm.tune("gemini-2.5-flash", data["train"], epochs=1), vertex)
    assert "refused the credentials" in text and "not-the-fakes-token" not in text
    tm.settings.update(credentials=vertex.credentials())
    monkeypatch.setenv("TUNING_MAGICS_API_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    text = _one_line_error(lambda: tm.get_job("projects/fake-project/locations/us-central1/tuningJobs/1"), vertex)
    assert text.startswith("cannot reach Vertex AI at http://127.0.0.1:9")


def test_settings_take_a_credentials_object_and_never_show_it(vertex):
    with pytest.raises(UserError, match="google-auth Credentials object") as info:
        tm.settings.update(credentials="ya29.a-string-is-not-credentials")
    assert info.value.field == "credentials"
    assert "Credentials" in tm.settings.describe() and vertex.token not in tm.settings.describe()


# ====================================================================== images


def _png(seed: int) -> bytes:
    import matplotlib

    from matplotlib.figure import Figure

    fig = Figure(figsize=(0.4, 0.4), dpi=20)
    fig.add_subplot().plot([0, 1], [seed, 1 - seed])
    out = io.BytesIO()
    fig.savefig(out, format="png")
    assert matplotlib  # drawn on a Figure: no global backend is touched
    return out.getvalue()


def test_local_images_are_uploaded_once_each_and_rows_refer_to_them_by_gs_uri(vertex, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    pictures = []
    for i in range(2):
        pictures.append(tmp_path / f"picture-{i}.png")
        pictures[-1].write_bytes(_png(i))
    frame = pd.DataFrame({"image": [str(pictures[i % 2]) for i in range(6)],
                          "question": [f"What is drawn in picture {i}?" for i in range(6)],
                          "answer": [f"A line, number {i % 2}." for i in range(6)]})  # fmt: skip
    ds = tm.dataset(frame, out=str(tmp_path / "pictures.jsonl"), prompt="question", completion="answer",
                    images="image", model="gemini-2.5-flash")
    plan = tm.tune("gemini-2.5-flash", ds, epochs=1, dry_run=True)
    assert staged(vertex) == [] and sum(u.endswith(".png") for u in plan.uploads.values()) == 2
    tm.tune("gemini-2.5-flash", ds, epochs=1)
    uri = vertex.bodies()[-1]["supervisedTuningSpec"]["trainingDatasetUri"]
    assert uri == plan.request["supervisedTuningSpec"]["trainingDatasetUri"]
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    bucket = client.bucket(vertex.bucket)
    rows = [json.loads(line) for line in bucket.blob(uri.split("/", 3)[3]).download_as_bytes().splitlines()]
    urls = [_image_uri(part) for row in rows for part in _parts(row) if _image_uri(part)]
    assert len(urls) == 6 and all(u.startswith(f"gs://{vertex.bucket}/{vertex.staging}/images/sha256-") for u in urls)
    assert len(set(urls)) == 2 and len(staged(vertex, "images/")) == 2
    for i, picture in enumerate(pictures):
        assert bucket.blob(urls[i].split("/", 3)[3]).download_as_bytes() == picture.read_bytes()
    assert "inlineData" not in json.dumps(rows) and "data:image" not in json.dumps(rows)
    assert (tmp_path / "pictures.jsonl").read_text().count("inlineData") == 6  # the user's file is left as it was


def _parts(row):
    for message in row.get("messages", []):
        if isinstance(message.get("content"), list):
            yield from message["content"]
    for turn in row.get("contents", []):
        yield from turn.get("parts", [])


def _image_uri(part):
    if "image_url" in part:
        return part["image_url"]["url"]
    data = part.get("file_data") or part.get("fileData")
    return (data.get("file_uri") or data.get("fileUri")) if data else None


def test_a_tuned_gemini_model_is_tuned_further_from_one_of_its_checkpoints(vertex, data):
    vertex.step_seconds = 60
    first = tm.tune("gemini-2.5-pro", data["train"], epochs=2, adapter_size=4)
    walk(vertex, first)
    assert first.succeeded and first.tuned_model_name
    checkpoint = first.checkpoints[0].name.removeprefix("checkpoint-")
    again = tm.tune(first, data["train"], epochs=1, pre_tuned_model_checkpoint_id=checkpoint)
    body = vertex.bodies()[-1]
    # google-genai sends this message with its Python field names; proto JSON takes either spelling.
    pre = {re.sub(r"_(\w)", lambda m: m.group(1).upper(), k): v for k, v in body["preTunedModel"].items()}
    assert pre == {"tunedModelName": first.tuned_model_name, "checkpointId": checkpoint}
    assert "baseModel" not in body and again.backend == "vertex"
    with pytest.raises(UserError, match="does not continue tuning gemini-2.5-flash") as info:
        flash = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
        walk(vertex, flash)
        tm.tune(flash, data["train"], epochs=1)
    assert info.value.field == "base_model"
    with pytest.raises(UserError, match="tuned only by Vertex AI"):
        tm.tune(first, data["train"], epochs=1, backend="local")


def test_no_token_appears_in_any_output_log_or_error_of_a_whole_run(vertex, data, caplog, capfd):
    import logging

    caplog.set_level(logging.DEBUG)  # every library's debug log too
    vertex.step_seconds = 60
    shown = [tm.settings.describe(), str(tm.settings.as_dict())]
    shown.append(str(tm.tune("gemini-2.5-flash", FRAME, epochs=1, dry_run=True)))
    job = tm.tune("meta/llama3_1@llama-3.1-8b", data["train"], tuning_mode="FULL", epochs=2, output_uri=data["output"])
    walk(vertex, job)
    shown += [repr(job), str(job.info), str(job.config), job.metrics().to_string(), job.data_stats().to_string(),
              str(job.checkpoints), repr(tm.list_jobs()), repr(tm.get_job(job.name))]
    from tuning_magics.backends.vertex.jobs import FIRST_READ_PAUSES

    vertex.fail_next(500, f"backend error while serving Bearer {vertex.token}", method="GET", path=r"/tuningJobs/",
                     times=len(FIRST_READ_PAUSES) + 1)  # every quick try of a first read
    with pytest.raises(UserError) as info:
        tm.get_job(job.name)
    shown.append(str(info.value))
    assert "[token]" in str(info.value)
    out, err = capfd.readouterr()
    everything = "\n".join(shown) + out + err + caplog.text
    assert job.succeeded and len(everything) > 1000
    assert vertex.token not in everything
    assert vertex.token.split(".", 1)[1] not in everything


def test_a_tuned_gemini_model_is_also_continued_from_its_resource_name(vertex, data):
    vertex.step_seconds = 60
    first = tm.tune("gemini-2.5-pro", data["train"], epochs=1, adapter_size=4)
    walk(vertex, first)
    tm.tune(first.tuned_model_name, data["train"], epochs=1)
    body = vertex.bodies()[-1]
    assert body["preTunedModel"].get("tunedModelName", body["preTunedModel"].get("tuned_model_name")) == \
        first.tuned_model_name
    with pytest.raises(UserError, match="not found") as info:
        tm.tune("projects/fake-project/locations/us-central1/models/404", data["train"], epochs=1)
    assert "\n" not in str(info.value)


def test_a_distillation_job_reports_the_services_counts_and_leaves_the_teachers_answers(vertex, data):
    vertex.step_seconds = 60
    job = tm.tune("qwen3-4b", data["prompts"], method="distillation", base_teacher_model=TEACHER, epochs=2,
                  output_uri=data["output"])
    walk(vertex, job)
    assert job.succeeded and job.config["method"] == "distillation" and job.config["base_teacher_model"] == TEACHER
    stats = job.data_stats()
    assert stats.loc["examples", "service"] == len(PROMPTS) == stats.loc["examples", "predicted"]
    assert stats.loc["billable_tokens", "service"] > 0
    assert job.progress().total_steps > 0
    assert tm.storage.exists(f"{data['output']}/distillation_labelled_dataset.jsonl")


def test_wait_returns_a_paused_job_with_what_to_do(vertex, data):
    vertex.next_outcome("paused", at="TUNING_JOB_STATE_TUNING")
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    started = time.monotonic()
    assert job.wait(timeout=60).state == "JOB_STATE_PAUSED" and not job.done
    assert time.monotonic() - started < 30
    assert "paused" in job.hint and "job.wait() again" in job.hint


def test_a_continued_job_is_itself_continued_from_its_job(vertex, data):
    vertex.step_seconds = 60
    first = tm.tune("gemini-2.5-pro", data["train"], epochs=1)
    walk(vertex, first)
    second = tm.tune(first, data["train"], epochs=1)
    walk(vertex, second)
    assert tm.get_job(second.name).config["base_model"] == "gemini-2.5-pro"
    third = tm.tune(second, data["train"], epochs=1, dry_run=True)
    assert third.model == "gemini-2.5-pro"
    assert third.request["preTunedModel"]


def test_rows_naming_image_files_on_this_machine_are_uploaded_and_rewritten(vertex, tmp_path):
    picture = tmp_path / "cat.png"
    picture.write_bytes(_png(0))
    rows = [{"contents": [{"role": "user", "parts": [{"fileData": {"mimeType": "image/png", "fileUri": str(picture)}},
                                                      {"text": f"What is this, {i}?"}]},
                          {"role": "model", "parts": [{"text": "A line."}]}]} for i in range(4)]  # fmt: skip
    records = tmp_path / "local-images.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in (rows, str(records)):
        tm.tune("gemini-2.5-flash", source, epochs=1)
    uris = {b["supervisedTuningSpec"]["trainingDatasetUri"] for b in vertex.bodies()}
    assert len(uris) == 1  # the same rows, from records or a file: one dataset object
    assert len(staged(vertex, "images/")) == 1
    text = vertex.storage.read(uris.pop()).decode()
    assert str(picture) not in text and text.count(f"gs://{vertex.bucket}/{vertex.staging}/images/sha256-") == 4
    missing = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "nope.png"}},
                                                          {"type": "text", "text": "?"}]},
                             {"role": "assistant", "content": "no"}]}]  # fmt: skip
    with pytest.raises(UserError, match="image file on this machine"):
        tm.tune("gemini-2.5-flash", missing, epochs=1)


def test_a_job_without_a_loss_curve_says_why_in_one_line(vertex, data):
    from tuning_magics.display.monitor import job_text

    vertex.step_seconds = 60
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=1)
    frame = job.metrics()
    assert len(frame) == 0 and job.metrics_note == frame.attrs["note"] == (
        "no loss curve yet: Vertex AI logs the metrics once tuning starts")
    assert "metrics: no loss curve yet: Vertex AI logs the metrics once tuning starts" in job_text(job)
    walk(vertex, job)
    assert len(job.metrics()) and job.metrics_note is None and "no loss curve" not in job_text(job)


def test_metrics_are_read_once_per_snapshot_of_the_job(vertex, data):
    vertex.step_seconds = 60
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=2)
    walk(vertex, job)

    def reads():
        return sum(1 for r in vertex.requests if r.path.endswith(":read") or r.path.endswith(":batchRead"))

    before = reads()
    frame, progress = job.metrics(), job.progress()  # what a monitor update asks for together
    once = reads() - before
    assert once > 0 and progress.step == progress.total_steps and len(frame)
    frame.loc[0, "train_loss"] = -1.0  # the caller's copy: the job's own frame is not changed
    assert job.metrics()["train_loss"].iloc[0] != -1.0
    assert reads() - before == once
    job.refresh()  # a new snapshot reads them again
    job.metrics()
    assert reads() - before == 2 * once


# ====================================================================== evaluation during tuning


def test_a_gemini_job_evaluated_during_tuning_sends_the_services_evaluation_config_and_reads_its_scores(vertex,
                                                                                                       data):
    job = tm.tune("gemini-2.5-flash", data["train"], epochs=3, validation_dataset=data["validation"],
                  evaluation={"metrics": "exact_match, rouge_l", "max_new_tokens": 64})
    config = vertex.bodies()[-1]["supervisedTuningSpec"]["evaluationConfig"]
    kinds = [next(k for k, v in metric.items() if v is not None and k != "aggregation_metrics")
             for metric in config["metrics"]]
    assert kinds == ["exact_match_spec", "rouge_spec"] and config["metrics"][1]["rouge_spec"]["rouge_type"] == "rougeL"
    assert config["outputConfig"]["gcs_destination"]["output_uri_prefix"].startswith(f"gs://{vertex.bucket}/")
    assert config["inferenceGenerationConfig"] == {"temperature": 0.0, "maxOutputTokens": 64}
    walk(vertex, job)
    assert job.state == "JOB_STATE_SUCCEEDED"
    scores = job.checkpoint_scores()
    assert list(scores.index) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert list(scores.columns) == ["step", "exact_match", "rouge_l"]
    assert scores["exact_match"].is_monotonic_increasing and 0 < scores["rouge_l"].min() <= 1
    assert job.best_checkpoint() == "checkpoint-3" and job.best_checkpoint("rouge_l") == "checkpoint-3"
    frame = job.metrics()  # beside the loss curve the experiment holds
    assert frame["eval_exact_match"].notna().sum() == 3 and frame["train_loss"].notna().any()


def test_evaluation_during_tuning_on_vertex_follows_the_services_rules_before_anything_is_uploaded(vertex, data):
    for kwargs, field, words in [
            (dict(base_model="qwen3-4b", output_uri=data["output"]), "evaluation", "Gemini models only"),
            (dict(evaluation={"metrics": "token_f1"}), "evaluation.metrics", "not token_f1"),
            (dict(evaluation={"data": FRAME}), "evaluation.data", "give the evaluation data as validation_dataset"),
    ]:
        arguments = dict(base_model="gemini-2.5-flash", evaluation={"metrics": "exact_match"},
                         validation_dataset=FRAME[:4])
        arguments.update(kwargs)
        with pytest.raises(UserError, match=words) as info:
            tm.tune(train_dataset=FRAME, epochs=1, **arguments)
        assert info.value.field == field and "\n" not in str(info.value)
    tm.settings.update(location="europe-west4")
    try:
        with pytest.raises(UserError, match="us-central1 only") as info:
            tm.tune("gemini-2.5-flash", FRAME, validation_dataset=FRAME[:4], evaluation=True)
    finally:
        tm.settings.update(location="us-central1")
    assert vertex.bodies() == [] and staged(vertex) == []
    # evaluation's own data is the validation set the service scores, and the dry run shows the whole request.
    plan = tm.tune("gemini-2.5-flash", FRAME, evaluation={"data": FRAME[:4]}, dry_run=True)
    assert plan.request["supervisedTuningSpec"]["validationDatasetUri"].startswith("gs://")
    assert plan.request["supervisedTuningSpec"]["evaluationConfig"]["metrics"][0]["exact_match_spec"] == {}


def test_the_fake_refuses_evaluation_configs_the_service_refuses(vertex, data):
    from google.genai import errors, types

    client = vertex.genai_client()
    output = types.OutputConfig(gcs_destination=types.GcsDestination(output_uri_prefix=f"gs://{vertex.bucket}/e"))
    for metrics, validation, words in [
            ([types.Metric(name="rougeL")], data["validation"], "rouge_type 'rougel'"),
            ([types.Metric(name="exact_match")], None, "requires"),
    ]:
        config = types.CreateTuningJobConfig(
            validation_dataset=types.TuningValidationDataset(gcs_uri=validation) if validation else None,
            evaluation_config=types.EvaluationConfig(metrics=metrics, output_config=output))
        with pytest.raises(errors.ClientError, match=words):
            client.tunings.tune(base_model="gemini-2.5-flash", training_dataset=types.TuningDataset(
                gcs_uri=data["train"]), config=config)


# ====================================================================== preference tuning


PAIRS = [{"prompt": f"Say hello to guest {i}.", "chosen": f"Hello, guest {i}, welcome!", "rejected": "hi"}
         for i in range(12)]


def test_a_gemini_preference_job_sends_what_google_genai_sends_by_hand_and_its_pairs_in_geminis_format(vertex):
    from google.genai import types

    from tuning_magics.datasets import preference

    job = tm.tune("gemini-2.5-flash", PAIRS, method="preference", beta=0.1, epochs=2, adapter_size=4,
                  validation_dataset=PAIRS[:3])
    ours = vertex.bodies()[-1]
    spec = ours["preferenceOptimizationSpec"]
    # The same call written by hand with google-genai, on the files tuning_magics uploaded.
    client = vertex.genai_client()  # kept: a client that is collected closes its connections
    client.tunings.tune(
        base_model="gemini-2.5-flash", training_dataset=types.TuningDataset(gcs_uri=spec["trainingDatasetUri"]),
        config=types.CreateTuningJobConfig(method="PREFERENCE_TUNING", beta=0.1, epoch_count=2,
                                           adapter_size="ADAPTER_SIZE_FOUR", validation_dataset=types.
                                           TuningValidationDataset(gcs_uri=spec["validationDatasetUri"])))
    hand = vertex.bodies()[-1]
    ours.pop("labels")
    assert ours == hand and spec["hyperParameters"]["beta"] == 0.1
    # TRL's pairs went up in Gemini's format, which the service (and the fake) reads.
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket, name = spec["trainingDatasetUri"][len("gs://"):].split("/", 1)
    lines = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(bucket).blob(
        name).download_as_text().splitlines()
    first = json.loads(lines[0])
    assert preference.detect(first) == preference.GEMINI_PREFERENCE and len(lines) == 12
    assert preference.pair_of(first, preference.GEMINI_PREFERENCE) == (
        [{"role": "user", "content": "Say hello to guest 0."}], "Hello, guest 0, welcome!", "hi")
    walk(vertex, job)
    assert job.state == "JOB_STATE_SUCCEEDED" and job.config["method"] == "preference" and job.config["beta"] == 0.1
    assert job.data_stats().loc["examples", "service"] == 12  # the service counted the pairs


def test_preference_tuning_on_vertex_ai_follows_the_catalog_and_the_services_format(vertex):
    with pytest.raises(UserError, match="Vertex AI preference-tunes gemini-2.5-flash, gemini-2.5-flash-lite, "
                                        "not gemini-2.5-pro") as info:
        tm.tune("gemini-2.5-pro", PAIRS, method="preference")
    assert info.value.field == "method"
    gs = vertex.put(vertex.uri("pairs.jsonl"), PAIRS)  # TRL's format, already in Cloud Storage
    with pytest.raises(UserError, match="Vertex AI reads preference pairs in Gemini's format") as info:
        tm.tune("gemini-2.5-flash", gs, method="preference")
    assert info.value.field == "train_dataset" and vertex.bodies() == []
