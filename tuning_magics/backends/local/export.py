"""A local job's model written for other runtimes (see :mod:`tuning_magics.export`, which verifies it).

``"hf"``: the checkpoint loaded as chat loads it (a LoRA adapter merged into its
base weights; ``final`` of a LoRA job already holds the merged model), saved as a
plain Hugging Face folder (``model.safetensors`` or its shards, ``config.json``,
the tokenizer with the chat template training rendered with) and a generation
config whose end tokens are those the engine ends a reply at. ``"peft"``: the
adapter alone (``adapter_config.json``, ``adapter_model.safetensors``) with the
tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...catalog import PEFT, normalise_mode
from ...errors import UserError
from ...export import complete_folder, is_weights

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_folder(checkpoint: Path) -> Path | None:
    """The LoRA adapter of a checkpoint folder (``final/adapter`` or the checkpoint itself), else None."""
    for folder in (checkpoint / "adapter", checkpoint):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def check(job_id: str, config: dict, format: str) -> None:
    if format == "peft" and normalise_mode(config.get("tuning_mode") or "FULL") != PEFT:
        raise UserError(f"job {job_id} tuned all of the model's weights (tuning_mode FULL), so it has no adapter "
                        "to export; use format='hf'", field="format")


def export_bytes(checkpoint: Path, format: str) -> int:
    """About the size of the export: the adapter's files, or the model's weights."""
    from .memory import param_count
    from .models import load_config

    adapter = adapter_folder(checkpoint)
    if format == "peft":
        return sum((adapter / name).stat().st_size for name in _ADAPTER_FILES if (adapter / name).is_file())
    weights = [p for p in checkpoint.iterdir() if is_weights(p.name)]
    if weights:
        return sum(p.stat().st_size for p in weights)
    return param_count(load_config(str(checkpoint))) * 4  # an adapter's checkpoint: the merged float32 weights


def config(checkpoint: Path) -> dict:
    """The model's config (an adapter's: its base model's)."""
    from .models import load_config

    return load_config(str(checkpoint)).to_dict()


def write(checkpoint: Path, format: str, folder: Path) -> None:
    """The export of ``checkpoint`` (a local folder) in ``format`` into the empty ``folder``."""
    from .generate import LocalChatModel
    from .models import load_tokenizer

    if format == "peft":
        adapter = adapter_folder(checkpoint)
        for name in _ADAPTER_FILES:
            shutil.copy2(adapter / name, folder / name)
        load_tokenizer(str(adapter)).save_pretrained(folder)
        return
    chat = LocalChatModel(str(checkpoint))  # as job.chat loads it: an adapter merged into its base weights
    chat.model.save_pretrained(folder, safe_serialization=True)
    chat.tokenizer.save_pretrained(folder)
    complete_folder(folder)  # other runtimes end a reply where the engine does
