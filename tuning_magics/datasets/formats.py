"""The five JSONL example formats, and lossless conversion between them.

Formats (one JSON object per line):

``prompt_completion``
    ``{"prompt": "...", "completion": "..."}``
``chat``
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}``;
    ``content`` may also be a list of ``{"type": "text", "text": ...}`` and
    ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` parts
    (multimodal chat).
``generate_content``
    ``{"systemInstruction": {"parts": [...]}, "contents": [{"role": "user"|"model", "parts": [...]}]}``
    with ``text``, ``fileData``/``file_data`` and ``inlineData``/``inline_data``
    parts (multimodal GenerateContent). camelCase and snake_case keys and both
    ``model`` and ``assistant`` roles are accepted.

The neutral form every format converts through is the chat form: a list of
``{"role", "content"}`` messages whose content is a string (one text part) or
a list of parts. Conversion keeps every text part, its order and turn
boundaries, so chat -> generate_content -> chat gives back the same record.
"""

from __future__ import annotations

import mimetypes

PROMPT_COMPLETION = "prompt_completion"
CHAT = "chat"
GENERATE_CONTENT = "generate_content"
FORMATS = (PROMPT_COMPLETION, CHAT, GENERATE_CONTENT)

_FORMAT_ALIASES = {
    "prompt_completion": PROMPT_COMPLETION,
    "prompt-completion": PROMPT_COMPLETION,
    "completion": PROMPT_COMPLETION,
    "chat": CHAT,
    "messages": CHAT,
    "openai": CHAT,
    "generate_content": GENERATE_CONTENT,
    "generatecontent": GENERATE_CONTENT,
    "generate-content": GENERATE_CONTENT,
    "gemini": GENERATE_CONTENT,
    "contents": GENERATE_CONTENT,
}

#: Keys each format allows at the top level of a record.
TOP_KEYS = {
    PROMPT_COMPLETION: {"prompt", "completion"},
    CHAT: {"messages"},
    GENERATE_CONTENT: {"contents", "systemInstruction", "system_instruction"},
}

IMAGE_MIME_TYPES = ("image/jpeg", "image/png", "image/webp")


def normalise_format(name: str) -> str:
    """The canonical format name for a user's spelling; raises UserError for unknown names."""
    from ..errors import UserError

    found = _FORMAT_ALIASES.get(str(name).lower().replace(" ", "_"))
    if found is None:
        raise UserError(
            f"format must be one of {', '.join(FORMATS)}, not {name!r}", field="format"
        )
    return found


def detect(record) -> str | None:
    """The format of one record, judged by its keys; None when no format fits. Preference pairs (see
    :mod:`.preference`) are told apart first: they share keys with the other formats."""
    if not isinstance(record, dict):
        return None
    from . import preference

    pair = preference.detect(record)
    if pair is not None:
        return pair
    if "messages" in record:
        return CHAT
    if "contents" in record or "systemInstruction" in record or "system_instruction" in record:
        return GENERATE_CONTENT
    if "prompt" in record or "completion" in record:
        return PROMPT_COMPLETION
    return None


def get(d: dict, snake: str, camel: str, default=None):
    """A key in either spelling: ``get(part, "file_data", "fileData")``."""
    if snake in d:
        return d[snake]
    return d.get(camel, default)


def guess_image_mime(url: str) -> str:
    """The MIME type of an image from a ``data:`` URI or a path's extension (JPEG when unknown)."""
    if url.startswith("data:"):
        return url[5:].split(";", 1)[0].split(",", 1)[0] or "image/jpeg"
    guessed, _ = mimetypes.guess_type(url.split("?", 1)[0])
    return guessed or "image/jpeg"


# -- GenerateContent <-> chat -------------------------------------------------


def _gc_part_to_chat(part: dict):
    if "text" in part:
        return {"type": "text", "text": part["text"]}
    file_data = get(part, "file_data", "fileData")
    if file_data is not None:
        return {"type": "image_url", "image_url": {"url": get(file_data, "file_uri", "fileUri")}}
    inline = get(part, "inline_data", "inlineData")
    if inline is not None:
        mime = get(inline, "mime_type", "mimeType") or "image/jpeg"
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{inline.get('data', '')}"}}
    raise ValueError(f"unknown part keys {sorted(part)}")


def _parts_to_content(parts: list):
    converted = [_gc_part_to_chat(p) for p in parts]
    if len(converted) == 1 and converted[0]["type"] == "text":
        return converted[0]["text"]
    return converted


