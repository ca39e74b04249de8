"""Take a tuned model elsewhere, with proof that it answers as it did in the notebook.

``job.export(format, path=None, checkpoint="final")`` writes the model in a format
another runtime loads, then **verifies** it: the exported files are loaded by that
runtime on their own, asked a sample of the job's own prompts (its validation set,
else its training prompts) greedily, and each answer is compared with the tuned
model's answer through the engine (``job.chat``). The export is kept only when the
answers agree (:data:`REQUIRED` of them identical); otherwise nothing is left at
``path`` and one line says how many agreed and the first that did not. A merge that
silently gave back the base model is caught the same way, and the report also says
on how many prompts the export answers differently from the base model.

Formats:

- ``"hf"``: a self-contained Hugging Face folder (safetensors, config, tokenizer with
  the chat template training used, a generation config that ends a reply at the
  template's end-of-turn token); a LoRA job's adapter is merged into the base
  weights. Verified with transformers.
- ``"peft"``: a LoRA job's adapter alone, with the tokenizer, for serving on its base
  model (vLLM's ``--lora-modules``). Verified with PEFT on transformers.

What a backend cannot export is refused in one line before anything is written (a
tuned Gemini model lives only in Vertex AI), and so is an export the disk has no room
for. The backend writes the files (``Job._write_export``); this module checks,
verifies and reports, and imports no backend.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

FORMATS = ("hf", "peft")
#: Prompts asked of the exported model and of the tuned one, unless export() is told otherwise.
SAMPLE = 8
#: The longest answer compared, in tokens.
MAX_NEW_TOKENS = 64
#: The share of answers that must be identical for an export in full precision to count as done.
REQUIRED = 1.0


@dataclass
class Export:
    """What ``job.export()`` wrote, and how its answers compared with the tuned model's."""

    format: str
    path: str
    job: str
    checkpoint: str
    bytes: int
    #: Prompts asked, and how many the export answered exactly as ``job.chat`` did (None: not verified).
    prompts: int = 0
    identical: int | None = None
    #: Of the same prompts, how many the export answered differently from the base model (None: not asked).
    differs_from_base: int | None = None
    examples: list[dict] = field(default_factory=list, repr=False)

    @property
    def verified(self) -> bool:
        return self.identical is not None and self.identical >= REQUIRED * self.prompts

    def __str__(self) -> str:
        head = f"{self.format} export of job {self.job} ({self.checkpoint}) in {self.path}, {_amount(self.bytes)}"
        if self.identical is None:
            return f"{head}; not verified"
        base = "" if self.differs_from_base is None else \
            f"; differs from the base model on {self.differs_from_base}/{self.prompts}"
        return f"{head}; {self.identical}/{self.prompts} answers identical to job.chat{base}"

    __repr__ = __str__


def export_job(job, format: str = "hf", path=None, *, checkpoint: str = "final", verify: bool = True,
               sample: int = SAMPLE, overwrite: bool = False) -> Export:
    """:meth:`tuning_magics.jobs.Job.export`: write, verify, report (see the module's docstring)."""
    from .storage import atomic_folder

    if format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, not {format!r}", field="format")
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 1:
        raise UserError(f"sample must be a whole number of at least 1, not {sample!r}", field="sample")
    job._check_export(format, checkpoint)  # what this job cannot export is said before anything is written
    target = Path(path) if path is not None else job._export_home() / f"{checkpoint}-{format}"
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass overwrite=True to replace it, or another path",
                        field="path")
    need = job._export_bytes(format, checkpoint)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if need * 1.1 > free:
        raise UserError(f"the {format} export needs about {_amount(need)} and {target.parent} has {_amount(free)} "
                        "free; free some space or give another path", field="path")
    with atomic_folder(target) as tmp:
        job._write_export(format, checkpoint, tmp)
        result = Export(format, str(target), job.id, checkpoint, _size(tmp))
        if verify:
            _verify(job, result, tmp, sample)
    return result


def _amount(n: int) -> str:
    """Bytes in words a person reads at a glance: 3.3 MB, 1.24 GB."""
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def job_prompts(job, sample: int) -> list[list[dict]]:
    """Up to ``sample`` of the job's own prompts: its validation examples', else its training examples', each
    the conversation up to its last assistant turn."""
    from .datasets.formats import read_conversations

    for path in (job._validation_file(), job._training_file()):
        if not path or str(path).startswith("gs://") or not Path(path).is_file():
            continue
        prompts = []
        for conversation in read_conversations(path):
            last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=0)
            if last > 0:
                prompts.append(conversation[:last])
            if len(prompts) == sample:
                break
        if prompts:
            return prompts
    raise UserError(f"job {job.id} has no prompts of its own to verify the export with (its training data is "
                    "gone); pass verify=False to export unverified", field="verify")


def _verify(job, result: Export, folder: Path, sample: int) -> None:
    """Ask the exported model and the tuned one the same prompts; a one-line UserError below :data:`REQUIRED`."""
    prompts = job_prompts(job, sample)
    asked = None if result.checkpoint == "final" else result.checkpoint
    tuned = [job.chat(p, checkpoint=asked, temperature=0, max_new_tokens=MAX_NEW_TOKENS) for p in prompts]
    exported = answers_from_folder(folder, prompts, peft=result.format == "peft")
    try:
        base = [job.chat(p, checkpoint="base", temperature=0, max_new_tokens=MAX_NEW_TOKENS) for p in prompts]
    except (UserError, OSError):  # no base model to ask here: the comparison is left out
        base = None
    result.prompts = len(prompts)
    result.identical = sum(a == b for a, b in zip(exported, tuned))
    result.differs_from_base = None if base is None else sum(a != b for a, b in zip(exported, base))
    result.examples = [{"prompt": p[-1]["content"], "exported": e, "tuned": t} for p, e, t in zip(prompts, exported,
                                                                                                     tuned)]
    if not result.verified:
        first = next(x for x in result.examples if x["exported"] != x["tuned"])
        raise UserError(f"the {result.format} export did not verify, so it was not kept: {result.identical}/"
                        f"{result.prompts} answers identical to job.chat (all are needed); the first that differs, "
                        f"to {first['prompt'][:60]!r}: exported {first['exported'][:60]!r}, tuned "
                        f"{first['tuned'][:60]!r}", field="format")


def answers_from_folder(folder, prompts: list[list[dict]], *, peft: bool = False,
                        max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of the model in ``folder`` as transformers alone loads it (a PEFT adapter on the base model
    its config names, with ``peft``): its own tokenizer, chat template and generation config decide the prompt
    and where a reply ends."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if peft:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for messages in prompts:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            new = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
            out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out
