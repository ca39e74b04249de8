"""An OpenAI-compatible chat endpoint for a local model (the client for such endpoints is :mod:`.client`).

``serve(model)`` loads the model once (any id or folder :class:`~.generate.LocalChatModel`
accepts) and answers on a background thread::

    with serve("runs/tune-1/postprocess/node-0/checkpoints/final") as server:
        server.url                      # http://127.0.0.1:PORT/v1
        server.chat("Hello")            # through HTTP, like any client

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}`` (the id URL-encoded or
not, as clients send ``job/final``), ``POST /v1/chat/completions`` (``messages``,
``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``,
``seed``, ``stop``, ``stream`` with server-sent events ending in ``data: [DONE]``,
and ``usage`` token counts). Requests follow the rules of :mod:`tuning_magics.chat_request`,
the ones ``job.chat()`` follows; a mistake is answered 400 with the same sentence,
in OpenAI's error shape with ``param`` naming the field (``messages[2].content``). An
option the server does not have (``tools``, ``response_format``, ``logprobs``,
penalties...) is refused, never ignored, unless its value changes nothing.

Resources are bounded the way TGI and vLLM bound them:

- a body over ``max_body_bytes`` is refused (413) from its Content-Length, or as
  soon as a chunked body streams past it; deep JSON nesting is a 400;
- a prompt that, with ``max_tokens``, does not fit the model's context is refused
  (400, with the numbers) before generation, without waiting for the model; only a
  bounded prefix of a huge prompt is tokenised to prove it;
- a request (line, headers and body) must arrive whole within ``request_timeout``
  seconds of its first byte, and a connection silent that long is closed (408);
- at most ``max_connections`` connections are open at once; more are answered
  503 and closed at once;
- at most ``max_concurrent_requests`` generations at once, more are answered 429
  (TGI's ``--max-concurrent-requests``): each holds its own KV cache;
- those running take turns one decoding step at a time (see :mod:`.generate`),
  so one long request cannot hold back the others;
- a generation stops as soon as its client disconnects (a client that only
  half-closes its end, which HTTP allows, still gets its reply).

The server binds to loopback only unless ``allow_remote=True``, because it has
no authentication.
"""

from __future__ import annotations

import inspect
import io
import ipaddress
import json
import select
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ...errors import UserError
from ...chat_request import BadRequest, chat_request, parse_chat_request
from .client import EndpointRefused, chat_completion, stream_chat_completion

