"""A small client for OpenAI-compatible chat-completions endpoints (ours, vLLM, llama.cpp, OpenAI...).

``chat_completion(url, messages)`` returns the response JSON,
``stream_chat_completion`` yields the reply's text pieces as the server sends
them, ``list_models`` reads ``GET /models``. Every failure, HTTP or network, is
an :class:`EndpointError` with the status (``None`` when nothing answered, or
the answer was cut or stalled) and a one-line message; a 4xx is an
:class:`EndpointRefused`, also a :class:`~tuning_magics.errors.UserError`
(the request is what to fix). A stream that reports an error, or ends without
``data: [DONE]``, raises instead of passing for a finished reply.
Standard library only, so it costs nothing to import.
"""

from __future__ import annotations

import json
from typing import Iterator

from ...errors import UserError


class EndpointError(Exception):
    """An endpoint answered with an error or not at all; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None):
        super().__init__(message)
        self.status = status
        #: The endpoint's own words, when it gave any.
        self.detail = detail or message


class EndpointRefused(UserError, EndpointError):
    """The endpoint refused the request (HTTP 4xx): ``detail`` is its sentence."""

    def __init__(self, message: str, status: int, detail: str | None = None):
        UserError.__init__(self, message)
        self.status, self.detail = status, detail or message


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def chat_url(base_url: str) -> str:
    """The chat-completions URL for a base URL (``http://h:p/v1``) or a full ``.../chat/completions`` URL.

    A query (``?api_key=...``) stays at the end, where it belongs.
    """
    return _at(base_url, "/chat/completions")


def _at(base_url: str, suffix: str) -> str:
    """``base_url`` with its path ending in ``suffix`` (``/chat/completions`` or ``/models``), its query kept."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base_url)
    path = parts.path.rstrip("/").removesuffix("/chat/completions")
    return urlunsplit((parts.scheme, parts.netloc, path + suffix, parts.query, ""))


def _open(url: str, payload: dict | None, *, api_key: str | None, timeout: float, accept: str):
    """Open one request; HTTP and connection failures become EndpointError."""
    import http.client
    import urllib.error
    import urllib.request

    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Accept": accept}
    url, basic = _without_userinfo(url)
    if basic:
        headers["Authorization"] = f"Basic {basic}"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    url = redact_url(url)  # what errors may say: never a key the URL carries
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            detail = exc.read()[:2000].decode(errors="replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        detail = _one_line(detail or exc.reason or "")
        kind = EndpointRefused if 400 <= exc.code < 500 else EndpointError
        raise kind(f"HTTP {exc.code} from {url}: {detail}", exc.code, detail) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise EndpointError(f"no answer from {url} ({_one_line(getattr(exc, 'reason', exc))})") from None


#: Query parameters that carry a credential (``?api_key=...``): never shown, never stored in a job's config.
_SECRET_PARAMS = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token", "auth", "sig",
                            "signature", "password", "secret", "code"})


def redact_url(url: str) -> str:
    """``url`` with any password (``user:pw@``) and credential query values (``?api_key=``) replaced by ``***``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(str(url))
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _without_userinfo(url: str) -> tuple[str, str | None]:
    """``url`` without ``user:password@``, and those as the value of a Basic Authorization header (or None)."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), token


def _cut(url: str, exc: BaseException) -> EndpointError:
    """A body that stalled past the timeout or was cut short."""
    return EndpointError(f"the answer from {redact_url(url)} stopped before its end ({_one_line(exc) or type(exc).__name__})")


def _request(url: str, payload: dict | None, *, api_key: str | None, timeout: float) -> dict:
    import http.client

    with _open(url, payload, api_key=api_key, timeout=timeout, accept="application/json") as resp:
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _cut(url, exc) from None
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise EndpointError(f"{redact_url(url)} did not answer with JSON ({exc})") from None


def list_models(base_url: str, *, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """The model ids an OpenAI-compatible endpoint serves (``GET <base>/models``)."""
    data = _request(_at(base_url, "/models"), None, api_key=api_key, timeout=timeout)
    return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]


def stream_chat_completion(base_url: str, messages: list[dict], *, model: str | None = None,
                           api_key: str | None = None, timeout: float = 600.0, **params) -> Iterator[str]:
    """POST one streaming chat completion and yield the reply's text pieces as they arrive (SSE).

    ``timeout`` bounds each wait for the next bytes. Raises EndpointError when the
    stream carries an error event or ends without ``[DONE]``.
    """
    import http.client

    payload = {"messages": messages, "stream": True, **{k: v for k, v in params.items() if v is not None}}
    if model:
        payload["model"] = model
    url = chat_url(base_url)
    with _open(url, payload, api_key=api_key, timeout=timeout, accept="text/event-stream") as resp:
        while True:
            try:
                raw = resp.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise _cut(url, exc) from None
            if not raw:
                raise EndpointError(f"the stream from {redact_url(url)} ended before data: [DONE]; the reply is incomplete")
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError
            except ValueError:
                raise EndpointError(f"{redact_url(url)} sent a malformed stream event: {data[:80]}") from None
            if event.get("error") is not None:
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                code = error.get("code") if isinstance(error, dict) else None
                raise EndpointError(f"{redact_url(url)} ended the stream with an error: {_one_line(message)}",
                                    code if isinstance(code, int) else None, _one_line(message))
            choices = event.get("choices") or []
            piece = choices[0].get("delta", {}).get("content") if choices and isinstance(choices[0], dict) else None
            if piece:
                yield piece


def chat_completion(base_url: str, messages: list[dict], *, model: str | None = None, api_key: str | None = None,
                    timeout: float = 600.0, **params) -> dict:
    """POST one non-streaming chat completion and return the response JSON; raises EndpointError."""
    payload = {"messages": messages, "stream": False, **{k: v for k, v in params.items() if v is not None}}
    if model:
        payload["model"] = model
    return _request(chat_url(base_url), payload, api_key=api_key, timeout=timeout)
