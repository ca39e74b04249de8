"""An OpenAI-compatible chat endpoint for a local model (the client for such endpoints is :mod:`.client`).

``serve(model)`` loads the model once (any id or folder :class:`~.generate.LocalChatModel`
accepts) and answers on a background thread::

    with serve("runs/tune-1/postprocess/node-0/checkpoints/final") as server:
        server.url                      # http://127.0.0.1:PORT/v1
        server.chat("Hello")            # through HTTP, like any client

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (``messages``,
``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``,
``seed``, ``stream`` with server-sent events ending in ``data: [DONE]``, and
``usage`` token counts). Generation is serialised with a lock: one model, one
request at a time, any number of waiting clients. The server binds to loopback
only unless ``allow_remote=True``, because it has no authentication.
"""

from __future__ import annotations

from typing import Iterator

import ipaddress
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ...errors import UserError
from .client import chat_completion, stream_chat_completion

#: Upper bound of ``max_tokens`` a request may ask for.
MAX_TOKENS_LIMIT = 8192
DEFAULT_MAX_TOKENS = 256
_ROLES = ("system", "user", "assistant", "model", "developer")


class BadRequest(Exception):
    """A client mistake: answered with this status and message as an OpenAI-style JSON error."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- request parsing ------------------------------------------------------------


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise BadRequest(f"{where}.content[{i}] must be an object with a type", param=f"{where}.content")
            if part["type"] == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part["type"] in ("image_url", "input_image"):
                raise BadRequest("this model reads text only; remove the image parts", param=f"{where}.content")
            else:
                raise BadRequest(f"{where}.content[{i}] has unknown type {part['type']!r}; use text",
                                 param=f"{where}.content")
        return "\n".join(texts)
    if content is None:
        return ""
    raise BadRequest(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def parse_chat_request(body: dict) -> dict:
    """Check an OpenAI chat-completions body; returns messages and generation options, or raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise BadRequest(f"{where} must be an object with role and content", param="messages")
        role = m["role"]
        if role not in _ROLES:
            raise BadRequest(f"{where}.role {role!r} is not supported; use system, user or assistant", param="messages")
        role = {"model": "assistant", "developer": "system"}.get(role, role)
        clean.append({"role": role, "content": _content_text(m.get("content"), where)})

    def number(name, default, lo, hi, kind=float):
        value = body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
            raise BadRequest(f"'{name}' must be a {'whole ' if kind is int else ''}number", param=name)
        if not lo <= value <= hi:
            raise BadRequest(f"'{name}' must be between {lo} and {hi}, not {value}", param=name)
        return kind(value)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    body = {**body, "max_tokens": max_tokens}
    n = number("n", 1, 1, 1, int)  # noqa: F841 - checked only: one choice per request
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    return {
        "messages": clean,
        "max_new_tokens": number("max_tokens", DEFAULT_MAX_TOKENS, 1, MAX_TOKENS_LIMIT, int),
        "temperature": number("temperature", 0.0, 0.0, 2.0),
        "top_p": number("top_p", 1.0, 0.0, 1.0) or 1.0,
        "top_k": number("top_k", 0, 0, 1_000_000, int),
        "seed": number("seed", None, -(2**63), 2**63 - 1, int),
        "stream": stream,
        "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
    }


# -- the server -------------------------------------------------------------------