#: Largest request body, as TGI's default payload limit: far above any prompt a context holds.
MAX_BODY_BYTES = 2_000_000
#: Seconds a connection may stay silent (request line, headers, body, or a stalled reader).
REQUEST_TIMEOUT = 60.0
#: Generations at once; more are answered 429.
MAX_CONCURRENT_REQUESTS = 8
#: Open connections at once (each holds a thread); more are answered 503.
MAX_CONNECTIONS = 64
#: What a predict() instance may hold.
_INSTANCE_KEYS = ("prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed")


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

    def __init__(self, chat_model, httpd: _HTTPServer, model_name: str, *,
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

    @property
    def open_connections(self) -> int:
        """Client connections open now (each served by its own thread)."""
        return len(self._httpd.connections)

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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close every connection and free the port.

        New connections are answered 503. Connections waiting for a request (kept
        alive) are closed; a generation in progress stops at its next decoding
        step and is answered 503 (a stream ends with an error event). Handler
        threads get ``timeout`` seconds to finish; connections still open then
        (a client not reading its reply) are cut.
        """
        httpd = self._httpd
        httpd.stopping = True
        if self._thread.is_alive():
            httpd.shutdown()
            self._thread.join()
        deadline = time.monotonic() + timeout
        # SHUT_RD wakes a handler blocked reading and leaves it able to answer; SHUT_RDWR cuts the rest.
        for how, until in ((socket.SHUT_RD, deadline), (socket.SHUT_RDWR, None)):
            with httpd.lock:
                open_now = dict(httpd.connections)
            for sock in open_now:
                try:
                    sock.shutdown(how)
                except OSError:
                    pass
            for thread in open_now.values():
                thread.join(max(0.0, until - time.monotonic()) if until else 1.0)
        httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"<Server {self.model_name!r} at {self.url} ({state})>"

    def chat(self, messages_or_text, *, stream: bool = False, **options):
        """The reply to a string or a message list, through this endpoint's HTTP API (greedy by default).

        ``options`` are ``job.chat()``'s, with the same rules: ``max_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``. With ``stream=True``, an
        iterator of text pieces as the server sends them. A request the server
        refuses raises a one-line UserError with the server's sentence.
        """
        req = chat_request(messages_or_text, stream=stream, **options)
        body = {"messages": req["messages"], "max_tokens": req["max_new_tokens"], "stop": req["stop"] or None,
                **{k: options[k] for k in ("temperature", "top_p", "top_k", "seed") if options.get(k) is not None}}
        # The server names max_tokens, the name it was sent; this caller wrote max_new_tokens.
        return self._ask(body, stream, rename={"max_tokens": "max_new_tokens"})

    def chat_panel(self, *, base=None):
        """A chat panel with this endpoint (streamed replies, history); ``base``: a model to compare, side by side."""
        from ...display.chat import ChatPanel

        return ChatPanel(self, base=base, title=f"Chat with {self.model_name} at {self.url}")

    def predict(self, instances: list[dict]) -> list[str]:
        """Vertex-style ``predict``: each instance has ``prompt`` (or ``messages``), ``max_tokens``, ``temperature``,
        ``top_p``, ``top_k``, ``seed``, checked by the rules of a chat-completions body."""
        if not isinstance(instances, (list, tuple)):
            raise UserError(f"instances must be a list of {{prompt or messages, ...}} objects, not "
                            f"{type(instances).__name__}", field="instances")
        bodies = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict) or not ("prompt" in inst or "messages" in inst):
                raise UserError(f"instances[{i}] must be an object with a prompt or messages, not "
                                f"{str(inst)[:60] if isinstance(inst, dict) else type(inst).__name__}",
                                field="instances")
            unknown = sorted(set(inst) - set(_INSTANCE_KEYS))
            if unknown:
                raise UserError(f"instances[{i}] has no field {unknown[0]!r}; the fields are "
                                f"{', '.join(_INSTANCE_KEYS)}", field="instances")
            body = {k: v for k, v in inst.items() if k != "prompt"}
            if "messages" not in inst:
                body["messages"] = [{"role": "user", "content": inst["prompt"]}] \
                    if isinstance(inst["prompt"], str) else inst["prompt"]
            try:
                parse_chat_request(body)  # every instance is checked before the first is sent
            except BadRequest as exc:
                raise BadRequest(f"instances[{i}]: {exc}", field=exc.field) from None
            bodies.append(body)
        return [self._ask(body, False) for body in bodies]

    def _ask(self, body: dict, stream: bool, rename: dict | None = None):
        def refused(exc: EndpointRefused) -> BadRequest:
            message = exc.detail
            for old, new in (rename or {}).items():
                message = message.replace(old, new)
            return BadRequest(message, status=exc.status)

        messages, params = body["messages"], {k: v for k, v in body.items() if k != "messages"}
        if not stream:
            try:
                data = chat_completion(self.url, messages, model=self.model_name, **params)
            except EndpointRefused as exc:
                raise refused(exc) from None
            return data["choices"][0]["message"]["content"]

        def pieces():
            try:
                yield from stream_chat_completion(self.url, messages, model=self.model_name, **params)
            except EndpointRefused as exc:
                raise refused(exc) from None

        return pieces()


def _usage(prompt_len: int, new: list[int]) -> dict:
    # The end-of-turn token is generated, so it counts, as with OpenAI's API.
    return {"prompt_tokens": int(prompt_len), "completion_tokens": len(new),
            "total_tokens": int(prompt_len) + len(new)}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


#: The answer to a generation cut short by Server.stop().
_STOPPED = {"message": "the server stopped before the reply was finished; send the request to a running server",
            "type": "server_error", "param": None, "code": 503}


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; knows its open sockets so stop() can close them."""

    daemon_threads = True
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stopping = False
        self.lock = threading.Lock()
        self.connections: dict[socket.socket, threading.Thread] = {}

    def process_request(self, request, client_address) -> None:
        with self.lock:
            full = self.stopping or len(self.connections) >= self.max_connections
            if not full:
                thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                          name="tuning-magics-connection", daemon=True)
                self.connections[request] = thread
                thread.start()
        if full:
            self._refuse(request)

    def _refuse(self, request) -> None:
        why = "the server is stopping" if self.stopping else \
            f"the server has {self.max_connections} connections open, the most it takes; retry shortly"
        body = json.dumps({"error": {"message": why, "type": "server_error", "param": None, "code": 503}}).encode()
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
            request.shutdown(socket.SHUT_WR)
            request.recv(65536, socket.MSG_DONTWAIT)  # what the client sent already: closing on it would reset
        except OSError:
            pass
        super().shutdown_request(request)

    def shutdown_request(self, request) -> None:
        with self.lock:
            self.connections.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # A client that vanished or stalled is not worth a traceback on the notebook's stderr.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _RequestReader(io.RawIOBase):
    """The handler's reader: from the request's first byte, every read waits only for what the deadline leaves.

    A socket timeout alone bounds each read, so a client trickling a byte a second could hold a thread forever.
    """

    def __init__(self, handler: _Handler):
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        h, sock = self.handler, self.handler.connection
        if h.deadline:
            left = h.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request took too long")
            sock.settimeout(min(left, h.timeout))
        try:
            n = sock.recv_into(buffer)
        finally:
            if h.deadline:
                sock.settimeout(h.timeout)
        if n and h.deadline == 0.0:  # the request's first bytes: its clock starts
            h.deadline = time.monotonic() + h.timeout
        return n


