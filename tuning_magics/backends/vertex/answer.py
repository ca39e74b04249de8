"""Evaluation answers from Gemini on Vertex AI: online a few at a time, or one batch prediction job for many.

A Gemini job's base and final model answer evaluation prompts online through
``generate_content`` (:class:`~tuning_magics.evaluation.ChatAnswerer`: bounded concurrency,
a quota's 429 waited out). From ``batch_from`` prompts not yet in the cache, they go instead
as one batch prediction job (half the price of online calls and no rate limit, but minutes
to start): the requests are written as JSONL to the staging bucket, the job runs, and each
prediction is matched back to its request. A line the batch could not answer is asked online.
Both ways ask the same greedy request, so their answers share the evaluation cache.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ...errors import UserError
from ...evaluation import Answerer, CHUNK
from . import client as vc

#: Seconds between looks at a running batch prediction (it takes minutes to start).
BATCH_POLL = 15.0


def gemini_request(messages: list[dict], max_new_tokens: int) -> dict:
    """One batch prediction line's ``request`` (GenerateContentRequest JSON): the conversation, its system
    instruction apart, answered greedily in at most ``max_new_tokens``."""
    request: dict = {"contents": [{"role": "model" if m["role"] == "assistant" else "user",
                                   "parts": [{"text": m["content"]}]} for m in messages if m["role"] != "system"],
                     "generationConfig": {"temperature": 0, "maxOutputTokens": int(max_new_tokens)}}
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if system:
        request["systemInstruction"] = {"parts": [{"text": system}]}
    return request


def _text(response: dict) -> str | None:
    """The reply in a prediction's response, or None where it has none (blocked, empty)."""
    for candidate in (response or {}).get("candidates") or []:
        parts = ((candidate or {}).get("content") or {}).get("parts") or []
        return "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict))
    return None


class GeminiAnswerer(Answerer):
    """``online`` (a ChatAnswerer of the same model) below ``batch_from`` prompts, one batch prediction of
    ``model`` (a tuned model's name or ``publishers/google/models/<id>``) from there."""

    def __init__(self, online, *, model: str, ctx: vc.Context, batch_from: int):
        self.label, self.key, self.online = online.label, online.key, online
        self.model, self.ctx, self.batch_from = model, ctx, int(batch_from)
        #: The batch predictions run, for whoever wants to follow or cite them.
        self.batches: list = []

    def chunk_size(self, missing: int) -> int:
        """Prompts asked at a time: all of them for a batch, else the evaluation's chunk."""
        return missing if missing >= self.batch_from else CHUNK

    def answer(self, prompts, *, max_new_tokens: int) -> list[str]:
        if len(prompts) < self.batch_from:
            return self.online.answer(prompts, max_new_tokens=max_new_tokens)
        requests = [gemini_request(p, max_new_tokens) for p in prompts]
        found = self._batch(requests)
        keys = [json.dumps(r, sort_keys=True) for r in requests]
        left = [i for i, key in enumerate(keys) if found.get(key) is None]
        if left:  # what the batch did not answer is asked online
            for i, text in zip(left, self.online.answer([prompts[i] for i in left], max_new_tokens=max_new_tokens)):
                found[keys[i]] = text
        return [found[key] for key in keys]

    def _batch(self, requests: list[dict]) -> dict[str, str | None]:
        """Run one batch prediction over the requests; their replies by request (JSON, keys sorted)."""
        from ... import storage
        from .endpoints import batch_predict

        staging = vc.staging_folder(self.ctx, "a batch prediction's requests")
        with tempfile.TemporaryDirectory(prefix="tuning-magics-batch-") as scratch:
            local = Path(scratch) / "requests.jsonl"
            local.write_text("".join(json.dumps({"request": r}) + "\n" for r in requests), encoding="utf-8")
            source = storage.upload_content_addressed(local, staging + "/evaluations/requests")
        batch = batch_predict(self.model, source, staging + "/evaluations/predictions")
        self.batches.append(batch)
        while not batch.done:
            time.sleep(BATCH_POLL)
            batch.refresh()
        if batch.output_uri is None:
            raise UserError(f"batch prediction {batch.name} ended {batch.state}"
                            + (f": {batch.error}" if batch.error else "") + "; evaluate again to retry (answers "
                            "already given are kept), or pass batch_from=None to ask online", field="batch_from")
        found: dict[str, str | None] = {}
        for line in storage.read_bytes(batch.output_uri.rstrip("/") + "/predictions.jsonl").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("request"), dict):
                found[json.dumps(row["request"], sort_keys=True)] = None if row.get("status") else \
                    _text(row.get("response"))
        return found
