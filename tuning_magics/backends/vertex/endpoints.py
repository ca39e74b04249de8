"""Serving on Vertex AI: Model Garden deploy of tuned open models, and chat with any endpoint.

:func:`deploy_job` deploys a succeeded open-model job's ``final`` checkpoint (or a
named one) through Model Garden's custom weights, as the tuning notebooks do by
hand with ``model_garden.CustomModel(gcs_uri=...).deploy(machine_type="g2-standard-12",
accelerator_type="NVIDIA_L4", accelerator_count=1)``, but without blocking: a
deploy takes 15-30 minutes and is billed, so it returns at once with the
endpoint, named from the start (``endpoint_user_id``), while the service
deploys to it. The endpoint shows its state in the notebook (state, elapsed,
its name), ``wait()``s when asked, and answers once it is up. A tuned Gemini
model is served by the service already: its endpoint is returned, nothing is
deployed.

A :class:`VertexEndpoint` chats like the local engine's endpoint (same
signature, same request rules from :mod:`tuning_magics.chat_request`, so a
mistake is one line before any network call), through the method that fits:

- ``"deployed"`` (a tuned open model on its own machine): ``predict`` with the
  conversation in the serving container's chat-completions format, so the
  model's own chat template frames it (up to 200 tokens, ``temperature`` 1.0,
  ``top_p`` 1.0, ``top_k`` 1 unless the call says otherwise), at the endpoint's
  dedicated DNS name when it has one, as ``aiplatform.Endpoint.predict`` does;
- ``"gemini"`` (a tuned Gemini model or one of its checkpoints):
  google-genai's ``generate_content`` / ``generate_content_stream``;
- ``"managed"`` (open models served by Vertex AI, such as the distillation
  teachers, see :func:`managed_endpoint`): OpenAI-style chat completions at
  ``.../endpoints/openapi/chat/completions`` with the credentials' bearer token.

:func:`chat_with_job` is ``VertexJob.chat``: a Gemini job answers from its
endpoint or a checkpoint's; an open-model job answers from the endpoint its
``deploy()`` returned in this session, once it is up, and never deploys by
itself (a deployment costs money while it runs). :func:`batch_predict` runs a
Gemini batch prediction over a JSONL file in Cloud Storage.

The aiplatform SDK's process-wide settings (``vertexai.init``) belong to the
notebook: deploy, chat and delete name the project, region, credentials and API
endpoint on each request (REST with the context's credentials, or a GAPIC client
with its own client options), and never read or change them, also while a
deployment is followed from a background thread.

The cloud SDKs are imported inside the functions that use them: ``import
vertexai`` alone takes seconds.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from datetime import datetime

from ...chat_request import apply_stop, chat_request
from ...errors import UserError
from ...jobs import JOB_STATE_SUCCEEDED
from . import client as vc

DEFAULT_MACHINE_TYPE = "g2-standard-12"
DEFAULT_ACCELERATOR_TYPE = "NVIDIA_L4"
DEFAULT_ACCELERATOR_COUNT = 1
#: The seed's sampling: what a deployed open model is asked with unless chat() says otherwise.
PREDICT_DEFAULTS = {"max_tokens": 200, "temperature": 1.0, "top_p": 1.0, "top_k": 1}
#: Where an open-model job leaves its checkpoints under its output folder.
CHECKPOINTS_FOLDER = "postprocess/node-0/checkpoints"
KINDS = ("deployed", "gemini", "managed")
#: An endpoint's deployment states: being deployed, answering, failed to deploy, deleted by delete().
DEPLOYING, READY, FAILED, DELETED = "DEPLOYING", "READY", "FAILED", "DELETED"
#: How long a Model Garden deploy takes, as Google's notebooks say (the service gives no estimate).
TYPICAL_DEPLOY = "15-30 minutes"
_TIMEOUT = vc.API_TIMEOUT


class VertexEndpoint:
    """An endpoint on Vertex AI that answers ``chat()``: ``name``, ``kind`` (deployed, gemini or managed).

    ``name`` is the endpoint's resource name (``projects/P/locations/L/endpoints/E``);
    for a managed open model, ``model`` is its id (``qwen/qwen3-next-80b-a3b-thinking-maas``)
    and ``name`` the OpenAI-compatible endpoint it is served from.

    One that ``job.deploy()`` returned follows its deployment: ``state`` (DEPLOYING,
    READY, FAILED, DELETED), ``elapsed`` seconds, ``note`` and ``error``; ``refresh()``
    looks again, ``wait()`` blocks until it is up. Displayed in a notebook it shows
    all of that live.
    """

    def __init__(self, name: str, kind: str, *, model: str | None = None, ctx: vc.Context | None = None,
                 source: str | None = None, operation: str | None = None, machine: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.name = name
        self.kind = kind
        self.model = model
        self.source = source  # what is served: a checkpoint's gs:// folder or a tuning job's checkpoint
        self.operation = operation  # the deploy's long-running operation, for an endpoint deploy() made
        self.machine = machine  # what it is deployed on, e.g. "g2-standard-12 with 1 NVIDIA_L4"
        self.state = DEPLOYING if operation else READY
        self.note: str | None = None  # what a deploying endpoint waits for, when known
        self.error: str | None = None  # why the deploy failed
        self._ctx = ctx
        self._predict_at: str | None = None  # the dedicated predict URL, once known (the shared one never kept)
        self._started = time.monotonic()
        self._service_seconds = 0.0  # the deploy's age by the service's own clock
        self._took: float | None = None  # seconds the deploy took, once it ended
        self._looking = threading.Lock()  # one look at a time (a display thread and the user's wait may overlap)

    @property
    def ctx(self) -> vc.Context:
        if self._ctx is None:
            self._ctx = vc.context(resource=self.name)
        return self._ctx

    @property
    def done(self) -> bool:
        """Whether the deployment has ended (up, failed or deleted): nothing more to follow."""
        return self.state != DEPLOYING

    @property
    def elapsed(self) -> float:
        """Seconds since the deploy began (by this session's clock or the service's, whichever says more)."""
        if self._took is not None:
            return self._took
        return max(time.monotonic() - self._started, self._service_seconds)

    def __repr__(self) -> str:
        what = f" {self.model}" if self.model else ""
        state = "" if self.state == READY else f" {self.state} {_minutes(self.elapsed)}"
        source = f" serving {self.source}" if self.source else ""
        return f"<VertexEndpoint {self.kind}{what}{state} {self.name}{source}>"

    def chat(self, messages_or_text, *, stream: bool = False, **gen):
        """The reply to a string or a message list (text), or with ``stream=True`` an iterator of text pieces.

        ``gen`` holds ``job.chat()``'s options, with the same rules: ``max_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``. A mistake is a one-line
        UserError before anything is sent; so is an error the service answers, and
        so is asking an endpoint that is still deploying.
        """
        req = chat_request(messages_or_text, stream=stream, **gen)
        given = {k: req[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
                 if gen.get(k) is not None}
        self._check_up()
        ask = {"deployed": self._predict, "gemini": self._generate, "managed": self._complete}[self.kind]
        return apply_stop(ask(req["messages"], given, stream), req["stop"])  # the reply ends before a stop sequence

    # -- following a deployment ----------------------------------------------------------------

    def poll_interval(self, looks: int) -> float:
        """A deploy takes minutes: look after 1 s, then less and less often, every 15 s at most."""
        return min(15.0, 1.5 ** looks)

    def refresh(self) -> VertexEndpoint:
        """Look at the deployment again (its operation, then the endpoint's dedicated DNS name)."""
        if not self.done:
            with vc.api_errors(self._following(), self.ctx):
                self._look()
        return self

    def wait(self, timeout: float | None = None, poll: float | None = None) -> VertexEndpoint:
        """Block until the endpoint is up and return it; a failed deploy is a one-line UserError.

        ``timeout`` (seconds) raises ``TimeoutError`` naming the endpoint while it is
        still deploying then; the deployment goes on. A look that fails on the way
        (the network, the service busy) is tried again until then.
        """
        self._follow(timeout, poll)
        self._check_up()
        return self

    def _follow(self, timeout: float | None, poll: float | None) -> None:
        """Look at the deployment until it ends (up, failed or deleted); ``timeout`` seconds: a TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        looks, trouble = 0, None
        while not self.done:
            try:
                self._look()
                trouble = None
            except Exception as exc:  # noqa: BLE001 - a passing failure is looked at again; others are one line
                if not _passing(exc):
                    with vc.api_errors(self._following(), self.ctx):
                        raise
                trouble = exc
            if self.done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                last = f"; the last look at it failed ({type(trouble).__name__})" if trouble else ""
                raise TimeoutError(
                    f"endpoint {self.name} is still deploying after {timeout:g} s ({_minutes(self.elapsed)} so far"
                    f"{last}); the deployment goes on, and its machine is billed once it is up: endpoint.wait() "
                    "waits again, endpoint.delete() waits for it and removes it")
            pause = self.poll_interval(looks) if poll is None else poll
            looks += 1
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)

    def _following(self) -> str:
        return f"follow the deployment of endpoint {self.name}"

    def _look(self) -> None:
        """One look at the deploy operation and, once it is done, at the endpoint (network errors as raised)."""
        with self._looking:
            if self.done:
                return
            ctx = self.ctx
            with _session(ctx) as session:
                # The deploy is a google.longrunning Operation: GET it until done, then its response (a
                # DeployResponse) or its error. DeployOperationMetadata carries no endpoint: only
                # generic_metadata, publisher_model, destination, project_number and model_id
                # (google/cloud/aiplatform_v1beta1/types/model_garden_service.py).
                op = _checked(session.get(f"{_api_base(ctx)}/v1beta1/{self.operation}", timeout=_TIMEOUT)).json()
                op = op or {}
                self._service_seconds = max(self._service_seconds, _operation_age(op))
                if not op.get("done"):
                    return
                if op.get("error"):
                    self._end(FAILED, error=self._failure(op["error"]))
                    return
                self.name = (op.get("response") or {}).get("endpoint") or self.name
                found = _checked(session.get(f"{_api_base(ctx)}/v1/{self.name}", timeout=_TIMEOUT)).json() or {}
            url = self._dedicated_url(found)
            if url is False:
                self.note = "deployed; waiting for its dedicated DNS name"
                return
            self._predict_at = url
            self._end(READY)

    def _end(self, state: str, *, error: str | None = None) -> None:
        self._took = self.elapsed
        self.state, self.error, self.note = state, error, None

    def _failure(self, error: dict) -> str:
        status = _RPC_STATUS.get(error.get("code"), f"code {error.get('code')}")
        text = " ".join(str(error.get("message") or "no message").split())[:300].rstrip(".")
        if status == "RESOURCE_EXHAUSTED":
            fix = (f"ask for more serving quota for {self.machine or 'the machine'} in {self.ctx.location} (the "
                   "console's Quotas page), or deploy(machine_type=..., accelerator_type=...) on another machine")
        else:
            fix = "fix what it says and call job.deploy() again"
        return vc.redact(f"deploying {self.source or 'the model'} to endpoint {self.name} failed after "
                         f"{_minutes(self.elapsed)} ({status}: {text}); {fix}; endpoint.delete() removes the "
                         "endpoint if it was made", self.ctx.credentials)

    def _check_up(self) -> None:
        """A one-line UserError unless the endpoint answers: still deploying (after one more look), failed, deleted."""
        if self.state == DEPLOYING:
            self.refresh()
        if self.state == DEPLOYING:
            raise UserError(f"endpoint {self.name} is still deploying ({_minutes(self.elapsed)} so far; a Model "
                            f"Garden deploy takes {TYPICAL_DEPLOY}): endpoint.wait() waits for it", field="endpoint")
        if self.state == FAILED:
            raise UserError(self.error, field="endpoint")
        if self.state == DELETED:
            raise UserError(f"endpoint {self.name} was deleted; job.deploy() makes a new one", field="endpoint")

    # -- display ---------------------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        """In a notebook a deployment shows itself live (state, elapsed, the endpoint's name); text elsewhere."""
        from ...display.deploy import show

        show(self)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """The endpoint's facts as text and HTML, for frontends without widgets."""
        from ...display.deploy import endpoint_bundle

        return endpoint_bundle(self)

    # -- deployed open models: predict ---------------------------------------------------

    def predict_instance(self, messages: list[dict], given: dict) -> dict:
        """The ``predict`` instance for a checked conversation: the messages as a chat request, with the options.

        Model Garden's serving containers (vLLM) take an OpenAI chat request inside a
        predict instance that says ``"@requestFormat": "chatCompletions"``, frame the
        messages with the model's own chat template, and answer with the chat
        completion as the prediction (GoogleCloudPlatform/vertex-ai-samples,
        notebooks/community/model_garden/model_garden_pytorch_qwq_deployment.ipynb and
        model_garden_llama_guard_deployment.ipynb): the template the model was tuned with.
        """
        instance = {"@requestFormat": "chatCompletions", "messages": messages, **PREDICT_DEFAULTS}
        if "max_new_tokens" in given:
            instance["max_tokens"] = given["max_new_tokens"]
        for key in ("temperature", "top_p", "top_k", "seed"):
            if key in given:
                instance[key] = given[key]
        if instance["top_k"] == 0:  # "no top-k", which the serving container spells -1
            instance["top_k"] = -1
        return instance

    def _predict(self, messages: list[dict], given: dict, stream: bool):
        instance = self.predict_instance(messages, given)

        def ask() -> str:
            ctx = self.ctx
            with vc.api_errors(f"ask endpoint {self.name}", ctx), _session(ctx) as session:
                url = self._predict_url(session, ctx)
                answer = _checked(session.post(url, json={"instances": [instance]}, timeout=_TIMEOUT)).json()
            predictions = (answer or {}).get("predictions")
            if not predictions:
                raise UserError(f"endpoint {self.name} answered without a prediction; check that a model is "
                                "deployed on it")
            return _prediction_text(predictions[0] if isinstance(predictions, list) else predictions, self.name)

        if not stream:
            return ask()

        def pieces():  # predict has no stream: the whole reply is the one piece
            yield ask()

        return pieces()

    def _predict_url(self, session, ctx: vc.Context) -> str:
        """Where the endpoint answers ``predict``: its dedicated DNS name when it has one.

        The dedicated URL is kept once known; the shared one is looked up again each
        time, since a dedicated endpoint's first reads can lack its DNS name.
        """
        if self._predict_at is None:
            found = _checked(session.get(f"{_api_base(ctx)}/v1/{self.name}", timeout=_TIMEOUT)).json() or {}
            url = self._dedicated_url(found)
            if url is False:
                raise UserError(f"endpoint {self.name} has no dedicated DNS name yet, and only that name answers "
                                "its predictions; try again in a minute", field="endpoint")
            if url is None:
                return f"{_api_base(ctx)}/v1/{self.name}:predict"
            self._predict_at = url
        return self._predict_at

    def _dedicated_url(self, found: dict) -> str | None | bool:
        """The dedicated predict URL of an endpoint as read (``False``: dedicated, no DNS name yet; ``None``: shared).

        Model Garden endpoints are dedicated, and the shared host refuses their
        predictions ("This endpoint is a dedicated endpoint via CloudESF and cannot be
        accessed through the Vertex AI API. Please access the endpoint using its
        dedicated dns name ..."); aiplatform's ``Endpoint.predict(use_dedicated_endpoint=True)``
        posts to ``https://{dedicated_endpoint_dns}/v1/{resource_name}:predict``
        (google/cloud/aiplatform/models.py).
        """
        if not found.get("dedicatedEndpointEnabled"):
            return None
        dns = found.get("dedicatedEndpointDns")
        return f"https://{dns}/v1/{self.name}:predict" if dns else False

    # -- tuned Gemini: generate_content ----------------------------------------------------

    def generate_request(self, messages: list[dict], given: dict) -> tuple[list, object]:
        """google-genai's ``(contents, GenerateContentConfig or None)`` for a checked conversation."""
        from google.genai import types

        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        contents = [types.Content(role="model" if m["role"] == "assistant" else "user",
                                  parts=[types.Part(text=m["content"])])
                    for m in messages if m["role"] != "system"]
        options = {"temperature": given.get("temperature"), "top_p": given.get("top_p"),
                   "top_k": given.get("top_k") or None,  # 0 means "no top-k": the service's default
                   "max_output_tokens": given.get("max_new_tokens"), "seed": given.get("seed")}
        options = {k: v for k, v in options.items() if v is not None}
        if system:
            options["system_instruction"] = system
        return contents, types.GenerateContentConfig(**options) if options else None

    def _generate(self, messages: list[dict], given: dict, stream: bool):
        ctx = self.ctx
        action = f"ask the tuned model at {self.name}"
        with vc.api_errors(action, ctx):
            contents, config = self.generate_request(messages, given)
            models = vc.genai_client(ctx).models
        if not stream:
            with vc.api_errors(action, ctx):
                answer = models.generate_content(model=self.name, contents=contents, config=config)
            return _gemini_text(answer, self.name)

        def pieces():
            with vc.api_errors(action, ctx):
                for chunk in models.generate_content_stream(model=self.name, contents=contents, config=config):
                    text = _gemini_text(chunk, self.name, partial=True)
                    if text:
                        yield text

        return pieces()

    # -- managed open models: chat completions ----------------------------------------------

    def completion_body(self, messages: list[dict], given: dict, stream: bool) -> dict:
        """The OpenAI chat-completions body for a checked conversation."""
        body = {"model": self.model, "messages": messages, "stream": stream}
        if "max_new_tokens" in given:
            body["max_tokens"] = given["max_new_tokens"]
        for key in ("temperature", "top_p", "seed"):
            if key in given:
                body[key] = given[key]
        if given.get("top_k"):
            body["top_k"] = given["top_k"]
        return body

    def _complete(self, messages: list[dict], given: dict, stream: bool):
        ctx = self.ctx
        body = self.completion_body(messages, given, stream)
        url = f"{_api_base(ctx)}/v1beta1/{self.name}/chat/completions"
        action = f"ask {self.model} through chat completions"

        def post(session):
            return _checked(session.post(url, json=body, timeout=_TIMEOUT, stream=stream))

        if not stream:
            with vc.api_errors(action, ctx), _session(ctx) as session:
                data = post(session).json()
            try:
                return data["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise UserError(f"{self.model} answered without a reply: {vc.redact(str(data)[:200])}") from None

        def pieces():
            with vc.api_errors(action, ctx), _session(ctx) as session:
                response = post(session)
                try:
                    yield from _sse_pieces(response, self.model)
                finally:
                    response.close()

        return pieces()

    def chat_panel(self, *, base=None):
        """A chat panel with this endpoint (streamed replies, history); ``base``: a model to compare, side by side."""
        from ...display.chat import ChatPanel

        return ChatPanel(self, base=base, title=f"Chat with {self.model or self.name}")

    # -- clean-up --------------------------------------------------------------------------

    def delete(self, timeout: float | None = None, poll: float | None = None) -> None:
        """Undeploy the model and delete the endpoint, so its machine stops costing money (deployed only).

        A deploy still under way is waited for first, as :meth:`wait` does (the
        service refuses to undeploy from an endpoint a model is being deployed to),
        so a deployment never outlives the delete asked of it; ``timeout`` seconds
        raise ``TimeoutError`` naming it while it is still deploying then. A failed
        deploy's endpoint is deleted too; one already deleted is left as it is.
        A tuned Gemini model's endpoint belongs to the service and a managed model
        has none of its own: for those this is a one-line UserError.
        """
        if self.kind != "deployed":
            raise UserError(f"a {self.kind} endpoint is served by Vertex AI and is not deleted from here; only an "
                            "endpoint job.deploy() made for an open model is", field="endpoint")
        if self.state == DELETED:
            return
        self._follow(timeout, poll)
        ctx = self.ctx
        with vc.api_errors(f"delete endpoint {self.name}", ctx), _endpoint_service(ctx) as service:
            found = service.get_endpoint(name=self.name, timeout=_TIMEOUT)
            split = dict(found.traffic_split)
            models = sorted(found.deployed_models, key=lambda m: split.get(m.id, 0))  # those without traffic first
            for k, model in enumerate(models):
                request = {"endpoint": self.name, "deployed_model_id": model.id}
                left = [m.id for m in models[k + 1:]]
                if split.get(model.id) and left:  # its traffic goes to a model still deployed
                    split = {left[-1]: 100}
                    request["traffic_split"] = split
                service.undeploy_model(request=request, timeout=_TIMEOUT).result(timeout=None)
            service.delete_endpoint(name=self.name, timeout=_TIMEOUT).result(timeout=None)
        self._end(DELETED, error=self.error)
        _forget(self.name)

    undeploy = delete


# -- the helpers of chat ------------------------------------------------------------------------


def _prediction_text(prediction, name: str) -> str:
    """The reply in a prediction: a chat completion's message (``"@requestFormat": "chatCompletions"``) or text."""
    if isinstance(prediction, str):
        return prediction
    if isinstance(prediction, dict):
        choices = prediction.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            content = (choices[0].get("message") or {}).get("content")
            if isinstance(content, str):
                return content
        for key in ("content", "text", "output", "generated_text"):
            if isinstance(prediction.get(key), str):
                return prediction[key]
    raise UserError(f"endpoint {name} answered without a reply: {vc.redact(str(prediction)[:200])}")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min"


#: google.rpc.Code numbers of an operation's error, by name (google/rpc/code.proto).
_RPC_STATUS = {1: "CANCELLED", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND", 6: "ALREADY_EXISTS",
               7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 10: "ABORTED",
               13: "INTERNAL", 14: "UNAVAILABLE", 16: "UNAUTHENTICATED"}


def _operation_age(op: dict) -> float:
    """Seconds between an operation's create and update times (its ``genericMetadata``), by the service's clock."""
    meta = (op.get("metadata") or {}).get("genericMetadata") or {}
    times = [_timestamp(meta.get(key)) for key in ("createTime", "updateTime")]
    return max(0.0, times[1] - times[0]) if None not in times else 0.0


def _timestamp(text) -> float | None:
    """An RFC 3339 time as the API writes it (``2026-01-02T03:04:05.123456789Z``) in seconds, or None."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", str(text or ""))
    if not m:
        return None
    fraction = (m.group(2) or ".0")[:7]  # datetime reads microseconds at most
    return datetime.fromisoformat(m.group(1) + fraction + m.group(3).replace("Z", "+00:00")).timestamp()


def _passing(exc: BaseException) -> bool:
    """Whether a failed look is worth another: the network, or the service busy or overloaded."""
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    from google.api_core import exceptions

    return isinstance(exc, (exceptions.TooManyRequests, exceptions.ServerError))


def _gemini_text(answer, name: str, *, partial: bool = False) -> str:
    parts = []
    for candidate in (getattr(answer, "candidates", None) or [])[:1]:
        content = getattr(candidate, "content", None)
        for part in getattr(content, "parts", None) or []:
            if isinstance(getattr(part, "text", None), str) and not getattr(part, "thought", False):
                parts.append(part.text)
    if parts or partial:
        return "".join(parts)
    blocked = getattr(getattr(answer, "prompt_feedback", None), "block_reason", None)
    if blocked is not None:
        raise UserError(f"the tuned model at {name} refused the prompt ({getattr(blocked, 'name', blocked)})")
    return ""


def _sse_pieces(response, model: str):
    """The text pieces of an OpenAI chat-completions stream (server-sent events)."""
    for raw in response.iter_lines():
        line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise UserError(f"{model} sent a malformed stream event: {vc.redact(data[:80])}") from None
        if isinstance(event, dict) and event.get("error"):
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise UserError(f"{model} ended the stream with an error: {vc.redact(str(message))[:300]}")
        for choice in (event.get("choices") or [])[:1] if isinstance(event, dict) else []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield text
    raise UserError(f"the stream from {model} ended before data: [DONE]; the reply is incomplete")


def _api_base(ctx: vc.Context) -> str:
    base = ctx.api_endpoint or ("aiplatform.googleapis.com" if ctx.location == "global"
                                else f"{ctx.location}-aiplatform.googleapis.com")
    if "://" not in base:
        base = f"https://{base}"
    return base.rstrip("/")


def _checked(response):
    """The response, or for an error status the google-api-core exception it stands for."""
    if response.status_code >= 400:
        from google.api_core import exceptions

        raise exceptions.from_http_response(response)
    return response


class _session:
    """google-auth's AuthorizedSession on the context's credentials, closed on exit."""

    def __init__(self, ctx: vc.Context):
        from google.auth.transport.requests import AuthorizedSession

        self.session = AuthorizedSession(ctx.credentials)

    def __enter__(self):
        return self.session

    def __exit__(self, *exc):
        self.session.close()


def _endpoint_service(ctx: vc.Context):
    """aiplatform's GAPIC EndpointService client for the context: its own credentials, endpoint and transport."""
    from google.api_core.client_options import ClientOptions
    from google.cloud.aiplatform_v1 import EndpointServiceClient

    return EndpointServiceClient(credentials=ctx.credentials, transport="rest",
                                 client_options=ClientOptions(api_endpoint=_api_base(ctx)))


def managed_endpoint(model_id: str, *, location: str | None = None) -> VertexEndpoint:
    """A managed open model (Model-as-a-Service, such as ``qwen/qwen3-next-80b-a3b-thinking-maas``) to chat with.

    It answers through Vertex AI's OpenAI-compatible chat completions in the
    configured project and location (or ``location``); nothing is deployed.
    """
    if not isinstance(model_id, str) or not re.fullmatch(r"[\w.-]+/[\w.@-]+", model_id.strip()):
        raise UserError(f"model_id must be a publisher/model id such as 'qwen/qwen3-next-80b-a3b-thinking-maas', "
                        f"not {model_id!r}"[:200], field="model_id")
    ctx = vc.context()
    if location is not None:
        if not isinstance(location, str) or not location.strip():
            raise UserError(f"location must be a region name such as 'us-central1', not {location!r}",
                            field="location")
        ctx = vc.Context(ctx.project, location.strip(), ctx.credentials, ctx.api_endpoint, ctx.staging_bucket)
    return VertexEndpoint(f"{ctx.parent}/endpoints/openapi", "managed", model=model_id.strip(), ctx=ctx)


# -- jobs: deploy and chat ------------------------------------------------------------------------

#: The endpoints deploy() made in this session: job name -> {checkpoint name -> endpoint}, latest last.
_DEPLOYED: dict[str, dict[str, VertexEndpoint]] = {}
_DEPLOYED_LOCK = threading.Lock()


def _remember(job, checkpoint: str, endpoint: VertexEndpoint) -> None:
    with _DEPLOYED_LOCK:
        made = _DEPLOYED.setdefault(job.name, {})
        made.pop(checkpoint, None)
        made[checkpoint] = endpoint
        job._vertex_endpoints = made  # kept on the job too, for whoever holds it


def _forget(endpoint_name: str) -> None:
    with _DEPLOYED_LOCK:
        for made in _DEPLOYED.values():
            for checkpoint, endpoint in list(made.items()):
                if endpoint.name == endpoint_name:
                    del made[checkpoint]


def _deployed(job) -> dict[str, VertexEndpoint]:
    with _DEPLOYED_LOCK:
        return dict(getattr(job, "_vertex_endpoints", None) or _DEPLOYED.get(job.name) or {})


def _is_gemini(job) -> bool:
    """Whether ``job`` tuned a Gemini model: by its base model (``VertexJob.is_gemini``), never by a tuned model."""
    return bool(job.is_gemini)


def _check_succeeded(job, doing: str) -> None:
    if job.state != JOB_STATE_SUCCEEDED:
        raise UserError(f"job {job.name} is {job.state}: only a job that succeeded can {doing} "
                        "(job.wait() waits for it)", field="job")


def _gemini_endpoint(job, checkpoint) -> tuple[str, str]:
    """(checkpoint name, endpoint resource) of a succeeded Gemini job: the final model, or ``checkpoint``."""
    _check_succeeded(job, "answer")
    found = {c.name: c for c in job.checkpoints}
    if checkpoint is None or checkpoint == "final":
        if not job.endpoint:
            raise UserError(f"job {job.name} has no endpoint serving its tuned model", field="job")
        return "final", job.endpoint
    chosen = found.get(checkpoint) if isinstance(checkpoint, str) else None
    if chosen is None and (isinstance(checkpoint, int) and not isinstance(checkpoint, bool)
                           or str(checkpoint).isdigit()):
        step = int(checkpoint)
        chosen = next((c for c in found.values() if c.step == step), None) or found.get(f"checkpoint-{step}")
    if chosen is None or not chosen.uri:
        names = ", ".join(f"{c.name} (step {c.step})" if c.step is not None else c.name for c in found.values())
        raise UserError(f"job {job.name} has no checkpoint {checkpoint!r}; choose one of {names or 'final'}",
                        field="checkpoint")
    return chosen.name, chosen.uri


def open_checkpoint(job, checkpoint, doing: str = "be deployed") -> tuple[str, str]:
    """(checkpoint name, gs:// folder) of a succeeded open-model job: ``final``, or ``checkpoint`` (name or step)."""
    _check_succeeded(job, doing)
    if not job.output_uri:
        raise UserError(f"job {job.name} has no output folder to take its model from", field="job")
    name = "final" if checkpoint is None else checkpoint
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise UserError(f"checkpoint must be a name such as 'checkpoint-8' or a step number, not {checkpoint!r}",
                        field="checkpoint")
    if isinstance(name, int) or name.isdigit():
        name = f"checkpoint-{int(name)}"
    found = {c.name: c.uri for c in job.checkpoints}
    if name not in found:
        raise UserError(f"job {job.name} has no checkpoint {name!r} under {job.output_uri.rstrip('/')}/"
                        f"{CHECKPOINTS_FOLDER}; choose one of {', '.join(found) or '(none found)'}",
                        field="checkpoint")
    return name, found[name]


def _check_deploy_options(machine_type, accelerator_type, accelerator_count, endpoint_display_name, timeout):
    if not isinstance(machine_type, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", machine_type.strip()):
        raise UserError(f"machine_type must be a machine type name such as 'g2-standard-12', not "
                        f"{machine_type!r}"[:200], field="machine_type")
    if not isinstance(accelerator_type, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", accelerator_type.strip()):
        raise UserError(f"accelerator_type must be an accelerator name such as 'NVIDIA_L4', not "
                        f"{accelerator_type!r}"[:200], field="accelerator_type")
    if isinstance(accelerator_count, bool) or not isinstance(accelerator_count, (int, float)) \
            or accelerator_count != int(accelerator_count) or accelerator_count < 1:
        raise UserError(f"accelerator_count must be a whole number of at least 1, not {accelerator_count!r}"[:200],
                        field="accelerator_count")
    if endpoint_display_name is not None and (not isinstance(endpoint_display_name, str)
                                              or not endpoint_display_name.strip()):
        raise UserError(f"endpoint_display_name must be a non-empty string, not {endpoint_display_name!r}"[:200],
                        field="endpoint_display_name")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise UserError(f"timeout must be a number of seconds above 0, not {timeout!r}"[:200], field="timeout")


def deploy_job(job, *, checkpoint=None, machine_type: str = DEFAULT_MACHINE_TYPE,
               accelerator_type: str = DEFAULT_ACCELERATOR_TYPE, accelerator_count: int = DEFAULT_ACCELERATOR_COUNT,
               endpoint_display_name: str | None = None, timeout: float | None = None, **unknown) -> VertexEndpoint:
    """Deploy a succeeded open-model job's ``final`` checkpoint (or ``checkpoint``) through Model Garden.

    Serves the folder ``<output_uri>/postprocess/node-0/checkpoints/<checkpoint>`` on
    ``machine_type`` with ``accelerator_count`` ``accelerator_type`` (the seed's
    ``g2-standard-12`` with one NVIDIA L4 by default). Returns at once with the
    endpoint, named from the start, while the service deploys to it (15-30
    minutes); displayed in a notebook it shows its state live, ``endpoint.wait()``
    waits for it, and ``job.chat()`` uses it once it is up. ``timeout``: seconds
    to wait for it here before returning (a ``TimeoutError`` naming the endpoint
    when it is not up by then). The machine costs money until the endpoint is
    deleted (``endpoint.delete()``). A tuned Gemini model is served already: its
    endpoint (or ``checkpoint``'s) is returned and nothing is deployed.
    """
    if unknown:
        name = sorted(unknown)[0]
        raise UserError(f"deploy() has no option {name!r}; the options are checkpoint, machine_type, "
                        "accelerator_type, accelerator_count, endpoint_display_name and timeout", field=name)
    _check_deploy_options(machine_type, accelerator_type, accelerator_count, endpoint_display_name, timeout)
    ctx = job.ctx
    if _is_gemini(job):
        name, endpoint_name = _gemini_endpoint(job, checkpoint)
        endpoint = VertexEndpoint(endpoint_name, "gemini", model=job.tuned_model_name, ctx=ctx,
                                  source=f"{job.name} {name}")
        _remember(job, name, endpoint)
        return endpoint
    name, uri = open_checkpoint(job, checkpoint)
    machine = f"{machine_type.strip()} with {int(accelerator_count)} {accelerator_type.strip()}"
    endpoint_id = _endpoint_id(job, name)
    # The request aiplatform's CustomModel(gcs_uri=...).deploy() sends (vertexai/model_garden/_model_garden.py,
    # _deploy_gcs_uri), sent here with the context's credentials so the notebook's vertexai.init settings stay
    # untouched, plus DeployRequest.EndpointConfig.endpoint_user_id: the endpoint's ID, chosen here so its name
    # is known before the service finishes (google/cloud/aiplatform_v1beta1/types/model_garden_service.py).
    endpoint_config = {"endpointUserId": endpoint_id}
    if endpoint_display_name is not None:
        endpoint_config["endpointDisplayName"] = endpoint_display_name.strip()
    body = {"customModel": {"gcsUri": uri}, "endpointConfig": endpoint_config,
            "deployConfig": {"dedicatedResources": {
                "machineSpec": {"machineType": machine_type.strip(), "acceleratorType": accelerator_type.strip(),
                                "acceleratorCount": int(accelerator_count)},
                "minReplicaCount": 1, "maxReplicaCount": 1}}}  # fmt: skip
    with vc.api_errors(f"deploy {uri} on {machine}", ctx), _session(ctx) as session:
        op = _checked(session.post(f"{_api_base(ctx)}/v1beta1/{ctx.parent}:deploy", json=body,
                                   timeout=_TIMEOUT)).json() or {}
    operation = op.get("name") or ""
    if "/operations/" not in operation:
        raise UserError(f"Vertex AI answered the deploy of {uri} without an operation to follow: "
                        f"{vc.redact(str(op)[:200])}")
    # The operation's name carries the project number the service names the endpoint with.
    endpoint = VertexEndpoint(f"{operation.split('/operations/')[0]}/endpoints/{endpoint_id}", "deployed", ctx=ctx,
                              source=uri, operation=operation, machine=machine)
    _remember(job, name, endpoint)
    if timeout is not None:
        endpoint.wait(timeout)
    return endpoint


def _endpoint_id(job, checkpoint: str) -> str:
    """A fresh endpoint ID naming the job and checkpoint: a letter first, ``[a-z0-9-]``, at most 63 characters."""
    tail = f"-{secrets.token_hex(3)}"
    stem = re.sub(r"[^a-z0-9]+", "-", f"tm-{job.id}-{checkpoint}".lower()).strip("-")
    return stem[: 63 - len(tail)].rstrip("-") + tail


def base_endpoint(job) -> VertexEndpoint:
    """The base model a Gemini job tuned, served by Vertex AI (``publishers/google/models/<id>``), to compare with.

    An open model has no endpoint of its own to ask before tuning: a one-line UserError says so.
    """
    base = str((job.config or {}).get("base_model") or "").strip()
    if not _is_gemini(job) or not base.startswith("gemini-"):
        raise UserError(f"job {job.name} tuned an open model, whose base model has no endpoint here to compare "
                        "with; the tuned model answers alone", field="checkpoint")
    return VertexEndpoint(f"publishers/google/models/{base}", "gemini", model=base, ctx=job.ctx,
                          source=f"{job.name} base")


def chat_with_job(job, messages_or_text, *, checkpoint=None, stream: bool = False, **gen):
    """``VertexJob.chat``: a Gemini job's tuned model (or checkpoint), or the endpoint its ``deploy()`` made.

    ``checkpoint``: a name (``checkpoint-2``, ``final``) or a step number; ``"base"``: a
    Gemini job's base model before tuning, through ``generate_content``. An
    open-model job answers only once ``job.deploy()`` has made an endpoint in this
    session: chat never deploys by itself, since a deployment costs money.
    """
    chat_request(messages_or_text, stream=stream, **gen)  # a mistake is one line before anything is read or sent
    if checkpoint == "base":
        return base_endpoint(job).chat(messages_or_text, stream=stream, **gen)
    if _is_gemini(job):
        name, endpoint_name = _gemini_endpoint(job, checkpoint)
        endpoint = VertexEndpoint(endpoint_name, "gemini", ctx=job.ctx, source=f"{job.name} {name}")
        return endpoint.chat(messages_or_text, stream=stream, **gen)
    made = _deployed(job)
    if checkpoint is None:
        endpoint = list(made.values())[-1] if made else None
        wanted = "job.deploy()"
    else:
        name = f"checkpoint-{int(checkpoint)}" if (isinstance(checkpoint, int) and not isinstance(checkpoint, bool)
                                                   or str(checkpoint).isdigit()) else str(checkpoint)
        endpoint = made.get(name)
        wanted = f"job.deploy(checkpoint={name!r})"
    if endpoint is None:
        raise UserError(f"job {job.name} tuned an open model, which answers once it is deployed: call {wanted} "
                        "first (the endpoint costs money while it runs; endpoint.delete() stops it)",
                        field="checkpoint" if checkpoint is not None else "job")
    return endpoint.chat(messages_or_text, stream=stream, **gen)


# -- batch prediction (Gemini) ----------------------------------------------------------------------


class BatchPrediction:
    """A Gemini batch prediction on Vertex AI: ``name``, ``state``, ``done``, ``output_uri`` once it has succeeded."""

    def __init__(self, raw, ctx: vc.Context):
        self._raw = raw
        self._ctx = ctx

    @property
    def name(self) -> str:
        return self._raw.name

    @property
    def state(self) -> str:
        state = self._raw.state
        return getattr(state, "name", None) or str(state or "JOB_STATE_PENDING")

    @property
    def done(self) -> bool:
        return self.state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
                              "JOB_STATE_EXPIRED", "JOB_STATE_PARTIALLY_SUCCEEDED")

    @property
    def error(self) -> str | None:
        error = getattr(self._raw, "error", None)
        return getattr(error, "message", None) or None

    @property
    def output_uri(self) -> str | None:
        """The gs:// folder holding ``predictions.jsonl`` (one line per request: request, response, status)."""
        if self.state not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"):
            return None
        folder = getattr(getattr(self._raw, "output_info", None), "gcs_output_directory", None)
        return folder or getattr(getattr(self._raw, "dest", None), "gcs_uri", None)

    def refresh(self) -> BatchPrediction:
        """Read the batch prediction's state again."""
        with vc.api_errors(f"read batch prediction {self.name}", self._ctx):
            self._raw = vc.genai_client(self._ctx).batches.get(name=self.name)
        return self

    def __repr__(self) -> str:
        where = f" -> {self.output_uri}" if self.output_uri else ""
        return f"<BatchPrediction {self.name} {self.state.removeprefix('JOB_STATE_')}{where}>"


def batch_predict(job_or_endpoint, src_gs_uri: str, dest_gs_prefix: str) -> BatchPrediction:
    """Run a tuned Gemini model (a job, a Gemini endpoint from it, or a model name) over a JSONL file of requests.

    ``src_gs_uri``: a ``gs://`` JSONL file, one ``{"request": {"contents": [...]}}`` a
    line. ``dest_gs_prefix``: the ``gs://`` folder the predictions go under. Batch
    prediction costs half of online prediction and is not rate-limited. Returns
    at once; ``refresh()`` follows it to ``output_uri``.
    """
    for name, value in (("src_gs_uri", src_gs_uri), ("dest_gs_prefix", dest_gs_prefix)):
        if not isinstance(value, str) or not re.fullmatch(r"gs://[^/\s]+/\S*", value.strip()):
            raise UserError(f"{name} must be a gs:// URI, not {value!r}"[:200], field=name)
    if not src_gs_uri.strip().endswith(".jsonl"):
        raise UserError(f"src_gs_uri must be a JSONL file (.jsonl) of requests, not {src_gs_uri!r}", field="src_gs_uri")
    target = job_or_endpoint
    if isinstance(target, VertexEndpoint):
        if target.kind != "gemini" or not target.model:
            raise UserError("batch prediction runs tuned Gemini models: pass the tuning job (or its tuned model's "
                            "name)", field="job_or_endpoint")
        model, ctx = target.model, target.ctx
    elif isinstance(target, str):
        model, ctx = target.strip(), vc.context(resource=target.strip())
    elif hasattr(target, "tuned_model_name"):
        if not _is_gemini(target):
            raise UserError(f"job {target.name} tuned an open model; batch prediction here runs tuned Gemini models",
                            field="job_or_endpoint")
        _check_succeeded(target, "run a batch prediction")
        model, ctx = target.tuned_model_name, target.ctx
    else:
        raise UserError(f"job_or_endpoint must be a Vertex AI tuning job, a Gemini endpoint or a model name, not "
                        f"{type(target).__name__}", field="job_or_endpoint")
    with vc.api_errors(f"start a batch prediction with {model}", ctx):
        from google.genai import types

        raw = vc.genai_client(ctx).batches.create(
            model=model, src=src_gs_uri.strip(),
            config=types.CreateBatchJobConfig(dest=dest_gs_prefix.strip()))
    return BatchPrediction(raw, ctx)