class _Handler(BaseHTTPRequestHandler):
    server_version = "tuning-magics"
    protocol_version = "HTTP/1.1"
    endpoint: Server  # set on the subclass built per server
    max_body_bytes: int = MAX_BODY_BYTES
    timeout = REQUEST_TIMEOUT  # socket timeout, set by StreamRequestHandler.setup()
    #: When the request being read must be whole: 0.0 until its first byte, None once it is read.
    deadline: float | None = None
    _gone = _probed = False
    _poller = None

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader, replaced by one with a deadline
        self.rfile = io.BufferedReader(_RequestReader(self))

    def handle_one_request(self) -> None:
        if self.server.stopping:
            self.close_connection = True
            return
        self.deadline = 0.0
        self._gone = self._probed = self._headers_sent = False
        super().handle_one_request()

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

    def _readable(self) -> bool:
        """Whether the connection has input (or an end, or an error) waiting; never blocks, any descriptor number."""
        if not hasattr(select, "poll"):  # Windows: its select() has no descriptor-number limit
            return bool(select.select([self.connection], [], [], 0)[0])
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.connection, select.POLLIN)
        return bool(self._poller.poll(0))

    def _client_gone(self) -> bool:
        """True once the client is known to have closed the connection (checked between decoding steps).

        The end of the client's input alone does not say so: a client may half-close
        (shutdown(SHUT_WR)) and still read its reply. So, before a reply's headers,
        that end is answered with an interim "100 Continue" (HTTP/1.1 clients accept
        one at any time); a client that has really gone answers it with a reset,
        seen at a later check. A failure of the check itself is not a disconnect.
        """
        if self._gone:
            return True
        try:
            if not self._readable() or self.connection.recv(1, socket.MSG_PEEK):
                return False  # nothing new, or the client's next request already
            # The end of the client's input. A reset that came after it shows only as the socket's error.
            if self._probed or self._headers_sent:
                self._gone = bool(self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
            elif self.request_version == "HTTP/1.1":
                self._probed = True
                self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            self._gone = True
        except (OSError, ValueError):
            return False
        return self._gone

    _headers_sent = False

    def _stopped(self) -> bool:
        """Whether the generation should end now: its client went away, or the server is stopping."""
        return self.server.stopping or self._client_gone()

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
        self.deadline = None
        ep = self.endpoint
        path = self._path()
        model = {"id": ep.model_name, "object": "model", "created": ep.created, "owned_by": "tuning_magics"}
        one = path.removeprefix("/v1").removeprefix("/models/") if path.startswith(("/v1/models/", "/models/")) \
            else None
        if path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [model]})
        elif one is not None:
            # The openai client sends the id percent-encoded ("job%2Ffinal"), others as it is.
            name = urllib.parse.unquote(one)
            if name == ep.model_name:
                self._send_json(200, model)
            else:
                self._error(404, f"model {name[:100]!r} is not served here; this endpoint serves {ep.model_name!r}",
                            "model")
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
            self.deadline = None  # read whole: from here on, only each write has a time limit
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
        # The slot is taken before the prompt is tokenised, so a busy server refuses before doing that work.
        if not ep._enter():
            self._error(429, f"the server is busy with {ep.max_concurrent_requests} requests; retry shortly",
                        headers={"Retry-After": "1"})
            return
        try:
            try:
                # Tokenised and checked against the context here, outside the model's turns.
                req = ep.chat_model.prepare(req)
            except BadRequest as exc:
                self._error(exc.status, str(exc), exc.field)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failure: the server's error, not a crash
                self._error(500, f"cannot prepare the prompt: {_first_line(exc)}")
                return
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

    def _cut(self, req: dict, new: list[int], finish: str) -> bool:
        """Whether Server.stop() ended this generation before its end."""
        return self.server.stopping and finish == "length" and len(new) < req["max_new_tokens"]

    def _complete(self, req: dict) -> None:
        cm = self.endpoint.chat_model
        text, prompt_len, new = cm.complete(req, should_stop=self._stopped)
        finish = cm.finish_reason(new, req["stop"])
        if self._cut(req, new, finish):
            self.close_connection = True
            self._error(503, _STOPPED["message"])
            return
        self._send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.endpoint.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": _usage(prompt_len, new),
        })

    def _stream(self, req: dict) -> None:
        ep = self.endpoint
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": ep.model_name}
        self._headers_sent = True  # no interim "100 Continue" after this
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
        pieces = ep.chat_model.stream(req, ids=ids, should_stop=self._stopped)
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
        finish = ep.chat_model.finish_reason(ids, req["stop"])
        if self._cut(req, ids, finish):
            send({"error": _STOPPED})
            return
        usage = _usage(req["prompt_tokens"], ids)
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
          request_timeout: float = REQUEST_TIMEOUT, max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS,
          max_connections: int = MAX_CONNECTIONS) -> Server:
    """Load a model once and serve it on ``http://host:port/v1`` from a background thread; returns the Server.

    ``port=0`` picks a free port. ``model_name`` is the id clients send
    (default: the folder's or model's name). Hosts other than loopback are
    refused unless ``allow_remote=True``: the endpoint has no authentication.
    ``max_body_bytes``, ``request_timeout`` (seconds), ``max_concurrent_requests``
    and ``max_connections`` bound what clients can take (see the module's notes).
    """
    from .generate import LocalChatModel

    if not allow_remote and not _is_loopback(str(host)):
        raise UserError(f"host {host!r} would expose the model to the network without authentication; "
                        "use 127.0.0.1, or pass allow_remote=True if you mean it", field="host")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"port must be a whole number from 1 to 65535, or 0 for a free one, not {port!r}"[:200],
                        field="port")
    for name, value in (("max_body_bytes", max_body_bytes), ("request_timeout", request_timeout),
                        ("max_concurrent_requests", max_concurrent_requests), ("max_connections", max_connections)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or (name != "request_timeout" and int(value) != value):
            raise UserError(f"{name} must be a positive {'number' if name == 'request_timeout' else 'whole number'}"
                            f", not {value!r}", field=name)
    chat_model = model_path_or_id if hasattr(model_path_or_id, "reply") else \
        LocalChatModel(model_path_or_id, device=device, dtype=dtype)
    name = model_name or _default_name(getattr(chat_model, "name", str(model_path_or_id)))
    handler = type("Handler", (_Handler,), {"max_body_bytes": int(max_body_bytes), "timeout": float(request_timeout)})
    try:
        httpd = _HTTPServer((host, port), handler)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port, "
                        "or port=0 for a free one", field="port") from None
    httpd.max_connections = int(max_connections)
    server = Server(chat_model, httpd, name, max_concurrent_requests=int(max_concurrent_requests))
    handler.endpoint = server
    server._thread.start()
    return server


#: What deploy() passes on to serve().
DEPLOY_OPTIONS = tuple(p for p in inspect.signature(serve).parameters if p != "model_path_or_id")


def check_deploy_options(options: dict) -> None:
    """A UserError naming an option deploy() does not take (before any model loads)."""
    unknown = sorted(set(options) - set(DEPLOY_OPTIONS))
    if unknown:
        raise UserError(f"deploy() has no option {unknown[0]!r}; the options are checkpoint, "
                        f"{', '.join(DEPLOY_OPTIONS)}", field=unknown[0])


def deploy(model, **options) -> Server:
    """``LocalJob.deploy()``: serve a tuned checkpoint folder (or a loaded model); options are those of :func:`serve`."""
    check_deploy_options(options)
    return serve(model, **options)


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
