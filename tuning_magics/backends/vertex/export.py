"""A Vertex AI open-model job's checkpoint taken elsewhere (:mod:`tuning_magics.export` verifies it).

The service leaves each checkpoint as a Hugging Face folder in Cloud Storage,
``<output_uri>/postprocess/node-0/checkpoints/<name>/``: the safetensors shards and
their index, ``config.json`` and the tokenizer files, which is what Model Garden's
custom-weights deploy reads from it ("Tune open models", Tuned model artifacts;
"Deploy models with custom weights", Model files:
https://cloud.google.com/vertex-ai/generative-ai/docs/model-garden/deploy-models-with-custom-weights).

``"hf"`` downloads the folder (each object checksum-verified) and adds a generation
config that ends a reply at the chat template's end-of-turn token; ``"peft"`` downloads
the adapter and tokenizer of a checkpoint that holds a LoRA adapter. ``"gguf"`` and
``"ollama"`` are made from the ``"hf"`` folder. Nothing here answers from these weights
but the export itself (the service answers once ``job.deploy()`` has put them on an
endpoint), so a GGUF export is compared with the checkpoint in transformers, and an
``"hf"`` export, which is those weights, is checked to load and answer on its own.
"""

from __future__ import annotations

from pathlib import Path

from ... import storage
from ...errors import UserError

_ADAPTER = ("adapter_config.json", "adapter_model.safetensors")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt")


def _uri(job, checkpoint: str) -> str:
    """The checkpoint's folder in Cloud Storage; a one-line UserError naming those the job has."""
    found = {c.name: c.uri for c in job.checkpoints}
    if checkpoint in found:
        return found[checkpoint].rstrip("/") + "/"
    if not found:
        raise UserError(f"job {job.id} has no checkpoints to export yet ({job.state}); export it once it has "
                        "succeeded", field="checkpoint")
    raise UserError(f"job {job.id} has no checkpoint {checkpoint!r}; it has {', '.join(found)}", field="checkpoint")


def _files(job, checkpoint: str) -> tuple[str, dict[str, int]]:
    """The checkpoint's folder and its files (name relative to the folder: size in bytes)."""
    from . import client as vc

    uri = _uri(job, checkpoint)
    with vc.api_errors(f"list checkpoint {checkpoint} of job {job.id}", job.ctx):
        sizes = storage.list_sizes(uri)
    return uri, {name[len(uri):]: size for name, size in sizes.items()}


def _weights(files: dict[str, int]) -> list[str]:
    return [n for n in files if n.endswith(".safetensors") and not n.startswith("adapter_")]


def check(job, format: str, checkpoint: str) -> None:
    """One line for what this checkpoint cannot be exported as."""
    uri, files = _files(job, checkpoint)
    adapter = "adapter_config.json" in files
    if format == "peft" and not adapter:
        raise UserError(f"checkpoint {checkpoint} of job {job.id} holds the tuned model's whole weights, no LoRA "
                        "adapter; export it with format='hf'", field="format")
    if format != "peft" and not _weights(files):
        hint = "export the adapter with format='peft'" if adapter else "check the job's output_uri"
        raise UserError(f"checkpoint {checkpoint} of job {job.id} has no model weights (*.safetensors) in {uri}; "
                        f"{hint}", field="checkpoint")
    if not any(name in _TOKENIZER for name in files):
        raise UserError(f"checkpoint {checkpoint} of job {job.id} has no tokenizer files in {uri} (tokenizer.json, "
                        "tokenizer_config.json), which a runtime needs to write its prompts", field="checkpoint")


def export_bytes(job, format: str, checkpoint: str) -> int:
    _uri, files = _files(job, checkpoint)
    wanted = _ADAPTER + _TOKENIZER if format == "peft" else files
    return sum(size for name, size in files.items() if name in wanted)


def write(job, format: str, checkpoint: str, folder: Path) -> None:
    """Download the checkpoint (``"peft"``: its adapter and tokenizer) into the empty ``folder``."""
    from ...export import complete_folder
    from . import client as vc

    uri, files = _files(job, checkpoint)
    names = [n for n in files if n in _ADAPTER + _TOKENIZER] if format == "peft" else list(files)
    with vc.api_errors(f"download checkpoint {checkpoint} of job {job.id}", job.ctx):
        for name in names:
            storage.download_file(uri + name, folder / name)
    if format != "peft":
        complete_folder(folder)


def reference(prompts: list[list[dict]], hf: Path | None):
    """What the checkpoint's weights answer in transformers (from the ``"hf"`` folder a GGUF export was made
    from); None for an ``"hf"`` or ``"peft"`` export, which is those weights itself."""
    if hf is None:
        return None, "nothing"
    from ...export import answers_from_folder

    return answers_from_folder(hf, prompts), "the checkpoint's weights in transformers"
