"""Take a tuned model elsewhere, with proof that it answers as it did in the notebook.

``job.export(format, path=None, checkpoint="final")`` writes the model in a format
another runtime loads, then **verifies** it: the exported files are loaded by that
runtime on their own, asked a sample of the job's own prompts (its validation set,
else its training prompts) greedily, and each answer is compared with the tuned
model's answer through the engine (``job.chat``). The export is kept only when the
answers agree (:data:`REQUIRED` of them identical); otherwise nothing is left at
``path`` and one line says how many agreed and the first that did not. A merge that
silently gave back the base model is caught the same way, and the report also says
on how many prompts the export answers differently from the base model. Where nothing
here answers from the same weights (the ``"hf"`` export of a Vertex AI open-model job
is its checkpoint's weights themselves), the export is kept when it loads on its own
and answers the prompts, and the report says that is what was checked. Verification
loads the model in float32; a machine without the memory for it is told so first.

Formats:

- ``"hf"``: a self-contained Hugging Face folder (safetensors, config, tokenizer with
  the chat template training used, a generation config that ends a reply at the
  template's end-of-turn token); a LoRA job's adapter is merged into the base
  weights. Verified with transformers.
- ``"peft"``: a LoRA job's adapter alone, with the tokenizer, for serving on its base
  model (vLLM's ``--lora-modules``). Verified with PEFT on transformers.
- ``"gguf"``: one GGUF file (``model-<quantization>.gguf``: ``f16``, ``bf16``, ``q8_0``
  or ``f32``) with the chat template and the end-of-turn token in its metadata
  (:mod:`tuning_magics.export_gguf`). Verified with llama.cpp (llama-cpp-python),
  which renders the prompts with the file's own template.
- ``"ollama"``: the GGUF file and a ``Modelfile`` whose ``TEMPLATE``, ``SYSTEM`` (the
  training data's system prompt, when it had one) and ``PARAMETER stop`` lines
  reproduce the training template, ready for ``ollama create NAME -f Modelfile``. The
  GGUF is verified as above and the TEMPLATE by writing the job's prompts with it.

Full-precision exports must give every answer exactly; ``bf16`` and ``q8_0`` round the
weights, so they must agree on :data:`QUANTIZED_REQUIRED` of the prompts, and the report
also gives the mean difference of the log-probability of the tuned model's answers.

What a backend cannot export is refused in one line before anything is written (a
tuned Gemini model lives only in Vertex AI), and so is an export the disk has no room
for. The backend writes the files (``Job._write_export``) and says what the export must
answer (``Job._export_reference``: ``job.chat``, or for a Vertex AI open-model job,
whose model answers only once deployed, its checkpoint's weights in transformers);
this module checks, verifies and reports, and imports no backend.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import params
from .errors import UserError

FORMATS = ("hf", "peft", "gguf", "ollama")
#: The tokenizer files a Hugging Face model folder may hold.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt")
#: Prompts asked of the exported model and of the tuned one, unless export() is told otherwise.
SAMPLE = 8
#: The longest answer compared, in tokens.
MAX_NEW_TOKENS = 64
#: The share of answers that must be identical for an export in full precision to count as done.
REQUIRED = 1.0
#: The same for rounded weights (GGUF at bf16 or q8_0).
QUANTIZED_REQUIRED = 0.75


@dataclass
class Export:
    """What ``job.export()`` wrote, and how its answers compared with the tuned model's."""

    format: str
    path: str
    job: str
    checkpoint: str
    bytes: int
    #: Prompts asked, and how many the export answered exactly as :attr:`reference` did (None: not compared).
    prompts: int = 0
    identical: int | None = None
    #: Of the same prompts, how many the export answered differently from the base model (None: not asked).
    differs_from_base: int | None = None
    examples: list[dict] = field(default_factory=list, repr=False)
    #: A GGUF export's weight type, and for rounded ones the mean log-probability difference (nats per token) of
    #: the tuned model's answers between the export and the tuned model.
    quantization: str | None = None
    logprob_difference: float | None = None
    #: What the export's answers were compared with: the tuned model through the engine (``job.chat``), or, for a
    #: job whose model answers only once deployed, its checkpoint's weights as transformers answers.
    reference: str = "job.chat"
    #: Of the prompts, how many the export answered with text when nothing else here answers from the same weights
    #: (an ``"hf"`` export of a Vertex AI checkpoint is those weights): it was checked to load and answer on its own.
    answered: int | None = None

    @property
    def required(self) -> float:
        """The share of identical answers this export needs."""
        return QUANTIZED_REQUIRED if self.quantization in ("bf16", "q8_0") else REQUIRED

    @property
    def verified(self) -> bool:
        if self.identical is None:  # nothing to compare with: loaded by its runtime alone and asked every prompt
            return self.answered is not None and self.prompts > 0
        return self.identical >= self.required * self.prompts

    def __str__(self) -> str:
        kind = f"{self.format} ({self.quantization})" if self.quantization else self.format
        head = f"{kind} export of job {self.job} ({self.checkpoint}) in {self.path}, {_amount(self.bytes)}"
        if self.identical is None and self.answered is not None:
            return f"{head}; loaded on its own and asked {self.prompts} of the job's prompts, {self.answered} " \
                   "answered with text (nothing else here answers from these weights to compare with)"
        if self.identical is None:
            return f"{head}; not verified"
        base = "" if self.differs_from_base is None else \
            f"; differs from the base model on {self.differs_from_base}/{self.prompts}"
        drift = "" if self.logprob_difference is None else \
            f"; mean log-probability difference {self.logprob_difference:.3f} nats a token"
        return f"{head}; {self.identical}/{self.prompts} answers identical to {self.reference}{base}{drift}"

    __repr__ = __str__


