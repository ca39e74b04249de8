"""Chat with a model on this machine: any checkpoint folder or model id the engine can load.

The prompt is rendered with the model's own chat template, exactly as in
training, so a tuned model sees the format it learned. Requests are checked by
:mod:`tuning_magics.chat_request` (the rules the server uses too), including that prompt and
reply fit the model's context.

Several threads may share one model: they take turns one decoding step at a
time, first come first served, so a long reply never holds back a short one.
That is what continuous batching gives vLLM, TGI or llama.cpp's server,
without the batching: one step of one request is the longest anyone waits per
turn (a prefill is bounded by the context check).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Iterator

from ...chat_request import BadRequest, chat_request, check_context, cut_at_stop, until_stop


class _Turns:
    """A first-come-first-served lock that its holder can pass to those waiting and get back after them.

    The lock knows its holder (a thread): only the holder releases it, so a thread
    interrupted while waiting (Ctrl-C in ``pass_turn``) cannot free a turn another holds.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._holder: int | None = None

    def _wait_turn(self) -> None:  # called with the condition held
        ticket = object()
        self._queue.append(ticket)
        try:
            while self._holder is not None or self._queue[0] is not ticket:
                self._cond.wait()
        except BaseException:
            # Interrupted (KeyboardInterrupt...): a ticket left at the head would block everyone.
            self._queue.remove(ticket)
            self._cond.notify_all()
            raise
        self._queue.popleft()
        self._holder = threading.get_ident()

    def acquire(self) -> None:
        with self._cond:
            self._wait_turn()

    def release(self) -> None:
        """Free the lock if this thread holds it (after an interrupted ``pass_turn`` it does not)."""
        with self._cond:
            if self._holder == threading.get_ident():
                self._holder = None
                self._cond.notify_all()

    def waiting(self) -> bool:
        return bool(self._queue)

    def pass_turn(self) -> bool:
        """Let everyone waiting go first, then take the lock back; False when nobody was waiting."""
        with self._cond:
            if not self._queue:
                return False
            self._holder = None
            self._cond.notify_all()
            self._wait_turn()
            return True


