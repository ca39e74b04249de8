"""What a chat request may hold: the one set of rules for ``job.chat()`` and ``endpoint.chat()`` on every
backend, ``LocalChatModel.reply()`` and the local server.

A mistake raises :class:`BadRequest`, a one-line :class:`~tuning_magics.errors.UserError`
that names the message or option at fault; the server answers it with its
``status`` and the same text. An option is used or refused, never ignored.
Stop sequences end a reply before the first of them (:func:`cut_at_stop`,
:func:`until_stop` for a reply that arrives in pieces). Standard library only.
"""

from __future__ import annotations

import json
import math
import re
from typing import Iterable, Iterator

from .errors import UserError

#: Upper bound of ``max_tokens`` / ``max_new_tokens`` a request may ask for.
MAX_TOKENS_LIMIT = 8192
#: Tokens generated when the request does not say (fewer when the model's context has less room).
DEFAULT_MAX_TOKENS = 256
#: Accepted roles and what the chat template sees (Gemini says "model", OpenAI's newer API "developer").
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "model": "assistant", "developer": "system"}
#: Generation options: (lowest, highest, whole number).
RANGES = {
    "max_new_tokens": (1, MAX_TOKENS_LIMIT, True),
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, 1_000_000, True),
    "seed": (-(2**63), 2**63 - 1, True),
}
#: Most stop sequences a request may give (OpenAI's limit).
MAX_STOPS = 4
#: The fields of an OpenAI chat-completions body that the server reads.
BODY_FIELDS = ("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
               "n", "stop", "stream", "stream_options")
#: Fields that only label a request for the caller's own records: accepted, they change no reply.
LABELS = ("user", "metadata", "safety_identifier", "prompt_cache_key")
#: OpenAI options the server does not have, each with the values that change nothing, the only ones accepted.
UNSUPPORTED = {
    "response_format": [{"type": "text"}], "tools": [[]], "tool_choice": ["none"], "functions": [[]],
    "function_call": ["none"], "parallel_tool_calls": [True, False], "logprobs": [False], "top_logprobs": [0],
    "presence_penalty": [0], "frequency_penalty": [0], "logit_bias": [{}], "store": [False],
    "modalities": [["text"]],
}
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadRequest(UserError):
    """A request that breaks a rule: ``field`` names the option or message, ``status`` is the HTTP answer."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400):
        super().__init__(message, field=field)
        self.status = status


def _text(content, where: str) -> str:
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise BadRequest(f"{where}.content[{i}] must be an object with a type", field=f"{where}.content")
            if part["type"] in ("image_url", "input_image"):
                raise BadRequest("this model reads text only; remove the image parts", field=f"{where}.content")
            if part["type"] != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}.content[{i}] must be {{\"type\": \"text\", \"text\": \"...\"}}, "
                                 f"not type {str(part['type'])[:40]!r}", field=f"{where}.content")
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise BadRequest(f"{where}.content must be a string or a list of text parts, not {type(content).__name__}",
                         field=f"{where}.content")
    bad = _SURROGATE.search(text)
    if bad:
        # A lone surrogate is not Unicode text: a str decoded with errors="surrogateescape", or a
        # JSON "\ud800" escape. Tokenizers cannot encode it.
        raise BadRequest(f"{where}.content holds a lone surrogate {bad.group()!r} at character {bad.start()}, which "
                         "is not valid Unicode; fix the text's encoding", field=f"{where}.content")
    return text


def check_messages(messages) -> list[dict]:
    """``[{"role", "content"}]`` with roles mapped for the chat template, from a string or a message list."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        got = "an empty list" if isinstance(messages, (list, tuple)) else \
            "None" if messages is None else f"a {type(messages).__name__}"
        raise BadRequest(f"'messages' is required: a string or a non-empty list of {{role, content}} messages, "
                         f"not {got}", field="messages")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object with role and content, not {type(m).__name__}", field=where)
        role = m.get("role")
        if role is None:
            raise BadRequest(f"{where}.role is required: system, user or assistant", field=f"{where}.role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"{where}.role {str(role)[:40]!r} is not supported; use system, user or assistant",
                             field=f"{where}.role")
        if m.get("content") is None:
            raise BadRequest(f"{where}.content is required: a string or a list of text parts", field=f"{where}.content")
        # A field of OpenAI's messages this engine has no use for (name, tool_calls, tool_call_id...) is refused,
        # not dropped; a null or empty one says nothing, as in a reply's message echoed back.
        extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v not in (None, [], {}, ""))
        if extra:
            raise BadRequest(f"{where}.{str(extra[0])[:40]} is not supported; send role and content only",
                             field=f"{where}.{str(extra[0])[:40]}")
        clean.append({"role": ROLES[role], "content": _text(m["content"], where)})
    return clean


def check_option(name: str, value, *, shown: str | None = None):
    """``value`` of option ``name`` (a key of RANGES) after its range check; ``shown`` is the caller's name for it."""
    shown = shown or name
    lo, hi, whole = RANGES[name]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) or (whole and int(value) != value):
        raise BadRequest(f"'{shown}' must be a {'whole ' if whole else ''}number, not {value!r}"[:200], field=shown)
    if not lo <= value <= hi:
        raise BadRequest(f"'{shown}' must be between {lo} and {hi}, not {value}", field=shown)
    return int(value) if whole else float(value)


def check_stop(stop) -> list[str]:
    """The stop sequences of a request: from a string or a list of up to MAX_STOPS non-empty strings (None: none)."""
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS \
            or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them, "
                         f"not {stop!r}"[:200], field="stop")
    return list(dict.fromkeys(stops))


