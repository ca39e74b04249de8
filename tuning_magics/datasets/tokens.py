"""Token counts: the model's own tokenizer where it is available offline, an estimate otherwise.

The estimate is one token per four UTF-8 bytes of text plus a few tokens of
chat-template overhead per message, close for English and conservative for
scripts such as Korean; reports always say when counts are estimates.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

#: Tokens the chat template adds around each message (role markers, separators).
TEMPLATE_TOKENS_PER_MESSAGE = 4
BYTES_PER_TOKEN = 4


def estimate_text(n_bytes: int) -> int:
    """Estimated tokens for ``n_bytes`` bytes of UTF-8 text."""
    return -(-n_bytes // BYTES_PER_TOKEN)


def _hf_cached(repo: str) -> bool:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    return (hub / f"models--{repo.replace('/', '--')}").is_dir()


@lru_cache(maxsize=8)
def _load_tokenizer(model_id: str):
    """The model's tokenizer if it can be had without a download, else None."""
    from .. import catalog

    spec = catalog.find(model_id)
    if spec is not None and spec.provider == "local":
        try:
            from ..backends.local.models import load_tokenizer
        except ImportError:
            return None
        return load_tokenizer(spec.id)
    repo = spec.hf_repo if spec is not None else model_id
    if not repo:
        return None
    if not (Path(repo).is_dir() or _hf_cached(repo)):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(repo, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        return None


class TokenCounter:
    """Counts the tokens of a conversation for one model."""

    def __init__(self, model_id: str | None):
        self.model_id = model_id
        self.tokenizer = _load_tokenizer(model_id) if model_id else None
        self.estimated = self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None)
        if model_id is None:
            self.note = "token counts are estimates (about 4 bytes a token); name a model for exact counts"
        elif self.estimated:
            self.note = (f"token counts are estimates (about 4 bytes a token): the tokenizer of {model_id} "
                         "is not available offline")
        else:
            self.note = f"token counts use the tokenizer of {model_id}"

    def count(self, messages: list[dict]) -> int:
        """Tokens of the conversation as the model sees it in training."""
        from .formats import text_of

        if not self.estimated:
            text_messages = [{"role": m["role"], "content": text_of(m["content"])} for m in messages]
            try:
                ids = self.tokenizer.apply_chat_template(text_messages, tokenize=True)
                return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
            except Exception:  # noqa: BLE001 - odd templates fall back to the estimate
                pass
        total = 0
        for m in messages:
            total += estimate_text(len(text_of(m["content"]).encode("utf-8"))) + TEMPLATE_TOKENS_PER_MESSAGE
        return total
