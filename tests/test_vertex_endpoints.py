"""Serving on Vertex AI (tuning_magics.backends.vertex.endpoints), through the real google-genai and
google-cloud-aiplatform SDKs against the fake Vertex AI API (tests/fake_vertex.py) and the Cloud Storage emulator:
Model Garden deploy of a tuned open model (minutes long on the fake's clock, followed in the background, to a
dedicated endpoint), chat through predict with the model's chat template, generate_content and chat completions."""

from __future__ import annotations

import io
import re
import threading
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest
from conftest import finish

import tuning_magics as tm
from tuning_magics.errors import UserError

pytest.importorskip("google.genai")
pytestmark = pytest.mark.filterwarnings("ignore:The SDK's tuning implementation is experimental")

from tuning_magics.backends.vertex import endpoints  # noqa: E402
from fake_vertex import CHAT, TEACHER, chat_reply  # noqa: E402



@pytest.fixture
def vertex(vertex):
    """The signed-in fake, with jobs and deployments (20 minutes) that move only when the test moves its clock."""
    vertex.step_seconds = 60
    return vertex


@pytest.fixture
def train(vertex):
    return vertex.put(vertex.uri("train.jsonl"), CHAT)


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


def deployed(fake, job, **options):
    """``job.deploy(**options)``, its clock moved to the end of the deployment, and waited for."""
    endpoint = job.deploy(**options)
    fake.advance(fake.deploy_seconds + fake.dns_delay)
    return endpoint.wait(timeout=30, poll=0.01)


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
        endpoint = deployed(vertex, llama)
    deploy = requests_to(vertex, r":deploy$")
    assert len(deploy) == 1 and deploy[0].path == "/v1beta1/projects/fake-project/locations/us-central1:deploy"
    final = f"{llama.output_uri}/postprocess/node-0/checkpoints/final"
    endpoint_id = deploy[0].body["endpointConfig"]["endpointUserId"]
    assert deploy[0].body == {"customModel": {"gcsUri": final}, "endpointConfig": {"endpointUserId": endpoint_id},
                              "deployConfig": {"dedicatedResources": {
        "machineSpec": {"machineType": "g2-standard-12", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 1},
        "minReplicaCount": 1, "maxReplicaCount": 1}}}  # fmt: skip
    assert endpoint_id.startswith(f"tm-{llama.id}-final-")
    assert endpoint.kind == "deployed" and endpoint.source == final and endpoint.state == "READY"
    assert endpoint.name == f"projects/123456789012/locations/us-central1/endpoints/{endpoint_id}"
    assert endpoint.name in repr(endpoint) and "deployed" in repr(endpoint)
    no_token_in(vertex, out.getvalue(), repr(endpoint))


def test_deploy_returns_at_once_named_and_says_how_long_it_has_been_deploying(vertex, llama):
    started = time.monotonic()
    endpoint = llama.deploy()
    assert time.monotonic() - started < 20  # a 20-minute deploy on the fake's clock: deploy() did not wait for it
    assert endpoint.state == "DEPLOYING" and not endpoint.done
    assert endpoint.name.rsplit("/", 1)[1] == requests_to(vertex, r":deploy$")[0].body["endpointConfig"][
        "endpointUserId"]  # known before the service is done, though the operation never names it
    assert "DEPLOYING" in repr(endpoint) and endpoint.name in repr(endpoint)
    for call in (lambda: endpoint.chat("hi"), lambda: llama.chat("hi"), lambda: list(llama.chat("hi", stream=True))):
        with pytest.raises(UserError, match=r"is still deploying \(0 min so far; .*endpoint.wait\(\)") as info:
            call()
        assert endpoint.name in str(info.value)
    vertex.advance(7 * 60)
    with pytest.raises(UserError, match=r"still deploying \(7 min so far"):
        llama.chat("hi")
    ops = [r for r in vertex.requests if "/operations/" in r.path]
    assert ops and all(r.method == "GET" and r.path.startswith("/v1beta1/") for r in ops)
    assert not requests_to(vertex, r":predict$")  # nothing is asked of an endpoint that is not up
    vertex.advance(14 * 60)
    assert endpoint.wait(timeout=30, poll=0.01) is endpoint and endpoint.state == "READY"
    assert endpoint.chat("hi") == llama.chat("hi") and "hi" in endpoint.chat("hi")
    assert "21 min" not in repr(endpoint) and endpoint.elapsed >= 20 * 60


