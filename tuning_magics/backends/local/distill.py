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
Both are written atomically, once every prompt is answered: either the whole
file exists or none does. Until then each answer is appended, as it arrives,
to ``distillation_labelled_dataset.partial.jsonl`` (``{"source_line", "key",
"answer"}``, ``key`` a digest of teacher, options and prompt), so a job that
crashes or is cancelled at prompt 9,000 of 10,000 asks the teacher, when
resumed, for the last 1,000 only.

The teacher is:

- a model the local engine loads (``local/tiny-*``, a checkpoint folder such as a
  job's ``postprocess/node-0/checkpoints/final``, a Hugging Face id in the local
  cache): prompts are answered in left-padded batches;
- an OpenAI-compatible chat-completions endpoint (``http://host:port/v1`` or the
  full ``.../chat/completions`` URL, ending in ``#<model id>`` to pick one model
  of an endpoint that serves several; API key from ``api_key`` or
  ``$OPENAI_API_KEY``): prompts are sent concurrently from a small thread pool.

The managed service's teachers (``deepseek-ai/deepseek-r1-0528-maas``...) live
only behind Vertex AI; locally they are reached through an endpoint URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ...errors import UserError
from ...storage import atomic_writer

LABELLED_FILE = "distillation_labelled_dataset.jsonl"
SOURCES_FILE = "distillation_labelled_dataset.sources.jsonl"
PARTIAL_FILE = "distillation_labelled_dataset.partial.jsonl"
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


