"""Preference tuning on the local engine: DPO through TRL's ``DPOTrainer``.

The job's pairs (:mod:`tuning_magics.datasets.preference`) go to the trainer as
conversations (the prompt's messages, the chosen and the rejected assistant turn),
and the run goes through the engine's one path for TRL trainers (:func:`.trainer._run`),
so a DPO job keeps every promise a supervised one does: metrics rows (the loss, and
what preference tuning is judged by: the reward margin of chosen over rejected and how
often chosen wins, on training and validation pairs), progress, checkpoints in the
service's layout, cancel and Stop early between steps, evaluation during tuning, and an
exact resume after a cancel or a killed worker. The model is loaded by the engine's
loader, so any model it tunes (LoRA or full) is tuned here.

A LoRA job's reference model is the base under the adapter (TRL turns the adapter off
to score it); a full job's is a frozen copy of the starting weights, twice the weights
in memory.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from .trainer import (DEFAULT_BETA, DEFAULT_LEARNING_RATES, PEFT, PREFERENCE_LEARNING_RATE_SHARE, TINY_MAX_PARAMS,
                      TrainConfig, TrainResult, _default_max_seq_len, _failed_with, _lora, _precision, _rank_device,
                      _ranks, _run, _set_threads, _single_device, _start, _steps_per_epoch, _training_args,
                      normalise_mode)


def _dataset(path: str | None):
    import datasets

    from ...datasets.preference import read_pairs

    if not path:
        return None
    pairs = read_pairs(path)
    return datasets.Dataset.from_list([{"prompt": p["prompt"],
                                        "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                        "rejected": [{"role": "assistant", "content": p["rejected"]}]}
                                       for p in pairs])


def train_preference(config: TrainConfig, *, beta: float | None = None, on_event=None, should_stop=None,
                     should_stop_early=None, evaluator=None, resume: bool = False) -> TrainResult:
    """Tune ``config``'s model on its preference pairs with DPO; what :func:`.trainer.train` returns, the same
    events and files. Raises :class:`.trainer.TrainingCancelled` when ``should_stop()`` turns True."""
    config.check()
    with _ranks(config, resume=resume, method="preference", beta=beta, on_failure=_failed_with(on_event)):
        return _train_preference(config, beta=beta, on_event=on_event, should_stop=should_stop,
                                 should_stop_early=should_stop_early, evaluator=evaluator, resume=resume)


def _train_preference(config: TrainConfig, *, beta, on_event, should_stop, should_stop_early, evaluator,
                      resume: bool) -> TrainResult:
    import torch
    from trl import DPOConfig, DPOTrainer

    from .memory import param_count
    from .models import load_config, load_model_and_tokenizer

    mode = normalise_mode(config.tuning_mode)
    emit = on_event or (lambda event: None)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    emit({"event": "substate", "substate": "PROCESSING_DATASET"})
    device = _rank_device(config)
    source = config.custom_base_model or config.base_model
    model_config = load_config(source)
    max_len = int(config.max_seq_len or _default_max_seq_len(model_config, config.base_model))
    try:
        train_set, val_set = _dataset(config.train_path), _dataset(config.validation_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the preference pairs ({exc}); validate them with "
                        "tuning_magics.validate(path, method='preference')", field="train_path") from None
    n_params = param_count(model_config)
    _set_threads(device, n_params)
    lr = float(config.learning_rate or DEFAULT_LEARNING_RATES[("tiny" if n_params < TINY_MAX_PARAMS else "real", mode)]
               * PREFERENCE_LEARNING_RATE_SHARE) * float(config.learning_rate_multiplier)
    start = _start(config, resume)
    model, tokenizer = load_model_and_tokenizer(source, dtype=torch.float32, device=device)
    precision = _precision(config, device)
    args = DPOConfig(beta=beta or DEFAULT_BETA, max_length=max_len, **_training_args(
        config, out=out, device=device, lr=lr, total_steps=_steps_per_epoch(config, len(train_set)) * int(
            config.epochs), precision=precision, n_params=n_params))
    _single_device(args, device)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                         processing_class=tokenizer, peft_config=_lora(config) if mode == PEFT else None)
    kept = len(trainer.train_dataset)  # TRL drops a pair whose prompt alone fills max_seq_len
    emit({"event": "dataset", "examples": kept, "dropped": len(train_set) - kept,
          "validation_examples": len(trainer.eval_dataset) if val_set is not None else 0, "max_seq_len": max_len})
    if not kept:
        raise UserError(f"every pair's prompt fills max_seq_len ({max_len} tokens), so no answer is left to "
                        "compare; raise max_seq_len or shorten the prompts", field="max_seq_len")
    return _run(trainer, config=config, mode=mode, tokenizer=tokenizer, lr=lr, start=start, resume=resume, emit=emit,
                should_stop=should_stop, should_stop_early=should_stop_early, evaluator=evaluator,
                precision=precision)
