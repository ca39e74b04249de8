"""Tuning on this machine: full tuning or LoRA, on TRL's trainers, with transformers and PEFT.

``train(TrainConfig(...))`` reads a local JSONL file in any accepted format,
renders it with the model's chat template (learning only the assistant's tokens),
and tunes with TRL's ``SFTTrainer`` on exactly those tokens, in length-grouped
batches; :mod:`.preference` tunes preference pairs with ``DPOTrainer``. Both go
through :func:`_run`, which keeps the engine's promises from inside the trainer's
loop: a metrics line per step in ``<output_dir>/metrics.jsonl``, checkpoints in the
managed service's layout (see :mod:`.checkpoints`), and a :class:`TrainResult`.
``on_event`` receives every metrics line and markers of the job's sub-state;
``should_stop`` cancels between steps; ``should_stop_early`` ends training after
the current step and keeps the best checkpoint so far as ``final``
(:attr:`TrainResult.note` says which); ``resume=True`` continues exactly from the
last complete checkpoint (weights, optimizer, schedule, random generators).

Events passed to ``on_event`` (plain dicts):

- ``{"event": "substate", "substate": "PROCESSING_DATASET" | "TUNING" | "POST_PROCESSING"}``
- ``{"event": "dataset", "examples", "dropped", "validation_examples", "tokens", "loss_tokens", "max_seq_len"}``
- ``{"event": "metrics", "step", "epoch", "train_loss", "learning_rate", "token_accuracy",
  "tokens_per_second", "padding_share", "grad_norm", "trained_tokens"}`` (one per optimizer step; a
  preference job's have ``reward_margin`` and ``reward_accuracy`` instead of the token figures)
- ``{"event": "metrics", "step", "epoch", "eval_loss", "eval_token_accuracy"}`` (one per epoch, with validation)
- ``{"event": "progress", "step", "total_steps", "epoch", "epochs", "fraction"}``
- ``{"event": "checkpoint", "path", "step", "epoch"}``
- ``{"event": "metrics", "step", "epoch", "eval_<metric>"...}`` (evaluation during tuning: at step 0 and after
  each checkpoint)
- ``{"event": "resumed", "step", "epoch", "checkpoint"}``
"""

from __future__ import annotations

import collections
import errno
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from ... import params
from ...catalog import FULL, PEFT, normalise_mode
from ...errors import UserError
from ...storage import atomic_folder
from ...evaluation.during import PREFIX
from . import checkpoints as ckpt
from .metrics import METRICS_FILE

