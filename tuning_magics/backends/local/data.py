"""From chat conversations to training batches.

Each conversation is rendered once with the model's own chat template and
tokenized once, by the dataset layer's renderer
(:func:`tuning_magics.datasets.render.render`), the same code that draws the
dataset report's preview, so what a user is shown is what the model trains on.
Labels are ``-100`` everywhere except on the assistant's tokens (its reply and
the end-of-turn token), so the loss teaches answers, not prompts. Batches group
examples of similar length and pad only to the longest example of the batch,
which keeps the padding share small.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...datasets.render import IGNORE_INDEX, assistant_spans, render

__all__ = ["IGNORE_INDEX", "Example", "assistant_spans", "collate", "encode", "encode_all",
           "length_grouped_batches", "LengthGroupedSampler"]


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


def encode(tokenizer, messages: list[dict], max_seq_len: int | None = None) -> Example:
    """Tokenize one conversation with completion-only labels (``-100`` outside assistant turns)."""
    r = render(tokenizer, messages, max_seq_len)
    return Example(r.input_ids, r.labels)


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
    # At most one batch (the last chunk's) is short; it goes last, so the order reads as fixed-size batches.
    batches.sort(key=lambda b: len(b) < batch_size)
    return batches


class LengthGroupedSampler:
    """:func:`length_grouped_batches` as a sampler for a training ``DataLoader`` of ``batch_size``: the epoch's
    batches one after another, a new order each epoch (``set_epoch``, which transformers' Trainer calls)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        for batch in length_grouped_batches(self.lengths, self.batch_size, self.seed * 1000 + self.epoch):
            yield from batch


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
