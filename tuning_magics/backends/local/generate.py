"""Chat with a model on this machine: any checkpoint folder or model id the engine can load.

The prompt is rendered with the model's own chat template, exactly as in
training, so a tuned model sees the format it learned.
"""

from __future__ import annotations

from typing import Iterator


def _as_messages(messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


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

    @property
    def device(self):
        return next(self.model.parameters()).device

    def stop_ids(self) -> list[int]:
        """Token ids that end a reply (end of sequence and the template's end-of-turn markers)."""
        ids = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return sorted(ids)

    def encode(self, messages) -> dict:
        """The prompt's input ids and attention mask, rendered with the chat template."""
        text = self.tokenizer.apply_chat_template(_as_messages(messages), tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def generation_kwargs(self, max_new_tokens, temperature, top_p, top_k, seed) -> dict:
        """``generate()`` options for greedy (temperature 0) or sampled decoding."""
        import torch

        kw = dict(max_new_tokens=int(max_new_tokens), eos_token_id=self.stop_ids(),
                  pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                  else self.stop_ids()[0])
        if temperature and temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k or 0))
            if seed is not None:
                torch.manual_seed(int(seed))
        else:
            # Greedy: unset sampling knobs so the model's generation config cannot re-enable them.
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def reply(self, messages, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
              top_k: int = 0, seed: int | None = None, stream: bool = False):
        """The assistant's answer to ``messages`` (a list of chat messages or one user string).

        ``temperature=0`` decodes greedily. With ``stream=True`` the result is an
        iterator of text pieces instead of one string.
        """
        if stream:
            return self.stream(messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, seed=seed)
        return self.complete(messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed)[0]

    def complete(self, messages, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None) -> tuple[str, int, list[int]]:
        """(reply text, prompt length in tokens, generated token ids): what a server needs for usage counts."""
        import torch

        inputs = self.encode(messages)
        with torch.no_grad():
            out = self.model.generate(**inputs, **self.generation_kwargs(max_new_tokens, temperature, top_p, top_k,
                                                                         seed))
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True), int(inputs["input_ids"].shape[1]), new

    def stream(self, messages, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, ids: list | None = None) -> Iterator[str]:
        """Yield the answer as it is generated, in text pieces (generation runs in a helper thread).

        When ``ids`` is a list, the generated token ids are appended to it as they come.
        """
        import threading

        import torch
        from transformers import TextIteratorStreamer

        class _Streamer(TextIteratorStreamer):
            def put(self, value):
                if ids is not None and not (self.skip_prompt and self.next_tokens_are_prompt):
                    ids.extend(value.reshape(-1).tolist())
                super().put(value)

        inputs = self.encode(messages)
        streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, **self.generation_kwargs(max_new_tokens, temperature, top_p, top_k, seed),
                      streamer=streamer)
        errors: list[BaseException] = []

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if errors:
            raise errors[0]
