"""What a chat request may hold: the one set of rules for ``job.chat()`` and ``endpoint.chat()`` on every
backend, ``LocalChatModel.reply()`` and the local server.

A mistake raises :class:`BadRequest`, a one-line :class:`~tuning_magics.errors.UserError`
that names the message or option at fault; the server answers it with its
``status`` and the same text. Standard library only.
"""

from __future__ import annotations

import math
import re

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
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadRequest(UserError):
    """A request that breaks a rule: ``field`` names the option or message, ``status`` is the HTTP answer."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400):
        super().__init__(message, field=field)
        self.status = status


def _text(content, where: str) -> str:
    if content is None:
        return ""
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
        if not isinstance(m, dict) or "role" not in m:
            raise BadRequest(f"{where} must be an object with role and content, not {type(m).__name__}",
                             field="messages")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"{where}.role {str(role)[:40]!r} is not supported; use system, user or assistant",
                             field=f"{where}.role")
        clean.append({"role": ROLES[role], "content": _text(m.get("content"), where)})
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


def chat_request(messages, *, max_new_tokens=None, temperature=None, top_p=None, top_k=None, seed=None,
                 stream=False, **unknown) -> dict:
    """The checked request of a Python call (``job.chat``, ``LocalChatModel.reply``); raises BadRequest.

    Returns ``messages``, ``max_new_tokens`` (None: as many as fit, at most
    DEFAULT_MAX_TOKENS), ``temperature``, ``top_p``, ``top_k``, ``seed``,
    ``stream`` and ``max_name`` (how the caller spelt max_new_tokens).
    """
    if unknown:
        name = sorted(unknown)[0]
        raise BadRequest(f"chat() has no option {name!r}; the options are max_new_tokens, temperature, top_p, "
                         "top_k, seed and stream", field=name)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be True or False, not {stream!r}"[:200], field="stream")
    return _request(check_messages(messages), {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                               "top_p": top_p, "top_k": top_k, "seed": seed}, stream, {})


def parse_chat_request(body) -> dict:
    """The checked request of an OpenAI chat-completions body (the server); raises BadRequest.

    The result is :func:`chat_request`'s, plus ``include_usage``.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if "messages" not in body:
        raise BadRequest("'messages' is required: a non-empty list of {role, content} objects", field="messages")
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
    req = _request(messages, values, stream, {"max_new_tokens": max_name})
    options = body.get("stream_options") or {}
    req["include_usage"] = bool(isinstance(options, dict) and options.get("include_usage"))
    return req


def _request(messages: list[dict], values: dict, stream: bool, names: dict) -> dict:
    req = {name: check_option(name, value, shown=names.get(name)) for name, value in values.items()}
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
