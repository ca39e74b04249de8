"""From chat conversations to training batches.

Each conversation is rendered once with the model's own chat template and
tokenized once. Labels are ``-100`` everywhere except on the assistant's
tokens (its reply and the end-of-turn token), so the loss teaches answers, not
prompts. Batches group examples of similar length and pad only to the longest
example of the batch, which keeps the padding share small.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized conversation."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _render(tokenizer, messages, *, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns in it.

    A span runs from the start of the reply to the end of its end-of-turn
    marker. It is found by rendering the conversation up to each assistant turn
    with and without the reply; templates for which that does not give prefixes
    of the full text (some drop earlier reasoning) fall back to locating the
    reply text itself.
    """
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    prefix_ok = True
    for i, m in enumerate(messages):
        if m["role"] not in ("assistant", "model"):
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            prefix_ok = False
            break
        end = len(upto.rstrip())  # the newline after the end marker is the next turn's business
        spans.append((len(before), end))
    if prefix_ok:
        return full, spans
    spans = []
    cursor = 0
    eos = tokenizer.eos_token or ""
    for m in messages:
        if m["role"] not in ("assistant", "model"):
            continue
        text = m["content"] if isinstance(m["content"], str) else ""
        start = full.find(text, cursor) if text else -1
        if start < 0:
            continue
        end = start + len(text)
        rest = full[end:]
        stripped = rest.lstrip()
        if eos and stripped.startswith(eos):
            end += len(rest) - len(stripped) + len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def encode(tokenizer, messages: list[dict], max_seq_len: int | None = None) -> Example:
    """Tokenize one conversation with completion-only labels (``-100`` outside assistant turns)."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span_i = 0
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        while span_i < len(spans) and spans[span_i][1] <= a:
            span_i += 1
        if span_i < len(spans) and b > a and a >= spans[span_i][0] and b <= spans[span_i][1]:
            labels[t] = ids[t]
    if max_seq_len is not None and len(ids) > max_seq_len:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return Example(ids, labels)


def encode_all(tokenizer, conversations, max_seq_len: int | None = None) -> tuple[list[Example], int]:
    """Tokenize every conversation; returns the examples that keep at least one loss token and the number dropped."""
    out = []
    dropped = 0
    for conv in conversations:
        ex = encode(tokenizer, conv, max_seq_len)
        # After truncation a label only counts when a token precedes it (shifted loss).
        if any(x != IGNORE_INDEX for x in ex.labels[1:]):
            out.append(ex)
        else:
            dropped += 1
    return out, dropped


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, *, mega: int = 32) -> list[list[int]]:
    """Index batches for one epoch: shuffled, then sorted by length inside mega-chunks, batches shuffled.

    Examples of similar length share a batch (little padding) while the order
    still changes every epoch. Deterministic for a given ``seed``.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = max(batch_size * mega, batch_size)
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        batches.extend(group[j:j + batch_size] for j in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int):
    """Pad a batch to its longest example; returns (input_ids, attention_mask, labels, pad_count) tensors."""
    import torch

    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    pads = int(len(examples) * width - int(mask.sum()))
    return ids, mask, labels, pads
