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


class CheckpointEvaluator:
    """Evaluation during tuning (:mod:`tuning_magics.evaluation.during`): the model being trained answers the
    job's evaluation examples, and each metric's mean is returned.

    ``evaluator(model, tokenizer, label, folder)`` is called by the trainer with its model in eval mode: at step
    0 (``base``, ``folder`` None: the base model's source) and after each checkpoint (``checkpoint-N`` and its
    folder). Answers go into the evaluation cache under that checkpoint's fingerprint, so ``job.evaluate()``
    does not generate them again. ``should_stop()`` is asked between chunks of examples: a cancel does not wait
    for a whole evaluation.
    """

    def __init__(self, spec: dict, model_id: str, base_source: str, *, should_stop=None):
        from ... import catalog
        from ...evaluation import examples_of
        from ...evaluation.metrics import resolve

        self.spec, self.base_source, self.should_stop = spec, base_source, should_stop
        self.metrics = resolve(list(spec["metrics"]))
        self.cases = examples_of(spec["path"], catalog.find(model_id), name="evaluation data", limit=spec["limit"],
                                 method=spec.get("method", "sft"))

    def _progress(self, _phase, _done, _total) -> None:
        if self.should_stop is not None and self.should_stop():
            from .trainer import TrainingCancelled

            raise TrainingCancelled("cancelled while evaluating")

    def __call__(self, model, tokenizer, label: str, folder: str | None) -> dict[str, float]:
        from ...evaluation import run
        from .generate import LocalChatModel

        chat = LocalChatModel.around(model, tokenizer, label)
        answerer = LocalAnswerer(label, folder or self.base_source, loader=lambda: chat)
        found = run([answerer], self.cases, self.metrics, max_new_tokens=int(self.spec["max_new_tokens"]),
                    progress=self._progress, title=f"evaluation of {label}")
        table = found.table
        return {metric.name: float(table.loc[label, metric.name]) for metric in self.metrics}
