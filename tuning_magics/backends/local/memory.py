"""How much memory a tuning job needs, how much the machine has, and a check before training.

The estimate counts weights, gradients and AdamW's two moment buffers for the
trainable parameters, plus activations for one batch (the usual transformer
rule of thumb, about 34 values per hidden unit per token per layer, plus the
logits and their gradient). It errs on the high side: a refused job would
really have been slow or crashed.
"""

from __future__ import annotations

import re

from ...catalog import FULL, PEFT, normalise_mode
from ...errors import UserError
from ...machine import available_ram

GiB = 1024**3
_LORA_PROJECTIONS = 7  # q, k, v, o, gate, up, down
# Keep a margin for the framework itself, fragmentation and the rest of the machine.
_USABLE_SHARE = 0.9
#: Models at least this big are trained with gradient checkpointing.
CHECKPOINTING_MIN_PARAMS = 100_000_000


def _dtype_bytes(dtype) -> int:
    if dtype is None:
        return 4
    name = str(dtype).replace("torch.", "").lower()
    if name in ("bfloat16", "bf16", "float16", "fp16", "half"):
        return 2
    if name in ("float32", "fp32", "float", "auto"):
        return 4 if name != "auto" else 2
    if name in ("int8", "uint8", "float8"):
        return 1
    return 4