#: Default learning rates by (model size class, mode). Toy models start from
#: random weights and must learn fast; real models need the usual small values.
DEFAULT_LEARNING_RATES = {
    ("tiny", FULL): 3e-3,
    ("tiny", PEFT): 1e-2,
    ("real", FULL): 1e-5,
    ("real", PEFT): 2e-4,
}
#: Preference tuning (DPO): its beta unless the job says (how far the model may move from where it started;
#: lower moves further), and its learning rate's share of supervised tuning's default, since it starts from a
#: model that already answers.
DEFAULT_BETA = 0.1
PREFERENCE_LEARNING_RATE_SHARE = 0.1
#: Models below this many weights count as "tiny" for the defaults above.
TINY_MAX_PARAMS = 50_000_000
MAX_SEQ_LEN_CAP = 4096
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainingCancelled(Exception):
    """Raised by :func:`train` when ``should_stop()`` returned True; nothing partial was written."""


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a local tuning run needs. Paths are local; ``train_path`` is JSONL in any accepted format."""

    base_model: str
    train_path: str
    output_dir: str
    custom_base_model: str | None = None
    tuning_mode: str = FULL
    epochs: int = 3
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATES for the model's size and mode
    learning_rate_multiplier: float = 1.0
    adapter_size: int = 8  # LoRA rank
    lora_alpha: int | None = None  # None: 2 * adapter_size
    validation_path: str | None = None
    batch_size: int = 8
    max_seq_len: int | None = None  # None: the model's limit, capped at MAX_SEQ_LEN_CAP
    seed: int = 0
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "cosine"  # or "linear", "constant"
    bf16: bool | None = None  # None: bf16 autocast on GPUs that support it
    device: str | None = None  # None: first GPU, else CPU
    check_memory: bool = True
    # What TRL and transformers give a GPU (each needs CUDA and its package; see GPU_OPTIONS):
    load_in_4bit: bool = False  # QLoRA: the frozen base weights in 4-bit NF4 under a LoRA adapter
    kernels: bool = False  # the Hub's optimised layer kernels (Liger's and others), through the kernels package
    padding_free: bool = False  # a batch as one sequence without padding, through FlashAttention 2
    gpus: int | None = None  # data parallel over this many GPUs of this machine, a process each (None: one)

    def check(self) -> None:
        """Raise a one-line UserError naming the first option out of range, or a data file that is missing.

        Values that pass are kept in their plain type (a NumPy integer becomes an int).
        """
        normalise_mode(self.tuning_mode)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _RULES and not (value is None and f.name in _NONE_MEANS_DEFAULT):
                setattr(self, f.name, _RULES[f.name](f.name, value))
        check_gpu_options({name: getattr(self, name) for name in (*GPU_OPTIONS, "gpus")}, self.tuning_mode,
                          self.device)
        if not Path(self.train_path).is_file():
            raise UserError(f"training file {self.train_path!r} does not exist", field="train_path")
        if self.validation_path and not Path(self.validation_path).is_file():
            raise UserError(f"validation file {self.validation_path!r} does not exist", field="validation_path")


@dataclass
class TrainResult:
    """What a finished run produced."""

    final_dir: str
    steps: int
    epochs: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_second: float
    padding_share: float
    checkpoints: list[str] = field(default_factory=list)
    learning_rate: float = 0.0
    metrics_path: str = ""
    #: Set when training was stopped early: where, and which checkpoint became ``final``.
    note: str | None = None


# -- option checks: which rule of tuning_magics.params each option follows --------------------------


def _device(name: str, value) -> str:
    from .models import check_device

    check_device(value)
    return value


_RULES = {
    **params.RULES,
    "lora_alpha": params.whole_at_least_1,
    "batch_size": params.whole_at_least_1,
    "max_seq_len": params.whole_at_least_1,
    "seed": params.whole,
    "warmup_ratio": params.from_up_to(0.0, 1.0),
    "weight_decay": params.from_up_to(0.0, math.inf),
    "max_grad_norm": params.above_0,
    "gradient_accumulation_steps": params.whole_at_least_1,
    "lr_scheduler": params.one_of("cosine", "linear", "constant"),
    "bf16": params.flag_or_auto,
    "device": _device,
    "check_memory": params.flag,
    "load_in_4bit": params.flag,
    "kernels": params.flag,
    "padding_free": params.flag,
    "gpus": params.whole_at_least_1,
}
#: Options whose None means "the trainer's default".
_NONE_MEANS_DEFAULT = {"learning_rate", "lora_alpha", "max_seq_len", "bf16", "device", "gpus"}
#: TrainConfig fields that tune() fills from its own parameters; the others are engine options.
OWN_FIELDS = frozenset({"base_model", "custom_base_model", "tuning_mode", "epochs", "learning_rate",
                        "learning_rate_multiplier", "adapter_size", "train_path", "validation_path", "output_dir"})


#: Engine options for a GPU: what each does, and the package it needs (its import name and its pip name).
GPU_OPTIONS = {
    "load_in_4bit": ("QLoRA, 4-bit base weights", "bitsandbytes", "bitsandbytes"),
    "kernels": ("the Hub's optimised kernels", "kernels", "kernels"),
    "padding_free": ("padding-free batches", "flash_attn", "flash-attn"),
}


#: Set (to anything) to run ``gpus=N`` as N CPU processes: the data-parallel path, on a machine without GPUs.
PARALLEL_ON_CPU = "TUNING_MAGICS_PARALLEL_ON_CPU"


def check_gpu_options(options: dict, tuning_mode, device=None) -> None:
    """A one-line UserError for a GPU option (:data:`GPU_OPTIONS`, ``gpus``) this job or machine cannot use:
    QLoRA on a full tuning job, any of them without a CUDA GPU (or with ``device`` set to another), or without
    its package, more GPUs than the machine has. Checked when the job is submitted and again when it starts."""
    import importlib.util

    if not any(options.get(name) for name in (*GPU_OPTIONS, "gpus")):
        return  # (torch is imported only when a GPU option is asked for)
    import torch

    gpus = options.get("gpus") or 1
    if gpus > 1 and not os.environ.get(PARALLEL_ON_CPU):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < gpus:
            raise UserError(f"gpus={gpus} trains on {gpus} CUDA GPUs and this machine has {have}; leave gpus out"
                            + (f", or ask for at most {have}" if have > 1 else ""), field="gpus")
        if device is not None and str(device) not in ("cuda", "auto"):
            raise UserError(f"gpus={gpus} trains on the first {gpus} GPUs, and device={device!r}; leave one of them "
                            "out", field="gpus")

    for name, (what, module, package) in GPU_OPTIONS.items():
        if not options.get(name):
            continue
        if name == "load_in_4bit" and normalise_mode(tuning_mode) != PEFT:
            raise UserError("load_in_4bit=True (QLoRA) trains a LoRA adapter over 4-bit base weights; add "
                            "tuning_mode='PEFT_ADAPTER', or leave load_in_4bit out for full tuning", field=name)
        if device is not None and not str(device).startswith(("cuda", "auto")):
            raise UserError(f"{name}=True ({what}) runs on a CUDA GPU, and device={device!r}; leave one of them "
                            "out", field=name)
        if not torch.cuda.is_available():
            raise UserError(f"{name}=True ({what}) needs a CUDA GPU and this machine has none; leave {name} out "
                            "here", field=name)
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{name}=True ({what}) needs the {package} package: pip install {package}", field=name)


def engine_options() -> list[str]:
    """The engine options ``tune()`` passes through (``batch_size``, ``max_seq_len``, ``seed``, ...)."""
    return [f.name for f in fields(TrainConfig) if f.name not in OWN_FIELDS]


def effective_values(config: dict, *, tiny: bool) -> dict:
    """The defaults a job with ``config`` (a job's config) would train with, for the values it leaves unset.

    ``tiny``: the model is a built-in toy model (the learning-rate defaults differ).
    """
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("base_model", "train_path",
                                                                                 "output_dir")}
    out = {}
    mode = normalise_mode(config.get("tuning_mode") or FULL)
    for name in ("epochs", "adapter_size", "learning_rate_multiplier"):
        if config.get(name) is None and (name != "adapter_size" or mode == PEFT):
            out[name] = defaults[name]
    multiplier = config.get("learning_rate_multiplier") or 1.0
    if config.get("method") == "preference":
        multiplier *= PREFERENCE_LEARNING_RATE_SHARE
        if config.get("beta") is None:
            out["beta"] = DEFAULT_BETA
    if config.get("learning_rate") is None:
        out["learning_rate"] = DEFAULT_LEARNING_RATES[("tiny" if tiny else "real", mode)] * multiplier
    elif config.get("learning_rate_multiplier") is not None:
        out["learning_rate"] = config["learning_rate"] * multiplier  # what the optimiser is given
    given = config.get("engine_options") or {}
    for name in engine_options():
        if given.get(name) is None and defaults.get(name) is not None:
            out[name] = defaults[name]
    return out


def engine_option_rules() -> dict:
    """Each engine option and the rule its value follows."""
    return {name: _RULES[name] for name in engine_options()}


def check_engine_options(options: dict) -> dict:
    """The options with plain values; a one-line UserError for an unknown one or a value out of range.

    None means the default.
    """
    known = engine_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(
            f"tune() got an unknown parameter {unknown[0]!r}; engine options are {', '.join(known)}",
            field=unknown[0],
        )
    return {name: None if value is None else _RULES[name](name, value) for name, value in options.items()}


def _set_threads(device, n_params: int) -> None:
    import torch

    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    if n_params < TINY_MAX_PARAMS:
        # Toy matmuls gain little from threads, and on a busy machine (notebook, CI, other
        # jobs) OpenMP threads spinning for a shared core made steps 15x slower in our tests.
        torch.set_num_threads(1)
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        import psutil

        cores = min(cores, psutil.cpu_count(logical=False) or cores)
    except ImportError:
        pass
    # One thread per physical core: hyper-threads only add contention in matmuls.
    torch.set_num_threads(max(1, cores))


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _rng_state() -> dict:
    """The random generators' states, as transformers' Trainer saves them (``rng_state.pth``) and reads them back
    when it resumes."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state()
    return state


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file: a full disk then raises OSError(ENOSPC), not an opaque RuntimeError."""
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk is full; safetensors reports it only in its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc) \
                or "os error 28" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def output_failure(exc: BaseException, out: Path, metrics_file: Path | None = None) -> UserError | None:
    """The one-line reason for a failure caused by the job folder vanishing or the disk filling up, else None."""
    out = Path(out)
    gone = out if not out.is_dir() else metrics_file if metrics_file is not None and not metrics_file.is_file() \
        else None
    if gone is not None:
        return UserError(f"{gone} was removed while the job was running, so its metrics and checkpoints are lost; "
                         "submit the job again (to a folder that stays)", field="output_uri")
    if _disk_full(exc):
        return UserError(f"no space left on device in {out}; free some space, then job.resume() continues from "
                         "the last checkpoint", field="output_uri")
    return None


@contextmanager
def _job_writes(out: Path, metrics_file: Path | None):
    """Turn a write that failed because the job folder vanished, or the disk is full, into a one-line UserError."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        failure = output_failure(exc, out, metrics_file)
        if failure is None:
            raise
        raise failure from None


def _default_max_seq_len(model_config, base_name: str) -> int:
    from ... import catalog

    limits = [MAX_SEQ_LEN_CAP]
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    mpe = getattr(text, "max_position_embeddings", None)
    if mpe:
        limits.append(int(mpe))
    entry = catalog.find(base_name)
    if entry is not None:
        limits.append(entry.max_seq_len)
    return min(limits)


def _loss_and_accuracy(logits, labels):
    """Summed next-token cross-entropy over labelled positions, the number of them, and how many were right."""
    import torch.nn.functional as F

    target = labels[:, 1:]
    keep = target != -100
    picked = logits[:, :-1][keep].float()
    tgt = target[keep]
    loss_sum = F.cross_entropy(picked, tgt, reduction="sum")
    correct = int((picked.argmax(-1) == tgt).sum())
    return loss_sum, int(keep.sum()), correct


def _best_checkpoint(out: Path, with_validation: bool) -> tuple[Path, str | None]:
    """The checkpoint to keep when stopping early, and why: by the task metric scored during tuning where there
    is one (the highest, the earlier on a tie, as ``job.best_checkpoint()`` picks), else the lowest validation
    loss (the later on a tie), else the latest."""
    from ...evaluation.during import NOT_TASK
    from ...evaluation.stats import highest
    from .metrics import read_metrics

    found = ckpt.list_checkpoints(out)
    rows = read_metrics(out)
    task = next((k for row in rows for k in row if k.startswith(PREFIX) and k not in NOT_TASK), None)
    if task is not None:
        scores = {row["step"]: row[task] for row in rows if task in row}
        by_name = {p.name: scores[int(p.name.split("-")[1])] for p in found if int(p.name.split("-")[1]) in scores}
        best = highest(by_name)
        if best is not None:
            return ckpt.checkpoints_dir(out) / best, f"best {task[len(PREFIX):]}, {by_name[best]:.4g}"
    if with_validation:
        scored = [(ckpt.read_state(p).get("eval_loss"), i, p) for i, p in enumerate(found)]
        scored = [(loss, i, p) for loss, i, p in scored if loss is not None]
        if scored:
            loss, _, best = min(scored, key=lambda t: (t[0], -t[1]))
            return best, f"lowest validation loss, {loss:.4g}"
    return found[-1], None


def _asked(check) -> bool:
    """``check()`` as a bool (False without one); a callback that fails counts as False: it must not end a long
    run."""
    try:
        return bool(check and check())
    except Exception:  # noqa: BLE001
        return False


def _save_weights(model, tokenizer, folder: Path, mode: str) -> None:
    """A checkpoint's weights into ``folder``: the adapter alone for LoRA, the whole model for full tuning, and
    the tokenizer."""
    from .models import save_model

    if mode == PEFT:
        model.save_pretrained(folder)
    else:
        save_model(model, folder)
    tokenizer.save_pretrained(folder)


def _save_final(model, tokenizer, folder: Path, mode: str) -> None:
    """The tuned model into ``folder``, ready to serve: for LoRA the adapter in ``adapter/`` and the model with it
    merged beside it; its KV cache on; the tokenizer with each."""
    from .models import save_model

    if mode == PEFT:
        _save_weights(model, tokenizer, folder / "adapter", mode)
        if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
            # QLoRA: the adapter merges into the base weights in 16 bits, not into their 4-bit copies.
            import torch

            from .models import load_model_and_tokenizer

            model, _ = load_model_and_tokenizer(str(folder / "adapter"), dtype=torch.bfloat16, device="cpu")
        else:
            model = model.merge_and_unload()
    model.config.use_cache = True
    save_model(model, folder)
    tokenizer.save_pretrained(folder)


def _score(evaluator, model, tokenizer, label: str, folder: str | None, *, step: int, epoch, metrics, emit) -> None:
    """Evaluation during tuning: ``evaluator`` scores the model as it is now (in eval mode, its KV cache on, no
    gradients), and its scores become a metrics row ``eval_<metric>`` at ``step``; nothing without an evaluator."""
    import torch

    if evaluator is None:
        return
    emit({"event": "substate", "substate": "EVALUATING"})
    model.eval()
    model.config.use_cache = True
    try:
        with torch.no_grad():
            scores = evaluator(model, tokenizer, label, folder)
    finally:
        model.config.use_cache = False
        model.train()
    row = {"step": step, "epoch": epoch, **{PREFIX + name: round(value, 6) for name, value in scores.items()}}
    metrics.write(row)
    emit({"event": "metrics", **row})
    emit({"event": "substate", "substate": "TUNING"})


def _load_weights(model, folder: Path, mode: str, device) -> None:
    """Put the trained weights of checkpoint ``folder`` into ``model`` (the adapter's alone for LoRA)."""
    from safetensors.torch import load_file

    if mode == PEFT:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors"), device=str(device)))
        return
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(shard), device=str(device)))
    # Tied weights (the output layer shares the embeddings) are saved once, so strict loading would refuse.
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"{folder} holds weights the model does not have: {unexpected[:3]}")