def _content_to_parts(content) -> list[dict]:
    if isinstance(content, str):
        return [{"text": content}]
    parts = []
    for item in content:
        if item.get("type") == "text":
            parts.append({"text": item["text"]})
        else:
            url = item["image_url"]["url"] if isinstance(item.get("image_url"), dict) else item.get("image_url")
            mime = guess_image_mime(url)
            if url.startswith("data:"):
                parts.append({"inlineData": {"mimeType": mime, "data": url.split(",", 1)[1]}})
            else:
                parts.append({"fileData": {"mimeType": mime, "fileUri": url}})
    return parts


def to_messages(record: dict, fmt: str | None = None) -> list[dict]:
    """The record as a list of chat messages (roles ``system``, ``user``, ``assistant``).

    The record is assumed valid (see :mod:`tuning_magics.datasets.validate`).
    """
    fmt = fmt or detect(record)
    from . import preference

    if fmt in preference.FORMATS:  # the prompt and the preferred answer: what the pair asks to learn
        prompt, chosen, _rejected = preference.pair_of(record, fmt)
        return prompt + [{"role": "assistant", "content": chosen}]
    if fmt == CHAT:  # an assistant turn's "weight" (0: not learned) goes along
        return [
            {"role": "assistant" if m["role"] == "model" else m["role"], "content": m["content"],
             **({"weight": m["weight"]} if "weight" in m else {})}
            for m in record["messages"]
        ]
    if fmt == PROMPT_COMPLETION:
        out = [{"role": "user", "content": record["prompt"]}]
        if record.get("completion") is not None:
            out.append({"role": "assistant", "content": record["completion"]})
        return out
    if fmt == GENERATE_CONTENT:
        out = []
        system = get(record, "system_instruction", "systemInstruction")
        if system:
            out.append({"role": "system", "content": _parts_to_content(system.get("parts", []))})
        for turn in record.get("contents", []):
            role = "assistant" if turn.get("role") in ("model", "assistant") else "user"
            out.append({"role": role, "content": _parts_to_content(turn.get("parts", []))})
        return out
    raise ValueError(f"unknown format {fmt!r}")


def from_messages(messages: list[dict], fmt: str) -> dict:
    """Build a record of format ``fmt`` from chat messages."""
    if fmt == CHAT:
        return {"messages": [{"role": m["role"], "content": m["content"],
                              **({"weight": m["weight"]} if "weight" in m else {})} for m in messages]}
    if fmt == GENERATE_CONTENT:
        record: dict = {}
        contents = []
        for m in messages:
            if m["role"] == "system":
                record["systemInstruction"] = {"parts": _content_to_parts(m["content"])}
            else:
                contents.append({"role": "model" if m["role"] == "assistant" else "user",
                                 "parts": _content_to_parts(m["content"])})
        record["contents"] = contents
        return record
    if fmt == PROMPT_COMPLETION:
        roles = [m["role"] for m in messages]
        if roles not in (["user", "assistant"], ["user"]) or any(
            not isinstance(m["content"], str) for m in messages
        ):
            raise ValueError("only a single text user turn with at most one assistant reply fits prompt/completion")
        out = {"prompt": messages[0]["content"]}
        if len(messages) == 2:
            out["completion"] = messages[1]["content"]
        return out
    raise ValueError(f"unknown format {fmt!r}")


def convert(record: dict, fmt: str) -> dict:
    """Convert one valid record to format ``fmt`` (any accepted spelling)."""
    fmt = normalise_format(fmt)
    source = detect(record)
    if source == fmt == PROMPT_COMPLETION:
        return record
    return from_messages(to_messages(record, source), fmt)


def text_of(content) -> str:
    """All text of a message content, parts joined with newlines (images left out)."""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def images_of(content) -> list[str]:
    """The image URLs of a message content."""
    if isinstance(content, str):
        return []
    return [
        p["image_url"]["url"] if isinstance(p.get("image_url"), dict) else p.get("image_url")
        for p in content
        if p.get("type") == "image_url"
    ]


def read_conversations(path) -> list[list[dict]]:
    """Every example of a local JSONL file (any format) as chat messages with text content.

    This is what the local engine trains on; it assumes the file was validated.
    """
    import orjson

    out = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh):
            raw = raw.strip()
            if number == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark
            if not raw:
                continue
            record = orjson.loads(raw)
            out.append([
                {"role": m["role"], "content": text_of(m["content"]), **({"weight": m["weight"]} if "weight" in m
                                                                        else {})}
                for m in to_messages(record)
            ])
    return out