def _sibling(target: Path, name: str, suffix: str) -> Path:
    """The sidecar ``name`` next to the default labelled file, else ``<stem><suffix>`` next to ``target``."""
    return target.with_name(name if target.name == LABELLED_FILE else target.stem + suffix)


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
        raise UserError(f"cannot read the prompts of {str(train_path)!r} ({exc}); check the file with "
                        "tuning_magics.validate()",
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
# A teacher's answer(prompts, on_answer=...) calls on_answer(i, text) for each prompt as
# its answer arrives, from the calling thread; "" means no answer (retried once later).


def _is_url(teacher: str) -> bool:
    return teacher.startswith(("http://", "https://"))


#: How a tune() user gives an endpoint teacher its key. The job's worker reads it from the
#: environment it inherits from the process that starts it: the one calling tune() or
#: job.resume() when a slot is free, but the previous job's worker for a job that waited.
_KEY_HINT = ("set OPENAI_API_KEY (os.environ[\"OPENAI_API_KEY\"] = ...) in the notebook or script, then call "
             "job.resume() or tune() again while no other job runs: a job reads the key from the process that "
             "starts it, which for a job that waited in the queue is the job before it")


def _refused(url: str, exc, what: str, api_key: str | None = None) -> UserError:
    text = str(exc)
    if api_key:
        text = text.replace(api_key, "***")  # some servers echo the key they refuse; it must not reach job logs
    from .client import redact_url

    return UserError(f"the teacher endpoint {redact_url(url)} refused {what} ({text}); {_KEY_HINT}",
                     field="base_teacher_model")


class _LocalTeacher:
    """A model loaded on this machine, answering prompts in left-padded batches.

    Prompts follow the rules of ``job.chat()`` (:mod:`tuning_magics.chat_request`): each is
    checked against the model's context before any is answered, and a reply gets
    at most the room the context leaves.
    """

    def __init__(self, name: str, *, device=None, dtype=None):
        from .generate import LocalChatModel

        self.chat = LocalChatModel(name, device=device, dtype=dtype)

    def _prompt_ids(self, prompt: list[dict], index: int) -> list[int]:
        from ...chat_request import BadRequest, check_context

        try:
            ids = self.chat.prompt_ids(prompt)
            check_context(len(ids), None, self.chat.context_length)
        except BadRequest as exc:
            raise _Refused(str(exc), index=index, by="local") from None
        return ids

    def _room(self, longest: int, gen: dict) -> int:
        context = self.chat.context_length
        return gen["max_new_tokens"] if context is None else min(gen["max_new_tokens"], context - longest)

    def answer(self, prompts: list[list[dict]], *, on_answer: Callable[[int, str], None], batch_size: int,
               stop: Callable[[], bool], **gen) -> None:
        import torch

        tok, model = self.chat.tokenizer, self.chat.model
        encoded = [self._prompt_ids(p, i) for i, p in enumerate(prompts)]  # every prompt checked up front
        # Longest first: similar lengths share a batch (little padding) and a batch that
        # does not fit in memory fails at once, not at the end.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        if gen["seed"] is not None:
            torch.manual_seed(int(gen["seed"]))
        side = tok.padding_side
        tok.padding_side = "left"  # generation appends on the right, so pads go on the left
        try:
            for start in range(0, len(order), batch_size):
                if stop():
                    raise _cancelled_error()
                idx = order[start:start + batch_size]
                kwargs = self.chat.generation_kwargs(self._room(len(encoded[idx[0]]), gen), gen["temperature"],
                                                     gen["top_p"], gen["top_k"])
                enc = tok.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
                enc = {k: v.to(self.chat.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                with torch.no_grad():
                    out = model.generate(**enc, **kwargs)
                new = out[:, enc["input_ids"].shape[1]:]
                for row, i in enumerate(idx):
                    on_answer(i, tok.decode(new[row], skip_special_tokens=True))
        finally:
            tok.padding_side = side

    def answer_one(self, prompt: list[dict], **gen) -> str:
        room = self._room(len(self._prompt_ids(prompt, 0)), gen)
        return self.chat.reply(prompt, **{**gen, "max_new_tokens": room})


class _EndpointTeacher:
    """An OpenAI-compatible chat-completions endpoint, asked from a small thread pool."""

    def __init__(self, url: str, *, api_key: str | None, model: str | None, timeout: float, concurrency: int):
        from .client import EndpointError, list_models, redact_url

        url, _, named = url.partition("#")  # "http://host/v1#model-id" names the model
        self.url = url
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.concurrency = max(1, int(concurrency))
        self.model = model or named or None
        self.errors: dict[int, str] = {}
        if self.model is None:
            try:
                served = list_models(url, api_key=self.api_key, timeout=min(timeout, 30.0))
            except EndpointError as exc:
                if exc.status in (401, 403):
                    raise _refused(url, exc, "the API key" if self.api_key else "a request without an API key",
                                   self.api_key) from None
                if exc.status is None:
                    raise UserError(f"the teacher endpoint {redact_url(url)} does not answer ({exc}); start the server or "
                                    "check the URL", field="base_teacher_model") from None
                served = []  # some servers have no /models; the request then names no model
            self.model = served[0] if len(served) == 1 else None
            if len(served) > 1:
                raise UserError(f"the teacher endpoint {redact_url(url)} serves {len(served)} models "
                                f"({', '.join(served[:5])}); name one at the end of base_teacher_model: "
                                f"{redact_url(url)}#{served[0]}",
                                field="base_teacher_model")

    def _ask(self, prompt: list[dict], gen: dict) -> str:
        """The endpoint's answer; EndpointError when it fails, _Refused when it refuses this prompt."""
        from .client import EndpointError, chat_completion, redact_url

        params = {"max_tokens": gen["max_new_tokens"], "temperature": gen["temperature"], "top_p": gen["top_p"]}
        if gen.get("seed") is not None:
            params["seed"] = gen["seed"]
        try:
            data = chat_completion(self.url, prompt, model=self.model, api_key=self.api_key, timeout=self.timeout,
                                   **params)
            return data["choices"][0]["message"].get("content") or ""
        except EndpointError as exc:
            if exc.status in (401, 403):
                raise _refused(self.url, exc, "the API key" if self.api_key else "a request without an API key",
                               self.api_key) from None
            if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429):
                raise _Refused(str(exc)) from None
            raise
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"{redact_url(self.url)} answered without choices[0].message.content") from None

    def answer(self, prompts: list[list[dict]], *, on_answer: Callable[[int, str], None], batch_size: int,
               stop: Callable[[], bool], **gen) -> None:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        from .client import EndpointError

        def settle(fut, i) -> None:
            try:
                text = fut.result()
            except EndpointError as exc:
                self.errors[i] = str(exc)  # answered "" and retried once later
                text = ""
            except _Refused as exc:
                raise _Refused(str(exc), index=i, by=exc.by) from None
            on_answer(i, text)

        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher") as pool:
            pending = {}
            todo = iter(range(len(prompts)))
            try:
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
                        settle(fut, pending.pop(fut))
                    if stop():
                        raise _cancelled_error()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                # Answers already on their way were paid for: keep them for the resumed job.
                for fut, i in pending.items():
                    if not fut.cancelled():
                        try:
                            settle(fut, i)
                        except BaseException:  # noqa: BLE001 - the first error is the one to report
                            pass
                raise

    def answer_one(self, prompt: list[dict], **gen) -> str:
        from .client import EndpointError

        try:
            return self._ask(prompt, gen)
        except EndpointError as exc:
            self.last_error = str(exc)
            return ""


class _Refused(Exception):
    """The teacher cannot answer one prompt: the endpoint refused it (a 4xx other than 401, 403, 408, 429),
    or (``by="local"``) it does not fit the local model's context. Retrying will not help."""

    def __init__(self, message: str, index: int | None = None, by: str = "endpoint"):
        super().__init__(message)
        self.index, self.by = index, by


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


# -- the answers so far ---------------------------------------------------------------


class _Answers:
    """The teacher's answers so far, in the partial file: read back on a resume, appended as they arrive.

    An answer is reused only for the same source line and the same key (teacher,
    options and prompt), so a changed training file or teacher asks again.
    """

    def __init__(self, path: Path, keys: dict[int, str]):
        self.path, self.keys = path, keys
        self.got: dict[int, str] = {}
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1  # a last line without its newline was torn by a crash
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
                line, key, answer = rec["source_line"], rec["key"], rec["answer"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(line, int) and keys.get(line) == key and isinstance(answer, str) and answer.strip():
                self.got[line] = answer
        self._fh = open(path, "r+b" if data else "wb")
        self._fh.truncate(end)  # so the next record starts on a line of its own
        self._fh.seek(end)

    def add(self, line: int, answer: str) -> bool:
        """Record one answer; False for an empty one, which is not kept (it is asked again)."""
        if not answer.strip():
            return False
        self.got[line] = answer
        rec = {"source_line": line, "key": self.keys[line], "answer": answer}
        self._fh.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
        self._fh.flush()  # in the OS's hands: a killed worker loses nothing
        return True

    def close(self) -> None:
        self._fh.close()


def _key(teacher: str, gen: dict, prompt: list[dict]) -> str:
    text = json.dumps([teacher, gen, prompt], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -- the labelling ------------------------------------------------------------------


def _write_jsonl(path: Path, records) -> None:
    with atomic_writer(path, overwrite=True) as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")


def label_dataset(teacher, train_path, out_path, *, on_event: Callable[[dict], None] | None = None,
                  batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int | None = None, api_key: str | None = None, model: str | None = None,
                  timeout: float = 600.0, concurrency: int = ENDPOINT_CONCURRENCY,
                  should_stop: Callable[[], bool] | None = None, device=None, dtype=None) -> int:
    """Have ``teacher`` answer every prompt of ``train_path``; write the labelled chat JSONL; return its line count.

    ``out_path`` is the labelled file or the job's output folder (the file is then
    ``<folder>/distillation_labelled_dataset.jsonl``). Answers obtained by an
    earlier, interrupted call for the same file are reused (see the module notes).
    ``on_event`` receives ``{"event": "progress", "stage": "labelling", "done", "total"}``.
    An empty or failed answer is retried once; a second failure raises a UserError
    naming the line. ``model`` names the model at an endpoint that serves several;
    ``should_stop`` cancels between batches (raising the trainer's ``TrainingCancelled``).
    """
    from ...chat_request import check_option

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a whole number of at least 1, not {batch_size!r}"[:200], field="batch_size")
    # The rules of job.chat()'s options, each required here.
    gen = {name: check_option(name, value) for name, value in (
        ("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
        ("seed", seed))}
    for name in ("max_new_tokens", "temperature", "top_p", "top_k"):
        if gen[name] is None:
            raise UserError(f"'{name}' must be a number, not None", field=name)
    emit = on_event or (lambda event: None)
    stop = should_stop or (lambda: False)
    target = labelled_path(out_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    name = Path(train_path).name

    examples = read_prompts(train_path)
    total = len(examples)
    ident = str(teacher).strip() + (f"#{model}" if model else "")
    answers = _Answers(_sibling(target, PARTIAL_FILE, ".partial.jsonl"),
                       {line: _key(ident, gen, prompt) for line, prompt in examples})
    t0 = time.perf_counter()
    try:
        todo = [(line, prompt) for line, prompt in examples if line not in answers.got]
        emit({"event": "progress", "stage": "labelling", "done": total - len(todo), "total": total})
        if todo:
            _ask_teacher(teacher, todo, answers, emit=emit, total=total, file_name=name, stop=stop,
                         batch_size=int(batch_size), gen=gen, api_key=api_key, model=model, timeout=timeout,
                         concurrency=concurrency, device=device, dtype=dtype)
    finally:
        answers.close()

    labelled = [{"messages": [*prompt, {"role": "assistant", "content": answers.got[line]}]}
                for line, prompt in examples]
    # The sidecar first: the labelled file's presence is what tells a resumed job labelling is complete.
    _write_jsonl(_sibling(target, SOURCES_FILE, ".sources.jsonl"),
                 ({"line": k, "source_line": line} for k, (line, _) in enumerate(examples, 1)))
    _write_jsonl(target, labelled)
    answers.path.unlink(missing_ok=True)
    emit({"event": "labelled", "path": str(target), "examples": total,
          "seconds": round(time.perf_counter() - t0, 3)})
    return total


def _ask_teacher(teacher, todo: list[tuple[int, list[dict]]], answers: _Answers, *, emit, total: int,
                 file_name: str, stop, batch_size: int, gen: dict, **options) -> None:
    """Have the teacher answer the prompts ``todo``, each recorded in ``answers`` as it arrives."""
    worker = _teacher(teacher, **options)

    def on_answer(i: int, text: str) -> None:
        if answers.add(todo[i][0], text):
            emit({"event": "progress", "stage": "labelling", "done": len(answers.got), "total": total})

    try:
        worker.answer([p for _, p in todo], on_answer=on_answer, batch_size=batch_size, stop=stop, **gen)
        for i, (line, prompt) in enumerate(todo):
            if line in answers.got:
                continue
            if stop():
                raise _cancelled_error()
            # One retry, alone: a transient endpoint error, or a batch effect of padding.
            try:
                on_answer(i, worker.answer_one(prompt, **gen))
            except _Refused as exc:
                raise _Refused(str(exc), index=i, by=exc.by) from None
            if line not in answers.got:
                why = getattr(worker, "last_error", None) or getattr(worker, "errors", {}).get(i)
                reason = f" ({why})" if why else ""
                raise UserError(f"the teacher gave no answer to line {line} of {file_name} twice{reason}; "
                                "fix or remove that prompt, or use another teacher", field="base_teacher_model",
                                line=line)
    except _Refused as exc:
        line = todo[exc.index][0] if exc.index is not None else None
        where = f"line {line} of {file_name}" if line is not None else "a prompt"
        if exc.by == "local":
            raise UserError(f"the teacher cannot answer {where}: {exc}, or remove that prompt", field="train_dataset",
                            line=line) from None
        raise UserError(f"the teacher endpoint refused {where}: {exc}; fix or remove that prompt, or use another "
                        "teacher", field="base_teacher_model", line=line) from None