#: TRL's and transformers' log names -> the job's metric names.
_LOGGED = {"loss": "train_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
           "mean_token_accuracy": "token_accuracy", "num_tokens": "trained_tokens", "eval_loss": "eval_loss",
           "eval_mean_token_accuracy": "eval_token_accuracy",
           "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
           "eval_rewards/margins": "eval_reward_margin", "eval_rewards/accuracies": "eval_reward_accuracy"}


def _precision(config: TrainConfig, device) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: bf16 mixed precision on GPUs that have it, fp16 on those that do not
    (a Colab T4), float32 on a CPU; ``bf16=True`` on a GPU without it is a one-line error."""
    import torch

    if device.type != "cuda":
        return "fp32"
    has_bf16 = torch.cuda.is_bf16_supported()
    if config.bf16 and not has_bf16:
        raise UserError(f"bf16=True, but {torch.cuda.get_device_name(device)} has no bfloat16; leave bf16 unset "
                        "(fp16 mixed precision is used on this GPU)", field="bf16")
    if config.bf16 is False:
        return "fp32"
    return "bf16" if has_bf16 else "fp16"


def _training_args(config: TrainConfig, *, out: Path, device, lr: float, total_steps: int, precision: str,
                   n_params: int) -> dict:
    """What every engine job gives its TRL trainer: the job's hyperparameters, and the trainer's own saving,
    logging, evaluation and progress bars off (the engine keeps them, see :func:`_run`)."""
    from .memory import CHECKPOINTING_MIN_PARAMS

    warmup = int(round(total_steps * float(config.warmup_ratio)))
    schedule = "constant_with_warmup" if config.lr_scheduler == "constant" and warmup else config.lr_scheduler
    return dict(
        output_dir=str(out / ".trl"), per_device_train_batch_size=int(config.batch_size),
        per_device_eval_batch_size=int(config.batch_size), gradient_accumulation_steps=int(config.gradient_accumulation_steps),
        num_train_epochs=int(config.epochs), learning_rate=lr, lr_scheduler_type=schedule, warmup_steps=warmup,
        weight_decay=float(config.weight_decay), max_grad_norm=float(config.max_grad_norm), seed=int(config.seed),
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device.type == "cpu",
        # Recompute activations in the backward pass for big models: they would not fit otherwise.
        activation_checkpointing=n_params >= CHECKPOINTING_MIN_PARAMS,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=device.type == "cuda")


def _run(trainer, *, config: TrainConfig, mode: str, tokenizer, lr: float, start: Path | None, resume: bool, emit,
         should_stop, should_stop_early, evaluator, precision: str = "fp32") -> TrainResult:
    """Train with ``trainer`` (a TRL trainer), keeping what the engine promises every job from inside its loop.

    A ``TrainerCallback`` writes a metrics row per step (and per evaluation) to ``metrics.jsonl`` and TensorBoard,
    emits progress, checks cancel before each step and Stop early after it, fails a diverged run in one line
    before any checkpoint holds its weights, evaluates on the validation set at each epoch's end and writes a
    checkpoint (whole or not at all, in the service's layout, at most 10) after each epoch it keeps, with what
    transformers needs to resume exactly (optimizer, schedule, random generators, trainer state); evaluation
    during tuning scores the model at step 0 and at each checkpoint. ``start`` is the checkpoint to resume from.
    In a data-parallel job (``gpus``) every rank runs this; only the first writes, and its cancel and Stop early
    are every rank's.
    """
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from .metrics import MetricsWriter

    out = Path(config.output_dir)
    epochs = int(config.epochs)
    # From the examples the trainer kept (TRL drops preference pairs whose prompt alone fills max_seq_len).
    steps_per_epoch = _steps_per_epoch(config, len(trainer.train_dataset))
    total_steps = steps_per_epoch * epochs
    keep_epochs = set(ckpt.checkpoint_epochs(epochs))
    begin = int(ckpt.read_state(start)["global_step"]) if start is not None else 0
    world, main = _world()
    with _job_writes(out, None):
        metrics = MetricsWriter(out, keep_until_step=begin if resume else None) if main else _Unwritten()
    if start is not None:
        emit({"event": "resumed", "step": begin, "epoch": begin // steps_per_epoch, "checkpoint": str(start)})
    run = {"early": False, "last": {}, "eval_step": None, "t0": None, "time": 0.0, "total_real": 0,
           "total_padded": 0, "speed": {}}
    accum = int(config.gradient_accumulation_steps)
    batches_per_epoch = math.ceil(math.ceil(len(trainer.train_dataset) / int(config.batch_size)) / world)
    counted = collections.deque()  # (real, padded) tokens of each batch collated, in order
    collate = trainer.data_collator

    def counting(features):
        """The trainer's collator, counting each batch's real and padded tokens (for tokens/s and the padding
        share; the data loader collates a batch ahead, so a step takes its own batches from the front)."""
        batch = collate(features)
        if "attention_mask" in batch and "input_ids" in batch:
            counted.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        elif "input_ids" in batch and "position_ids" in batch:  # padding-free: one sequence, no padding
            counted.append((batch["input_ids"].numel(), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting

    def save_checkpoint(step: int, epoch) -> None:
        if not main:
            return
        target = ckpt.checkpoints_dir(out) / f"checkpoint-{step}"
        metrics.check()  # a vanished job folder must not be made again by the write below
        with atomic_folder(target) as tmp:
            _save_weights(trainer.model, tokenizer, tmp, mode)
            _torch_save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
            _torch_save(trainer.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            _torch_save(_rng_state(), tmp / "rng_state.pth")
            trainer.state.save_to_json(str(tmp / ckpt.TRAINER_STATE))
        emit({"event": "checkpoint", "path": str(target), "step": step, "epoch": epoch})
        score(target.name, str(target), step, epoch)

    def score(label: str, folder: str | None, step: int, epoch) -> None:
        if main:
            _score(evaluator, trainer.model, tokenizer, label, folder, step=step, epoch=epoch, metrics=metrics,
                   emit=emit)

    def validate() -> None:
        before = len(counted)
        trainer.evaluate()
        while len(counted) > before:  # the validation batches went through the same collator: not training's
            counted.pop()
        run["eval_step"] = trainer.state.global_step

    class Bridge(TrainerCallback):
        """The engine's promises, kept from inside the trainer's loop."""

        def on_train_begin(self, args, state, control, **kwargs):
            run["t0"] = time.perf_counter()
            seen = [row["num_tokens"] for row in state.log_history if "num_tokens" in row]
            if seen and hasattr(trainer, "_total_train_tokens"):  # resumed: TRL's count starts again at 0
                trainer._total_train_tokens = int(seen[-1])

        def on_step_begin(self, args, state, control, **kwargs):
            if _agreed(_asked(should_stop), args.device):
                raise TrainingCancelled(f"cancelled at step {state.global_step}")

        def on_step_end(self, args, state, control, **kwargs):
            # A step's time runs from the end of the one before (its batches' collation and its metrics row
            # included), leaving out only evaluation and checkpoint writing at an epoch's end.
            if trainer.args.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt, run["t0"] = max(now - run["t0"], 1e-9), now
            within = (state.global_step - 1) % steps_per_epoch  # this step's place in its epoch
            mine = [counted.popleft() for _ in range(min(accum, batches_per_epoch - within * accum))
                    if counted]
            # This process's batches; the other ranks' are as many, of about the same lengths.
            real, padded = world * sum(r for r, _ in mine), world * sum(p for _, p in mine)
            run.update(time=run["time"] + dt, total_real=run["total_real"] + real,
                       total_padded=run["total_padded"] + padded)
            run["speed"] = {"tokens_per_second": round(real / dt, 1),
                            "padding_share": round((padded - real) / max(1, padded), 6)} if padded else {}
            run["skipped"] = bool(getattr(trainer.accelerator, "optimizer_step_was_skipped", False))
            if state.global_step < total_steps and _agreed(_asked(should_stop_early), args.device):
                run["early"] = control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            epoch = round(float(state.epoch or 0), 4)
            row = {"step": state.global_step, "epoch": int(epoch) if epoch.is_integer() else epoch}
            row.update({ours: round(float(logs[theirs]), 6) if theirs != "learning_rate" else float(logs[theirs])
                        for theirs, ours in _LOGGED.items() if isinstance(logs.get(theirs), (int, float))})
            training = "train_loss" in row
            if training:
                loss, norm = row["train_loss"], row.get("grad_norm", 0.0)
                # fp16's loss scaling skips a step whose gradients overflowed, and lowers the scale: not divergence.
                overflow = precision == "fp16" and run.get("skipped") and math.isfinite(loss)
                if not (math.isfinite(loss) and (math.isfinite(norm) or overflow)):
                    # Diverged: the run ends here, before any checkpoint or final model holds these weights.
                    what = f"the gradient norm became {norm:g}" if math.isfinite(loss) else f"the loss became {loss:g}"
                    raise UserError(f"training diverged: {what} at step {state.global_step} with learning_rate "
                                    f"{row.get('learning_rate', lr):g}; lower learning_rate (or "
                                    "learning_rate_multiplier)", field="learning_rate")
                row.update(run["speed"])
            if len(row) > 2:
                run["last"].update(row)
                metrics.write(row)
                emit({"event": "metrics", **row})
            if training:
                emit({"event": "progress", "step": state.global_step, "total_steps": total_steps,
                      "epoch": row["epoch"], "epochs": epochs,
                      "fraction": round(state.global_step / max(1, total_steps), 6)})

        def on_epoch_end(self, args, state, control, **kwargs):
            step = state.global_step
            if run["early"] or step % steps_per_epoch or step == begin:
                return  # stopped inside an epoch, or nothing trained
            epoch = step // steps_per_epoch
            if trainer.eval_dataset is not None:
                validate()
            if epoch in keep_epochs:
                if _agreed(_asked(should_stop), args.device):
                    raise TrainingCancelled(f"cancelled at step {step}")
                save_checkpoint(step, epoch)
            run["t0"] = time.perf_counter()

    trainer.remove_callback(PrinterCallback)  # it prints every log line
    trainer.add_callback(Bridge())
    note = None
    try:
        with _job_writes(out, metrics.path):
            emit({"event": "substate", "substate": "TUNING"})
            if begin == 0:  # the model it starts from, scored as each checkpoint will be
                score("base", None, 0, 0)
            trainer.train(resume_from_checkpoint=str(start) if start is not None else None)
            step = trainer.state.global_step
            if _agreed(_asked(should_stop), trainer.args.device):
                raise TrainingCancelled(f"cancelled at step {step}")
            if run["early"] and trainer.eval_dataset is not None and run["eval_step"] != step:
                validate()  # (every rank takes part)
            if not main:
                return _result(trainer, run, config, lr, None, None)
            if run["early"]:  # this step's checkpoint, then the best so far becomes final
                epoch = round(float(trainer.state.epoch or 0), 4)
                if not (ckpt.checkpoints_dir(out) / f"checkpoint-{step}").is_dir():
                    save_checkpoint(step, epoch)
                best, reason = _best_checkpoint(out, trainer.eval_dataset is not None)
                if best.name != f"checkpoint-{step}":
                    _load_weights(trainer.model, best, mode, trainer.args.device)
                note = f"stopped early at step {step} of {total_steps}; final is {best.name}" + \
                    (f" ({reason})" if reason else "")
            emit({"event": "substate", "substate": "POST_PROCESSING"})
            metrics.check()
            with atomic_folder(ckpt.final_dir(out)) as tmp:
                _save_final(trainer.model, tokenizer, tmp, mode)
            metrics.check()  # the run is only a success if what it wrote is still there
    finally:
        metrics.close()
        if main:
            shutil.rmtree(out / ".trl", ignore_errors=True)
    return _result(trainer, run, config, lr, start, note)


class _Unwritten:
    """The metrics of a rank that does not write (a data-parallel job's others): nothing kept."""

    path = None

    def write(self, row: dict) -> None:
        pass

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


def _result(trainer, run: dict, config: TrainConfig, lr: float, start: Path | None, note: str | None) -> TrainResult:
    out = Path(config.output_dir)
    last = run["last"]
    done = ckpt.read_state(start) if start is not None else {}
    return TrainResult(
        final_dir=str(ckpt.final_dir(out)), steps=trainer.state.global_step, epochs=int(config.epochs),
        train_loss=last.get("train_loss", done.get("train_loss")), eval_loss=last.get("eval_loss", done.get("eval_loss")),
        tokens_per_second=round(run["total_real"] / run["time"], 1) if run["time"] else 0.0,
        padding_share=round((run["total_padded"] - run["total_real"]) / run["total_padded"], 6)
        if run["total_padded"] else 0.0,
        checkpoints=[str(p) for p in ckpt.list_checkpoints(out)], learning_rate=lr,
        metrics_path=str(out / METRICS_FILE), note=note)


def _gpu_loading(config: TrainConfig, compute_dtype) -> dict:
    """``from_pretrained``'s options for the job's GPU options (:data:`GPU_OPTIONS`, checked before)."""
    options = {}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
    if config.kernels:
        options["use_kernels"] = True
    if config.padding_free:
        options["attn_implementation"] = "flash_attention_2"
    return options


def _world() -> tuple[int, bool]:
    """(processes training this job, whether this one is the first: the one that writes)."""
    return int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0") == "0"


#: Seconds a data-parallel job waits, once another of its processes has failed, for its first process to end on
#: its own (the same error reaches every process) before it is ended for that failure.
RANK_FAILURE_GRACE = 5.0


@contextmanager
def _ranks(config: TrainConfig, *, resume: bool, method: str = "supervised", beta: float | None = None,
           on_failure: Callable[[str], None] | None = None):
    """``gpus=N``: this process trains as rank 0 of N, and starts ranks 1..N-1 (``python -m .rank``, the same job
    without callbacks), one per GPU, joined by torch.distributed through the environment accelerate reads. Only
    rank 0 writes (metrics, checkpoints, the final model); it decides cancel and Stop early for all. The other
    ranks end with it: they are stopped when it fails or is cancelled, and they watch it. When one of them fails
    (its log is ``rank-<i>.log`` in the job folder), ``on_failure(message)`` is called (the worker records the
    failure and ends); without one, training is interrupted and the failure raised as a UserError."""
    import _thread
    import socket
    import subprocess
    import sys
    import threading
    from dataclasses import asdict

    n = int(config.gpus or 1)
    if n == 1 or "RANK" in os.environ:
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n)}
    spec = json.dumps({"config": asdict(config), "method": method, "resume": resume, "beta": beta})
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    logs = [Path(config.output_dir) / f"rank-{i}.log" for i in range(1, n)]
    others = []
    for i, log in enumerate(logs, 1):
        with open(log, "wb") as fh:
            others.append(subprocess.Popen([sys.executable, "-m", "tuning_magics.backends.local.rank", spec],
                                           env={**os.environ, **env, "RANK": str(i), "LOCAL_RANK": str(i)},
                                           stdout=subprocess.DEVNULL, stderr=fh))
    failed: list[str] = []
    ended = threading.Event()

    def failure(i: int, code: int) -> str:
        lines = [line for line in logs[i - 1].read_text(errors="replace").splitlines() if line.strip()]
        why = f": {lines[-1].strip()[:200]}" if lines else ""
        return f"training process {i + 1} of {n} ended with exit code {code}{why}; its log is {logs[i - 1]}"

    def watch() -> None:
        while not ended.wait(1.0):
            for i, proc in enumerate(others, 1):
                if proc.poll() not in (None, 0):
                    if ended.wait(RANK_FAILURE_GRACE):
                        return  # the job ended on its own (the same error in every process)
                    failed.append(failure(i, proc.returncode))
                    for other in others:
                        if other.poll() is None:
                            other.kill()
                    if on_failure is not None:
                        on_failure(failed[0])
                    _thread.interrupt_main()
                    return

    # (accelerate sets the thread variables for processes on CPUs)
    saved = {k: os.environ.get(k) for k in (*env, "RANK", "LOCAL_RANK", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(env, RANK="0", LOCAL_RANK="0")
    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
        for proc in others:
            proc.wait(timeout=600)
    except KeyboardInterrupt:
        if failed:
            raise UserError(failed[0], field="gpus") from None
        raise
    finally:
        ended.set()
        for proc in others:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import torch.distributed as dist
        from accelerate.state import AcceleratorState, PartialState

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(True)  # the next job of this process starts on its own
        PartialState._reset_state()


def _failed_with(on_event):
    """A data-parallel job's ``on_failure``: the ``failed`` event to whoever runs the job (the worker records it)."""
    if on_event is None:
        return None
    return lambda message: on_event({"event": "failed", "error": message})


def _agreed(flag: bool, device) -> bool:
    """Rank 0's ``flag``, the same on every rank of a data-parallel job (``flag`` itself with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    import torch

    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, 0)
    return bool(value.item())


def _rank_device(config: TrainConfig):
    """The device this process trains on: the job's, or in a data-parallel job on GPUs this rank's own."""
    from .models import default_device

    device = default_device(config.device)
    if device.type == "cuda" and _world()[0] > 1:
        import torch

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _steps_per_epoch(config: TrainConfig, examples: int) -> int:
    """Optimizer steps in an epoch: the batches, shared among a data-parallel job's processes, accumulated."""
    batches = math.ceil(math.ceil(examples / int(config.batch_size)) / _world()[0])
    return math.ceil(batches / int(config.gradient_accumulation_steps))


def _single_device(args, device) -> None:
    """A one-process job trains on its one GPU: transformers would spread it over every GPU it sees
    (``nn.DataParallel``, which TRL refuses) and always from ``cuda:0``."""
    if device.type != "cuda" or _world()[0] > 1:
        return
    import torch

    torch.cuda.set_device(device)
    _ = args.device  # transformers sets its devices up once, then keeps them
    args._n_gpu = 1
    args.__dict__["_setup_devices"] = device


def _start(config: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint a job continues from (``resume``: the last complete one), after settling a crashed writer's
    leftovers; a job that starts over loses its old checkpoints."""
    out = Path(config.output_dir)
    if not _world()[1]:  # another rank: the first one settles the folder
        return ckpt.latest_checkpoint(out) if resume else None
    ckpt.remove_stale_temp(out)
    if resume:
        latest = ckpt.latest_checkpoint(out)
        if latest is not None and "log_history" not in ckpt.read_state(latest):
            raise UserError(f"{latest.name} was written by an earlier version of the engine and cannot be resumed "
                            f"step for step; tune again from it with custom_base_model='{latest}'",
                            field="resume")
        return latest
    shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)
    return None


def _lora(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=int(config.adapter_size), lora_alpha=int(config.lora_alpha or 2 * config.adapter_size),
                      lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM", bias="none")


def train(config: TrainConfig, *, on_event: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, should_stop_early: Callable[[], bool] | None = None,
          resume: bool = False, evaluator: Callable | None = None) -> TrainResult:
    """Fine-tune ``config.base_model`` (or ``config.custom_base_model``) on ``config.train_path``, with TRL's
    ``SFTTrainer``.

    The trainer is handed exactly the tokens and labels the dataset report's preview shows
    (:func:`tuning_magics.datasets.render.render`), in length-grouped batches.
    Raises :class:`TrainingCancelled` when ``should_stop()`` turns True (the last
    complete checkpoint stays usable for ``resume=True``). When ``should_stop_early()``
    turns True, training ends after the step in progress: a checkpoint of that step
    is written (evaluated first when there is a validation set), the best checkpoint
    so far becomes ``final`` and the result's ``note`` says so. ``evaluator(model, tokenizer, label, folder)``
    (evaluation during tuning, see :class:`.answer.CheckpointEvaluator`) scores the model before the first step
    and after each checkpoint; its scores are metrics rows ``eval_<metric>``. Raises UserError for
    anything the user can fix (missing weights, unreadable data, not enough memory).
    """
    config.check()
    with _ranks(config, resume=resume, on_failure=_failed_with(on_event)):
        return _train(config, on_event=on_event, should_stop=should_stop, should_stop_early=should_stop_early,
                      resume=resume, evaluator=evaluator)


def _train(config: TrainConfig, *, on_event, should_stop, should_stop_early, resume: bool, evaluator) -> TrainResult:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from ...datasets.formats import read_conversations
    from . import data as D
    from .memory import check_fits, param_count
    from .models import load_config, load_model_and_tokenizer, load_tokenizer

    mode = normalise_mode(config.tuning_mode)
    emit = on_event or (lambda event: None)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    emit({"event": "substate", "substate": "PROCESSING_DATASET"})
    device = _rank_device(config)
    _seed_all(config.seed)
    source = config.custom_base_model or config.base_model
    model_config = load_config(source)
    tokenizer = load_tokenizer(source)
    max_len = int(config.max_seq_len or _default_max_seq_len(model_config, config.base_model))
    try:
        train_convs = read_conversations(config.train_path)
        val_convs = read_conversations(config.validation_path) if config.validation_path else []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the dataset ({exc}); validate it with %dataset first", field="train_path") \
            from None
    train_set, dropped = D.encode_all(tokenizer, train_convs, max_len)
    val_set, _ = D.encode_all(tokenizer, val_convs, max_len)
    if not train_set:
        raise UserError("no training example has an assistant reply to learn; every example needs one",
                        field="train_path")
    emit({"event": "dataset", "examples": len(train_set), "dropped": dropped, "validation_examples": len(val_set),
          "tokens": sum(len(e) for e in train_set), "loss_tokens": sum(e.loss_tokens for e in train_set),
          "max_seq_len": max_len})

    n_params = param_count(model_config)
    _set_threads(device, n_params)
    precision = _precision(config, device)
    # Frozen base weights of a LoRA run on GPU can live in half precision; trained weights stay float32.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    weight_dtype = half if (half is not None and mode == PEFT) else torch.float32
    if config.check_memory:
        check_fits(model_config, mode, max(len(e) for e in train_set), config.batch_size, weight_dtype,
                   device=device, adapter_size=config.adapter_size, model_name=source)
    start = _start(config, resume)
    model, _ = load_model_and_tokenizer(source, dtype=weight_dtype, device=device,
                                        **_gpu_loading(config, half or torch.float16))
    lr = float(config.learning_rate or DEFAULT_LEARNING_RATES[
        ("tiny" if n_params < TINY_MAX_PARAMS else "real", mode)]) * float(config.learning_rate_multiplier)
    steps_per_epoch = _steps_per_epoch(config, len(train_set))

    def rows(examples):
        return datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                           "labels": [e.labels for e in examples]}) if examples else None

    lengths = [len(e) for e in train_set]

    class Engine(SFTTrainer):
        """TRL's SFTTrainer with the engine's length-grouped batches: little padding, a new order each epoch."""

        def _get_train_sampler(self, train_dataset=None):
            return D.LengthGroupedSampler(lengths, int(config.batch_size), int(config.seed))

    args = SFTConfig(max_length=max_len, dataset_kwargs={"skip_prepare_dataset": True},
                     padding_free=bool(config.padding_free),
                     **_training_args(config, out=out, device=device, lr=lr, total_steps=steps_per_epoch * int(
                         config.epochs), precision=precision, n_params=n_params))
    _single_device(args, device)
    trainer = Engine(model=model, args=args, train_dataset=rows(train_set), eval_dataset=rows(val_set),
                     processing_class=tokenizer, peft_config=_lora(config) if mode == PEFT else None)
    return _run(trainer, config=config, mode=mode, tokenizer=tokenizer, lr=lr, start=start, resume=resume, emit=emit,
                should_stop=should_stop, should_stop_early=should_stop_early, evaluator=evaluator,
                precision=precision)
