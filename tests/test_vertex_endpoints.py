"""Serving on Vertex AI (tuning_magics.backends.vertex.endpoints), through the real google-genai and
google-cloud-aiplatform SDKs against the fake Vertex AI API (tests/fake_vertex.py) and the Cloud Storage emulator:
Model Garden deploy of a tuned open model, chat through predict, generate_content and chat completions."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest

import tuning_magics as tm
from tuning_magics.errors import UserError

pytest.importorskip("google.genai")
pytestmark = pytest.mark.filterwarnings("ignore:The SDK's tuning implementation is experimental")

from tuning_magics.backends.vertex import endpoints  # noqa: E402
from fake_vertex import CHAT, TEACHER  # noqa: E402



@pytest.fixture
def vertex(vertex):
    """The signed-in fake, with jobs that move only when the test moves its clock and quick deployments."""
    vertex.step_seconds = 60
    vertex.deploy_seconds = 0.05
    return vertex


@pytest.fixture
def train(vertex):
    return vertex.put(vertex.uri("train.jsonl"), CHAT)


def finish(fake, job, limit=30):
    """Refresh the job, moving the fake's clock a step each time, until it ends."""
    for _ in range(limit):
        if job.refresh().done:
            return job
        fake.advance(fake.step_seconds)
    raise AssertionError(f"{job.name} did not end: {job.state}")


@pytest.fixture
def llama(vertex, train):
    """A succeeded Llama 3.1 8B job with its checkpoints in the emulator."""
    job = tm.tune("meta/llama3_1@llama-3.1-8b", train, tuning_mode="PEFT_ADAPTER", epochs=3,
                  output_uri=f"gs://{vertex.bucket}/out-{time.time_ns()}")
    return finish(vertex, job)


@pytest.fixture
def gemini(vertex, train):
    """A succeeded Gemini 2.5 Flash job: a tuned model served with two checkpoints."""
    return finish(vertex, tm.tune("gemini-2.5-flash", train, epochs=2))


def requests_to(fake, pattern):
    import re

    return [r for r in fake.requests if re.search(pattern, r.path)]


def no_token_in(fake, *texts):
    for text in texts:
        assert fake.token not in str(text)


# ====================================================================== deploy


def test_deploying_an_open_model_job_sends_the_seeds_machine_and_the_final_checkpoint(vertex, llama):
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        endpoint = llama.deploy()
    deploy = requests_to(vertex, r":deploy$")
    assert len(deploy) == 1 and deploy[0].path == "/v1beta1/projects/fake-project/locations/us-central1:deploy"
    final = f"{llama.output_uri}/postprocess/node-0/checkpoints/final"
    assert deploy[0].body == {"customModel": {"gcsUri": final}, "deployConfig": {"dedicatedResources": {
        "machineSpec": {"machineType": "g2-standard-12", "acceleratorType": 11, "acceleratorCount": 1},
        "minReplicaCount": 1, "maxReplicaCount": 1}}}  # fmt: skip  (NVIDIA_L4 goes as its enum number)
    assert endpoint.kind == "deployed" and endpoint.source == final
    assert endpoint.name.startswith("projects/123456789012/locations/us-central1/endpoints/")
    assert endpoint.name in repr(endpoint) and "deployed" in repr(endpoint)
    no_token_in(vertex, out.getvalue(), repr(endpoint))


def test_a_named_checkpoint_and_other_machines_can_be_deployed(vertex, llama):
    steps = [c.step for c in llama.checkpoints if c.step is not None]
    endpoint = llama.deploy(checkpoint=steps[0], machine_type="a2-highgpu-1g", accelerator_type="NVIDIA_TESLA_A100",
                            accelerator_count=1, endpoint_display_name="first-epoch")
    body = requests_to(vertex, r":deploy$")[-1].body
    assert body["customModel"]["gcsUri"].endswith(f"/postprocess/node-0/checkpoints/checkpoint-{steps[0]}")
    assert body["deployConfig"]["dedicatedResources"]["machineSpec"]["machineType"] == "a2-highgpu-1g"
    assert body["endpointConfig"]["endpointDisplayName"] == "first-epoch"
    assert endpoint.source.endswith(f"checkpoint-{steps[0]}")
    # chat picks the endpoint of the checkpoint asked for, by step or by name
    assert llama.chat("hi", checkpoint=steps[0]) == llama.chat("hi", checkpoint=f"checkpoint-{steps[0]}")
    with pytest.raises(UserError, match=r"job.deploy\(checkpoint='final'\)"):
        llama.chat("hi", checkpoint="final")