def test_a_wait_that_times_out_names_the_endpoint_and_how_to_delete_it(vertex, llama):
    endpoint = llama.deploy()
    vertex.advance(3 * 60)
    with pytest.raises(TimeoutError) as info:
        endpoint.wait(timeout=0.3, poll=0.05)
    message = str(info.value)
    assert endpoint.name in message and "3 min so far" in message and "endpoint.delete()" in message
    assert "network" not in message and "\n" not in message
    with pytest.raises(TimeoutError, match=r"still deploying after 0.3 s \(3 min so far"):
        endpoint.delete(timeout=0.3, poll=0.05)  # delete() waits for a deploy under way, as wait() does
    # deploy(timeout=...) waits that long and says the same; the deploy goes on and the job knows its endpoint
    with pytest.raises(TimeoutError, match=r"endpoint projects/123456789012/.+/endpoints/tm-.+ is still deploying"):
        llama.deploy(checkpoint="final", timeout=0.2)
    with pytest.raises(UserError, match="still deploying"):
        llama.chat("hi")
    vertex.advance(20 * 60)
    assert endpoint.wait(timeout=30, poll=0.01).state == "READY"
    endpoint.delete()
    assert endpoint.state == "DELETED" and endpoint.name not in vertex.endpoints


def test_delete_during_a_deploy_waits_for_it_then_removes_the_endpoint(vertex, llama):
    """The service refuses to undeploy while a model is being deployed: delete() waits, so nothing is left billing."""
    endpoint = llama.deploy()
    vertex.advance(3 * 60)
    threading.Timer(0.5, vertex.advance, args=(20 * 60,)).start()  # the deploy ends while delete() waits
    endpoint.delete(poll=0.05)  # the fake, like the service, refuses to undeploy or delete while deploying
    assert endpoint.state == "DELETED" and endpoint.name not in vertex.endpoints
    endpoint.delete()  # again: nothing left to delete, and nothing asked of the service
    assert len(requests_to(vertex, r":undeployModel$")) == 1


def test_a_look_that_fails_on_the_way_is_tried_again_and_a_refusal_is_one_line(vertex, llama):
    endpoint = llama.deploy()
    vertex.advance(20 * 60)
    vertex.fail_next(503, "The service is currently unavailable.", path="/operations/", times=2)
    assert endpoint.wait(timeout=30, poll=0.01).state == "READY"
    again = llama.deploy()
    vertex.deny("aiplatform.operations.get")
    vertex.fail_next(403, "Permission 'aiplatform.operations.get' denied.", path="/operations/")
    with pytest.raises(UserError) as info:
        again.wait(timeout=30, poll=0.01)
    assert "permission denied" in str(info.value) and again.name in str(info.value)


def test_a_deploy_that_fails_says_why_in_one_line_and_its_endpoint_can_be_deleted(vertex, llama):
    vertex.fail_deploy()
    endpoint = llama.deploy()
    vertex.advance(20 * 60)
    with pytest.raises(UserError) as info:
        endpoint.wait(timeout=30, poll=0.01)
    message = str(info.value)
    assert endpoint.state == "FAILED" and message == endpoint.error and "\n" not in message
    assert "RESOURCE_EXHAUSTED" in message and "custom_model_serving_nvidia_l4_gpus" in message
    assert "g2-standard-12 with 1 NVIDIA_L4" in message and endpoint.name in message
    with pytest.raises(UserError, match="RESOURCE_EXHAUSTED"):
        llama.chat("hi")
    endpoint.delete()  # the endpoint the deploy made, empty
    assert endpoint.name not in vertex.endpoints


def test_a_named_checkpoint_and_other_machines_can_be_deployed(vertex, llama):
    steps = [c.step for c in llama.checkpoints if c.step is not None]
    endpoint = deployed(vertex, llama, checkpoint=steps[0], machine_type="a2-highgpu-1g",
                        accelerator_type="NVIDIA_TESLA_A100", accelerator_count=1, endpoint_display_name="first-epoch")
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


def test_an_accelerator_the_service_does_not_know_is_one_line_naming_it(vertex, llama):
    with pytest.raises(UserError) as info:
        llama.deploy(accelerator_type="NVIDIA_L5")
    message = str(info.value)
    assert message.startswith("Vertex AI rejected the request to deploy") and "accelerator_type" in message
    assert "NVIDIA_L5" in message and "\n" not in message


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


