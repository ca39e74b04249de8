"""Evaluation during tuning: task metrics scored on each checkpoint as it is written.

``tune(..., evaluation={"data": df, "metrics": ["exact_match"]})``, or in a
``%%tune`` body::

    evaluation:
      data: $eval_df          # default: the validation set
      metrics: exact_match, rouge_l
      max_new_tokens: 64

The local engine answers every example with the model it is training, greedily
and in batches, before the first step (the base model, step 0) and after each
checkpoint; each metric's mean goes into the job's metrics as ``eval_<metric>``
(``job.metrics()``, TensorBoard, the monitor's curve), and the answers into the
evaluation cache, so ``job.evaluate()`` afterwards only generates for ``final``.
Vertex AI scores a Gemini job's checkpoints itself (the tuning job's evaluation
config); their scores come back in the same columns.

Metrics are named ones (:data:`~tuning_magics.evaluation.metrics.BUILT_IN`): the
job's own process scores them. A function of yours scores afterwards, with
``job.evaluate(metrics=[f])``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

#: Where each metric's mean goes in a job's metrics: ``eval_exact_match``, ...
PREFIX = "eval_"
#: Metrics of the trainers' own that share the prefix and are not task metrics (validation loss and accuracy;
#: a preference job's reward margin and how often chosen wins, on its validation pairs).
NOT_TASK = frozenset({"eval_loss", "eval_token_accuracy", "eval_reward_margin", "eval_reward_accuracy"})
#: The most examples evaluated at each checkpoint unless ``limit`` says otherwise: each one costs generation.
DEFAULT_LIMIT = 200
#: Tokens an answer may take during tuning unless ``max_new_tokens`` says otherwise.
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class DuringTuning:
    """What ``evaluation=`` asks of a tuning job; see the module's description."""

    data: object = None  # anything tune() takes; None: the validation set
    metrics: tuple = ("exact_match",)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    limit: int | None = DEFAULT_LIMIT  # None: every example

    def describe(self) -> dict:
        """What a job's config records (the data as the datasets are described)."""
        from ..datasets import prepare

        out = {"metrics": list(self.metrics), "max_new_tokens": self.max_new_tokens, "limit": self.limit}
        out["data"] = prepare.describe(self.data) if self.data is not None else "validation_dataset"
        return out


_KEYS = ("data", "metrics", "max_new_tokens", "limit")


def check(value) -> DuringTuning | None:
    """``evaluation=`` as a :class:`DuringTuning`: None or False for none, True for the defaults, metric names,
    or a mapping of ``data``, ``metrics``, ``max_new_tokens``, ``limit``; anything else is one line naming it."""
    from .. import params
    from .metrics import BUILT_IN

    if value is None or value is False:
        return None
    if value is True:
        return DuringTuning()
    if isinstance(value, DuringTuning):
        return value
    if isinstance(value, (str, list, tuple)):
        value = {"metrics": value}
    if not isinstance(value, dict):
        raise UserError(f"evaluation must be a mapping of data, metrics, max_new_tokens and limit (or True), not "
                        f"{type(value).__name__}", field="evaluation")
    unknown = [k for k in value if k not in _KEYS]
    if unknown:
        raise UserError(f"evaluation: unknown key {unknown[0]!r}; its keys are {', '.join(_KEYS)}",
                        field="evaluation")
    metrics = value.get("metrics") or ("exact_match",)
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    names = []
    for item in metrics:
        if not isinstance(item, str):
            raise UserError(f"evaluation.metrics: during tuning the metrics are named ones ({', '.join(BUILT_IN)}), "
                            f"scored by the job's own process, not {item!r}; score a function of yours afterwards "
                            "with job.evaluate(metrics=[f])", field="evaluation.metrics")
        if item not in BUILT_IN:
            raise UserError(f"evaluation.metrics: unknown metric {item!r}; during tuning: {', '.join(BUILT_IN)}",
                            field="evaluation.metrics")
        if item not in names:
            names.append(item)
    out = {"max_new_tokens": params.whole_at_least_1("evaluation.max_new_tokens",
                                                     value.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))}
    limit = value.get("limit", DEFAULT_LIMIT)
    out["limit"] = None if limit is None else params.whole_at_least_1("evaluation.limit", limit)  # None: all
    if isinstance(value.get("data"), str) and value["data"] in ("train", "training"):
        raise UserError("evaluation.data: during tuning, give the examples themselves (the training data's own "
                        "variable to measure recall), or leave it out for the validation set",
                        field="evaluation.data")
    return DuringTuning(data=value.get("data"), metrics=tuple(names), **out)


def task_metrics(columns) -> list[str]:
    """The metric names (``exact_match``, ...) among a metrics frame's columns (``eval_exact_match``, ...)."""
    return [c[len(PREFIX):] for c in columns if str(c).startswith(PREFIX) and c not in NOT_TASK]


def checkpoint_scores(frame, checkpoints):
    """One row per model scored during tuning, in step order: ``base`` (step 0), each checkpoint by its name
    (``checkpoint-N``, or ``step N`` where its checkpoint is not kept), with ``step`` and a column per metric."""
    import pandas as pd

    names = task_metrics(frame.columns)
    if not names or not len(frame):
        return pd.DataFrame(columns=["step", *names]).rename_axis("model")
    rows = frame.dropna(subset=[PREFIX + n for n in names], how="all")
    by_step = {c.step: c.name for c in checkpoints if c.step is not None}
    labels = ["base" if step == 0 else by_step.get(int(step), f"step {int(step)}") for step in rows["step"]]
    out = rows[["step", *(PREFIX + n for n in names)]].rename(columns={PREFIX + n: n for n in names})
    out.index = pd.Index(labels, name="model")
    return out


def best_checkpoint(scores, metric: str | None = None) -> str | None:
    """The checkpoint with the highest ``metric`` (default: the first) in :func:`checkpoint_scores`; the base
    model never counts, and a tie goes to the earliest, which trained least. None when nothing was scored."""
    from .stats import highest

    if metric is not None and metric not in scores.columns:
        raise UserError(f"no metric {metric!r} was scored during tuning; it scored "
                        f"{', '.join(c for c in scores.columns if c != 'step') or 'none'}", field="metric")
    metric = metric or next((c for c in scores.columns if c != "step"), None)
    if metric is None:
        return None
    return highest({label: value for label, value in scores[metric].items() if label != "base"})