@pytest.mark.parametrize(("options", "field"), [
    ({"machine_type": 12}, "machine_type"),
    ({"machine_type": ""}, "machine_type"),
    ({"accelerator_type": None}, "accelerator_type"),
    ({"accelerator_count": 0}, "accelerator_count"),
    ({"accelerator_count": 1.5}, "accelerator_count"),
    ({"accelerator_count": True}, "accelerator_count"),
    ({"accelerator_count": "1"}, "accelerator_count"),
    ({"endpoint_display_name": ""}, "endpoint_display_name"),
    ({"timeout": -1}, "timeout"),
    ({"checkpoint": "checkpoint-999"}, "checkpoint"),
    ({"machine": "g2-standard-12"}, "machine"),
])  # fmt: skip
def test_a_bad_deploy_option_is_one_line_naming_it_and_deploys_nothing(vertex, llama, options, field):
    with pytest.raises(UserError) as info:
        llama.deploy(**options)
    assert info.value.field == field and field in str(info.value) and "\n" not in str(info.value)
    assert not requests_to(vertex, r":deploy$")


def test_a_job_that_has_not_succeeded_is_not_deployed(vertex, train):
    job = tm.tune("meta/llama3_1@llama-3.1-8b", train, epochs=1, output_uri=f"gs://{vertex.bucket}/out-running")
    with pytest.raises(UserError, match=r"is JOB_STATE_PENDING: only a job that succeeded can be deployed") as info:
        job.deploy()
    assert "\n" not in str(info.value)
    vertex.next_outcome("failed")
    failed = finish(vertex, tm.tune("meta/llama3_1@llama-3.1-8b", train, epochs=1,
                                    output_uri=f"gs://{vertex.bucket}/out-failed"))
    with pytest.raises(UserError, match="JOB_STATE_FAILED"):
        failed.deploy()
    assert not requests_to(vertex, r":deploy$")


def test_a_deploy_the_service_refuses_is_one_line_naming_the_project_without_the_token(vertex, llama):
    vertex.deny("aiplatform.endpoints.deploy")
    with pytest.raises(UserError) as info:
        llama.deploy()
    message = str(info.value)
    assert "permission denied" in message and "fake-project" in message and "\n" not in message
    no_token_in(vertex, message)


# ====================================================================== chat with a deployed open model


def test_an_open_model_job_chats_through_predict_with_the_seeds_instance(vertex, llama):
    with pytest.raises(UserError, match=r"call job.deploy\(\) first"):
        llama.chat("hi")  # chat never deploys by itself
    assert not requests_to(vertex, r":deploy$")
    endpoint = llama.deploy()
    reply = endpoint.chat("hi")
    predict = requests_to(vertex, r":predict$")
    assert len(predict) == 1 and predict[0].path == f"/v1/{endpoint.name}:predict"
    assert predict[0].body == {"instances": [{"prompt": "hi", "max_tokens": 200, "temperature": 1.0, "top_p": 1.0,
                                              "top_k": 1, "raw_response": True}]}  # fmt: skip
    assert "hi" in reply and not reply.startswith("Prompt:")
    # the job answers through the endpoint its deploy() returned, also when read back by name
    assert llama.chat("hi") == reply and tm.get_job(llama.name).chat("hi") == reply
    assert len(requests_to(vertex, r":predict$")) == 3