# ====================================================================== the deployment in the notebook


@pytest.fixture
def kernel(monkeypatch):
    """A kernel that records the parent header each thread sets (as ipykernel 7 keeps one per thread)."""
    from tuning_magics.display import monitor

    class Kernel:
        _parent_ident = {"shell": b"ident"}

        def __init__(self):
            self.header, self.set_in = {"header": {"msg_id": "cell-1"}}, []

        def get_parent(self, channel=None):
            return self.header

        def set_parent(self, ident, parent, channel="shell"):
            self.set_in.append((threading.current_thread().name, parent))

    k = Kernel()
    monkeypatch.setattr(monitor, "_kernel", lambda: (k, None))
    return k


def test_the_deployment_shows_its_state_elapsed_and_name_live_from_a_thread(vertex, llama, kernel, monkeypatch):
    pytest.importorskip("ipywidgets")
    from tuning_magics.display import deploy

    monkeypatch.setattr(deploy, "TICK", 0.02)
    endpoint = llama.deploy()
    view = deploy.DeployMonitor(endpoint)
    tree = [id(w) for w in view.widget.children]
    assert "DEPLOYING" in view.state.value and endpoint.name in view.details.value
    assert "g2-standard-12 with 1 NVIDIA_L4" in view.details.value and "elapsed 0:0" in view.times.value
    kernel.header = {"header": {"msg_id": "a-later-cell"}}  # the kernel moved on to another cell
    monkeypatch.setattr(type(endpoint), "poll_interval", lambda self, looks: 0.02)
    view.start()
    vertex.advance(12 * 60)
    deadline = time.monotonic() + 10
    while "elapsed 12:" not in view.times.value and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "elapsed 12:" in view.times.value and view.running
    vertex.advance(10 * 60)
    view.wait(10)
    assert not view.running and "READY" in view.state.value and endpoint.state == "READY"
    assert [id(w) for w in view.widget.children] == tree  # built once, only values changed
    assert kernel.set_in and kernel.set_in[0] == ("tuning-deploy-monitor", {"header": {"msg_id": "cell-1"}})
    bundle = view._repr_mimebundle_()
    assert endpoint.name in bundle["text/plain"] and "READY" in bundle["text/plain"]
    assert "endpoint.delete() stops the billing" in bundle["text/plain"] and "tm-deploy" in bundle["text/html"]


def test_without_widgets_the_endpoint_shows_as_text_and_html(vertex, llama, capsys, monkeypatch):
    from tuning_magics.display import deploy, monitor

    monkeypatch.setattr(monitor, "_kernel", lambda: (None, None))
    endpoint = llama.deploy()
    vertex.advance(5 * 60)
    endpoint.refresh()
    assert deploy.show(endpoint) is None
    text = capsys.readouterr().out
    assert endpoint.name in text and "DEPLOYING" in text and "elapsed 5:" in text and "endpoint.wait()" in text
    vertex.fail_deploy()
    failed = llama.deploy()
    vertex.advance(20 * 60)
    failed.refresh()
    bundle = failed._repr_mimebundle_()
    assert "FAILED" in bundle["text/plain"] and "RESOURCE_EXHAUSTED" in bundle["text/html"]
    assert "<script" not in bundle["text/html"]


# ====================================================================== dedicated endpoints


