"""A small client for OpenAI-compatible chat-completions endpoints (ours, vLLM, llama.cpp, OpenAI...).

``chat_completion(url, messages)`` returns the response JSON,
``stream_chat_completion`` yields the reply's text pieces as the server sends
them, ``list_models`` reads ``GET /models``. Every failure, HTTP or network, is
an :class:`EndpointError` with the status (``None`` when nothing answered).
Standard library only, so it costs nothing to import.
"""

from __future__ import annotations

import json
from typing import Iterator


class EndpointError(Exception):
    """An endpoint answered with an error or not at all; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def chat_url(base_url: str) -> str:
    """The chat-completions URL for a base URL (``http://h:p/v1``) or a full ``.../chat/completions`` URL."""
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _open(url: str, payload: dict | None, *, api_key: str | None, timeout: float, accept: str):
    """Open one request; HTTP and connection failures become EndpointError."""
    import urllib.error
    import urllib.request

    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Accept": accept}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise EndpointError(f"HTTP {exc.code} from {url}: {detail}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EndpointError(f"no answer from {url} ({reason})") from None


def _request(url: str, payload: dict | None, *, api_key: str | None, timeout: float) -> dict:
    with _open(url, payload, api_key=api_key, timeout=timeout, accept="application/json") as resp:
        try:
            return json.loads(resp.read() or b"{}")
        except ValueError as exc:
            raise EndpointError(f"{url} did not answer with JSON ({exc})") from None


def list_models(base_url: str, *, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """The model ids an OpenAI-compatible endpoint serves (``GET <base>/models``)."""
    base = base_url.rstrip("/")
    base = base.removesuffix("/chat/completions")
    data = _request(base + "/models", None, api_key=api_key, timeout=timeout)
    return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]


def stream_chat_completion(base_url: str, messages: list[dict], *, model: str | None = None,
                           api_key: str | None = None, timeout: float = 600.0, **params) -> Iterator[str]:
    """POST one streaming chat completion and yield the reply's text pieces as they arrive (SSE)."""
    payload = {"messages": messages, "stream": True, **{k: v for k, v in params.items() if v is not None}}
    if model:
        payload["model"] = model
    url = chat_url(base_url)
    with _open(url, payload, api_key=api_key, timeout=timeout, accept="text/event-stream") as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                choices = json.loads(data).get("choices") or []
            except ValueError:
                raise EndpointError(f"{url} sent a malformed stream event: {data[:80]}") from None
            piece = choices[0].get("delta", {}).get("content") if choices else None
            if piece:
                yield piece


def chat_completion(base_url: str, messages: list[dict], *, model: str | None = None, api_key: str | None = None,
                    timeout: float = 600.0, **params) -> dict:
    """POST one non-streaming chat completion and return the response JSON; raises EndpointError."""
    payload = {"messages": messages, "stream": False, **{k: v for k, v in params.items() if v is not None}}
    if model:
        payload["model"] = model
    return _request(chat_url(base_url), payload, api_key=api_key, timeout=timeout)