def test_chat_options_become_the_instances_fields(vertex, llama):
    endpoint = llama.deploy()
    reply = endpoint.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a car."}],
                          max_new_tokens=3, temperature=0.2, top_p=0.9, top_k=40, seed=7)
    instance = requests_to(vertex, r":predict$")[-1].body["instances"][0]
    assert instance == {"prompt": "System: Be brief.\nUser: Name a car.\nAssistant:", "max_tokens": 3,
                        "temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7, "raw_response": True}
    assert len(reply.split()) == 3
    pieces = list(endpoint.chat("hi", stream=True))
    assert pieces == [endpoint.chat("hi")]  # predict has no stream: the reply comes as one piece


def test_a_mistake_is_one_line_before_any_request(vertex, llama):
    endpoint = llama.deploy()
    before = len(vertex.requests)
    for call, field in ((lambda: endpoint.chat("hi", temperature=-1), "temperature"),
                        (lambda: endpoint.chat("hi", stream=True, temperature=-1), "temperature"),
                        (lambda: llama.chat("hi", temperature=-1), "temperature"),
                        (lambda: endpoint.chat([]), "messages"),
                        (lambda: endpoint.chat("hi", max_tokens=5), "max_tokens"),
                        (lambda: endpoint.chat([{"role": "robot", "content": "hi"}]), "messages[0].role")):
        with pytest.raises(UserError) as info:
            call()
        assert info.value.field == field and "\n" not in str(info.value)
    assert len(vertex.requests) == before


def test_an_endpoint_that_is_gone_is_one_line_naming_the_project(vertex, llama):
    endpoint = llama.deploy()
    vertex.endpoints.pop(endpoint.name)
    with pytest.raises(UserError) as info:
        endpoint.chat("hi")
    message = str(info.value)
    assert message.startswith("not found:") and "fake-project" in message and "\n" not in message
    no_token_in(vertex, message)


# ====================================================================== the notebook's own aiplatform settings

_SDK_SETTINGS = ("_project", "_location", "_credentials", "_api_endpoint", "_api_transport")


@pytest.fixture
def users_sdk():
    """The notebook's own ``vertexai.init(project="users-project", location="europe-west4")``, undone afterwards."""
    import vertexai
    from google.cloud.aiplatform import initializer

    config = initializer.global_config
    saved = {name: getattr(config, name) for name in _SDK_SETTINGS}
    for name in _SDK_SETTINGS:
        setattr(config, name, None)  # as in a fresh kernel
    vertexai.init(project="users-project", location="europe-west4")
    try:
        yield config
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def test_deploy_chat_and_delete_leave_the_notebooks_own_vertexai_settings_as_they_were(vertex, llama, users_sdk):
    before = {name: getattr(users_sdk, name) for name in _SDK_SETTINGS}
    assert before["_project"] == "users-project" and before["_location"] == "europe-west4"
    endpoint = llama.deploy()
    assert {name: getattr(users_sdk, name) for name in _SDK_SETTINGS} == before
    assert endpoint.chat("hi") == llama.chat("hi")
    assert {name: getattr(users_sdk, name) for name in _SDK_SETTINGS} == before
    endpoint.delete()
    assert {name: getattr(users_sdk, name) for name in _SDK_SETTINGS} == before
    assert users_sdk.project == "users-project" and users_sdk.location == "europe-west4"
    # and ours went to the configured project and region, not the notebook's
    assert requests_to(vertex, r":deploy$")[0].path == "/v1beta1/projects/fake-project/locations/us-central1:deploy"
    assert not [r for r in vertex.requests if "europe-west4" in r.path or "users-project" in r.path]


def test_a_chat_after_the_api_endpoint_setting_is_removed_goes_to_the_regions_own_endpoint(vertex, llama,
                                                                                            monkeypatch):
    import socket

    endpoint = llama.deploy()
    assert endpoint.chat("hi")
    monkeypatch.delenv("TUNING_MAGICS_API_ENDPOINT")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    looked_up, real = [], socket.getaddrinfo

    def local_only(host, *args, **kwargs):  # the tests reach 127.0.0.1 only: any other host is refused here
        if host not in ("127.0.0.1", "localhost"):
            looked_up.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "no network in the tests")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    before = len(vertex.requests)
    again = endpoints.VertexEndpoint(endpoint.name, "deployed")  # reads the settings as they are now
    with pytest.raises(UserError, match=r"cannot reach Vertex AI at us-central1-aiplatform.googleapis.com"):
        again.chat("hi")
    assert looked_up and set(looked_up) == {"us-central1-aiplatform.googleapis.com"}
    assert len(vertex.requests) == before  # nothing went to the endpoint set before


