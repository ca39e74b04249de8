"""Preference tuning on the local engine: DPO through TRL's ``DPOTrainer``.

The job's pairs (:mod:`tuning_magics.datasets.preference`) go to the trainer as
conversations (the prompt's messages, the chosen and the rejected assistant turn);
what the engine promises every job comes through a ``TrainerCallback``, not a loop of
its own: a metrics row per step in ``metrics.jsonl`` and TensorBoard (the loss, and
what preference tuning is judged by: the reward margin of chosen over rejected and
how often chosen wins, on training and validation pairs), progress for the monitor, a
checkpoint in the service's layout after each epoch it keeps (at most 10), cancel and
Stop early between steps, and evaluation during tuning at each checkpoint. The model
is loaded by the engine's loader, so any model it tunes (LoRA or full) is tuned here.

A LoRA job's reference model is the base under the adapter (TRL turns the adapter off
to score it); a full job's is a frozen copy, twice the weights in memory.

``resume=True`` (``job.resume()`` after a cancel or a killed worker) continues from the
last complete checkpoint: its weights, the epochs after it, the metrics up to its step
kept, so no step is trained or logged twice. The optimizer's moments and the learning
rate's schedule start again over the epochs left.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ...errors import UserError
from ...storage import atomic_folder
from . import checkpoints as ckpt
from .metrics import METRICS_FILE, MetricsWriter
from .trainer import (DEFAULT_BETA, DEFAULT_LEARNING_RATES, FULL, LORA_TARGETS, PEFT,
                      PREFERENCE_LEARNING_RATE_SHARE, TINY_MAX_PARAMS, TrainConfig, TrainResult, TrainingCancelled,
                      _asked, _best_checkpoint, _default_max_seq_len, _load_weights, _save_final, _save_weights,
                      _score, normalise_mode)

#: TRL's log names -> the job's metrics.
_LOGGED = {"loss": "train_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
           "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
           "eval_loss": "eval_loss", "eval_rewards/margins": "eval_reward_margin",
           "eval_rewards/accuracies": "eval_reward_accuracy"}


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
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from .memory import param_count
    from .models import default_device, load_config, load_model_and_tokenizer

    config.check()
    beta = beta or DEFAULT_BETA
    mode = normalise_mode(config.tuning_mode)
    emit = on_event or (lambda event: None)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    emit({"event": "substate", "substate": "PROCESSING_DATASET"})
    device = default_device(config.device)
    source = config.custom_base_model or config.base_model
    model_config = load_config(source)
    max_len = int(config.max_seq_len or _default_max_seq_len(model_config, config.base_model))
    try:
        train_set, val_set = _dataset(config.train_path), _dataset(config.validation_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the preference pairs ({exc}); validate them with "
                        "tuning_magics.validate(path, method='preference')", field="train_path") from None
    emit({"event": "dataset", "examples": len(train_set), "dropped": 0,
          "validation_examples": len(val_set) if val_set is not None else 0, "max_seq_len": max_len})
    size_class = "tiny" if param_count(model_config) < TINY_MAX_PARAMS else "real"
    lr = float(config.learning_rate or DEFAULT_LEARNING_RATES[(size_class, mode)] * PREFERENCE_LEARNING_RATE_SHARE) \
        * float(config.learning_rate_multiplier)
    ckpt.remove_stale_temp(out)
    start = ckpt.latest_checkpoint(out) if resume else None
    if not resume:
        shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)
    done = ckpt.read_state(start) if start is not None else {}
    offset_step, offset_epoch = int(done.get("global_step", 0)), int(done.get("epoch", 0))
    model, tokenizer = load_model_and_tokenizer(str(start) if start is not None and mode == FULL else source,
                                                dtype=torch.float32, device=device)
    peft_config = None
    if mode == PEFT and start is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(start), is_trainable=True)
    elif mode == PEFT:
        from peft import LoraConfig

        peft_config = LoraConfig(r=int(config.adapter_size), lora_alpha=int(config.lora_alpha or 2 * config.adapter_size),
                                 lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM", bias="none")
    batch_size, accum = int(config.batch_size), int(config.gradient_accumulation_steps)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / batch_size) / accum)
    total_steps = steps_per_epoch * int(config.epochs)
    keep_epochs = set(ckpt.checkpoint_epochs(int(config.epochs)))
    metrics = MetricsWriter(out, keep_until_step=offset_step if resume else None)
    if start is not None:
        emit({"event": "resumed", "step": offset_step, "epoch": offset_epoch, "checkpoint": str(start)})
    state = {"cancelled": False, "early": False, "last": {}}

    def save_checkpoint(trainer_model, step: int, epoch: int) -> None:
        target = ckpt.checkpoints_dir(out) / f"checkpoint-{step}"
        metrics.check()
        with atomic_folder(target) as tmp:
            _save_weights(trainer_model, tokenizer, tmp, mode)
            (tmp / ckpt.TRAINER_STATE).write_text(json.dumps({
                "global_step": step, "epoch": epoch, "epochs": int(config.epochs), "steps_per_epoch": steps_per_epoch,
                "train_loss": state["last"].get("train_loss"), "eval_loss": state["last"].get("eval_loss"),
                "tuning_mode": mode, "learning_rate": lr, "method": "preference", "beta": beta,
            }, indent=2), encoding="utf-8")
        emit({"event": "checkpoint", "path": str(target), "step": step, "epoch": epoch})
        score(trainer_model, target.name, str(target), step, epoch)

    def score(trainer_model, label: str, folder: str | None, step: int, epoch) -> None:
        _score(evaluator, trainer_model, tokenizer, label, folder, step=step, epoch=epoch, metrics=metrics, emit=emit)

    class Bridge(TrainerCallback):
        """The engine's promises, kept from inside TRL's loop."""

        def on_log(self, args, trainer_state, control, logs=None, **kwargs):
            row = {"step": offset_step + trainer_state.global_step,
                   "epoch": round(offset_epoch + float(trainer_state.epoch or 0), 4)}
            row.update({ours: round(float(logs[theirs]), 6) for theirs, ours in _LOGGED.items()
                        if isinstance((logs or {}).get(theirs), (int, float))})
            if len(row) > 2:
                state["last"].update(row)
                metrics.write(row)
                emit({"event": "metrics", **row})

        def on_step_end(self, args, trainer_state, control, **kwargs):
            step = offset_step + trainer_state.global_step
            emit({"event": "progress", "step": step, "total_steps": total_steps,
                  "epoch": round(offset_epoch + float(trainer_state.epoch or 0), 4), "epochs": int(config.epochs),
                  "fraction": round(step / max(1, total_steps), 6)})
            if _asked(should_stop):
                state["cancelled"] = control.should_training_stop = True
            elif step < total_steps and _asked(should_stop_early):
                state["early"] = control.should_training_stop = True
            return control

        def on_epoch_end(self, args, trainer_state, control, model=None, **kwargs):
            epoch = offset_epoch + round(float(trainer_state.epoch or 0))
            if epoch in keep_epochs and not state["cancelled"]:
                save_checkpoint(model, offset_step + trainer_state.global_step, epoch)
            return control

    args = DPOConfig(
        output_dir=str(out / ".trl"), per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=accum, num_train_epochs=int(config.epochs) - offset_epoch, learning_rate=lr,
        lr_scheduler_type=config.lr_scheduler, warmup_steps=int(round(total_steps * float(config.warmup_ratio))),
        weight_decay=float(config.weight_decay), max_grad_norm=float(config.max_grad_norm), beta=beta,
        max_length=max_len, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=config.seed,
        eval_strategy="epoch" if val_set is not None else "no", use_cpu=device.type == "cpu",
        bf16=bool(config.bf16) and device.type == "cuda", dataloader_num_workers=0)
    emit({"event": "substate", "substate": "TUNING"})
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Bridge()])
    try:
        if offset_step == 0:  # the model it starts from, scored as a supervised job scores its base
            score(trainer.model, "base", None, 0, 0)
        if offset_epoch < int(config.epochs):  # a job resumed after its last epoch only writes its final model
            trainer.train()
        if state["cancelled"]:
            raise TrainingCancelled(f"cancelled at step {offset_step + trainer.state.global_step}")
        note = None
        if state["early"]:  # the best checkpoint so far becomes final, chosen as a supervised job chooses
            step = offset_step + trainer.state.global_step
            if str(ckpt.checkpoints_dir(out) / f"checkpoint-{step}") not in map(str, ckpt.list_checkpoints(out)):
                save_checkpoint(trainer.model, step, offset_epoch + round(float(trainer.state.epoch or 0)))
            best, reason = _best_checkpoint(out, val_set is not None)
            if best.name != f"checkpoint-{step}":
                _load_weights(trainer.model, best, mode, device)
            note = f"stopped early at step {step} of {total_steps}; final is {best.name}" + \
                (f" ({reason})" if reason else "")
        emit({"event": "substate", "substate": "POST_PROCESSING"})
        metrics.check()
        with atomic_folder(ckpt.final_dir(out)) as tmp:
            _save_final(trainer.model, tokenizer, tmp, mode)
        metrics.check()
    finally:
        metrics.close()
        shutil.rmtree(out / ".trl", ignore_errors=True)
    last = state["last"]
    return TrainResult(final_dir=str(ckpt.final_dir(out)), steps=offset_step + trainer.state.global_step,
                       epochs=int(config.epochs),
                       train_loss=last.get("train_loss"), eval_loss=last.get("eval_loss"), tokens_per_second=0.0,
                       padding_share=0.0, checkpoints=[str(p) for p in ckpt.list_checkpoints(out)], learning_rate=lr,
                       metrics_path=str(out / METRICS_FILE), note=note)
