"""Supervised fine-tuning on this machine: full tuning or LoRA, with transformers and PEFT.

``train(TrainConfig(...))`` reads a local JSONL file in any accepted format,
renders it with the model's chat template, learns only the assistant's tokens,
writes a metrics line per step to ``<output_dir>/metrics.jsonl`` and checkpoints
in the managed service's layout (see :mod:`.checkpoints`), and returns a
:class:`TrainResult`. ``on_event`` receives every metrics line and markers of the
job's sub-state; ``should_stop`` cancels between steps; ``should_stop_early`` ends
training after the current step and keeps the best checkpoint so far as ``final``
(:attr:`TrainResult.note` says which); ``resume=True`` continues from the last
complete checkpoint.

Events passed to ``on_event`` (plain dicts):

- ``{"event": "substate", "substate": "PROCESSING_DATASET" | "TUNING" | "POST_PROCESSING"}``
- ``{"event": "dataset", "examples", "dropped", "validation_examples", "tokens", "loss_tokens", "max_seq_len"}``
- ``{"event": "metrics", "step", "epoch", "train_loss", "learning_rate", "token_accuracy",
  "tokens_per_second", "padding_share", "grad_norm"}`` (one per optimizer step)
- ``{"event": "metrics", "step", "epoch", "eval_loss", "eval_token_accuracy"}`` (one per epoch, with validation)
- ``{"event": "progress", "step", "total_steps", "epoch", "epochs", "fraction"}``
- ``{"event": "checkpoint", "path", "step", "epoch"}``
- ``{"event": "metrics", "step", "epoch", "eval_<metric>"...}`` (evaluation during tuning: at step 0 and after
  each checkpoint)
- ``{"event": "resumed", "step", "epoch", "checkpoint"}``
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from ... import params
from ...catalog import FULL, PEFT, normalise_mode
from ...errors import UserError
from ...storage import atomic_folder
from ...evaluation.during import PREFIX
from . import checkpoints as ckpt
from .metrics import METRICS_FILE, MetricsWriter

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

    def check(self) -> None:
        """Raise a one-line UserError naming the first option out of range, or a data file that is missing.

        Values that pass are kept in their plain type (a NumPy integer becomes an int).
        """
        normalise_mode(self.tuning_mode)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _RULES and not (value is None and f.name in _NONE_MEANS_DEFAULT):
                setattr(self, f.name, _RULES[f.name](f.name, value))
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
}
#: Options whose None means "the trainer's default".
_NONE_MEANS_DEFAULT = {"learning_rate", "lora_alpha", "max_seq_len", "bf16", "device"}
#: TrainConfig fields that tune() fills from its own parameters; the others are engine options.
OWN_FIELDS = frozenset({"base_model", "custom_base_model", "tuning_mode", "epochs", "learning_rate",
                        "learning_rate_multiplier", "adapter_size", "train_path", "validation_path", "output_dir"})


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
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(1.0, max(0.0, progress))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


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


def train(config: TrainConfig, *, on_event: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, should_stop_early: Callable[[], bool] | None = None,
          resume: bool = False, evaluator: Callable | None = None) -> TrainResult:
    """Fine-tune ``config.base_model`` (or ``config.custom_base_model``) on ``config.train_path``.

    Raises :class:`TrainingCancelled` when ``should_stop()`` turns True (the last
    complete checkpoint stays usable for ``resume=True``). When ``should_stop_early()``
    turns True, training ends after the step in progress: a checkpoint of that step
    is written (evaluated first when there is a validation set), the best checkpoint
    so far becomes ``final`` and the result's ``note`` says so. ``evaluator(model, tokenizer, label, folder)``
    (evaluation during tuning, see :class:`.answer.CheckpointEvaluator`) scores the model before the first step
    and after each checkpoint; its scores are metrics rows ``eval_<metric>``. Raises UserError for
    anything the user can fix (missing weights, unreadable data, not enough memory).
    """
    import torch

    from ...datasets.formats import read_conversations
    from . import data as D
    from .memory import check_fits
    from .models import default_device, load_config, load_model_and_tokenizer, load_tokenizer

    config.check()
    mode = normalise_mode(config.tuning_mode)
    emit = on_event or (lambda event: None)
    stop = should_stop or (lambda: False)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def cancelled() -> bool:
        return _asked(stop)

    def early() -> bool:
        return _asked(should_stop_early)

    emit({"event": "substate", "substate": "PROCESSING_DATASET"})
    device = default_device(config.device)
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

    from .memory import param_count

    n_params = param_count(model_config)
    _set_threads(device, n_params)
    size_class = "tiny" if n_params < TINY_MAX_PARAMS else "real"
    use_bf16 = config.bf16
    if use_bf16 is None:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    # Frozen base weights of a LoRA run on GPU can live in bf16; trained weights stay float32.
    weight_dtype = torch.bfloat16 if (use_bf16 and mode == PEFT and device.type == "cuda") else torch.float32
    if config.check_memory:
        longest = max(len(e) for e in train_set)
        check_fits(model_config, mode, longest, config.batch_size, weight_dtype, device=device,
                   adapter_size=config.adapter_size, model_name=source)

    # Where to start: a checkpoint when resuming, else the base weights.
    ckpt.remove_stale_temp(out)
    start_ckpt = ckpt.latest_checkpoint(out) if resume else None
    if not resume:
        shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)
    state = ckpt.read_state(start_ckpt) if start_ckpt else None

    load_from = start_ckpt if (start_ckpt is not None and mode == FULL) else source
    model, _ = load_model_and_tokenizer(str(load_from), dtype=weight_dtype, device=device)
    if mode == PEFT:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=int(config.adapter_size), lora_alpha=int(config.lora_alpha or 2 * config.adapter_size),
                          lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(model, lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if start_ckpt is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(start_ckpt / "adapter_model.safetensors"),
                                                       device=str(device)))
    if n_params >= 100_000_000:
        # Recompute activations in the backward pass: big models would not fit otherwise.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == PEFT:
            model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()

    lr = float(config.learning_rate or DEFAULT_LEARNING_RATES[(size_class, mode)]) * float(
        config.learning_rate_multiplier)
    batch_size, accum = int(config.batch_size), int(config.gradient_accumulation_steps)
    micro_per_epoch = math.ceil(len(train_set) / batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = steps_per_epoch * int(config.epochs)
    warmup = int(round(total_steps * float(config.warmup_ratio)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(config.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.lr_scheduler, warmup, total_steps))

    global_step, start_epoch = 0, 0
    if start_ckpt is not None:
        optimizer.load_state_dict(torch.load(start_ckpt / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(start_ckpt / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(start_ckpt / "rng_state.pth", weights_only=False))
        global_step, start_epoch = int(state["global_step"]), int(state["epoch"])
        emit({"event": "resumed", "step": global_step, "epoch": start_epoch, "checkpoint": str(start_ckpt)})
    with _job_writes(out, None):
        metrics = MetricsWriter(out, keep_until_step=global_step if resume else None)
    writes = _job_writes(out, metrics.path)

    keep_epochs = set(ckpt.checkpoint_epochs(int(config.epochs)))
    lengths = [len(e) for e in train_set]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (use_bf16 and device.type == "cuda") \
        else (lambda: torch.autocast("cpu", enabled=False))
    total_real = total_padded = 0
    total_time = 0.0
    last_loss = last_eval = None
    eval_step = None  # the step last_eval was measured at
    stopped_early = False
    note = None
    written: list[str] = [str(p) for p in ckpt.list_checkpoints(out)]

    def evaluate() -> tuple[float, float]:
        model.eval()
        loss_sum, n, right = 0.0, 0, 0
        order = sorted(range(len(val_set)), key=lambda i: len(val_set[i]))
        with torch.no_grad():
            for j in range(0, len(order), batch_size):
                ids, mask, labels, _ = D.collate([val_set[i] for i in order[j:j + batch_size]], pad_id)
                ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                with autocast():
                    logits = model(input_ids=ids, attention_mask=mask).logits
                ls, k, c = _loss_and_accuracy(logits, labels)
                loss_sum += float(ls)
                n += k
                right += c
        model.train()
        return loss_sum / max(1, n), right / max(1, n)

    def run_evaluation(epoch) -> None:
        nonlocal last_eval, eval_step
        last_eval, eval_acc = evaluate()
        eval_step = global_step
        row = {"step": global_step, "epoch": epoch, "eval_loss": round(last_eval, 6),
               "eval_token_accuracy": round(eval_acc, 6)}
        metrics.write(row)
        emit({"event": "metrics", **row})

    def keep_best(epoch) -> str:
        """Stopping early: checkpoint this step, then load the best checkpoint so far for ``final``."""
        if val_set and eval_step != global_step:
            run_evaluation(epoch)
        if str(ckpt.checkpoints_dir(out) / f"checkpoint-{global_step}") not in written:
            save_checkpoint(epoch)
        best, reason = _best_checkpoint(out, bool(val_set))
        if best.name != f"checkpoint-{global_step}":
            _load_weights(model, best, mode, device)
        why = f" ({reason})" if reason is not None else ""
        return f"stopped early at step {global_step} of {total_steps}; final is {best.name}{why}"

    def save_checkpoint(epoch) -> None:
        target = ckpt.checkpoints_dir(out) / f"checkpoint-{global_step}"
        metrics.check()  # a vanished job folder must not be made again by the write below
        with atomic_folder(target) as tmp:
            _save_weights(model, tokenizer, tmp, mode)
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
            _torch_save(_rng_state(), tmp / "rng_state.pth")
            (tmp / ckpt.TRAINER_STATE).write_text(json.dumps({
                "global_step": global_step, "epoch": epoch, "epochs": int(config.epochs),
                "steps_per_epoch": steps_per_epoch, "train_loss": last_loss, "eval_loss": last_eval,
                "tuning_mode": mode, "learning_rate": lr, "config": asdict(config),
            }, indent=2), encoding="utf-8")
        written.append(str(target))
        emit({"event": "checkpoint", "path": str(target), "step": global_step, "epoch": epoch})
        score(epoch, target.name, str(target))

    def score(epoch, label: str, folder: str | None) -> None:
        _score(evaluator, model, tokenizer, label, folder, step=global_step, epoch=epoch, metrics=metrics, emit=emit)

    try:
        with writes:
            emit({"event": "substate", "substate": "TUNING"})
            if global_step == 0:
                score(0, "base", None)
            for epoch in range(start_epoch, int(config.epochs)):
                batches = D.length_grouped_batches(lengths, batch_size, config.seed * 1000 + epoch)
                for s in range(0, len(batches), accum):
                    if cancelled():
                        raise TrainingCancelled(f"cancelled at step {global_step}")
                    group = [[train_set[i] for i in b] for b in batches[s:s + accum]]
                    group_loss_tokens = sum(sum(max(0, e.loss_tokens) for e in b) for b in group)
                    t0 = time.perf_counter()
                    loss_sum, n_tok, n_right, real, padded = 0.0, 0, 0, 0, 0
                    for b in group:
                        ids, mask, labels, pads = D.collate(b, pad_id)
                        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                        with autocast():
                            logits = model(input_ids=ids, attention_mask=mask).logits
                        ls, k, c = _loss_and_accuracy(logits, labels)
                        # Normalise by the whole group's loss tokens so accumulation equals one big batch.
                        (ls / max(1, group_loss_tokens)).backward()
                        loss_sum += float(ls.detach())
                        n_tok += k
                        n_right += c
                        padded += ids.numel()
                        real += ids.numel() - pads
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(config.max_grad_norm))
                    step_lr = optimizer.param_groups[0]["lr"]
                    if not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm))):
                        # Diverged: stop before the weights turn to NaN, so no checkpoint holds them.
                        what = (f"the gradient norm became {float(grad_norm):g}" if math.isfinite(loss_sum)
                                else f"the loss became {loss_sum:g}")
                        raise UserError(
                            f"training diverged: {what} at step {global_step + 1} with "
                            f"learning_rate {step_lr:g}; lower learning_rate (or learning_rate_multiplier)",
                            field="learning_rate")
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = max(time.perf_counter() - t0, 1e-9)
                    total_time += dt
                    total_real += real
                    total_padded += padded
                    last_loss = loss_sum / max(1, n_tok)
                    row = {
                        "step": global_step,
                        "epoch": round(epoch + (s // accum + 1) / steps_per_epoch, 4),
                        "train_loss": round(last_loss, 6),
                        "learning_rate": step_lr,
                        "token_accuracy": round(n_right / max(1, n_tok), 6),
                        "tokens_per_second": round(real / dt, 1),
                        "padding_share": round((padded - real) / max(1, padded), 6),
                        "grad_norm": round(float(grad_norm), 6),
                    }
                    metrics.write(row)
                    emit({"event": "metrics", **row})
                    emit({"event": "progress", "step": global_step, "total_steps": total_steps,
                          "epoch": row["epoch"], "epochs": int(config.epochs),
                          "fraction": round(global_step / total_steps, 6)})
                    if global_step < total_steps and early():
                        stopped_early = True
                        break
                if stopped_early:
                    break
                if val_set:
                    run_evaluation(epoch + 1)
                if epoch + 1 in keep_epochs:
                    if cancelled():
                        raise TrainingCancelled(f"cancelled at step {global_step}")
                    save_checkpoint(epoch + 1)

            if cancelled():
                raise TrainingCancelled(f"cancelled at step {global_step}")
            if stopped_early:
                note = keep_best(row["epoch"])
            emit({"event": "substate", "substate": "POST_PROCESSING"})
            final = ckpt.final_dir(out)
            metrics.check()
            with atomic_folder(final) as tmp:
                _save_final(model, tokenizer, tmp, mode)
            metrics.check()  # the run is only a success if what it wrote is still there
    finally:
        metrics.close()

    if last_eval is None and state is not None:
        last_eval = state.get("eval_loss")
    return TrainResult(
        final_dir=str(ckpt.final_dir(out)),
        steps=global_step,
        epochs=int(config.epochs),
        train_loss=last_loss if last_loss is not None else (state or {}).get("train_loss"),
        eval_loss=last_eval,
        tokens_per_second=round(total_real / total_time, 1) if total_time else 0.0,
        padding_share=round((total_padded - total_real) / total_padded, 6) if total_padded else 0.0,
        checkpoints=[str(p) for p in ckpt.list_checkpoints(out)],
        learning_rate=lr,
        metrics_path=str(out / METRICS_FILE),
        note=note,
    )