class Server:
    """A running endpoint: ``url`` (``http://127.0.0.1:PORT/v1``), ``model_name``, ``chat()``, ``stop()``."""

    def __init__(self, chat_model, httpd: ThreadingHTTPServer, model_name: str):
        self.chat_model = chat_model
        self.model_name = model_name
        self._httpd = httpd
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"tuning-magics-server-{self.port}", daemon=True)
        self.created = int(time.time())

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The OpenAI base URL: ``http://HOST:PORT/v1``."""
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    def stop(self) -> None:
        """Stop answering and free the port (requests in flight finish first)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"<Server {self.model_name!r} at {self.url} ({state})>"

    def chat(self, messages_or_text, *, stream: bool = False, **params):
        """The reply to a string or a message list, through this endpoint's HTTP API (greedy by default).

        With ``stream=True``, an iterator of text pieces as the server sends them.
        """
        messages = [{"role": "user", "content": messages_or_text}] if isinstance(messages_or_text, str) \
            else list(messages_or_text)
        if stream:
            return stream_chat_completion(self.url, messages, model=self.model_name, **params)
        data = chat_completion(self.url, messages, model=self.model_name, **params)
        return data["choices"][0]["message"]["content"]

    def predict(self, instances: list[dict]) -> list[str]:
        """Vertex-style ``predict``: each instance has ``prompt`` (or ``messages``), ``max_tokens``, ``temperature``..."""
        out = []
        for inst in instances:
            messages = inst.get("messages") or [{"role": "user", "content": inst.get("prompt", "")}]
            params = {k: inst[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "seed") if k in inst}
            out.append(self.chat(messages, **params))
        return out

    # -- generation (called by the request handler) ------------------------------
    # The chat model's own rendering and decoding are used, so a reply here is token
    # for token the one LocalChatModel.reply() gives, with exact token counts.
    def _gen(self, req: dict) -> dict:
        return {k: req[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}

    def complete(self, req: dict) -> tuple[str, dict, str]:
        """One reply: (text, usage, finish_reason)."""
        stops = set(self.chat_model.stop_ids())
        with self._lock:
            text, prompt_len, new = self.chat_model.complete(req["messages"], **self._gen(req))
        return text, _usage(prompt_len, new, stops), _finish(new, stops)

    def complete_stream(self, req: dict):
        """Yield text pieces, then a final (usage, finish_reason) tuple; holds the lock until generation ends."""
        cm = self.chat_model
        stops = set(cm.stop_ids())
        ids: list[int] = []
        with self._lock:
            prompt_len = int(cm.encode(req["messages"])["input_ids"].shape[1])
            yield from cm.stream(req["messages"], **self._gen(req), ids=ids)
        yield _usage(prompt_len, ids, stops), _finish(ids, stops)


def _usage(prompt_len: int, new: list[int], stops: set) -> dict:
    # The end-of-turn token is generated, so it counts, as with OpenAI's API.
    completion = len(new)
    return {"prompt_tokens": int(prompt_len), "completion_tokens": completion,
            "total_tokens": int(prompt_len) + completion}


def _finish(new: list[int], stops: set) -> str:
    return "stop" if new and new[-1] in stops else "length"


class _Handler(BaseHTTPRequestHandler):
    server_version = "tuning-magics"
    protocol_version = "HTTP/1.1"
    endpoint: Server  # set on the subclass built per server

    def log_message(self, fmt, *args) -> None:  # quiet: notebooks should not fill with access logs
        pass

    # -- replies ------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    # -- routes ---------------------------------------------------------------------
    def do_GET(self) -> None:
        ep = self.endpoint
        path = self._path()
        if path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [
                {"id": ep.model_name, "object": "model", "created": ep.created, "owned_by": "tuning_magics"}]})
        elif path in (f"/v1/models/{ep.model_name}", f"/models/{ep.model_name}"):
            self._send_json(200, {"id": ep.model_name, "object": "model", "created": ep.created,
                                  "owned_by": "tuning_magics"})
        elif path in ("", "/health", "/v1"):
            self._send_json(200, {"status": "ok", "model": ep.model_name})
        else:
            self._error(404, f"no route GET {path}; use GET /v1/models or POST /v1/chat/completions")

    def do_POST(self) -> None:
        path = self._path()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            self._error(400, "bad Content-Length header")
            return
        raw = self.rfile.read(length) if length > 0 else b""
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route POST {path}; use POST /v1/chat/completions")
            return
        try:
            try:
                body = json.loads(raw or b"null")
            except ValueError as exc:
                raise BadRequest(f"the request body is not valid JSON ({exc})") from None
            req = parse_chat_request(body)
            model = body.get("model")
            if model not in (None, "", self.endpoint.model_name):
                raise BadRequest(f"model {model!r} is not served here; this endpoint serves "
                                 f"{self.endpoint.model_name!r} (GET /v1/models)", status=404, param="model")
        except BadRequest as exc:
            self._error(exc.status, str(exc), exc.param)
            return
        try:
            if req["stream"]:
                self._stream(req)
            else:
                self._complete(req)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to answer
        except Exception as exc:  # noqa: BLE001 - a failed generation is the server's error, not a crash
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            try:
                self._error(500, f"generation failed: {first}")
            except OSError:
                pass

    def _complete(self, req: dict) -> None:
        text, usage, finish = self.endpoint.complete(req)
        self._send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.endpoint.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        })

    def _stream(self, req: dict) -> None:
        ep = self.endpoint
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": ep.model_name}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends the connection; no chunked encoding needed
        self.end_headers()
        self.close_connection = True

        def send(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}]})
        gen = ep.complete_stream(req)
        client_gone = False
        for item in gen:
            if isinstance(item, tuple):
                usage, finish = item
                break
            if client_gone:
                continue  # keep draining so the model is free before the lock is released
            try:
                send({**base, "choices": [{"index": 0, "delta": {"content": item}, "finish_reason": None}]})
            except OSError:
                client_gone = True
        if client_gone:
            return
        final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        if req["include_usage"]:
            send(final)
            send({**base, "choices": [], "usage": usage})
        else:
            final["usage"] = usage  # as vLLM does; clients that do not ask for usage ignore it
            send(final)
        send("[DONE]")


def serve(model_path_or_id, *, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
          allow_remote: bool = False, device=None, dtype=None) -> Server:
    """Load a model once and serve it on ``http://host:port/v1`` from a background thread; returns the Server.

    ``port=0`` picks a free port. ``model_name`` is the id clients send
    (default: the folder's or model's name). Hosts other than loopback are
    refused unless ``allow_remote=True``: the endpoint has no authentication.
    """
    from .generate import LocalChatModel

    if not allow_remote and not _is_loopback(str(host)):
        raise UserError(f"host {host!r} would expose the model to the network without authentication; "
                        "use 127.0.0.1, or pass allow_remote=True if you mean it", field="host")
    chat_model = model_path_or_id if hasattr(model_path_or_id, "reply") else \
        LocalChatModel(model_path_or_id, device=device, dtype=dtype)
    name = model_name or _default_name(getattr(chat_model, "name", str(model_path_or_id)))
    handler = type("Handler", (_Handler,), {})
    try:
        httpd = ThreadingHTTPServer((host, int(port)), handler)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port, "
                        "or port=0 for a free one", field="port") from None
    httpd.daemon_threads = True
    server = Server(chat_model, httpd, name)
    handler.endpoint = server
    server._thread.start()
    return server


def deploy(model_path, **options) -> Server:
    """``LocalJob.deploy()``: serve a tuned checkpoint folder; options are those of :func:`serve`."""
    return serve(model_path, **options)


def _default_name(name: str) -> str:
    path = Path(name)
    if path.is_dir() or len(path.parts) > 2:
        parts = path.resolve().parts
        # .../<job>/postprocess/node-0/checkpoints/final -> "<job>/final"
        if "postprocess" in parts:
            i = parts.index("postprocess")
            return f"{parts[i - 1]}/{parts[-1]}" if i else parts[-1]
        return path.name or name
    return name
