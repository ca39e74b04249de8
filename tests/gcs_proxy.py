"""A fault-injecting HTTP proxy in front of the Cloud Storage emulator, on 127.0.0.1.

Every request the client sends goes through :class:`FaultProxy`, which forwards it
to the emulator over a fresh connection and relays the answer (one request per
client connection: the proxy answers with ``Connection: close``). Faults are
scripted with :meth:`FaultProxy.inject`; each applies to the next ``times``
requests that match (after skipping ``skip`` of them):

``"drop"``
    read the whole request, then close the connection without answering; the
    server never sees the request.
``"reset"``
    the same, but with a TCP reset instead of an orderly close.
``"reset_mid_body"``
    read the request head and half of its body, then reset the connection while
    the client is still sending; the server never sees the request.
``"lose_response"``
    forward the request (the server carries it out), then close the connection
    without passing the answer on.
``"delay"``
    hold the request ``seconds`` before forwarding it (past the client's read
    timeout, the client gives up and retries while the first one is held).
an ``int`` (429, 500, 503, ...)
    answer with that status and a JSON error, without forwarding.

The proxy also corrects one answer of the emulator: asked for the status of a
resumable upload that holds no bytes yet, it claims ``Range: bytes=0-0``; Cloud
Storage sends no Range header then.

The emulator ignores generation preconditions; the proxy enforces them the way
Cloud Storage does (``enforce_preconditions``): an upload with ``ifGenerationMatch=G``
is answered with 412 when the object's current generation is not ``G`` (0: the
object must not exist), checked when a multipart upload arrives, when a
resumable upload starts and when its last chunk arrives.

Everything that happened is in :attr:`FaultProxy.seen`, one :class:`Seen` per request.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

Matcher = str | Callable[["Request"], bool]
Fault = str | int

_FAULTS = {"drop", "reset", "reset_mid_body", "lose_response", "delay"}


@dataclass(frozen=True)
class Request:
    """What the proxy read of one request."""

    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # lower-case names
    body: bytes  # may be partial for reset_mid_body

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query).items()}

    @property
    def kind(self) -> str:
        """``multipart``, ``initiate`` (a resumable upload starts), ``chunk``, ``download`` or ``metadata``."""
        query = self.query
        if self.path.startswith("/upload/"):
            if "upload_id" in query:
                return "chunk"
            return "initiate" if query.get("uploadType") == "resumable" else query.get("uploadType", "upload")
        return "download" if query.get("alt") == "media" else "metadata"

    @property
    def is_upload(self) -> bool:
        return self.path.startswith("/upload/")

    @property
    def finishes_upload(self) -> bool:
        """True for a request that creates the object: a multipart upload, or a resumable upload's last chunk."""
        kind = self.kind
        if kind == "multipart":
            return True
        if kind != "chunk":
            return False
        match = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+)", self.headers.get("content-range", "").strip())
        return bool(match) and (match.group(2) is None or int(match.group(2)) + 1 == int(match.group(3)))


@dataclass
class Seen:
    """One request as the proxy handled it: the fault applied (None: forwarded as is) and the status answered."""

    method: str
    target: str
    kind: str
    fault: Fault | None = None
    status: int | None = None  # None: the client got no answer
    body_bytes: int = 0
    final: bool = False  # the request that creates the object


@dataclass
class _Rule:
    fault: Fault
    match: Matcher
    times: int
    skip: int
    seconds: float
    applied: int = 0
    seen: int = 0

    def take(self, request: Request) -> bool:
        if self.applied >= self.times or not _matches(self.match, request):
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        self.applied += 1
        return True


def _matches(match: Matcher, request: Request) -> bool:
    if callable(match):
        return bool(match(request))
    if match == "any":
        return True
    if match == "upload":
        return request.is_upload
    if match == "final":
        return request.finishes_upload
    return request.kind == match


