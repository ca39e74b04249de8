"""Built-in tiny models and the loading of every model the local engine tunes.

A model is named by one of:

- ``local/tiny-qwen3``, ``local/tiny-llama``, ``local/tiny-gemma3``: real
  transformers architectures (Qwen3, Llama, Gemma 3) at toy size with the
  project's byte-level tokenizer. They are built from a fixed seed on first use
  and cached as an ordinary Hugging Face folder under :func:`data_home`.
- a catalog id such as ``qwen/qwen3@qwen3-4b`` (mapped to its Hugging Face repo);
- a Hugging Face repo id such as ``Qwen/Qwen3-4B``, read from the local HF cache
  only; nothing is ever downloaded;
- a local folder: a Hugging Face checkpoint, a previous job's
  ``postprocess/node-0/checkpoints/final`` (or the job's output folder itself),
  an intermediate ``checkpoint-N`` or a PEFT adapter folder.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...paths import data_home
from ...storage import atomic_folder

TINY_PREFIX = "local/tiny-"
# Bump when the recipe of a tiny model changes so stale caches are not reused.
_TINY_VERSION = "v2"
_TINY_SEED = 1234
#: Common size of the tiny models (hidden size, layers, MLP width); small enough
#: to tune on two CPU cores in seconds, big enough to memorise a few hundred facts.
TINY_SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
TINY_MAX_POSITIONS = 1024
TINY_EMBEDDING_STD = 0.1


def _quiet() -> None:
    """Silence transformers' per-file progress bars: they flood notebook cells and job logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def tiny_model_names() -> list[str]:
    """The ids of the built-in tiny models."""
    return [TINY_PREFIX + fam for fam in _TINY_FAMILIES]


def _tiny_config(family: str):
    from ...datasets.tokenizer import BOS, IM_END, PAD, SPECIAL_TOKENS, VOCAB_SIZE

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    common = dict(
        vocab_size=(VOCAB_SIZE + 15) // 16 * 16,  # a multiple of 16 for efficient matmuls
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[IM_END],
        tie_word_embeddings=True,
        **TINY_SHAPE,
    )
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common)
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, query_pre_attn_scalar=TINY_SHAPE["head_dim"], sliding_window=256)
    raise KeyError(family)


_TINY_FAMILIES = ("qwen3", "llama", "gemma3")
_TINY_CLASSES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def tiny_model_path(name: str) -> Path:
    """The folder of built-in tiny model ``name`` (``local/tiny-qwen3``...), built and cached on first use."""
    family = name[len(TINY_PREFIX):] if name.startswith(TINY_PREFIX) else name
    if family not in _TINY_FAMILIES:
        raise UserError(
            f"unknown built-in model {name!r}; choose one of {', '.join(tiny_model_names())}", field="base_model"
        )
    final = data_home() / "models" / f"tiny-{family}-{_TINY_VERSION}"
    if (final / "config.json").is_file():
        return final
    # Another process may finish the same build first: its copy is identical, so it stays.
    with atomic_folder(final, replace=False) as tmp:
        _build_tiny(family, tmp)
    return final


def _build_tiny(family: str, folder: Path) -> None:
    import torch
    import transformers
    from transformers import GenerationConfig

    from ...datasets.tokenizer import EOS, IM_END, build_tokenizer

    _quiet()
    config = _tiny_config(family)
    cls = getattr(transformers, _TINY_CLASSES[family])
    # fork_rng keeps the caller's random state untouched while the init is seeded.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = cls(config)
        # The default init (std 0.02) caps the tied output logits near +-2.5 behind the final
        # norm; LoRA, which cannot touch embeddings or norms, then cannot push the loss below ~5.
        # Larger embeddings play the part of a pretrained model's well-spread vocabulary.
        model.get_input_embeddings().weight.data.normal_(0.0, TINY_EMBEDDING_STD)
    tokenizer = build_tokenizer()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
    save_model(model, folder)
    tokenizer.save_pretrained(folder)