def export_job(job, format: str = "hf", path=None, *, checkpoint: str = "final", verify: bool = True,
               sample: int = SAMPLE, overwrite: bool = False, quantization: str = "f16") -> Export:
    """:meth:`tuning_magics.jobs.Job.export`: write, verify, report (see the module's docstring)."""
    from .storage import atomic_folder

    if format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, not {format!r}", field="format")
    sample = params.whole_at_least_1("sample", sample)
    gguf = format in ("gguf", "ollama")
    if gguf:
        from .errors import require_extra
        from .export_gguf import check_quantization

        check_quantization(quantization)
        require_extra("export")
    job._check_export(format, checkpoint)  # what the job cannot export: said before any write
    config = job._export_config(checkpoint)
    if gguf:
        from .export_gguf import check

        check(config, quantization)  # an architecture llama.cpp's writer here does not know: before any download
    name = f"{checkpoint}-{format}" + (f"-{quantization}" if gguf else "")
    target = Path(path) if path is not None else job._export_home() / name
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass overwrite=True to replace it, or another path",
                        field="path")
    weights = job._export_bytes("hf" if gguf else format, checkpoint)
    need = weights + (_gguf_bytes(config, weights, quantization) if gguf else 0)  # gguf: the hf folder too
    free = shutil.disk_usage(_existing(target.parent)).free
    if need * 1.1 > free:
        raise UserError(f"the {format} export needs about {_amount(need)} and {target.parent} has {_amount(free)} "
                        "free; free some space or give another path", field="path")
    if verify:
        _check_memory(format, config, weights if format != "peft" else job._export_bytes("hf", checkpoint))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp, tempfile.TemporaryDirectory(prefix=".hf-", dir=target.parent) as hf:
        if gguf:  # the "hf" export first, beside the target (the same disk), then the GGUF made from it
            job._write_export("hf", checkpoint, Path(hf))
            _write_gguf(job, format, Path(hf), tmp, quantization)
        else:
            job._write_export(format, checkpoint, tmp)
        result = Export(format, str(target), job.id, checkpoint, _size(tmp), quantization=quantization if gguf
                        else None)
        if verify:
            _verify(job, result, tmp, sample, hf=Path(hf) if gguf else None)
    return result


GGUF_FILE = "model-{}.gguf"
#: Bytes a weight takes in each dtype a config names, and in each GGUF type (q8_0: 34 bytes a block of 32).
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}


def _dtype_bytes(config: dict) -> float:
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return _BYTES.get(dtype, 4)


def _gguf_bytes(config: dict, weights: int, quantization: str) -> int:
    """About the size of the GGUF file made from ``weights`` bytes of safetensors in the config's dtype."""
    return int(weights / _dtype_bytes(config) * _BYTES[quantization])


def _check_memory(format: str, config: dict, weights: int) -> None:
    """Verification loads the model in float32: a one-line UserError where the machine has not the memory."""
    from .machine import available_ram

    need = int(weights / _dtype_bytes(config) * 4)
    free = available_ram()
    if 0 < free < need:  # (0: the system does not say)
        raise UserError(f"verifying the {format} export loads the model in float32, about {_amount(need)}, and this "
                        f"machine has {_amount(free)} of memory available; pass verify=False to export it unverified, "
                        "or export on a machine with more memory", field="verify")