def _shape(config) -> dict:
    """Sizes from a transformers config (or a plain dict of the same names)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    if text is not None:  # multimodal wrappers keep the language model's sizes here
        return _shape(text)
    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads") or 1)
    head_dim = int(get("head_dim") or hidden // heads)
    kv = int(get("num_key_value_heads") or heads)
    inter = int(get("intermediate_size") or 4 * hidden)
    layers = int(get("num_hidden_layers"))
    vocab = int(get("vocab_size"))
    tied = bool(get("tie_word_embeddings", False))
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    mlp = 3 * hidden * inter
    params = layers * (attn + mlp) + vocab * hidden * (1 if tied else 2)
    lora_per_rank = layers * (
        (hidden + heads * head_dim) * 2 + (hidden + kv * head_dim) * 2 + 2 * (hidden + inter) + (inter + hidden)
    )
    return dict(hidden=hidden, layers=layers, vocab=vocab, params=params, lora_per_rank=lora_per_rank)


def _params_from_text(text: str) -> int | None:
    """``"8B"`` -> 8e9; ``"17B active / 109B"`` -> 109e9 (all weights must be in memory)."""
    values = [float(n) * {"B": 1e9, "M": 1e6}[u] for n, u in re.findall(r"([\d.]+)\s*([BM])", text or "")]
    return int(max(values)) if values else None


def _shape_for(model_config_or_id) -> dict:
    if not isinstance(model_config_or_id, str):
        return _shape(model_config_or_id)
    from ... import catalog

    entry = catalog.find(model_config_or_id)
    if entry is None or entry.provider == "local" or model_config_or_id.startswith(("/", ".", "~")):
        from .models import load_config

        return _shape(load_config(model_config_or_id))
    params = _params_from_text(entry.params)
    if params is None:
        from .models import load_config

        return _shape(load_config(model_config_or_id))
    # No config at hand: plausible sizes from the parameter count (about 12 * hidden^2 per layer,
    # deeper models as they grow).
    layers = 16 if params < 2e9 else 32 if params < 20e9 else 64
    hidden = int((params / 12 / layers) ** 0.5)
    return dict(hidden=hidden, layers=layers, vocab=150_000, params=params,
                lora_per_rank=layers * 7 * 2 * hidden * 2)


def param_count(model_config_or_id) -> int:
    """Approximate number of weights of a model (config, size dict, or id read offline)."""
    return int(_shape_for(model_config_or_id)["params"])


def estimate_memory(model_config_or_id, tuning_mode: str, max_seq_len: int, batch_size: int, dtype=None,
                    *, adapter_size: int = 8) -> int:
    """Bytes a tuning job needs: weights, gradients and AdamW states of trainable weights, and activations.

    ``model_config_or_id`` is a transformers config, a dict of its sizes, or a
    model id / folder whose config is read offline (catalog ids fall back to
    their advertised parameter count). ``dtype`` is the weights' dtype.
    """
    s = _shape_for(model_config_or_id)
    w = _dtype_bytes(dtype)
    mode = normalise_mode(tuning_mode)
    weights = s["params"] * w
    if mode == PEFT:
        trainable = s["lora_per_rank"] * int(adapter_size)
        # LoRA weights, their gradients and the two Adam moments stay in float32.
        states = trainable * 16
    else:
        # Gradients in the weights' dtype, Adam moments in float32.
        states = s["params"] * (w + 8)
    tokens = int(max_seq_len) * int(batch_size)
    act_bytes = 2 if w <= 2 else 4
    per_layer = tokens * s["hidden"] * 34 * act_bytes // 2
    if s["params"] >= CHECKPOINTING_MIN_PARAMS:
        # The trainer recomputes activations (gradient checkpointing) for models this big:
        # one hidden state per layer is kept, plus one layer's full activations.
        activations = tokens * s["hidden"] * s["layers"] * act_bytes + per_layer
    else:
        activations = per_layer * s["layers"]
    logits = tokens * s["vocab"] * 4 * 3  # float32 logits, their softmax and gradient
    overhead = 256 * 1024**2
    return int(weights + states + activations + logits + overhead)


def available_memory(device=None) -> int:
    """Free bytes on ``device``: GPU memory for a CUDA device, else available system RAM."""
    dev = str(device or "cpu")
    if dev.startswith("cuda"):
        import torch

        index = int(dev.split(":")[1]) if ":" in dev else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free)
    return available_ram()


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}".rstrip("0").rstrip(".") + " GiB" if n < 10 * GiB else f"{round(n / GiB)} GiB"


def check_fits(model_config_or_id, tuning_mode: str, max_seq_len: int, batch_size: int, dtype=None, *,
               device=None, adapter_size: int = 8, available: int | None = None, model_name: str | None = None,
               modes=None) -> int:
    """Raise a one-line UserError when the job would not fit in memory; return the estimate in bytes.

    The message says what would fit: LoRA instead of full tuning (where
    ``modes``, the tuning modes the model takes, has it; None: any), a smaller
    batch or sequence length, or a smaller model of the catalog.
    """
    tuning_mode = normalise_mode(tuning_mode)
    need = estimate_memory(model_config_or_id, tuning_mode, max_seq_len, batch_size, dtype,
                           adapter_size=adapter_size)
    have = available_memory(device) if available is None else int(available)
    usable = int(have * _USABLE_SHARE)
    if need <= usable:
        return need

    def fits(**kw) -> bool:
        args = dict(tuning_mode=tuning_mode, max_seq_len=max_seq_len, batch_size=batch_size)
        args.update(kw)
        return estimate_memory(model_config_or_id, args["tuning_mode"], args["max_seq_len"], args["batch_size"],
                               dtype, adapter_size=adapter_size) <= usable

    options = []
    mode = tuning_mode
    if mode == FULL and (modes is None or PEFT in modes) and fits(tuning_mode=PEFT):
        options.append(f"tuning_mode={PEFT}")
    if batch_size > 1 and fits(batch_size=1):
        options.append("batch_size=1")
    if max_seq_len > 512 and fits(batch_size=1, max_seq_len=512):
        options.append("batch_size=1 with max_seq_len=512")
    smaller = _smaller_model(model_config_or_id, model_name, tuning_mode, max_seq_len, batch_size, dtype,
                             adapter_size, usable)
    if smaller:
        options.append(f"a smaller model such as {smaller}")
    where = "the GPU" if str(device or "cpu").startswith("cuda") else "this machine"
    if options:
        advice = "use " + (", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0])
    else:
        advice = "use a machine with more memory or the vertex backend"
    name = model_name or (model_config_or_id if isinstance(model_config_or_id, str) else "this model")
    raise UserError(
        f"tuning {name} ({mode}, batch_size={batch_size}, max_seq_len={max_seq_len}) needs ~{_gib(need)} "
        f"but {where} has {_gib(have)} free: {advice}",
        field="tuning_mode",
    )


def _smaller_model(model, name, mode, seq, batch, dtype, adapter_size, usable) -> str | None:
    from ... import catalog

    key = name or (model if isinstance(model, str) else None)
    entry = catalog.find(key) if key else None
    try:
        own = _shape_for(model)["params"]
    except UserError:
        return None
    candidates = []
    for m in catalog.models(provider="open"):
        p = _params_from_text(m.params)
        if p is None or p >= own or (entry is not None and m.family != entry.family):
            continue
        found = None
        for b in dict.fromkeys((batch, 1)):
            for md in (FULL, PEFT):
                if found is None and md in m.modes and \
                        estimate_memory(m.id, md, seq, b, dtype, adapter_size=adapter_size) <= usable:
                    extra = ([] if md == mode else [md]) + ([] if b == batch else ["batch_size=1"])
                    found = m.id + (f" ({', '.join(extra)})" if extra else "")
        if found:
            candidates.append((p, found))
    if not candidates:
        return None
    return max(candidates)[1]
