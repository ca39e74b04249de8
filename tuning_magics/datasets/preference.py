"""Preference data: a prompt, the answer preferred and the one rejected, in either format people bring.

``preference``
    ``{"prompt": ..., "chosen": ..., "rejected": ...}``, TRL's format: the prompt is
    a text or chat messages (ending with a user turn), each answer a text or a list
    holding one assistant message.
``gemini_preference``
    Vertex AI's format for Gemini preference tuning:
    ``{"system_instruction"?: {"parts": [...]}, "contents": [... ending with a user turn],
    "completions": [{"score": 1, "completion": {"role": "model", "parts": [...]}},
    {"score": 0, "completion": {...}}]}``: exactly two completions, the preferred
    one scored 1 and the other 0; text only. camelCase keys are read too.

Both convert to the neutral pair ``(prompt messages, chosen text, rejected text)``
(:func:`pair_of`) and back (:func:`from_pair`), keeping every turn of the prompt.
"""

from __future__ import annotations

PREFERENCE = "preference"
GEMINI_PREFERENCE = "gemini_preference"
FORMATS = (PREFERENCE, GEMINI_PREFERENCE)
#: Keys each format allows at the top level of a record.
TOP_KEYS = {
    PREFERENCE: {"prompt", "chosen", "rejected"},
    GEMINI_PREFERENCE: {"contents", "completions", "system_instruction", "systemInstruction"},
}


def detect(record: dict) -> str | None:
    """The preference format of a record, by its keys; None for anything else."""
    if "completions" in record:
        return GEMINI_PREFERENCE
    if "chosen" in record or "rejected" in record:
        return PREFERENCE
    return None


def answer_text(value) -> str | None:
    """The text of an answer given as a string, one assistant message, or a list holding one; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role") in ("assistant", "model") and isinstance(value.get("content"),
                                                                                                str):
        return value["content"]
    return None


def parts_text(parts) -> str | None:
    """The text of Gemini parts that are all text; None where one is not."""
    if not isinstance(parts, list) or not parts:
        return None
    texts = [p.get("text") for p in parts if isinstance(p, dict)]
    return "".join(texts) if len(texts) == len(parts) and all(isinstance(t, str) for t in texts) else None


def pair_of(record: dict, fmt: str) -> tuple[list[dict], str, str]:
    """(prompt as chat messages, chosen text, rejected text) of a valid record."""
    if fmt == PREFERENCE:
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            [{"role": "assistant" if m["role"] == "model" else m["role"], "content": m["content"]} for m in prompt]
        return messages, answer_text(record["chosen"]), answer_text(record["rejected"])
    messages = []
    system = record.get("system_instruction") or record.get("systemInstruction")
    if system and parts_text(system.get("parts")):
        messages.append({"role": "system", "content": parts_text(system["parts"])})
    for turn in record["contents"]:
        messages.append({"role": "assistant" if turn.get("role") == "model" else "user",
                         "content": parts_text(turn["parts"])})
    by_score = {item["score"]: parts_text(item["completion"]["parts"]) for item in record["completions"]}
    return messages, by_score[1], by_score[0]


def from_pair(prompt: list[dict], chosen: str, rejected: str, fmt: str) -> dict:
    """A record of ``fmt`` from a pair (the inverse of :func:`pair_of`)."""
    if fmt == PREFERENCE:
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    record: dict = {}
    system = [m["content"] for m in prompt if m["role"] == "system"]
    if system:
        record["system_instruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    record["contents"] = [{"role": "model" if m["role"] == "assistant" else "user", "parts": [{"text": m["content"]}]}
                          for m in prompt if m["role"] != "system"]
    record["completions"] = [{"score": 1, "completion": {"role": "model", "parts": [{"text": chosen}]}},
                             {"score": 0, "completion": {"role": "model", "parts": [{"text": rejected}]}}]
    return record


def read_pairs(path) -> list[dict]:
    """Every pair of a valid local preference JSONL file: ``{"prompt": messages, "chosen", "rejected"}``."""
    import orjson

    out = []
    with open(path, "rb") as fh:
        for raw in fh:
            raw = raw.strip().removeprefix(b"\xef\xbb\xbf")
            if raw:
                record = orjson.loads(raw)
                prompt, chosen, rejected = pair_of(record, detect(record))
                out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def convert_file(path, fmt: str) -> int:
    """Rewrite a valid local preference JSONL file in ``fmt``, atomically; how many records changed format."""
    import orjson

    from ..storage import atomic_writer

    records = []
    changed = 0
    with open(path, "rb") as fh:
        for raw in fh:
            raw = raw.strip().removeprefix(b"\xef\xbb\xbf")
            if raw:
                record = orjson.loads(raw)
                source = detect(record)
                if source != fmt:
                    record = from_pair(*pair_of(record, source), fmt)
                    changed += 1
                records.append(record)
    if changed:
        with atomic_writer(path, overwrite=True) as out:
            for record in records:
                out.write(orjson.dumps(record) + b"\n")
    return changed