@dataclass
class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` (``http://127.0.0.1:PORT``), injecting the scripted faults."""

    upstream: str
    bucket: str = ""  # a bucket that exists upstream, for :meth:`uri`
    enforce_preconditions: bool = True
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the proxy only forwards to 127.0.0.1")
        self._upstream = ("127.0.0.1", parts.port)
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()  # a precondition check and the write it guards happen together
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._sessions: dict[str, str] = {}  # resumable upload_id -> object name
        self._kept: dict[str, int] = {}  # resumable upload_id -> bytes the server acknowledged
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, name="gcs-fault-proxy", daemon=True)
        self._thread.start()

    def uri(self, name: str = "data.jsonl") -> str:
        """A fresh ``gs://`` URI in :attr:`bucket`, unique to the caller."""
        return f"gs://{self.bucket}/{uuid.uuid4().hex}/{name}"

    # ------------------------------------------------------------ scripting

    def inject(self, fault: Fault, *, match: Matcher = "any", times: int = 1, skip: int = 0,
               seconds: float = 0.0) -> None:
        """Apply ``fault`` to the next ``times`` requests that match ``match``, after letting ``skip`` pass.

        ``match``: ``"any"``, ``"upload"`` (any upload request), ``"multipart"``, ``"initiate"``,
        ``"chunk"``, ``"final"`` (the request that creates the object), ``"metadata"``,
        ``"download"``, or a function of a :class:`Request`.
        """
        if not (isinstance(fault, int) or fault in _FAULTS):
            raise ValueError(f"unknown fault {fault!r}")
        if fault == "delay" and seconds <= 0:
            raise ValueError("a delay needs seconds > 0")
        with self._lock:
            self._rules.append(_Rule(fault, match, times, skip, seconds))

    def clear(self) -> None:
        """Forget the scripted faults and what was seen."""
        with self._lock:
            self._rules.clear()
            self.seen.clear()

    def requests(self, match: Matcher = "any") -> list[Seen]:
        """The requests seen so far that match: the names :meth:`inject` takes, or a function of a :class:`Seen`."""
        with self._lock:
            seen = list(self.seen)
        if match == "any":
            return seen
        if match == "upload":
            return [s for s in seen if s.target.startswith("/upload/")]
        if match == "final":
            return [s for s in seen if s.final]
        if callable(match):
            return [s for s in seen if match(s)]
        return [s for s in seen if s.kind == match]

    def count(self, match: Matcher = "any") -> int:
        return len(self.requests(match))

    @property
    def faults(self) -> list[Seen]:
        """The requests a fault was applied to, in order."""
        return [s for s in self.requests() if s.fault is not None]

    @property
    def pending(self) -> int:
        """Scripted faults not applied yet."""
        with self._lock:
            return sum(r.times - r.applied for r in self._rules)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below; close() alone does not
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ serving

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with self._lock:
            self._open.add(client)
        try:
            self._one_request(client)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(client)
            with contextlib.suppress(OSError):
                client.close()

    def _pick(self, request: Request) -> _Rule | None:
        with self._lock:
            return next((rule for rule in self._rules if rule.take(request)), None)

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _one_request(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        head = _read_head(reader)
        if head is None:
            return
        method, target, headers, raw_head = head
        length = int(headers.get("content-length", "0") or 0)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            _answer(client, 501, "the test proxy needs Content-Length")
            return
        probe = Request(method, target, headers, b"")
        rule = self._pick(probe)
        fault = rule.fault if rule else None
        seen = Seen(method, target, probe.kind, fault, final=probe.finishes_upload)
        if fault == "reset_mid_body":
            seen.body_bytes = len(reader.read(length // 2)) if length else 0
            self._record(seen)
            _reset(client)
            return
        body = reader.read(length) if length else b""
        seen.body_bytes = len(body)
        request = Request(method, target, headers, body)
        self._record(seen)
        if fault in ("drop", "reset"):
            if fault == "reset":
                _reset(client)
            return
        if isinstance(fault, int):
            seen.status = fault
            _answer(client, fault, f"injected {fault}")
            return
        if fault == "delay" and self._stop.wait(rule.seconds):
            return
        with self._commit_lock:
            refused = self._precondition_refuses(request)
            if refused:
                status, response = 412, _error_response(412, refused)
            else:
                status, response = self._forward(raw_head, headers, body)
                if request.kind == "initiate" and status == 200:
                    self._remember_session(request, response)
                elif request.kind == "chunk" and status == 308:
                    response = self._fix_status_answer(request, response)
        if fault == "lose_response":
            return  # the server did it; the client never hears
        seen.status = status
        client.sendall(response)

    def _forward(self, raw_head: bytes, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        lines = raw_head.split(b"\r\n")
        kept = [line for line in lines[1:] if line and not line.lower().startswith((b"connection:", b"keep-alive:"))]
        request = b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""]) + body
        with socket.create_connection(self._upstream, timeout=30) as upstream:
            upstream.sendall(request)
            chunks = []
            while data := upstream.recv(1 << 16):
                chunks.append(data)
        response = b"".join(chunks)
        status = int(response.split(b" ", 2)[1])
        # Tell the client the connection ends here (the emulator may speak HTTP/1.0 without Content-Length).
        head, sep, rest = response.partition(b"\r\n\r\n")
        head_lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return status, b"\r\n".join([*head_lines, b"Connection: close"]) + sep + rest

    # ------------------------------------------------------------ preconditions

    def _precondition_refuses(self, request: Request) -> str | None:
        """Why Cloud Storage would answer 412 (None: it would not)."""
        if not self.enforce_preconditions or not request.is_upload:
            return None
        query = request.query
        expected = query.get("ifGenerationMatch")
        if expected is None or request.kind not in ("initiate", "multipart", "chunk"):
            return None
        if request.kind == "chunk" and not request.finishes_upload:
            return None
        bucket = request.path.split("/b/", 1)[1].split("/", 1)[0]
        name = query.get("name") or self._object_name(request)
        if name is None:
            return None
        current = self._generation(bucket, name)
        if int(expected) != current:
            return f"At least one of the pre-conditions you specified did not hold (ifGenerationMatch={expected})."
        return None

    def _object_name(self, request: Request) -> str | None:
        if request.kind == "chunk":
            return self._sessions.get(request.query["upload_id"])
        if request.kind == "initiate":
            return json.loads(request.body or b"{}").get("name")
        return _multipart_name(request)

    def _remember_session(self, request: Request, response: bytes) -> None:
        head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
        location = re.search(r"(?im)^location:\s*(\S+)", head)
        name = self._object_name(request)
        if location and name:
            upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(location.group(1)).query)["upload_id"][-1]
            self._sessions[upload_id] = name

    def _fix_status_answer(self, request: Request, response: bytes) -> bytes:
        """Drop the emulator's ``Range: bytes=0-0`` when it holds nothing (Cloud Storage sends no Range then)."""
        head, sep, rest = response.partition(b"\r\n\r\n")
        kept = re.search(rb"(?im)^range:\s*bytes=0-(\d+)\s*$", head)
        upload_id = request.query["upload_id"]
        if request.body:  # a chunk: remember how much the server acknowledged
            self._kept[upload_id] = int(kept.group(1)) + 1 if kept else 0
        elif kept and kept.group(1) == b"0" and not self._kept.get(upload_id):
            head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"range:"))
        return head + sep + rest

    def _generation(self, bucket: str, name: str) -> int:
        path = f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
        status, response = self._forward(f"GET {path} HTTP/1.1\r\nHost: {self.host[7:]}\r\n".encode(), {}, b"")
        if status == 404:
            return 0
        return int(json.loads(response.partition(b"\r\n\r\n")[2])["generation"])


def _multipart_name(request: Request) -> str | None:
    """The object name in a multipart upload's metadata part."""
    match = re.search(rb"\r\n\r\n(\{.*?\})\r\n--", request.body, re.S)
    if not match:
        return None
    return json.loads(match.group(1)).get("name")


def _read_head(reader) -> tuple[str, str, dict[str, str], bytes] | None:
    lines = []
    while True:
        line = reader.readline(65537)
        if not line:
            return None
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line.rstrip(b"\r\n"))
    if not lines:
        return None
    method, target, _version = lines[0].decode("latin-1").split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers, b"\r\n".join(lines) + b"\r\n"


def _error_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    reason = {412: "Precondition Failed", 429: "Too Many Requests", 500: "Internal Server Error",
              501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Error")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _answer(client: socket.socket, status: int, message: str) -> None:
    client.sendall(_error_response(status, message))


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST) rather than an orderly close."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
