"""The real google-genai and google-cloud-aiplatform SDKs against the fake Vertex AI (tests/fake_vertex.py).

These tests pin down the REST shapes the fake speaks, so the Vertex backend's own
tests can trust it: the seeds' tuning calls, the job lifecycle and its outputs,
the service's refusals, Model Garden deploy, prediction and the metrics chain.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest

pytest.importorskip("google.genai")
pytestmark = pytest.mark.filterwarnings("ignore:The SDK's tuning implementation is experimental")

from fake_vertex import CHAT, PHASES, PROMPTS, TEACHER, hand_written_bodies  # noqa: E402



@pytest.fixture
def fast(fake_vertex):
    """The fake with minute-long lifecycle steps that :func:`wait` walks through by moving its clock."""
    fake_vertex.step_seconds = 60
    fake_vertex.deploy_seconds = 0.05
    return fake_vertex


@pytest.fixture
def data(fake_vertex):
    """Training and validation sets in the storage emulator: chat examples and distillation prompts."""
    return {"train": fake_vertex.put(fake_vertex.uri("train.jsonl"), CHAT),
            "validation": fake_vertex.put(fake_vertex.uri("validation.jsonl"), CHAT[:4]),
            "prompts": fake_vertex.put(fake_vertex.uri("prompts.jsonl"), PROMPTS),
            "output": f"gs://{fake_vertex.bucket}/out-{time.time_ns()}",
            "custom": f"gs://{fake_vertex.bucket}/custom-llama"}  # fmt: skip


def types():
    from google.genai import types as t

    return t


def wait(fake, client, name, limit=20):
    """Poll, moving the fake's clock one step each time, until the job ends; return it and every step seen.

    A GET the fake answers 429 (every 5th of a job, ``fake.throttle_every``) is asked again, as a client should.
    """
    from google.genai import errors

    seen = []
    for _ in range(limit):
        try:
            job = client.tunings.get(name=name)
        except errors.APIError as exc:
            if exc.code != 429:
                raise
            job = client.tunings.get(name=name)
        seen.append((job.state.value, job.tuning_job_state.value if job.tuning_job_state else None))
        if job.has_ended or job.state.value in ("JOB_STATE_PAUSED", "JOB_STATE_PARTIALLY_SUCCEEDED"):
            break
        fake.advance(fake.step_seconds)
    return job, seen


def listing(fake, prefix):
    return sorted(b.name for b in _storage(fake).list_blobs(fake.bucket, prefix=prefix))


def _storage(fake):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials())


def error_of(call):
    from google.genai import errors

    with pytest.raises(errors.APIError) as info:
        call()
    return info.value


# ====================================================================== the seeds' tuning calls


def test_llama_full_tuning_from_a_custom_checkpoint_runs_its_lifecycle_and_writes_checkpoints(fast, data):
    t, client = types(), fast.genai_client()
    job = client.tunings.tune(
        base_model="meta/llama3_1@llama-3.1-8b", training_dataset=t.TuningDataset(gcs_uri=data["train"]),
        config=t.CreateTuningJobConfig(tuning_mode="TUNING_MODE_FULL", custom_base_model=data["custom"],
                                       epoch_count=3, validation_dataset=t.TuningValidationDataset(
                                           gcs_uri=data["validation"]), output_uri=data["output"]))  # fmt: skip
    assert fast.bodies()[-1] == {
        "baseModel": "meta/llama3_1@llama-3.1-8b",
        "supervisedTuningSpec": {"trainingDatasetUri": data["train"], "validationDatasetUri": data["validation"],
                                 "hyperParameters": {"epochCount": 3}, "tuningMode": "TUNING_MODE_FULL"},
        "customBaseModel": data["custom"], "outputUri": data["output"]}  # fmt: skip
    assert job.name.startswith("projects/123456789012/locations/us-central1/tuningJobs/")  # a project number
    assert job.state.value == "JOB_STATE_PENDING" and job.create_time.tzinfo is not None

    job, seen = wait(fast, client, job.name)
    assert seen == [*PHASES, ("JOB_STATE_SUCCEEDED", "TUNING_JOB_STATE_POST_PROCESSING")]
    assert job.create_time <= job.start_time < job.end_time <= job.update_time
    stats = job.tuning_data_stats.supervised_tuning_data_stats
    assert stats.tuning_dataset_example_count == 20
    assert stats.total_billable_token_count == 3 * sum(len(" ".join(
        m["content"] for m in rec["messages"]).split()) for rec in CHAT)  # whitespace tokens times epochs
    assert stats.tuning_step_count == 9
    # proto3 JSON leaves out a count of 0 and an empty list, as the service's answers do
    assert stats.total_truncated_example_count is None and stats.truncated_example_indices is None
    assert job.experiment.endswith("/metadataStores/default/contexts/tuning-experiment-" + job.name.rsplit("/")[-1])
    # open models leave files, and the service registers the tuned model (no checkpoints, no endpoint)
    assert job.tuned_model.model == f"{job.name.split('/tuningJobs/')[0]}/models/{job.name.rsplit('/', 1)[1]}@1"
    assert job.tuned_model.endpoint is None and job.tuned_model.checkpoints is None

    prefix = data["output"].split("/", 3)[3] + "/postprocess/node-0/checkpoints/"
    files = listing(fast, prefix)
    assert [f[len(prefix):] for f in files if f.endswith(".safetensors")] == [
        "checkpoint-3/model-00001-of-00001.safetensors", "checkpoint-6/model-00001-of-00001.safetensors",
        "checkpoint-9/model-00001-of-00001.safetensors", "final/model-00001-of-00001.safetensors"]  # fmt: skip
    assert not listing(fast, data["output"].split("/", 3)[3] + "/distillation")


def test_the_sft_spelling_of_tuning_mode_is_refused_like_the_service_refuses_it(fake_vertex, data):
    t, client = types(), fake_vertex.genai_client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # google-genai warns that FULL is not a TuningMode, and sends it anyway
        err = error_of(lambda: client.tunings.tune(
            base_model="meta/llama3_1@llama-3.1-8b", training_dataset=t.TuningDataset(gcs_uri=data["train"]),
            config=t.CreateTuningJobConfig(tuning_mode="FULL", output_uri=data["output"])))
    assert err.code == 400 and err.status == "INVALID_ARGUMENT"
    assert "tuning_job.supervised_tuning_spec.tuning_mode" in err.message and '"FULL"' in err.message
    assert not fake_vertex.jobs


def test_qwen_distillation_reports_dataset_stats_and_writes_the_teachers_answers(fast, data):
    t, client = types(), fast.genai_client()
    job = client.tunings.tune(
        base_model="qwen/qwen3@qwen3-4b", training_dataset=t.TuningDataset(gcs_uri=data["prompts"]),
        config=t.CreateTuningJobConfig(method="DISTILLATION", base_teacher_model=TEACHER, epoch_count=2,
                                       validation_dataset=t.TuningValidationDataset(gcs_uri=data["validation"]),
                                       output_uri=data["output"]))  # fmt: skip
    body = fast.bodies()[-1]
    assert body["distillationSpec"]["promptDatasetUri"] == data["prompts"]
    assert body["distillationSpec"]["baseTeacherModel"] == TEACHER
    assert "supervisedTuningSpec" not in body and body["outputUri"] == data["output"]

    job, _ = wait(fast, client, job.name)
    assert job.state.value == "JOB_STATE_SUCCEEDED"
    stats = job.tuning_data_stats.distillation_data_stats.training_dataset_stats
    assert stats.tuning_dataset_example_count == len(PROMPTS)
    assert stats.total_billable_token_count == 2 * sum(len(p["prompt"].split()) for p in PROMPTS)

    out = data["output"].split("/", 3)[3]
    assert f"{out}/postprocess/node-0/checkpoints/final/model-00001-of-00001.safetensors" in listing(fast, out)
    labelled = _storage(fast).bucket(fast.bucket).blob(f"{out}/distillation_labelled_dataset.jsonl")
    rows = [json.loads(line) for line in labelled.download_as_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == [p["prompt"] for p in PROMPTS]
    assert all(r["messages"][1]["role"] == "assistant" and r["messages"][1]["content"] for r in rows)


def test_data_stats_count_cut_examples_and_list_a_sample_of_them_from_1(fast, data):
    t, client = types(), fast.genai_client()
    long = [{"prompt": "word " * 9000} for _ in range(7)]
    train = fast.put(fast.uri("long.jsonl"), PROMPTS[:2] + long)
    sft = client.tunings.tune(base_model="qwen/qwen3@qwen3-4b", training_dataset=t.TuningDataset(gcs_uri=train),
                              config=t.CreateTuningJobConfig(output_uri=data["output"]))
    sft, _ = wait(fast, client, sft.name)
    stats = sft.tuning_data_stats.supervised_tuning_data_stats
    assert stats.total_truncated_example_count == 7 and stats.truncated_example_indices == [3, 4, 5, 6, 7]
    assert len(stats.dropped_example_reasons) == 5 and "example 3 " in stats.dropped_example_reasons[0]
    distilled = client.tunings.tune(base_model="qwen/qwen3@qwen3-4b", training_dataset=t.TuningDataset(gcs_uri=train),
                                    config=t.CreateTuningJobConfig(method="DISTILLATION", base_teacher_model=TEACHER,
                                                                   output_uri=data["output"]))  # fmt: skip
    distilled, _ = wait(fast, client, distilled.name)
    stats = distilled.tuning_data_stats.distillation_data_stats.training_dataset_stats
    assert stats.dropped_example_indices == [3, 4, 5, 6, 7] and len(stats.dropped_example_reasons) == 5
    assert stats.tuning_dataset_example_count == 9 and not hasattr(stats, "total_truncated_example_count")


def test_gemini_tuning_gives_a_tuned_model_with_checkpoints_that_answer(fast, data):
    t, client = types(), fast.genai_client()
    job = client.tunings.tune(
        base_model="gemini-2.5-flash", training_dataset=t.TuningDataset(gcs_uri=data["train"]),
        config=t.CreateTuningJobConfig(epoch_count=2, adapter_size="ADAPTER_SIZE_FOUR", learning_rate_multiplier=0.5,
                                       validation_dataset=t.TuningValidationDataset(gcs_uri=data["validation"])))
    assert fast.bodies()[-1]["supervisedTuningSpec"]["hyperParameters"] == {
        "epochCount": 2, "learningRateMultiplier": 0.5, "adapterSize": "ADAPTER_SIZE_FOUR"}
    job, _ = wait(fast, client, job.name)
    assert job.state.value == "JOB_STATE_SUCCEEDED"
    model = job.tuned_model
    assert model.model.startswith("projects/123456789012/locations/us-central1/models/") and model.model.endswith("@1")
    assert [(c.checkpoint_id, c.epoch, c.step) for c in model.checkpoints] == [("1", 1, 3), ("2", 2, 6)]
    assert model.endpoint == model.checkpoints[-1].endpoint

    reply = client.models.generate_content(model=model.endpoint, contents="Why is the sky blue?")
    again = client.models.generate_content(model=model.checkpoints[0].endpoint, contents="Why is the sky blue?")
    assert reply.text == again.text and "Why is the sky blue?" in reply.text
    assert reply.usage_metadata.prompt_token_count == 5
    streamed = "".join(c.text for c in client.models.generate_content_stream(model=model.endpoint,
                                                                              contents="Why is the sky blue?"))
    assert streamed == reply.text
    assert fast.requests[-1].query == {"alt": ["sse"]}


def test_hand_written_bodies_are_what_google_genai_sends_for_the_seed_calls(fake_vertex, data):
    bodies = hand_written_bodies(fake_vertex, train_uri=data["train"], validation_uri=data["validation"],
                                 output_uri=data["output"], custom_base_model=data["custom"])  # fmt: skip
    assert bodies["llama_sft"]["supervisedTuningSpec"]["tuningMode"] == "TUNING_MODE_FULL"
    assert bodies["qwen_distillation"] == {
        "baseModel": "qwen/qwen3@qwen3-4b",
        "distillationSpec": {"promptDatasetUri": data["train"], "validationDatasetUri": data["validation"],
                             "hyperParameters": {"epochCount": 3}, "baseTeacherModel": TEACHER},
        "outputUri": data["output"]}  # fmt: skip
    assert bodies["gemini_sft"] == {
        "baseModel": "gemini-2.5-flash",
        "supervisedTuningSpec": {"trainingDatasetUri": data["train"], "validationDatasetUri": data["validation"],
                                 "hyperParameters": {"epochCount": 3, "learningRateMultiplier": 1.0,
                                                     "adapterSize": "ADAPTER_SIZE_FOUR"}}}  # fmt: skip
    assert len(fake_vertex.jobs) == 3


# ====================================================================== list, cancel, scripted endings


def test_list_pages_newest_first_and_cancel_goes_through_cancelling(fake_vertex, data):
    t, client = types(), fake_vertex.genai_client()
    names = []
    for _ in range(3):
        fake_vertex.next_outcome("running")
        names.append(client.tunings.tune(base_model="gemini-2.5-flash",
                                         training_dataset=t.TuningDataset(gcs_uri=data["train"])).name)
    listed = [j.name for j in client.tunings.list(config={"page_size": 2})]
    assert listed == names[::-1]
    pages = [r.query for r in fake_vertex.requests if r.method == "GET" and r.path.endswith("/tuningJobs")]
    assert pages == [{"pageSize": ["2"]}, {"pageSize": ["2"], "pageToken": ["2"]}]

    client.tunings.cancel(name=names[0])
    assert client.tunings.get(name=names[0]).state.value == "JOB_STATE_CANCELLING"
    fake_vertex.advance(fake_vertex.step_seconds)
    job = client.tunings.get(name=names[0])
    assert job.state.value == "JOB_STATE_CANCELLED" and job.end_time and job.error.message == "CANCELED"
    assert client.tunings.get(name=names[1]).state.value == "JOB_STATE_PENDING"
    err = error_of(lambda: client.tunings.cancel(name=names[0]))
    assert err.code == 400 and "JOB_STATE_CANCELLED" in err.message


@pytest.mark.parametrize(("outcome", "state", "last_phase"), [
    ("failed", "JOB_STATE_FAILED", "TUNING_JOB_STATE_TUNING"),
    ("cancelled", "JOB_STATE_CANCELLED", "TUNING_JOB_STATE_TUNING"),
    ("expired", "JOB_STATE_EXPIRED", "TUNING_JOB_STATE_WAITING_FOR_CAPACITY"),
    ("paused", "JOB_STATE_PAUSED", "TUNING_JOB_STATE_TUNING"),
])  # fmt: skip
def test_scripted_outcomes_end_jobs_as_the_service_does(fast, data, outcome, state, last_phase):
    t, client = types(), fast.genai_client()
    error = {"code": 3, "message": "Example 7 has no model turn."} if outcome == "failed" else None
    fast.next_outcome(outcome, error=error)
    job = client.tunings.tune(base_model="gemini-2.5-flash", training_dataset=t.TuningDataset(gcs_uri=data["train"]))
    job, seen = wait(fast, client, job.name)
    assert seen == [*PHASES[:[p for _, p in PHASES].index(last_phase) + 1], (state, last_phase)]
    assert job.tuned_model is None
    if outcome == "failed":
        assert job.error.code == 3 and job.error.message == "Example 7 has no model turn." and job.end_time
    if outcome == "paused":
        assert job.end_time is None and not job.has_ended


def test_the_service_fills_in_gemini_defaults_without_touching_the_recorded_body(fast, data):
    t, client = types(), fast.genai_client()
    job = client.tunings.tune(base_model="gemini-2.5-flash", training_dataset=t.TuningDataset(gcs_uri=data["train"]))
    hp = job.supervised_tuning_spec.hyper_parameters
    assert (hp.epoch_count, hp.adapter_size.value, hp.learning_rate_multiplier) == (3, "ADAPTER_SIZE_FOUR", 1.0)
    assert fast.bodies() == [{"baseModel": "gemini-2.5-flash",
                              "supervisedTuningSpec": {"trainingDatasetUri": data["train"]}}]  # fmt: skip


def test_scripted_states_queued_updating_and_partially_succeeded(fast, data):
    t, client = types(), fast.genai_client()
    error = {"code": 13, "message": "The last checkpoint could not be exported. Trace 7f3a."}
    fast.next_outcome("partially_succeeded", error=error, states={
        "TUNING_JOB_STATE_WAITING_FOR_QUOTA": "JOB_STATE_QUEUED", "TUNING_JOB_STATE_TUNING": "JOB_STATE_UPDATING"})
    job = client.tunings.tune(base_model="gemini-2.5-flash", training_dataset=t.TuningDataset(gcs_uri=data["train"]))
    job, seen = wait(fast, client, job.name)
    assert [state for state, _ in seen] == ["JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_PENDING",
                                            "JOB_STATE_UPDATING", "JOB_STATE_RUNNING", "JOB_STATE_PARTIALLY_SUCCEEDED"]
    assert job.tuned_model.checkpoints and job.error.message == error["message"] and job.end_time
    err = error_of(lambda: client.tunings.cancel(name=job.name))
    assert err.code == 400 and "JOB_STATE_PARTIALLY_SUCCEEDED" in err.message


def test_each_method_takes_its_own_fields_and_gemini_refuses_learning_rate_and_batch_size(fake_vertex, data):
    from google.auth.transport.requests import AuthorizedSession

    t, client = types(), fake_vertex.genai_client()

    def gemini(**config):
        return error_of(lambda: client.tunings.tune(base_model="gemini-2.5-flash", config=t.CreateTuningJobConfig(
            **config), training_dataset=t.TuningDataset(gcs_uri=data["train"])))

    err = gemini(learning_rate=1e-4)
    assert (err.code, err.message) == (400, "learningRate is not supported for tuning gemini-2.5-flash; use "
                                            "learningRateMultiplier.")
    assert gemini(batch_size=8).message == "batchSize is not supported for tuning gemini-2.5-flash."
    # An open model takes them, and an adapter size for LoRA, as Google's own tune_open_model.py sends it.
    client.tunings.tune(base_model="qwen/qwen3@qwen3-32b", training_dataset=t.TuningDataset(gcs_uri=data["train"]),
                        config=t.CreateTuningJobConfig(tuning_mode="TUNING_MODE_PEFT_ADAPTER", learning_rate=2e-4,
                                                       batch_size=8, adapter_size="ADAPTER_SIZE_SIXTEEN",
                                                       output_uri=data["output"]))  # fmt: skip
    session = AuthorizedSession(fake_vertex.credentials())
    url = f"{fake_vertex.url}/v1beta1/projects/fake-project/locations/us-central1/tuningJobs"

    def post(**spec):
        body = {"baseModel": "qwen/qwen3@qwen3-4b", "outputUri": data["output"], **spec}
        answer = session.post(url, json=body, timeout=10)
        return answer.status_code, answer.json()["error"]["message"]

    sft = {"trainingDatasetUri": data["train"]}
    assert post(supervisedTuningSpec={**sft, "baseTeacherModel": TEACHER}) == (
        400, 'Invalid JSON payload received. Unknown name "baseTeacherModel" at \'tuning_job.supervised_tuning_spec\': '
             "Cannot find field.")  # fmt: skip
    code, message = post(supervisedTuningSpec={**sft, "hyperParameters": {"sftLossWeightMultiplier": 0.5}})
    assert code == 400 and "tuning_job.supervised_tuning_spec.hyper_parameters" in message
    code, message = post(supervisedTuningSpec=sft, distillationSpec={"promptDatasetUri": data["prompts"],
                                                                     "baseTeacherModel": TEACHER})
    assert code == 400 and "Oneof field 'tuning_spec' is already set" in message
    session.close()
    assert len(fake_vertex.jobs) == 1


def test_a_paused_job_can_be_cancelled(fast, data):
    t, client = types(), fast.genai_client()
    fast.next_outcome("paused")
    job = client.tunings.tune(base_model="gemini-2.5-flash", training_dataset=t.TuningDataset(gcs_uri=data["train"]))
    job, _ = wait(fast, client, job.name)
    assert job.state.value == "JOB_STATE_PAUSED"
    client.tunings.cancel(name=job.name)
    assert client.tunings.get(name=job.name).state.value == "JOB_STATE_CANCELLING"
    fast.advance(fast.step_seconds)
    assert client.tunings.get(name=job.name).state.value == "JOB_STATE_CANCELLED"


def test_a_job_can_be_held_in_any_phase(fast, data):
    t, client = types(), fast.genai_client()
    fast.next_outcome("running", at="TUNING_JOB_STATE_WAITING_FOR_QUOTA")
    job = client.tunings.tune(base_model="gemini-2.5-flash", training_dataset=t.TuningDataset(gcs_uri=data["train"]))
    fast.advance(3600)
    job = client.tunings.get(name=job.name)
    assert (job.state.value, job.tuning_job_state.value) == PHASES[0]
    assert job.start_time is None and job.tuning_data_stats is None and job.experiment is None


# ====================================================================== refusals


def test_the_service_checks_model_region_and_datasets_before_accepting_a_job(fake_vertex, data):
    t, client = types(), fake_vertex.genai_client()

    def tune(base="gemini-2.5-flash", train=data["train"], client=client, **config):
        return error_of(lambda: client.tunings.tune(base_model=base, training_dataset=t.TuningDataset(gcs_uri=train),
                                                    config=t.CreateTuningJobConfig(**config) if config else None))

    err = tune(base="meta/llama9@llama-9-1t")
    assert (err.code, err.status) == (400, "INVALID_ARGUMENT") and "meta/llama9@llama-9-1t" in err.message
    missing = f"gs://{fake_vertex.bucket}/nowhere/train.jsonl"
    err = tune(train=missing)
    assert err.code == 400 and missing in err.message and "does not exist" in err.message
    broken = fake_vertex.put(fake_vertex.uri("broken.jsonl"), json.dumps(CHAT[0]) + "\n{not json\n")
    err = tune(train=broken)
    assert err.code == 400 and f"Line 2 of {broken}" in err.message and "not valid JSON" in err.message
    err = tune(validation_dataset=t.TuningValidationDataset(gcs_uri=missing))
    assert "validationDatasetUri" in err.message
    err = tune(base="qwen/qwen3@qwen3-4b", output_uri=data["output"], method="DISTILLATION",
               base_teacher_model="openai/gpt-oss-120b-maas")  # fmt: skip
    assert "openai/gpt-oss-120b-maas" in err.message
    err = tune(base="meta/llama3_1@llama-3.1-8b")
    assert "output_uri" in err.message

    far = fake_vertex.genai_client(location="southamerica-east1")
    err = tune(base="meta/llama3_1@llama-3.1-8b", client=far, output_uri=data["output"])
    assert err.code == 400 and "southamerica-east1" in err.message and "us-central1" in err.message
    fake_vertex.regions["gemini-2.5-flash"] = {"europe-west4"}
    assert "us-central1" in tune().message
    assert not fake_vertex.jobs


def test_scripted_failures_use_the_services_codes_and_messages(fake_vertex, data):
    t, client = types(), fake_vertex.genai_client()

    def tune():
        return client.tunings.tune(base_model="gemini-2.5-flash",
                                   training_dataset=t.TuningDataset(gcs_uri=data["train"]))

    fake_vertex.exhaust_quota()
    err = error_of(tune)
    assert (err.code, err.status) == (429, "RESOURCE_EXHAUSTED") and "Quota exceeded" in err.message
    name = tune().name  # the quota error was for one request only

    fake_vertex.deny("aiplatform.tuningJobs.create")
    err = error_of(tune)
    assert (err.code, err.status) == (403, "PERMISSION_DENIED")
    assert "Permission 'aiplatform.tuningJobs.create' denied" in err.message
    assert client.tunings.get(name=name).name == name  # reading is still allowed

    err = error_of(lambda: client.tunings.get(name=name.rsplit("/", 1)[0] + "/424242"))
    assert (err.code, err.status) == (404, "NOT_FOUND") and "424242" in err.message

    fake_vertex.fail_next(503, "The service is currently unavailable.", method="GET", times=1)
    assert error_of(lambda: client.tunings.get(name=name)).code == 503

    fake_vertex.disable_api("fake-project")
    err = error_of(lambda: client.tunings.get(name=name))
    assert err.code == 403 and err.message.startswith(
        "Vertex AI API has not been used in project 123456789012 before or it is disabled.")
    assert err.details["error"]["details"][0]["reason"] == "SERVICE_DISABLED"


def test_every_fifth_get_of_a_job_is_throttled_and_a_connection_can_be_dropped(fake_vertex, data):
    import httpx

    t, client = types(), fake_vertex.genai_client()
    fake_vertex.next_outcome("running")
    train = t.TuningDataset(gcs_uri=data["train"])
    name = client.tunings.tune(base_model="gemini-2.5-flash", training_dataset=train).name
    for _ in range(4):
        client.tunings.get(name=name)
    err = error_of(lambda: client.tunings.get(name=name))
    assert (err.code, err.status) == (429, "RESOURCE_EXHAUSTED") and "Quota exceeded for quota metric" in err.message
    assert fake_vertex.throttled == 1 and client.tunings.get(name=name).name == name
    fake_vertex.throttle_every = None
    for _ in range(10):
        client.tunings.get(name=name)
    fake_vertex.drop_next(method="GET", path=r"/tuningJobs/")
    with pytest.raises(httpx.RemoteProtocolError):  # the server closed the connection without an answer
        client.tunings.get(name=name)
    assert client.tunings.get(name=name).name == name


def test_every_request_needs_the_fakes_bearer_token(fake_vertex):
    import requests

    assert fake_vertex.token.startswith("ya29.fake-vertex-token-")
    url = f"{fake_vertex.url}/v1beta1/projects/fake-project/locations/us-central1/tuningJobs"
    for headers in ({}, {"Authorization": "Bearer ya29.someone-else"}):
        answer = requests.get(url, headers=headers, timeout=10)
        assert answer.status_code == 401
        assert answer.json()["error"]["status"] == "UNAUTHENTICATED" and answer.json()["error"]["code"] == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {fake_vertex.token}"}, timeout=10).json() == {}
    assert [r.method for r in fake_vertex.requests] == ["GET"] * 3


# ====================================================================== deploy, predict, chat


def test_model_garden_deploy_of_the_final_checkpoint_then_predict(fast, data):
    pytest.importorskip("vertexai")
    from google.cloud import aiplatform
    from vertexai.preview import model_garden

    final = f"{data['output']}/postprocess/node-0/checkpoints/final"
    fast.put(f"{final}/model-00001-of-00001.safetensors", b"weights")
    fast.init_vertexai()
    endpoint = model_garden.CustomModel(gcs_uri=final).deploy(
        machine_type="g2-standard-12", accelerator_type="NVIDIA_L4", accelerator_count=1)
    deploy = next(r for r in fast.requests if r.path.endswith(":deploy"))
    assert deploy.path == "/v1beta1/projects/fake-project/locations/us-central1:deploy"
    assert deploy.body == {"customModel": {"gcsUri": final}, "deployConfig": {"dedicatedResources": {
        "machineSpec": {"machineType": "g2-standard-12", "acceleratorType": 11, "acceleratorCount": 1},
        "minReplicaCount": 1, "maxReplicaCount": 1}}}  # fmt: skip  (NVIDIA_L4 goes as its enum number)
    assert any(r.path.startswith("/ui/projects/") and "/operations/" in r.path for r in fast.requests)
    assert endpoint.resource_name.startswith("projects/123456789012/locations/us-central1/endpoints/")

    loaded = aiplatform.Endpoint(endpoint.resource_name)
    instance = {"prompt": "What is a car?", "max_tokens": 200, "temperature": 1.0, "top_p": 1.0, "top_k": 1}
    raw = loaded.predict(instances=[{**instance, "raw_response": True}]).predictions[0]
    framed = loaded.predict(instances=[instance]).predictions[0]
    assert "What is a car?" in raw and framed == f"Prompt:\nWhat is a car?\nOutput:\n{raw}"
    short = loaded.predict(instances=[{**instance, "max_tokens": 2, "raw_response": True}]).predictions[0]
    assert short == " ".join(raw.split()[:2])
    assert fast.requests[-1].path.startswith("/v1/") and fast.requests[-1].body["instances"][0]["top_k"] == 1

    with pytest.raises(Exception, match="safetensors"):
        model_garden.CustomModel(gcs_uri=f"gs://{fast.bucket}/empty").deploy()


def test_chat_completions_for_managed_open_models(fake_vertex):
    from google.auth.transport.requests import AuthorizedSession

    session = AuthorizedSession(fake_vertex.credentials())
    url = f"{fake_vertex.url}/v1beta1/projects/fake-project/locations/us-central1/endpoints/openapi/chat/completions"
    body = {"model": "meta/llama3_1@llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "Hi there"}]}
    answer = session.post(url, json=body, timeout=10).json()
    text = answer["choices"][0]["message"]["content"]
    assert "Hi there" in text and answer["usage"]["prompt_tokens"] == 2
    events = session.post(url, json={**body, "stream": True}, timeout=10).text.split("\r\n\r\n")
    chunks = [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == text
    assert events[-2] == "data: [DONE]"


# ====================================================================== metrics, the way the seed reads them


def test_the_experiment_run_gives_the_loss_curves_through_aiplatform(fast, data):
    pytest.importorskip("vertexai")
    pytest.importorskip("pandas")
    from google.cloud import aiplatform

    t, client = types(), fast.genai_client()
    validation = t.TuningValidationDataset(gcs_uri=data["validation"])
    job = client.tunings.tune(base_model="gemini-2.5-flash", training_dataset=t.TuningDataset(gcs_uri=data["train"]),
                              config=t.CreateTuningJobConfig(epoch_count=2, validation_dataset=validation))
    job, _ = wait(fast, client, job.name)
    fast.init_vertexai()
    experiment = job.experiment.split("/")[-1]
    run = aiplatform.ExperimentRun(experiment.replace("tuning-experiment", "tuning-experiment-run"),
                                   experiment=experiment)  # fmt: skip
    frame = run.get_time_series_data_frame()
    assert list(frame["step"]) == [1, 2, 3, 4, 5, 6]
    assert {"/train_total_loss", "/eval_total_loss", "/train_fraction_of_correct_next_step_preds",
            "/eval_fraction_of_correct_next_step_preds"} <= set(frame.columns)  # fmt: skip
    assert frame["/train_total_loss"].iloc[-1] < frame["/train_total_loss"].iloc[0]
    assert frame["/eval_total_loss"].notna().tolist() == [False, False, True, False, False, True]