def chat_request(messages, *, max_new_tokens=None, temperature=None, top_p=None, top_k=None, seed=None, stop=None,
                 stream=False, **unknown) -> dict:
    """The checked request of a Python call (``job.chat``, ``LocalChatModel.reply``); raises BadRequest.

    Returns ``messages``, ``max_new_tokens`` (None: as many as fit, at most
    DEFAULT_MAX_TOKENS), ``temperature``, ``top_p``, ``top_k``, ``seed``,
    ``stop`` (a list, maybe empty), ``stream`` and ``max_name`` (how the caller spelt max_new_tokens).
    """
    if unknown:
        name = sorted(unknown)[0]
        raise BadRequest(f"chat() has no option {name!r}; the options are max_new_tokens, temperature, top_p, "
                         "top_k, seed, stop and stream", field=name)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be True or False, not {stream!r}"[:200], field="stream")
    return _request(check_messages(messages), {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                               "top_p": top_p, "top_k": top_k, "seed": seed}, stop, stream, {})


def _same(value, neutral) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return isinstance(value, bool) and isinstance(neutral, bool) and value == neutral
    return value == neutral


def check_body_fields(body: dict) -> None:
    """BadRequest for the first field of ``body`` that the server would otherwise ignore: an option it does not
    have at a value that changes the reply, or a field it does not know (OpenAI refuses those too)."""
    for name in sorted(body, key=str):
        value = body[name]
        if name in BODY_FIELDS or name in LABELS or value is None:
            continue
        shown = str(name)[:60]
        if name not in UNSUPPORTED:
            raise BadRequest(f"unknown option {shown!r}; this endpoint takes {', '.join(BODY_FIELDS)} "
                             f"(and {', '.join(LABELS)} as labels)", field=shown)
        if not any(_same(value, neutral) for neutral in UNSUPPORTED[name]):
            neutral = " or ".join(json.dumps(v) for v in UNSUPPORTED[name])
            raise BadRequest(f"'{name}' is not supported by this endpoint; remove it (or send {neutral}, "
                             "which changes nothing)", field=name)


def parse_chat_request(body) -> dict:
    """The checked request of an OpenAI chat-completions body (the server); raises BadRequest.

    The result is :func:`chat_request`'s, plus ``include_usage``.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if "messages" not in body:
        raise BadRequest("'messages' is required: a non-empty list of {role, content} objects", field="messages")
    check_body_fields(body)
    if isinstance(body["messages"], str):  # job.chat()'s shorthand, not OpenAI's
        raise BadRequest("'messages' must be a list of {role, content} objects, not a string", field="messages")
    messages = check_messages(body["messages"])
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    values = {"max_new_tokens": body.get(max_name)}
    values.update({k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed")})
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadRequest(f"'n' must be 1 (one choice per request), not {n!r}"[:200], field="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", field="stream")
    req = _request(messages, values, body.get("stop"), stream, {"max_new_tokens": max_name})
    options = body.get("stream_options") or {}
    req["include_usage"] = bool(isinstance(options, dict) and options.get("include_usage"))
    return req


def _request(messages: list[dict], values: dict, stop, stream: bool, names: dict) -> dict:
    req = {name: check_option(name, value, shown=names.get(name)) for name, value in values.items()}
    req["stop"] = check_stop(stop)
    req["temperature"] = req["temperature"] or 0.0
    req["top_p"] = req["top_p"] or 1.0  # top_p 0 keeps nothing; treated as "off", as OpenAI does
    req["top_k"] = req["top_k"] or 0
    return {"messages": messages, **req, "stream": stream, "max_name": names.get("max_new_tokens", "max_new_tokens")}


def check_context(prompt_tokens: int, max_new_tokens: int | None, context: int | None, *,
                  max_name: str = "max_new_tokens", at_least: bool = False) -> int:
    """How many tokens to generate, when the prompt and the reply fit the model's context; else BadRequest.

    ``at_least``: ``prompt_tokens`` is a lower bound (only part of the prompt was counted).
    """
    size = f"the prompt is {'at least ' if at_least else ''}{prompt_tokens} tokens"
    if max_new_tokens is None:
        room = DEFAULT_MAX_TOKENS if context is None else min(DEFAULT_MAX_TOKENS, context - prompt_tokens)
        if room < 1:
            raise BadRequest(f"{size}; this model takes at most {context}, including the reply: shorten the messages",
                             field="messages")
        return room
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise BadRequest(f"{size}; this model takes at most {context}, including {max_name}={max_new_tokens}: "
                         f"shorten the messages or lower {max_name}", field="messages")
    return max_new_tokens


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """``text`` up to the first of the stop sequences ``stops``, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def _held(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that is the start of ``stop`` (but not all of it)."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def until_stop(pieces: Iterable[str], stops) -> Iterator[str]:
    """The text of ``pieces`` up to the first stop sequence, as it arrives.

    Text that may be the start of a stop sequence is held back until the next
    pieces tell; the source is closed once a stop sequence is found (so its
    generation ends) or when this iterator is closed.
    """
    pending = ""
    try:
        for piece in pieces:
            # Nothing sent can be part of a stop sequence, so one found starts in what is pending.
            pending += piece
            text, found = cut_at_stop(pending, stops)
            if found:
                if text:
                    yield text
                return
            keep = len(pending) - max((_held(pending, s) for s in stops), default=0)
            if keep:
                yield pending[:keep]
                pending = pending[keep:]
        if pending:
            yield pending
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


def apply_stop(reply, stops):
    """``reply`` (a string, or an iterator of text pieces) cut before its first stop sequence."""
    if not stops:
        return reply
    return cut_at_stop(reply, stops)[0] if isinstance(reply, str) else until_stop(reply, stops)