class _TakeTurns:
    """A stopping criterion, called after every decoding step: stops on request, else passes the turn.

    Sampling draws from torch's global generator, so a request that passes its
    turn keeps its own generator state: a seeded reply stays the same when others interleave.
    """

    def __init__(self, turns: _Turns, should_stop: Callable[[], bool] | None, device):
        self.turns, self.should_stop, self.device = turns, should_stop, device

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = bool(self.should_stop is not None and self.should_stop())
        if not stop and self.turns.waiting():
            cuda = self.device.type == "cuda"
            state = torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None
            if self.turns.pass_turn():
                torch.set_rng_state(state[0])
                if cuda:
                    torch.cuda.set_rng_state(state[1], self.device)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _StopSequences:
    """A stopping criterion: stops once the reply's last tokens hold one of the request's stop sequences.

    Each token adds at least a byte and a character has at most 4, so the last
    ``4 * longest + 4`` tokens hold any stop sequence that just ended: a step costs
    a short decode, not the whole reply's.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_tokens: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, prompt_tokens
        self.tail = 4 * max(map(len, stops)) + 4

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        ids = input_ids[0, max(self.start, input_ids.shape[1] - self.tail):].tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stop = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class LocalChatModel:
    """A loaded causal LM and tokenizer that answer chat messages.

    ``LocalChatModel("runs/job-1/postprocess/node-0/checkpoints/final").reply("Hi")``
    """

    def __init__(self, model_id_or_path, *, device=None, dtype=None):
        from .models import load_model_and_tokenizer

        self.name = str(model_id_or_path)
        self.model, self.tokenizer = load_model_and_tokenizer(model_id_or_path, dtype=dtype, device=device)
        self.model.eval()
        self.model.config.use_cache = True
        self._turns = _Turns()

    @classmethod
    def around(cls, model, tokenizer, name: str = "model") -> "LocalChatModel":
        """A chat model over weights already loaded (the trainer's, between steps): nothing is loaded or copied;
        the caller puts the model in eval mode with its KV cache on."""
        self = cls.__new__(cls)
        self.name, self.model, self.tokenizer, self._turns = name, model, tokenizer, _Turns()
        return self

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt and reply) the model takes: its position limit or the tokenizer's, if known."""
        config = self.model.config
        limits = [getattr(config, "max_position_embeddings", None),
                  getattr(getattr(config, "text_config", None), "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        # Tokenizers without a limit report a huge placeholder (1e30).
        limits = [int(n) for n in limits if isinstance(n, (int, float)) and 0 < n < 10**9]
        return min(limits) if limits else None

    def stop_ids(self) -> list[int]:
        """Token ids that end a reply (end of sequence and the template's end-of-turn markers)."""
        from ...datasets.tokenizer import stop_token_ids

        gen = getattr(self.model, "generation_config", None)
        return stop_token_ids(self.tokenizer, getattr(gen, "eos_token_id", None) if gen is not None else None)

    def render(self, messages) -> str:
        """The prompt text: ``messages`` in the chat template, ending where the assistant's reply starts."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            import jinja2

            if not isinstance(exc, jinja2.TemplateError):
                raise
            # A template's own rule (e.g. roles must alternate) is the request's mistake.
            raise BadRequest(f"the model's chat template refuses these messages ({exc}); change them to follow it",
                             field="messages") from None

    def _ids(self, text: str) -> list[int]:
        # verbose=False: a prompt over the limit is refused by prepare(), not warned about on stderr.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def tokens_at_least(self, text: str, limit: int) -> int | None:
        """A lower bound on ``text``'s token count once it is proved over ``limit``, else None.

        Only growing prefixes are encoded, so a megabyte prompt for a 1,024-token
        context costs a few kilobytes of tokenising, not the whole text.
        """
        budget = 4 * (limit + 2)
        while len(text) > budget:
            n = len(self._ids(text[:budget])) - 1  # the cut may split what would be one token
            if n > limit:
                return n
            budget *= 4
        return None

    def _tensors(self, ids: list[int]) -> dict:
        import torch

        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def generation_kwargs(self, max_new_tokens, temperature, top_p, top_k) -> dict:
        """``generate()`` options for greedy (temperature 0) or sampled decoding."""
        stops = self.stop_ids()
        kw = dict(max_new_tokens=int(max_new_tokens), eos_token_id=stops,
                  pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0])
        if temperature and temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k or 0))
        else:
            # Greedy: unset sampling knobs so the model's generation config cannot re-enable them.
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def prepare(self, req: dict) -> dict:
        """A checked request (see :mod:`tuning_magics.chat_request`) with its prompt encoded and checked against
        the context.

        Adds ``inputs`` and ``prompt_tokens``, and resolves ``max_new_tokens``;
        raises BadRequest when the prompt and reply do not fit.
        """
        ids = self.prompt_ids(req["messages"], req["max_new_tokens"], max_name=req["max_name"])
        max_new = check_context(len(ids), req["max_new_tokens"], self.context_length, max_name=req["max_name"])
        return {**req, "inputs": self._tensors(ids), "prompt_tokens": len(ids), "max_new_tokens": max_new}

    def prompt_ids(self, messages, max_new_tokens: int | None = None, *, max_name: str = "max_new_tokens") -> list:
        """The prompt's token ids; BadRequest, without encoding it all, when it cannot fit the context."""
        text = self.render(messages)
        context = self.context_length
        if context is not None:
            over = self.tokens_at_least(text, context)
            if over is not None:
                check_context(over, max_new_tokens, context, max_name=max_name, at_least=True)
        return self._ids(text)

    def reply(self, messages, *, stream: bool = False, **options):
        """The assistant's answer to ``messages`` (a list of chat messages or one user string).

        Options: ``max_new_tokens`` (default: 256, or what fits the context),
        ``temperature`` (0 decodes greedily), ``top_p``, ``top_k``, ``seed``, ``stop``
        (a string or up to 4: the reply ends before the first). With
        ``stream=True`` the result is an iterator of text pieces instead of one
        string. A mistake in the request raises a one-line UserError.
        """
        req = self.prepare(chat_request(messages, stream=stream, **options))
        return self.stream(req) if stream else self.complete(req)[0]

    def _generate(self, req: dict, should_stop, streamer=None):
        """Run ``generate`` in turn with other requests; stops early once ``should_stop()`` is true."""
        import torch
        from transformers import StoppingCriteriaList

        kwargs = self.generation_kwargs(req["max_new_tokens"], req["temperature"], req["top_p"], req["top_k"])
        criteria = StoppingCriteriaList([_TakeTurns(self._turns, should_stop, self.device)])
        if req["stop"]:
            criteria.append(_StopSequences(self.tokenizer, req["stop"], req["prompt_tokens"]))
        self._turns.acquire()
        try:
            if req.get("seed") is not None:
                torch.manual_seed(int(req["seed"]))
            with torch.no_grad():
                return self.model.generate(**req["inputs"], **kwargs, stopping_criteria=criteria, streamer=streamer)
        finally:
            self._turns.release()

    def complete(self, req: dict, *, should_stop: Callable[[], bool] | None = None) -> tuple[str, int, list[int]]:
        """(reply text, prompt length in tokens, generated token ids) for a checked request: what a server needs."""
        req = req if "inputs" in req else self.prepare(req)
        out = self._generate(req, should_stop)
        new = out[0, req["prompt_tokens"]:].tolist()
        return cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), req["stop"])[0], \
            req["prompt_tokens"], new

    def replies(self, conversations, *, max_new_tokens: int = 256, batch_size: int = 16) -> list[str]:
        """Greedy replies to many conversations, generated ``batch_size`` at a time: what an evaluation needs.

        Prompts are sorted by length and left-padded in each batch, so one
        ``generate`` call with its KV cache answers a whole batch; each reply ends
        at the model's end-of-turn token (or ``max_new_tokens``) and is the text
        ``reply(..., temperature=0)`` gives. Returned in the order given.
        """
        import torch

        encoded = [self.prompt_ids(messages, max_new_tokens) for messages in conversations]
        stops = set(self.stop_ids())
        kwargs = self.generation_kwargs(max_new_tokens, 0, None, None)
        pad = kwargs["pad_token_id"]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out: list[str] = [""] * len(encoded)
        for start in range(0, len(order), max(1, int(batch_size))):
            chunk = order[start:start + max(1, int(batch_size))]
            width = max(len(encoded[i]) for i in chunk)
            ids = [[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk]
            mask = [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk]
            inputs = {"input_ids": torch.tensor(ids, dtype=torch.long, device=self.device),
                      "attention_mask": torch.tensor(mask, dtype=torch.long, device=self.device)}
            self._turns.acquire()
            try:
                with torch.no_grad():
                    generated = self.model.generate(**inputs, **kwargs)
            finally:
                self._turns.release()
            for row, i in enumerate(chunk):
                new = generated[row, width:].tolist()
                end = next((k for k, token in enumerate(new) if token in stops), len(new))
                out[i] = self.tokenizer.decode(new[:end], skip_special_tokens=True)
        return out

    def finish_reason(self, new: list[int], stop=()) -> str:
        """OpenAI's ``finish_reason`` for the generated ids ``new``: "stop" when the reply ended by itself or at one
        of the ``stop`` sequences, else "length"."""
        if new and new[-1] in self.stop_ids():
            return "stop"
        return "stop" if stop and cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stop)[1] \
            else "length"

    def stream(self, req: dict, *, ids: list | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """An iterator of the reply's text pieces as they are generated (in a helper thread).

        When ``ids`` is a list, the generated token ids are appended to it as they
        come. Generation stops when ``should_stop()`` is true or the iterator is
        closed (its consumer went away). The text ends before the request's first
        stop sequence, and what may begin one is sent only once it does not.
        """
        req = req if "inputs" in req else self.prepare(req)  # mistakes raise here, not at the first piece
        return until_stop(self._pieces(req, ids, should_stop), req["stop"])

    def _pieces(self, req: dict, ids: list | None, should_stop) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        class _Streamer(TextIteratorStreamer):
            def put(self, value):
                if ids is not None and not (self.skip_prompt and self.next_tokens_are_prompt):
                    ids.extend(value.reshape(-1).tolist())
                super().put(value)

        streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = threading.Event()
        errors: list[BaseException] = []

        def stop() -> bool:
            return closed.is_set() or (should_stop is not None and should_stop())

        def run():
            try:
                self._generate(req, stop, streamer)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True, name="tuning-magics-generate")
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            closed.set()
            thread.join()
        if errors:
            raise errors[0]