def test_a_dedicated_endpoint_is_asked_at_its_dns_name_once_it_has_one(vertex, llama):
    from google.auth.transport.requests import AuthorizedSession

    vertex.dns_delay = 90
    endpoint = llama.deploy()
    vertex.advance(vertex.deploy_seconds)
    endpoint.refresh()
    assert endpoint.state == "DEPLOYING" and endpoint.note == "deployed; waiting for its dedicated DNS name"
    read = requests_to(vertex, endpoint.name.rsplit("/", 1)[1] + "$")
    assert read and read[-1].method == "GET"  # the endpoint was read, and had no DNS name yet
    with pytest.raises(UserError, match="still deploying"):
        endpoint.chat("hi")
    # an endpoint made by hand before its DNS name exists: no answer yet, and nothing kept of what it read
    by_hand = endpoints.VertexEndpoint(endpoint.name, "deployed")
    with pytest.raises(UserError, match="has no dedicated DNS name yet.*try again in a minute"):
        by_hand.chat("hi")
    vertex.advance(90)
    reply = endpoint.wait(timeout=30, poll=0.01).chat("hi")
    assert by_hand.chat("hi") == reply
    predict = requests_to(vertex, r":predict$")
    assert len(predict) == 2 and {r.headers["host"] for r in predict} == {vertex.dedicated_dns}
    assert all(r.path == f"/v1/{endpoint.name}:predict" for r in predict)
    # the shared host refuses the endpoint's predictions, with the service's words
    session = AuthorizedSession(vertex.credentials())
    shared = session.post(f"{vertex.url}/v1/{endpoint.name}:predict", json={"instances": [{"prompt": "hi"}]},
                          timeout=10).json()["error"]
    assert shared["status"] == "FAILED_PRECONDITION" and shared["message"].startswith(
        "This endpoint is a dedicated endpoint via CloudESF and cannot be accessed through the Vertex AI API.")


# ====================================================================== chat with a deployed open model