# ====================================================================== tuned Gemini


def test_a_gemini_job_chats_through_generate_content_on_its_final_endpoint(vertex, gemini):
    reply = gemini.chat("Why is the sky blue?")
    call = requests_to(vertex, r":generateContent$")[-1]
    assert call.path.endswith(f"{gemini.endpoint}:generateContent")
    assert call.body["contents"] == [{"role": "user", "parts": [{"text": "Why is the sky blue?"}]}]
    assert "generationConfig" not in call.body  # the service's defaults, unless the call says otherwise
    assert "Why is the sky blue?" in reply
    assert not requests_to(vertex, r":deploy$")


def test_a_gemini_job_chats_on_a_named_checkpoint_with_options_and_a_system_instruction(vertex, gemini):
    first = [c for c in gemini.checkpoints if c.name != "final"][0]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why is the sky blue?"}]
    reply = gemini.chat(messages, checkpoint=first.name, temperature=0.3, max_new_tokens=4, top_k=5, seed=1)
    call = requests_to(vertex, r":generateContent$")[-1]
    assert call.path.endswith(f"{first.uri}:generateContent") and first.uri != gemini.endpoint
    assert call.body["systemInstruction"]["parts"] == [{"text": "Answer briefly."}]
    assert [c["role"] for c in call.body["contents"]] == ["user", "model", "user"]
    assert call.body["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 4, "topK": 5, "seed": 1}
    assert len(reply.split()) == 4
    by_step = gemini.chat(messages, checkpoint=first.step, temperature=0.3, max_new_tokens=4, top_k=5, seed=1)
    assert by_step == reply and requests_to(vertex, r":generateContent$")[-1].path == call.path
    with pytest.raises(UserError, match=r"no checkpoint 'checkpoint-9'; choose one of checkpoint-1 \(step 3\)"):
        gemini.chat("hi", checkpoint="checkpoint-9")


def test_a_gemini_job_streams_its_reply(vertex, gemini):
    whole = gemini.chat("Why is the sky blue?")
    pieces = list(gemini.chat("Why is the sky blue?", stream=True))
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert requests_to(vertex, r":streamGenerateContent$")[-1].query == {"alt": ["sse"]}


def test_deploying_a_gemini_job_returns_its_endpoint_without_deploying(vertex, gemini):
    endpoint = gemini.deploy()
    assert endpoint.kind == "gemini" and endpoint.name == gemini.endpoint
    assert endpoint.chat("hi") == gemini.chat("hi")
    assert not requests_to(vertex, r":deploy$")
    with pytest.raises(UserError, match="served by Vertex AI"):
        endpoint.delete()


def test_a_gemini_job_that_has_not_finished_does_not_chat(vertex, train):
    job = tm.tune("gemini-2.5-flash", train, epochs=1)
    with pytest.raises(UserError, match="only a job that succeeded can answer"):
        job.chat("hi")


# ====================================================================== managed open models


def test_a_managed_open_model_answers_through_chat_completions(vertex):
    endpoint = endpoints.managed_endpoint(TEACHER)
    assert endpoint.kind == "managed" and TEACHER in repr(endpoint)
    reply = endpoint.chat("Hi there", max_new_tokens=3, temperature=0.5)
    call = requests_to(vertex, r"/chat/completions$")[-1]
    assert call.path == "/v1beta1/projects/fake-project/locations/us-central1/endpoints/openapi/chat/completions"
    assert call.headers["authorization"] == f"Bearer {vertex.token}"
    assert call.body == {"model": TEACHER, "messages": [{"role": "user", "content": "Hi there"}], "stream": False,
                         "max_tokens": 3, "temperature": 0.5}  # fmt: skip
    assert len(reply.split()) == 3
    pieces = list(endpoint.chat("Hi there", stream=True))
    assert len(pieces) > 1 and "".join(pieces).strip() == endpoint.chat("Hi there").strip()
    assert requests_to(vertex, r"/chat/completions$")[-2].body["stream"] is True


def test_a_managed_model_error_is_one_line_without_the_token(vertex):
    endpoint = endpoints.managed_endpoint(TEACHER)
    vertex.fail_next(429, f"Quota exceeded for {TEACHER}; token was Bearer {vertex.token}", path="chat/completions")
    with pytest.raises(UserError) as info:
        endpoint.chat("hi")
    message = str(info.value)
    assert message.startswith("quota exceeded in project fake-project, us-central1") and "\n" not in message
    no_token_in(vertex, message)
    vertex.fail_next(403, "Permission denied on the model.", path="chat/completions")
    with pytest.raises(UserError, match="permission denied"):
        list(endpoint.chat("hi", stream=True))
    with pytest.raises(UserError) as info:
        endpoints.managed_endpoint("not a model")
    assert info.value.field == "model_id"


def test_deleting_a_deployed_endpoint_undeploys_its_model_and_forgets_it(vertex, llama):
    endpoint = llama.deploy()
    endpoint.delete()
    assert endpoint.name not in vertex.endpoints
    undeploy = requests_to(vertex, r":undeployModel$")
    assert len(undeploy) == 1 and undeploy[0].body["deployedModelId"]
    assert [r.method for r in requests_to(vertex, endpoint.name.rsplit("/", 1)[1] + "$")][-1] == "DELETE"
    with pytest.raises(UserError, match=r"call job.deploy\(\) first"):
        llama.chat("hi")  # the job no longer answers through the deleted endpoint


# ====================================================================== batch prediction


def test_a_gemini_job_runs_a_batch_prediction_over_a_jsonl_file(vertex, gemini):
    requests = [{"request": {"contents": [{"role": "user", "parts": [{"text": f"Question {i}?"}]}]}}
                for i in range(3)]  # fmt: skip
    src = vertex.put(vertex.uri("batch.jsonl"), requests)
    dest = f"gs://{vertex.bucket}/batch-out"
    batch = endpoints.batch_predict(gemini, src, dest)
    body = vertex.bodies(path=r"/batchPredictionJobs$")[-1]
    assert body["model"] == gemini.tuned_model_name
    assert body["inputConfig"] == {"instancesFormat": "jsonl", "gcsSource": {"uris": [src]}}
    assert body["outputConfig"] == {"predictionsFormat": "jsonl", "gcsDestination": {"outputUriPrefix": dest}}
    assert batch.state == "JOB_STATE_PENDING" and not batch.done and batch.output_uri is None
    for _ in range(5):
        if batch.refresh().done:
            break
        vertex.advance(vertex.step_seconds)
    assert batch.state == "JOB_STATE_SUCCEEDED" and batch.output_uri.startswith(dest + "/")
    assert "SUCCEEDED" in repr(batch)
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket, folder = batch.output_uri[len("gs://"):].split("/", 1)
    blob = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(bucket).blob(
        f"{folder}/predictions.jsonl")
    assert blob.download_as_text().count("Question") == 6  # each line: the request and its answer
    # the Gemini endpoint deploy() returns knows its tuned model too
    endpoints.batch_predict(gemini.deploy(), src, dest)
    assert vertex.bodies(path=r"/batchPredictionJobs$")[-1]["model"] == gemini.tuned_model_name


def test_batch_prediction_mistakes_are_one_line(vertex, gemini, llama):
    with pytest.raises(UserError) as info:
        endpoints.batch_predict(gemini, "/tmp/batch.jsonl", f"gs://{vertex.bucket}/out")
    assert info.value.field == "src_gs_uri"
    with pytest.raises(UserError, match="open model"):
        endpoints.batch_predict(llama, vertex.uri("batch.jsonl"), f"gs://{vertex.bucket}/out")
    missing = vertex.uri("missing.jsonl")
    with pytest.raises(UserError) as info:
        endpoints.batch_predict(gemini, missing, f"gs://{vertex.bucket}/out")
    assert "rejected" in str(info.value) and missing in str(info.value) and "\n" not in str(info.value)
    assert not vertex.batches
