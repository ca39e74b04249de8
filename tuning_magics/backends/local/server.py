"""An OpenAI-compatible chat endpoint for a local model (the client for such endpoints is :mod:`.client`).

``serve(model)`` loads the model once (any id or folder :class:`~.generate.LocalChatModel`
accepts) and answers on a background thread::

    with serve("runs/tune-1/postprocess/node-0/checkpoints/final") as server:
        server.url                      # http://127.0.0.1:PORT/v1
        server.chat("Hello")            # through HTTP, like any client

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (``messages``,
``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``,
``seed``, ``stream`` with server-sent events ending in ``data: [DONE]``, and
``usage`` token counts). Requests follow the rules of :mod:`.chat_request`, the
ones ``job.chat()`` follows; a mistake is answered 400 with the same sentence.

Resources are bounded the way TGI and vLLM bound them:

- a body over ``max_body_bytes`` is refused (413) from its Content-Length, or as
  soon as a chunked body streams past it; deep JSON nesting is a 400;
- a prompt that, with ``max_tokens``, does not fit the model's context is refused
  (400, with the numbers) before generation, without waiting for the model;
- a connection that sends nothing for ``request_timeout`` seconds is closed (408);
- at most ``max_concurrent_requests`` generations at once, more are answered 429
  (TGI's ``--max-concurrent-requests``): each holds its own KV cache;
- those running take turns one decoding step at a time (see :mod:`.generate`),
  so one long request cannot hold back the others;
- a generation stops as soon as its client disconnects.

The server binds to loopback only unless ``allow_remote=True``, because it has
no authentication.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ...errors import UserError
from .chat_request import BadRequest, parse_chat_request
from .client import chat_completion, stream_chat_completion

#: Largest request body, as TGI's default payload limit: far above any prompt a context holds.
MAX_BODY_BYTES = 2_000_000
#: Seconds a connection may stay silent (request line, headers, body, or a stalled reader).
REQUEST_TIMEOUT = 60.0
#: Generations at once; more are answered 429.
MAX_CONCURRENT_REQUESTS = 8


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _ClientGone(Exception):
    """The client closed the connection before its request was read."""


# -- the server -------------------------------------------------------------------


class Server:
    """A running endpoint: ``url`` (``http://127.0.0.1:PORT/v1``), ``model_name``, ``chat()``, ``stop()``."""

    def __init__(self, chat_model, httpd: ThreadingHTTPServer, model_name: str, *,
                 max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS):
        self.chat_model = chat_model
        self.model_name = model_name
        self.max_concurrent_requests = int(max_concurrent_requests)
        self._httpd = httpd
        self._active = 0
        self._active_lock = threading.Lock()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"tuning-magics-server-{self.port}", daemon=True)
        self.created = int(time.time())

    @property
    def active_requests(self) -> int:
        """Generations in progress now."""
        return self._active

    def _enter(self) -> bool:
        with self._active_lock:
            if self._active >= self.max_concurrent_requests:
                return False
            self._active += 1
            return True

    def _leave(self) -> None:
        with self._active_lock:
            self._active -= 1

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

        ``params`` are the request's options (``max_tokens``, ``temperature``...). With
        ``stream=True``, an iterator of text pieces as the server sends them.
        """
        messages = [{"role": "user", "content": messages_or_text}] if isinstance(messages_or_text, str) \
            else list(messages_or_text)
        if stream:
            return stream_chat_completion(self.url, messages, model=self.model_name, **params)
        data = chat_completion(self.url, messages, model=self.model_name, **params)
        return data["choices"][0]["message"]["content"]

    def predict(self, instances: list[dict]) -> list[str]:
        """Vertex-style ``predict``: each instance has ``prompt`` (or ``messages``), ``max_tokens``, ``temperature``."""
        out = []
        for inst in instances:
            messages = inst.get("messages") or [{"role": "user", "content": inst.get("prompt", "")}]
            params = {k: inst[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "seed") if k in inst}
            out.append(self.chat(messages, **params))
        return out


def _usage(prompt_len: int, new: list[int]) -> dict:
    # The end-of-turn token is generated, so it counts, as with OpenAI's API.
    return {"prompt_tokens": int(prompt_len), "completion_tokens": len(new),
            "total_tokens": int(prompt_len) + len(new)}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _finish(new: list[int], stops: set) -> str:
    return "stop" if new and new[-1] in stops else "length"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that vanished or stalled is not worth a traceback on the notebook's stderr.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server_version = "tuning-magics"
    protocol_version = "HTTP/1.1"
    endpoint: Server  # set on the subclass built per server
    max_body_bytes: int = MAX_BODY_BYTES
    timeout = REQUEST_TIMEOUT  # socket timeout, set by StreamRequestHandler.setup()

    def log_message(self, fmt, *args) -> None:  # quiet: notebooks should not fill with access logs
        pass

    # -- replies ------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}},
                        headers)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def handle_expect_100(self) -> bool:
        # "Expect: 100-continue" (curl sends it for large bodies): refuse before the client sends the body.
        if self._declared_length() > self.max_body_bytes:
            self.close_connection = True
            self._error(413, self._too_big())
            return False
        return super().handle_expect_100()

    def _declared_length(self) -> int:
        try:
            return int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return -1

    def _too_big(self) -> str:
        return f"the request body is over {self.max_body_bytes} bytes, the most this endpoint takes; send less"

    def _linger(self) -> None:
        """After refusing an unread body: drop what the client still sends, briefly, so that closing
        does not reset the connection before the client has read the answer."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            for _ in range(64):  # at most 4 MiB
                if not self.connection.recv(65536):
                    break
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """True once the client closed its end (checked between decoding steps; a poll, it never blocks)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- the body -----------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(self.max_body_bytes)
        length = self._declared_length()
        if length < 0:
            raise BadRequest("bad Content-Length header; send the body's length in bytes")
        if length > self.max_body_bytes:
            raise BadRequest(self._too_big(), status=413)
        data = self.rfile.read(length)
        if len(data) < length:
            raise _ClientGone()
        return data

    def _read_chunked(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _ClientGone()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                raise BadRequest("bad chunk size in a chunked request body") from None
            if size == 0:
                for _ in range(100):  # trailers, up to the blank line
                    if not self.rfile.readline(1024).strip():
                        return bytes(body)
                raise BadRequest("too many trailer lines after a chunked request body")
            if len(body) + size > limit:
                raise BadRequest(self._too_big(), status=413)
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise _ClientGone()
            body += chunk
            self.rfile.readline(3)  # the CRLF after the chunk

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
            self._send_json(200, {"status": "ok", "model": ep.model_name, "active_requests": ep.active_requests})
        else:
            self._error(404, f"no route GET {path}; use GET /v1/models or POST /v1/chat/completions")

    def do_POST(self) -> None:
        ep = self.endpoint
        try:
            try:
                raw = self._read_body()
            except BadRequest as exc:
                # The unread rest of the body cannot be taken for a next request: answer, then close.
                self.close_connection = True
                self._error(exc.status, str(exc), exc.field)
                self._linger()
                return
            if self._path() not in ("/v1/chat/completions", "/chat/completions"):
                raise BadRequest(f"no route POST {self._path()}; use POST /v1/chat/completions", status=404)
            try:
                body = json.loads(raw or b"null")
            except ValueError as exc:
                raise BadRequest(f"the request body is not valid JSON ({exc})") from None
            except RecursionError:
                raise BadRequest("the request body nests JSON too deeply") from None
            req = parse_chat_request(body)
            model = body.get("model")
            if model not in (None, "", ep.model_name):
                raise BadRequest(f"model {str(model)[:100]!r} is not served here; this endpoint serves "
                                 f"{ep.model_name!r} (GET /v1/models)", status=404, field="model")
            # Tokenised and checked against the context here, outside the model's turns.
            req = ep.chat_model.prepare(req)
        except BadRequest as exc:
            self._error(exc.status, str(exc), exc.field)
            return
        except TimeoutError:
            self.close_connection = True
            self._error(408, f"the request was not received within {self.timeout:g} s; send it whole")
            return
        except _ClientGone:
            self.close_connection = True
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failure: the server's error, not a crash
            self._error(500, f"cannot prepare the prompt: {_first_line(exc)}")
            return
        if not ep._enter():
            self._error(429, f"the server is busy with {ep.max_concurrent_requests} requests; retry shortly",
                        headers={"Retry-After": "1"})
            return
        try:
            if req["stream"]:
                self._stream(req)
            else:
                self._complete(req)
        except OSError:
            self.close_connection = True  # the client went away or stalled; nothing to answer
        except Exception as exc:  # noqa: BLE001 - a failed generation is the server's error, not a crash
            try:
                self._error(500, f"generation failed: {_first_line(exc)}")
            except OSError:
                pass
        finally:
            ep._leave()

    def _complete(self, req: dict) -> None:
        cm = self.endpoint.chat_model
        text, prompt_len, new = cm.complete(req, should_stop=self._client_gone)
        self._send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.endpoint.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish(new, set(cm.stop_ids()))}],
            "usage": _usage(prompt_len, new),
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
        ids: list[int] = []
        pieces = ep.chat_model.stream(req, ids=ids, should_stop=self._client_gone)
        try:
            for piece in pieces:
                send({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        except OSError:
            raise  # the client went away: closing the pieces below stops the generation at its next step
        except Exception as exc:  # noqa: BLE001 - the status was sent; the error goes in the stream, as OpenAI's does
            send({"error": {"message": f"generation failed: {_first_line(exc)}", "type": "server_error",
                            "param": None, "code": 500}})
            return
        finally:
            pieces.close()
        usage, finish = _usage(req["prompt_tokens"], ids), _finish(ids, set(ep.chat_model.stop_ids()))
        final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        if req["include_usage"]:
            send(final)
            send({**base, "choices": [], "usage": usage})
        else:
            final["usage"] = usage  # as vLLM does; clients that do not ask for usage ignore it
            send(final)
        send("[DONE]")


def serve(model_path_or_id, *, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
          allow_remote: bool = False, device=None, dtype=None, max_body_bytes: int = MAX_BODY_BYTES,
          request_timeout: float = REQUEST_TIMEOUT,
          max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS) -> Server:
    """Load a model once and serve it on ``http://host:port/v1`` from a background thread; returns the Server.

    ``port=0`` picks a free port. ``model_name`` is the id clients send
    (default: the folder's or model's name). Hosts other than loopback are
    refused unless ``allow_remote=True``: the endpoint has no authentication.
    ``max_body_bytes``, ``request_timeout`` (seconds) and ``max_concurrent_requests``
    bound what one client can take (see the module's notes).
    """
    from .generate import LocalChatModel

    if not allow_remote and not _is_loopback(str(host)):
        raise UserError(f"host {host!r} would expose the model to the network without authentication; "
                        "use 127.0.0.1, or pass allow_remote=True if you mean it", field="host")
    for name, value in (("max_body_bytes", max_body_bytes), ("request_timeout", request_timeout),
                        ("max_concurrent_requests", max_concurrent_requests)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or (name != "request_timeout" and int(value) != value):
            raise UserError(f"{name} must be a positive {'number' if name == 'request_timeout' else 'whole number'}"
                            f", not {value!r}", field=name)
    chat_model = model_path_or_id if hasattr(model_path_or_id, "reply") else \
        LocalChatModel(model_path_or_id, device=device, dtype=dtype)
    name = model_name or _default_name(getattr(chat_model, "name", str(model_path_or_id)))
    handler = type("Handler", (_Handler,), {"max_body_bytes": int(max_body_bytes), "timeout": float(request_timeout)})
    try:
        httpd = _HTTPServer((host, int(port)), handler)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port, "
                        "or port=0 for a free one", field="port") from None
    server = Server(chat_model, httpd, name, max_concurrent_requests=int(max_concurrent_requests))
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