def save_model(model, folder, *, max_shard_size: str = "5GB") -> None:
    """``save_pretrained`` with shard names ``model-0000i-of-0000K.safetensors`` even for one shard.

    The managed service's output always uses the sharded naming; transformers
    writes a single ``model.safetensors`` for small models, so that file is
    renamed and an index written (``from_pretrained`` reads either).
    """
    import json

    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        name = "model-00001-of-00001.safetensors"
        with safe_open(str(single), framework="pt") as fh:
            keys = list(fh.keys())
        total = single.stat().st_size
        os.replace(single, folder / name)
        index = {"metadata": {"total_size": total}, "weight_map": {k: name for k in sorted(keys)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, or a Hugging Face repo id in the local cache."""

    name: str  # what the user wrote
    location: str  # folder path or HF repo id
    is_folder: bool
    adapter: bool = False  # a PEFT adapter folder (base model named in adapter_config.json)
    catalog_id: str | None = None


def _hint(repo: str) -> str:
    return (
        f"run `huggingface-cli download {repo}` on a machine with internet access (the cache at "
        f"~/.cache/huggingface can then be copied here), or pass a local folder as custom_base_model"
    )


def resolve_source(name) -> ModelSource:
    """Find where model ``name`` lives on this machine, or raise a one-line UserError saying what to do."""
    from ... import catalog

    text = str(name).strip()
    if not text:
        raise UserError("no base model given; pass base_model (e.g. local/tiny-qwen3)", field="base_model")
    if text.startswith(TINY_PREFIX):
        return ModelSource(text, str(tiny_model_path(text)), True)
    path = Path(text).expanduser()
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if path.exists() or looks_like_path:
        folder = _model_folder(path)
        return ModelSource(text, str(folder), True, adapter=_is_adapter(folder))
    entry = catalog.find(text)
    repo = text
    if entry is not None:
        if entry.provider == "gemini":
            raise UserError(f"{entry.id} is tuned by the Gemini service, not the local engine; "
                            "set backend='vertex' or choose an open model", field="base_model")
        if entry.provider == "local":
            return ModelSource(text, str(tiny_model_path(entry.id)), True, catalog_id=entry.id)
        repo = entry.hf_repo or text
    from ...datasets.tokenizer import hf_cached_folder

    if hf_cached_folder(repo) is None:
        raise UserError(f"the weights of {repo} are not on this machine and the local engine never downloads: "
                        + _hint(repo), field="base_model")
    return ModelSource(text, repo, False, catalog_id=entry.id if entry else None)


def _model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"model folder {str(path)!r} does not exist; pass an existing checkpoint folder "
                        "or a model id such as local/tiny-qwen3", field="custom_base_model")
    if (path / "config.json").is_file() or _is_adapter(path):
        return path
    # A job's output folder: use its final checkpoint.
    from .checkpoints import find_final

    final = find_final(path)
    if final is not None and (final / "config.json").is_file():
        return final
    raise UserError(f"{str(path)!r} holds no model (no config.json or adapter_config.json); pass a Hugging Face "
                    "checkpoint folder or a job's postprocess/node-0/checkpoints/final", field="custom_base_model")


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def load_config(model_id_or_path):
    """The transformers config of a model, offline; UserError when it is not on this machine."""
    from transformers import AutoConfig

    src = resolve_source(model_id_or_path)
    if src.adapter:
        return load_config(_adapter_base(src.location))
    try:
        return AutoConfig.from_pretrained(src.location, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(_load_failure(src, exc), field="base_model") from None


def _adapter_base(folder: str) -> str:
    import json

    data = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    base = data.get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter {folder!r} does not name its base model; load the base model and the adapter "
                        "with peft.PeftModel.from_pretrained", field="custom_base_model")
    return base


def _load_failure(src: ModelSource, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if src.is_folder:
        return f"cannot load the model in {src.location!r} ({first}); pass a complete Hugging Face checkpoint folder"
    return f"cannot load {src.location} from the local Hugging Face cache ({first}); " + _hint(src.location)


def load_tokenizer(model_id_or_path):
    """The tokenizer (with chat template) of a model id or folder, offline (see datasets.tokenizer.load_offline)."""
    from ...datasets.tokenizer import has_tokenizer, load_offline

    src = resolve_source(model_id_or_path)
    if src.adapter and not has_tokenizer(src.location):
        return load_tokenizer(_adapter_base(src.location))
    try:
        return load_offline(src.location)
    except (OSError, ValueError) as exc:
        raise UserError(_load_failure(src, exc), field="base_model") from None


def _resolve_dtype(dtype, device):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "auto": None}
        if dtype not in names:
            raise UserError(f"dtype must be one of {', '.join(names)}, not {dtype!r}", field="dtype")
        dtype = names[dtype]
        if dtype is None:
            return torch.bfloat16 if default_device(device).type == "cuda" and torch.cuda.is_bf16_supported() \
                else torch.float32
    return dtype


_DEVICE = re.compile(r"(cpu|cuda|mps)(:\d+)?|auto")


def check_device(device) -> None:
    """Raise a one-line UserError unless ``device`` (None, auto, cpu, cuda, cuda:N, mps) exists on this machine.

    torch is imported only when a GPU is asked for.
    """
    if device is None:
        return
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise UserError(f"device must be cpu, cuda, cuda:N, mps or auto, not {device!r}", field="device")
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("device='cuda' was asked for but this machine has no CUDA GPU; "
                            "leave device out to use what is there", field="device")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device={device!r} was asked for but this machine has {torch.cuda.device_count()} "
                            "CUDA GPU(s), numbered from 0; leave device out to use the first", field="device")
    if kind == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise UserError("device='mps' was asked for but MPS is not available here; leave device out",
                            field="device")


def default_device(device=None):
    """The torch device to use: ``device`` when given (see :func:`check_device`), else the first GPU, else the CPU."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device is not None and str(device) != "auto":
        check_device(str(device))
        return torch.device(str(device))
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


#: One model loads at a time in a process: transformers' from_pretrained is not safe in two threads at
#: once (the chat panel asks a tuned and a base model side by side; a server may load while a chat does).
_LOADING = threading.RLock()


def load_model_and_tokenizer(model_id_or_path, *, dtype=None, device=None, **options):
    """Load a causal LM and its tokenizer from a model id or folder, offline, ready for training or chat.

    A PEFT adapter folder is loaded on top of its base model and merged, so the
    result is always a plain transformers model. ``dtype`` is a torch dtype or
    a name (``float32``, ``bfloat16``, ``auto``); the default is float32. ``options`` go to ``from_pretrained``
    (``quantization_config``, ``attn_implementation``, ``use_kernels``); a quantized model is placed on ``device``
    as it loads. Safe to call from several threads: loads happen one at a time.
    """
    with _LOADING:
        return _load_model_and_tokenizer(model_id_or_path, dtype=dtype, device=device, **options)


def _load_model_and_tokenizer(model_id_or_path, *, dtype=None, device=None, **options):
    from transformers import AutoModelForCausalLM

    _quiet()
    src = resolve_source(model_id_or_path)
    dev = default_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    if src.adapter:
        from peft import PeftModel

        base, _ = load_model_and_tokenizer(_adapter_base(src.location), dtype=torch_dtype, device="cpu")
        try:
            model = PeftModel.from_pretrained(base, src.location).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(_load_failure(src, exc), field="custom_base_model") from None
    else:
        if "quantization_config" in options:
            options["device_map"] = {"": dev}  # a quantized model cannot be moved after loading
        try:
            model = AutoModelForCausalLM.from_pretrained(src.location, local_files_only=True, dtype=torch_dtype,
                                                         **options)
        except (OSError, ValueError) as exc:
            raise UserError(_load_failure(src, exc), field="base_model") from None
    tokenizer = load_tokenizer(model_id_or_path)
    if "device_map" not in options:
        model.to(dev)
    return model, tokenizer
