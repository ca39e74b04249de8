"""Distillation's first phase: a teacher model answers every prompt of the training set.

``label_dataset(teacher, train_path, out_path)`` reads the JSONL (any accepted
format), takes each example's conversation up to (not including) its final
assistant turn as the prompt, has the teacher answer every prompt, and writes
``distillation_labelled_dataset.jsonl``: one chat record per example,
``{"messages": [...prompt..., {"role": "assistant", "content": answer}]}``,
which the student is then tuned on. The file holds nothing but chat records,
so it passes the dataset validator and can be uploaded as is; the link from
each labelled line to its source line lives in the sidecar
``distillation_labelled_dataset.sources.jsonl`` (``{"line", "source_line"}``).
Both are written atomically: either the whole file exists or none does.

The teacher is:

- a model the local engine loads (``local/tiny-*``, a checkpoint folder such as a
  job's ``postprocess/node-0/checkpoints/final``, a Hugging Face id in the local
  cache): prompts are answered in left-padded batches;
- an OpenAI-compatible chat-completions endpoint (``http://host:port/v1`` or the
  full ``.../chat/completions`` URL; API key from ``api_key`` or ``$OPENAI_API_KEY``):
  prompts are sent concurrently from a small thread pool.

The managed service's teachers (``deepseek-ai/deepseek-r1-0528-maas``...) live
only behind Vertex AI; locally they are reached through an endpoint URL.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ...errors import UserError

LABELLED_FILE = "distillation_labelled_dataset.jsonl"
SOURCES_FILE = "distillation_labelled_dataset.sources.jsonl"
#: Parallel requests to an endpoint teacher: enough to hide latency, few enough not to hit rate limits.
ENDPOINT_CONCURRENCY = 4


class _Cancelled(Exception):
    pass


def _cancelled_error():
    try:
        from .trainer import (
            TrainingCancelled,  # light: trainer imports torch only inside train()
        )

        return TrainingCancelled("cancelled while the teacher was labelling the prompts")
    except ImportError:  # pragma: no cover
        return _Cancelled("cancelled while the teacher was labelling the prompts")


def labelled_path(out_path) -> Path:
    """The labelled file for ``out_path``: the path itself, or ``<folder>/distillation_labelled_dataset.jsonl``."""
    p = Path(out_path)
    if p.is_dir() or p.suffix.lower() not in (".jsonl", ".json"):
        return p / LABELLED_FILE
    return p


def read_prompts(train_path) -> list[tuple[int, list[dict]]]:
    """``(source line number, prompt messages)`` for every example of a JSONL file in any format.

    The prompt is the conversation without its final assistant turn (that is
    what the teacher answers); earlier assistant turns stay as context.
    """
    from ...datasets.formats import read_conversations

    try:
        conversations = read_conversations(train_path)
        # read_conversations skips blank lines; count them the same way to name source lines.
        with open(train_path, "rb") as fh:
            lines = [n for n, raw in enumerate(fh, 1) if raw.strip()]
    except OSError as exc:
        raise UserError(f"cannot read the training file {str(train_path)!r} ({exc.strerror or exc})",
                        field="train_dataset") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the prompts of {str(train_path)!r} ({exc}); validate it with %dataset first",
                        field="train_dataset") from None
    out = []
    for line, conv in zip(lines, conversations):
        prompt = conv[:-1] if conv and conv[-1]["role"] == "assistant" else conv
        if not any(m["role"] == "user" for m in prompt):
            raise UserError(f"line {line} of {train_path} has no user turn for the teacher to answer; "
                            "give every example a prompt", field="train_dataset", line=line)
        out.append((line, prompt))
    if not out:
        raise UserError(f"the training file {train_path} has no examples; give at least one prompt",
                        field="train_dataset")
    return out


# -- teachers ---------------------------------------------------------------------


def _is_url(teacher: str) -> bool:
    return teacher.startswith(("http://", "https://"))


class _LocalTeacher:
    """A model loaded on this machine, answering prompts in left-padded batches."""

    def __init__(self, name: str, *, device=None, dtype=None):
        from .generate import LocalChatModel

        self.chat = LocalChatModel(name, device=device, dtype=dtype)

    def answer(self, prompts: list[list[dict]], *, batch_size: int, progress: Callable[[int], None],
               stop: Callable[[], bool], **gen) -> list[str]:
        import torch

        tok, model = self.chat.tokenizer, self.chat.model
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        # Longest first: similar lengths share a batch (little padding) and a batch that
        # does not fit in memory fails at once, not at the end.
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        kwargs = self.chat.generation_kwargs(gen["max_new_tokens"], gen["temperature"], gen["top_p"], gen["top_k"],
                                       gen["seed"])
        answers: list[str] = [""] * len(texts)
        side = tok.padding_side
        tok.padding_side = "left"  # generation appends on the right, so pads go on the left
        try:
            for start in range(0, len(order), batch_size):
                if stop():
                    raise _cancelled_error()
                idx = order[start:start + batch_size]
                enc = tok([texts[i] for i in idx], add_special_tokens=False, padding=True, return_tensors="pt")
                enc = {k: v.to(self.chat.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                with torch.no_grad():
                    out = model.generate(**enc, **kwargs)
                new = out[:, enc["input_ids"].shape[1]:]
                for row, i in enumerate(idx):
                    answers[i] = tok.decode(new[row], skip_special_tokens=True)
                progress(len(idx))
        finally:
            tok.padding_side = side
        return answers

    def answer_one(self, prompt: list[dict], **gen) -> str:
        return self.chat.reply(prompt, **gen)


class _EndpointTeacher:
    """An OpenAI-compatible chat-completions endpoint, asked from a small thread pool."""

    def __init__(self, url: str, *, api_key: str | None, model: str | None, timeout: float, concurrency: int):
        from .client import EndpointError, list_models

        self.url = url
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.concurrency = max(1, int(concurrency))
        self.model = model
        if self.model is None:
            try:
                served = list_models(url, api_key=self.api_key, timeout=min(timeout, 30.0))
            except EndpointError as exc:
                if exc.status in (401, 403):
                    raise UserError(f"the teacher endpoint {url} refused the API key ({exc}); set OPENAI_API_KEY "
                                    "or pass api_key", field="base_teacher_model") from None
                if exc.status is None:
                    raise UserError(f"the teacher endpoint {url} does not answer ({exc}); start the server or "
                                    "check the URL", field="base_teacher_model") from None
                served = []  # some servers have no /models; the request then names no model
            self.model = served[0] if len(served) == 1 else None
            if len(served) > 1:
                raise UserError(f"the teacher endpoint {url} serves {len(served)} models ({', '.join(served[:5])}); "
                                "name one with model=...", field="base_teacher_model")

    def _ask(self, prompt: list[dict], gen: dict) -> str:
        from .client import EndpointError, chat_completion

        params = {"max_tokens": gen["max_new_tokens"], "temperature": gen["temperature"], "top_p": gen["top_p"]}
        if gen.get("seed") is not None:
            params["seed"] = gen["seed"]
        try:
            data = chat_completion(self.url, prompt, model=self.model, api_key=self.api_key, timeout=self.timeout,
                                   **params)
            return (data["choices"][0]["message"].get("content") or "")
        except EndpointError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429):
                raise UserError(f"the teacher endpoint refused a prompt: {exc}", field="base_teacher_model") \
                    from None
            raise
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"{self.url} answered without choices[0].message.content") from None

    def answer(self, prompts: list[list[dict]], *, batch_size: int, progress, stop, **gen) -> list[str]:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        from .client import EndpointError

        answers: list[str] = [""] * len(prompts)
        errors: dict[int, str] = {}
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher") as pool:
            pending = {}
            todo = iter(range(len(prompts)))
            # A bounded window of requests in flight so a cancel stops promptly.
            while True:
                while len(pending) < 2 * self.concurrency:
                    i = next(todo, None)
                    if i is None:
                        break
                    pending[pool.submit(self._ask, prompts[i], gen)] = i
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    try:
                        answers[i] = fut.result()
                    except EndpointError as exc:
                        errors[i] = str(exc)  # answered "" and retried once below
                    except BaseException:
                        for f in pending:
                            f.cancel()
                        raise
                    progress(1)
                if stop():
                    for f in pending:
                        f.cancel()
                    raise _cancelled_error()
        self.errors = errors
        return answers

    def answer_one(self, prompt: list[dict], **gen) -> str:
        from .client import EndpointError

        try:
            return self._ask(prompt, gen)
        except EndpointError as exc:
            self.last_error = str(exc)
            return ""


def _teacher(teacher, *, api_key, model, timeout, concurrency, device, dtype):
    from ... import catalog

    name = str(teacher or "").strip()
    if not name:
        raise UserError("no teacher given; pass base_teacher_model (an endpoint URL or a local model)",
                        field="base_teacher_model")
    if _is_url(name):
        return _EndpointTeacher(name, api_key=api_key, model=model, timeout=timeout, concurrency=concurrency)
    known = catalog.get_teacher(name)
    if known is not None and not Path(name).expanduser().exists():
        raise UserError(f"teacher {known.id} is served only by Vertex AI; for local distillation pass an "
                        "OpenAI-compatible endpoint URL that serves it (http://host:port/v1) or a local model",
                        field="base_teacher_model")
    return _LocalTeacher(name, device=device, dtype=dtype)


# -- the labelling ------------------------------------------------------------------


def _write_atomic(path: Path, lines) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(line + "\n" for line in lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def label_dataset(teacher, train_path, out_path, *, on_event: Callable[[dict], None] | None = None,
                  batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int | None = None, api_key: str | None = None, model: str | None = None,
                  timeout: float = 600.0, concurrency: int = ENDPOINT_CONCURRENCY,
                  should_stop: Callable[[], bool] | None = None, device=None, dtype=None) -> int:
    """Have ``teacher`` answer every prompt of ``train_path``; write the labelled chat JSONL; return its line count.

    ``out_path`` is the labelled file or the job's output folder (the file is then
    ``<folder>/distillation_labelled_dataset.jsonl``). ``on_event`` receives
    ``{"event": "progress", "stage": "labelling", "done", "total"}``. An empty or
    failed answer is retried once; a second failure raises a UserError naming the line.
    ``model`` names the model at an endpoint that serves several; ``should_stop``
    cancels between batches (raising the trainer's ``TrainingCancelled``).
    """
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}", field="batch_size")
    if int(max_new_tokens) < 1:
        raise UserError(f"max_new_tokens must be at least 1, not {max_new_tokens}", field="max_new_tokens")
    emit = on_event or (lambda event: None)
    stop = should_stop or (lambda: False)
    target = labelled_path(out_path)
    target.parent.mkdir(parents=True, exist_ok=True)

    examples = read_prompts(train_path)
    total = len(examples)
    done = 0

    def progress(k: int) -> None:
        nonlocal done
        done += k
        emit({"event": "progress", "stage": "labelling", "done": done, "total": total})

    emit({"event": "progress", "stage": "labelling", "done": 0, "total": total})
    t0 = time.perf_counter()
    gen = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p),
           "top_k": int(top_k), "seed": seed}
    worker = _teacher(teacher, api_key=api_key, model=model, timeout=timeout, concurrency=concurrency,
                      device=device, dtype=dtype)
    prompts = [p for _, p in examples]
    answers = worker.answer(prompts, batch_size=int(batch_size), progress=progress, stop=stop, **gen)
    for i, answer in enumerate(answers):
        if answer.strip():
            continue
        if stop():
            raise _cancelled_error()
        # One retry, alone: a transient endpoint error, or a batch effect of padding.
        answers[i] = worker.answer_one(prompts[i], **gen)
        if not answers[i].strip():
            line = examples[i][0]
            why = getattr(worker, "last_error", None) or getattr(worker, "errors", {}).get(i)
            reason = f" ({why})" if why else ""
            raise UserError(f"the teacher gave no answer to line {line} of {Path(train_path).name} twice{reason}; "
                            "fix or remove that prompt, or use another teacher", field="base_teacher_model",
                            line=line)

    records = [json.dumps({"messages": [*prompt, {"role": "assistant", "content": answer}]}, ensure_ascii=False)
               for prompt, answer in zip(prompts, answers)]
    sources = [json.dumps({"line": k, "source_line": line}) for k, (line, _) in enumerate(examples, 1)]
    # The sidecar first: the labelled file's presence is what tells a resumed job labelling is complete.
    _write_atomic(target.with_name(SOURCES_FILE) if target.name == LABELLED_FILE
                  else target.with_name(target.stem + ".sources.jsonl"), sources)
    _write_atomic(target, records)
    emit({"event": "labelled", "path": str(target), "examples": total,
          "seconds": round(time.perf_counter() - t0, 3)})
    return total
