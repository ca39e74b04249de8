"""Evaluation answers on the local engine: a model loaded here answers a whole batch of prompts per ``generate``."""

from __future__ import annotations

from ...evaluation import Answerer, fingerprint


class LocalAnswerer(Answerer):
    """A model the local engine loads (a folder or a model id), answering in batches (``LocalChatModel.replies``).

    ``loader`` returns the loaded model where a job already holds it (its chat model), so it is not loaded twice.
    """

    def __init__(self, label: str, source: str, *, loader=None, batch_size: int = 16):
        self.label, self.source, self.batch_size = label, str(source), batch_size
        self.key = f"local:{fingerprint(self.source)}"
        self._loader = loader

    def answer(self, prompts, *, max_new_tokens: int) -> list[str]:
        if self._loader is not None:
            model = self._loader()
        else:
            from .generate import LocalChatModel

            model = LocalChatModel(self.source)
        return model.replies(prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size)