def _existing(folder: Path) -> Path:
    """``folder``, or the nearest folder above it that exists (where a new one would be made)."""
    folder = folder.expanduser().absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def is_weights(name: str) -> bool:
    """Whether a file of a model folder holds the model's weights (a safetensors shard that is not an adapter's)."""
    return name.endswith(".safetensors") and not name.startswith("adapter_")


def _write_gguf(job, format: str, hf: Path, folder: Path, quantization: str) -> None:
    """The GGUF file (and for Ollama its Modelfile) in ``folder``, made from the job's ``"hf"`` export ``hf``."""
    from .export_gguf import end_of_turn, modelfile, write_gguf

    write_gguf(hf, folder / GGUF_FILE.format(quantization), quantization)
    if format == "ollama":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf)
        stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn(hf)]
        chats = job.training_chats()  # the system prompt every training example had, if one did
        system = chats.system_prompt if chats and chats.with_system_prompt == chats.examples else None
        (folder / "Modelfile").write_text(modelfile(tokenizer, GGUF_FILE.format(quantization), stops=stops,
                                                    system=system), encoding="utf-8")
        _check_modelfile(tokenizer, job_prompts(job, SAMPLE))


def _reason(exc: BaseException) -> str:
    """A library's error in a few words: its first line, cut short."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(":, ")[:120] if text else type(exc).__name__


def _amount(n: int) -> str:
    """Bytes in words a person reads at a glance: 3.3 MB, 1.24 GB."""
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def job_prompts(job, sample: int) -> list[list[dict]]:
    """Up to ``sample`` of the job's own prompts: its validation examples', else its training examples', each
    the conversation up to its last assistant turn."""
    from . import storage
    from .datasets.formats import read_conversations

    for path in (job._validation_file(), job._training_file()):
        if not path or not storage.exists(path):
            continue
        prompts = []
        with storage.local_copy(path) as local:
            conversations = read_conversations(local)
        for conversation in conversations:
            last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=0)
            if last > 0:
                prompts.append(conversation[:last])
            if len(prompts) == sample:
                break
        if prompts:
            return prompts
    raise UserError(f"job {job.id} has no prompts of its own to verify the export with (its training data is "
                    "gone); pass verify=False to export unverified", field="verify")


def _verify(job, result: Export, folder: Path, sample: int, *, hf: Path | None = None) -> None:
    """Ask the exported model and the tuned one the same prompts; a one-line UserError below :data:`REQUIRED`."""
    prompts = job_prompts(job, sample)
    tuned, result.reference = job._export_reference(prompts, result.checkpoint, hf)
    if result.quantization is not None:
        gguf_file = folder / GGUF_FILE.format(result.quantization)
        exported = answers_from_gguf(gguf_file, prompts)
        if result.quantization in ("bf16", "q8_0"):
            result.logprob_difference = logprob_difference(hf, gguf_file, prompts, tuned)
    else:
        exported = answers_from_folder(folder, prompts, peft=result.format == "peft")
    result.prompts = len(prompts)
    if tuned is None:  # nothing else answers from these weights: the export loaded and answered on its own
        result.answered = sum(bool(a.strip()) for a in exported)
        result.examples = [{"prompt": p[-1]["content"], "exported": e} for p, e in zip(prompts, exported)]
        return
    try:
        base = [job.chat(p, checkpoint="base", temperature=0, max_new_tokens=MAX_NEW_TOKENS) for p in prompts]
    except (UserError, OSError):  # no base model to ask here: the comparison is left out
        base = None
    result.identical = sum(a == b for a, b in zip(exported, tuned))
    result.differs_from_base = None if base is None else sum(a != b for a, b in zip(exported, base))
    result.examples = [{"prompt": p[-1]["content"], "exported": e, "tuned": t} for p, e, t in zip(prompts, exported,
                                                                                                     tuned)]
    if not result.verified:
        first = next(x for x in result.examples if x["exported"] != x["tuned"])
        need = "all are needed" if result.required == 1 else f"{result.required:.0%} are needed"
        raise UserError(f"the {result.format} export did not verify, so it was not kept: {result.identical}/"
                        f"{result.prompts} answers identical to {result.reference} ({need}); the first that differs, "
                        f"to {first['prompt'][:60]!r}: exported {first['exported'][:60]!r}, tuned "
                        f"{first['tuned'][:60]!r}", field="format")


def complete_folder(folder: Path) -> None:
    """Make a Hugging Face model folder answer elsewhere as the engine answers: a generation config whose end
    tokens are the chat template's end-of-turn ones (vLLM and transformers stop there). A one-line UserError when
    the folder has no tokenizer with a chat template, which every runtime needs to write the prompts."""
    import json

    from transformers import AutoTokenizer

    from .datasets.tokenizer import stop_token_ids

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own plain Exception
        raise UserError(f"the model has no tokenizer another runtime can load ({_reason(exc)}), so it cannot be "
                        "exported", field="checkpoint") from None
    if not tokenizer.chat_template:
        raise UserError("the model's tokenizer has no chat template, so another runtime could not write its prompts "
                        "as training did; it cannot be exported", field="checkpoint")
    path = folder / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if "eos_token_id" not in config:  # where transformers and vLLM look without one: the model's config
        model = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["eos_token_id"] = model.get("eos_token_id", (model.get("text_config") or {}).get("eos_token_id"))
    config["eos_token_id"] = stop_token_ids(tokenizer, config.get("eos_token_id"))
    if config.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        config["pad_token_id"] = tokenizer.pad_token_id
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def answers_from_folder(folder, prompts: list[list[dict]], *, peft: bool = False,
                        max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of the model in ``folder`` as transformers alone loads it (a PEFT adapter on the base model
    its config names, with ``peft``): its own tokenizer, chat template and generation config decide the prompt
    and where a reply ends."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if peft:
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - weights, a config or a tokenizer transformers does not read
        raise UserError(f"transformers could not load the exported model ({_reason(exc)}), so the export was not "
                        "kept", field="checkpoint") from None
    model.eval()
    out = []
    with torch.no_grad():
        for messages in prompts:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            new = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
            out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


def _llama(path, **options):
    """The GGUF file at ``path`` loaded by llama.cpp, with the context it was trained for, quietly."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=0, n_threads=max(1, min(4, os.cpu_count() or 1)), seed=0,
                 verbose=False, **options)


