"""A Vertex AI open-model job's checkpoint taken elsewhere (:mod:`tuning_magics.export` verifies it).

The service leaves each checkpoint as a Hugging Face folder in Cloud Storage,
``<output_uri>/postprocess/node-0/checkpoints/<name>/``: the safetensors shards with
their index, ``config.json`` and the tokenizer files, the merged weights whichever
tuning mode trained them, which is what Model Garden's custom-weights deploy reads from
it ("Tune open models", Tuned model artifacts; "Deploy models with custom weights",
Model files: https://cloud.google.com/vertex-ai/generative-ai/docs/model-garden/deploy-models-with-custom-weights).

``"hf"`` downloads the folder's own files (each object checksum-verified) and adds a
generation config that ends a reply at the chat template's end-of-turn token; ``"gguf"``
and ``"ollama"`` are made from that folder. There is no adapter to export alone
(``"peft"``). Nothing here answers from these weights but the export itself (the service
answers once ``job.deploy()`` has put them on an endpoint), so a GGUF export is compared
with the checkpoint in transformers, and an ``"hf"`` export, which is those weights, is
checked to load and answer on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from ... import storage
from ...errors import UserError
from ...export import TOKENIZER_FILES, is_weights

#: The files of a checkpoint an export takes: its weights, their index, the config and the tokenizer.
_INDEX, _CONFIG = "model.safetensors.index.json", "config.json"


def _files(job, checkpoint) -> tuple[str, str, dict[str, int]]:
    """(name, folder, its files: name relative to the folder, size in bytes) of the checkpoint; the files of the
    folder itself, not of folders inside it."""
    from . import client as vc
    from .endpoints import open_checkpoint

    name, uri = open_checkpoint(job, checkpoint, "be exported")
    uri = uri.rstrip("/") + "/"
    with vc.api_errors(f"list checkpoint {name} of job {job.id}", job.ctx):
        sizes = storage.list_sizes(uri)
    return name, uri, {u[len(uri):]: n for u, n in sizes.items() if "/" not in u[len(uri):]}


def _taken(files) -> list[str]:
    return [n for n in files if is_weights(n) or n in (_INDEX, _CONFIG) + TOKENIZER_FILES]


def check(job, format: str, checkpoint) -> None:
    """One line for what this checkpoint cannot be exported as, before anything is downloaded."""
    if format == "peft":
        raise UserError(f"job {job.id} tuned on Vertex AI, which keeps each checkpoint as the merged weights, with no "
                        "adapter to export alone; use format='hf'", field="format")
    name, uri, files = _files(job, checkpoint)
    if not any(is_weights(n) for n in files) or _CONFIG not in files:
        raise UserError(f"checkpoint {name} of job {job.id} has no model weights (*.safetensors and config.json) in "
                        f"{uri}; check the job's output_uri", field="checkpoint")
    if not any(n in TOKENIZER_FILES for n in files):
        raise UserError(f"checkpoint {name} of job {job.id} has no tokenizer files in {uri} (tokenizer.json, "
                        "tokenizer_config.json), which a runtime needs to write its prompts", field="checkpoint")


def config(job, checkpoint) -> dict:
    """The checkpoint's ``config.json``."""
    from . import client as vc
    from .endpoints import open_checkpoint

    name, uri = open_checkpoint(job, checkpoint, "be exported")
    with vc.api_errors(f"read checkpoint {name} of job {job.id}", job.ctx):
        return json.loads(storage.read_bytes(f"{uri.rstrip('/')}/{_CONFIG}"))


def export_bytes(job, checkpoint) -> int:
    _, _, files = _files(job, checkpoint)
    return sum(files[n] for n in _taken(files))


def write(job, checkpoint, folder: Path) -> None:
    """Download the checkpoint's weights, config and tokenizer into the empty ``folder``."""
    from ...export import complete_folder
    from . import client as vc

    name, uri, files = _files(job, checkpoint)
    with vc.api_errors(f"download checkpoint {name} of job {job.id}", job.ctx):
        for file in _taken(files):
            storage.download_file(uri + file, folder / file)
    complete_folder(folder)


def reference(prompts: list[list[dict]], hf: Path | None):
    """What the checkpoint's weights answer in transformers (from the ``"hf"`` folder a GGUF export was made
    from); None for an ``"hf"`` export, which is those weights itself."""
    if hf is None:
        return None, "nothing"
    from ...export import answers_from_folder

    return answers_from_folder(hf, prompts), "the checkpoint's weights in transformers"