def test_an_open_model_job_chats_through_predict_with_the_models_chat_template(vertex, llama):
    with pytest.raises(UserError, match=r"call job.deploy\(\) first"):
        llama.chat("hi")  # chat never deploys by itself
    assert not requests_to(vertex, r":deploy$")
    endpoint = deployed(vertex, llama)
    reply = endpoint.chat("hi")
    predict = requests_to(vertex, r":predict$")
    assert len(predict) == 1 and predict[0].path == f"/v1/{endpoint.name}:predict"
    assert predict[0].body == {"instances": [{"@requestFormat": "chatCompletions",
                                              "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 200, "temperature": 1.0, "top_p": 1.0, "top_k": 1}]}
    assert reply == chat_reply([{"role": "user", "content": "hi"}])
    # the job answers through the endpoint its deploy() returned, also when read back by name
    assert llama.chat("hi") == reply and tm.get_job(llama.name).chat("hi") == reply
    assert len(requests_to(vertex, r":predict$")) == 3


def test_a_conversation_goes_whole_to_the_models_template_with_the_chats_options(vertex, llama):
    endpoint = deployed(vertex, llama)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a car."},
                {"role": "assistant", "content": "A Volvo."}, {"role": "user", "content": "Another?"}]
    reply = endpoint.chat(messages, max_new_tokens=3, temperature=0.2, top_p=0.9, top_k=40, seed=7)
    instance = requests_to(vertex, r":predict$")[-1].body["instances"][0]
    assert instance == {"@requestFormat": "chatCompletions", "messages": messages, "max_tokens": 3,
                        "temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7}
    assert reply == chat_reply(messages, 3) and len(reply.split()) == 3
    assert "User:" not in str(instance)  # no conversation framed by hand: the model's own template frames it
    assert endpoint.chat(messages[-1:], max_new_tokens=3) != reply  # the earlier turns reached the model
    assert requests_to(vertex, r":predict$")[-1].body["instances"][0]["messages"] == messages[-1:]
    assert endpoint.chat("hi", top_k=0) and requests_to(vertex, r":predict$")[-1].body["instances"][0]["top_k"] == -1
    pieces = list(endpoint.chat("hi", stream=True))
    assert pieces == [endpoint.chat("hi")]  # predict has no stream: the reply comes as one piece
    assert endpoint.chat("hi", stop=" to:") == chat_reply([{"role": "user", "content": "hi"}]).split(" to:")[0]


def test_the_fake_refuses_a_conversation_framed_by_hand(vertex, llama):
    from google.auth.transport.requests import AuthorizedSession

    endpoint = deployed(vertex, llama)
    url = f"https://{vertex.dedicated_dns}/v1/{endpoint.name}:predict"
    session = AuthorizedSession(vertex.credentials())
    framed = session.post(url, json={"instances": [{"prompt": "System: Be brief.\nUser: Hi\nAssistant:"}]},
                          timeout=10)
    assert framed.status_code == 400 and "chatCompletions" in framed.json()["error"]["message"]
    plain = session.post(url, json={"instances": [{"prompt": "Hi", "raw_response": True}]}, timeout=10)
    assert plain.status_code == 200 and "Hi" in plain.json()["predictions"][0]


def test_a_mistake_is_one_line_before_any_request(vertex, llama):
    endpoint = deployed(vertex, llama)
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
    endpoint = deployed(vertex, llama)
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
    waiting = threading.Thread(target=endpoint.wait, kwargs={"timeout": 30, "poll": 0.01})
    waiting.start()  # followed from another thread, as the notebook's view does, while the notebook goes on
    seen = []
    while waiting.is_alive() and len(seen) < 50:
        seen.append({name: getattr(users_sdk, name) for name in _SDK_SETTINGS})
        time.sleep(0.005)
    vertex.advance(vertex.deploy_seconds)
    waiting.join(30)
    assert endpoint.state == "READY" and seen and all(s == before for s in seen)
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

    endpoint = deployed(vertex, llama)
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
    endpoint = deployed(vertex, llama)
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


def test_a_gemini_job_is_evaluated_through_generate_content_and_a_429_is_asked_again(vertex, gemini):
    """job.evaluate() on Vertex AI: base and tuned model through generate_content, a few at a time; the quota's
    429 on the way is waited out, not reported."""
    from fake_vertex import base_reply_to, reply_to

    from tuning_magics import evaluation

    questions = [f"What is {i} plus {i}?" for i in range(6)]
    data = [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": reply_to(q) if i % 2 == 0 else "Twelve."}]}
            for i, q in enumerate(questions)]
    before = len(requests_to(vertex, r"generateContent$"))
    vertex.fail_next(429, "Quota exceeded for aiplatform.googleapis.com/generate_content_requests",
                     status="RESOURCE_EXHAUSTED", path=r"generateContent$")
    waits = evaluation.RETRY_WAITS
    evaluation.RETRY_WAITS = (0.05,) * 5
    try:
        result = gemini.evaluate(data, checkpoints=None, limit=None)
    finally:
        evaluation.RETRY_WAITS = waits
    assert list(result.table.index) == ["base", "final"]
    assert result.table.loc["final", "exact_match"] == 0.5 and result.table.loc["base", "exact_match"] == 0
    assert result.answers["base"][0] == base_reply_to("gemini-2.5-flash", questions[0])  # the model before tuning
    assert len(requests_to(vertex, r"generateContent$")) - before == 2 * 6 + 1  # one asked twice
    again = gemini.evaluate(data, checkpoints=None)
    assert again.table.equals(result.table) and len(requests_to(vertex, r"generateContent$")) - before == 13


def test_vertex_ais_evaluation_service_judges_pointwise_and_pairwise_and_says_what_it_costs(vertex, gemini):
    """judge="vertex:MODEL": Gemini grades through evaluateInstances, the service filling the template's
    variables; the verdicts are cached like answers, and what the judge cost is said."""
    from fake_vertex import reply_to

    questions = [f"What is {i} times {i}?" for i in range(6)]
    data = [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": reply_to(q) if i % 2 == 0 else "Twelve."}]}
            for i, q in enumerate(questions)]
    before = len(vertex.evaluations)
    result = gemini.evaluate(data, checkpoints=None, judge="vertex:gemini-2.5-flash")
    graded = vertex.evaluations[before:]
    assert len(graded) == 2 * 6 + 6  # each model's answers pointwise, then final against base pairwise
    assert {g["model"] for g in graded} == {"projects/fake-project/locations/us-central1/publishers/google/models/"
                                            "gemini-2.5-flash"}
    pointwise = next(g for g in graded if g["kind"] == "pointwise_metric_input")
    assert {"{prompt}", "{reference}", "{response}"} <= set(re.findall(r"\{\w+\}", pointwise["template"]))
    assert pointwise["values"]["prompt"] in questions  # the service fills the template: the values travel apart
    # The fake grades 5 (1.0) when the answer is the reference, 3 (0.5) when it holds it: final is right on every
    # other example; base says the same after its "base <model>:" there, so it is partly right.
    assert result.table.loc["final", "judge"] == 0.5 and result.table.loc["base", "judge"] == 0.25
    # Pairwise, final is Response A on even examples and B on odd ones: it wins the even ones, ties the rest.
    assert result.pairwise["scores"] == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]
    usage = result.judge_usage
    assert usage["calls"] == 18 and usage["cached"] == 0 and usage["tokens"] > 18 * 200
    assert "billed to Vertex AI project fake-project" in result.text()
    again = gemini.evaluate(data, checkpoints=None, judge="vertex:gemini-2.5-flash")
    assert len(vertex.evaluations) == before + 18 and again.judge_usage["cached"] == 18
    assert again.table.equals(result.table)
    # A template with a variable the instance does not carry is refused by the service: one line.
    judge = tm.Judge("vertex", pointwise_prompt="Rate {answer} to {question} against {reference} in {context}.")
    with pytest.raises(UserError, match=r"evaluation service.*needs \{context\}") as info:
        gemini.evaluate(data[:2], checkpoints=None, judge=judge)
    assert "\n" not in str(info.value)


def test_many_gemini_answers_come_from_one_batch_prediction_each_and_match_the_online_ones(vertex, gemini,
                                                                                           monkeypatch):
    """From batch_from uncached prompts, base and final answer through a batch prediction job each, with the
    request asked online (so the answers, and the cache, are the same); below it, online."""
    from types import SimpleNamespace

    from fake_vertex import base_reply_to, reply_to

    from tuning_magics.backends.vertex import answer

    monkeypatch.setattr(answer, "time", SimpleNamespace(sleep=lambda _s: vertex.advance(vertex.step_seconds)))
    questions = [f"Which number follows {i}?" for i in range(5)]
    data = [{"messages": [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": q},
                          {"role": "assistant", "content": reply_to(q, 6)}]} for q in questions]
    online = len(requests_to(vertex, r"generateContent$"))
    batches = len(vertex.bodies(path=r"/batchPredictionJobs$"))
    result = gemini.evaluate(data, checkpoints=None, max_new_tokens=6, batch_from=5)
    bodies = vertex.bodies(path=r"/batchPredictionJobs$")[batches:]
    assert [b["model"] for b in bodies] == ["publishers/google/models/gemini-2.5-flash", gemini.tuned_model_name]
    assert len(requests_to(vertex, r"generateContent$")) == online  # nothing asked online
    assert result.answers["base"] == [base_reply_to("gemini-2.5-flash", q, 6) for q in questions]
    assert result.answers["final"] == [reply_to(q, 6) for q in questions]
    assert result.table.loc["final", "exact_match"] == 1.0
    # Below batch_from the same answers come online: one more example, the five others from the cache.
    more = data + [{"messages": [{"role": "user", "content": "Which number follows 9?"},
                                 {"role": "assistant", "content": "10"}]}]
    again = gemini.evaluate(more, checkpoints=None, max_new_tokens=6, batch_from=5)
    assert len(vertex.bodies(path=r"/batchPredictionJobs$")) == batches + 2
    assert len(requests_to(vertex, r"generateContent$")) == online + 2
    assert again.answers["final"][:5] == result.answers["final"]
    with pytest.raises(UserError, match="batch_from must be a whole number of at least 1"):
        gemini.evaluate(data, checkpoints=None, batch_from=0)


# ====================================================================== export


def test_a_tuned_gemini_model_cannot_be_exported_and_says_where_it_can_be_used(vertex, gemini, llama, tmp_path):
    before = len(vertex.requests)
    with pytest.raises(UserError) as info:
        gemini.export("hf", path=tmp_path / "model")
    assert str(info.value) == (f"job {gemini.id} tuned Gemini, whose tuned weights stay inside Vertex AI and cannot "
                               "be exported; serve it there with job.deploy() or job.chat(), or answer many prompts "
                               "with batch prediction (job.evaluate(batch_from=...))")
    assert len(vertex.requests) == before and not (tmp_path / "model").exists()  # refused before any request
    # An open model's checkpoint whose folder nothing can load (the fake's placeholder weights): one line, nothing
    # left; where only the vertex extra is installed, first what an export needs (transformers reads the weights).
    import importlib.util

    refusal = (rf"^checkpoint final of job {llama.id} has no tokenizer files in gs://.*/final/ \(tokenizer.json, "
               r"tokenizer_config.json\), which a runtime needs to write its prompts$") \
        if importlib.util.find_spec("torch") else r'^this needs torch, which is not installed: pip install ' \
                                                   r'"tuning_magics\[local\]"$'
    with pytest.raises(UserError, match=refusal):
        llama.export("hf", path=tmp_path / "model")
    assert not list(tmp_path.iterdir())