def answers_from_gguf(path, prompts: list[list[dict]], *, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of the GGUF file at ``path`` as llama.cpp (llama-cpp-python) gives them: the prompt written
    by the file's own chat template, the reply ended at its end-of-turn token."""
    llm = _llama(path)
    try:
        return [llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_new_tokens,
                                           repeat_penalty=1.0)["choices"][0]["message"]["content"] or ""
                for messages in prompts]
    finally:
        llm.close()


def _check_modelfile(tokenizer, prompts: list[list[dict]]) -> None:
    """The Modelfile's TEMPLATE writes each of the job's prompts exactly as the model's chat template does; a
    one-line UserError naming the first that differs."""
    from .export_gguf import render_like_ollama

    for messages in prompts:
        if render_like_ollama(tokenizer, messages) != tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True):
            raise UserError(f"the Modelfile's TEMPLATE writes the prompt {messages[-1]['content'][:60]!r} differently "
                            "from the model's chat template, so the ollama export was not kept; use format='gguf'",
                            field="format")


def logprob_difference(hf: Path, gguf_file: Path, prompts: list[list[dict]], answers: list[str]) -> float:
    """The mean absolute difference, in nats a token, between the log-probabilities the model in ``hf``
    (transformers) and the GGUF file (llama.cpp) give each token of ``answers`` after its prompt."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    llm = _llama(gguf_file, logits_all=True)

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    gaps = []
    try:
        for messages, answer in zip(prompts, answers):
            prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False).input_ids
            reply = tokenizer(answer, add_special_tokens=False).input_ids
            if not reply:
                continue
            ids = prompt + reply
            with torch.no_grad():
                theirs = model(torch.tensor([ids])).logits[0].float().numpy()
            llm.reset()
            llm.eval(ids)
            ours = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
            vocab = min(theirs.shape[-1], ours.shape[-1])  # (Gemma's GGUF leaves out the padding rows)
            rows = slice(len(prompt) - 1, len(ids) - 1)
            a = log_softmax(theirs[rows, :vocab])[np.arange(len(reply)), reply]
            b = log_softmax(ours[rows, :vocab])[np.arange(len(reply)), reply]
            gaps.extend(np.abs(a - b).tolist())
    finally:
        llm.close()
    return float(np.mean(gaps)) if gaps else 0.0
