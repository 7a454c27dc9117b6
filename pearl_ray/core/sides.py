"""What each side of the batched loop keeps per request, and the model protocol under it. No Ray, no decisions.

``CausalLM`` is one sequence's model: a KV-cached forward over new tokens, and rollback. The model runners
implement it (``modeling.hf.HFCausalLM``), the per-slot reference ``core.batch.PerSlotLM`` holds one per
slot, and ``core.baselines`` decodes with it.

Each side keeps, per request, a mirror of the sequence (committed + pending) and of what its KV cache holds
(``SeqMirror``, over one slot of a ``core.batch.BatchedLM``). A round's ``SeqUpdate`` rewrites the mirror;
the cache is then cropped to the longest prefix it shares with the new sequence (never the whole sequence:
the next forward must feed at least one token). After a rejection that is exactly len(committed) - 1
positions, as the spec asks; after an accept nothing is cropped.
"""

from __future__ import annotations

import statistics
import time
from typing import Protocol

import torch

from .messages import SeqUpdate


class CausalLM(Protocol):
    """What the core needs from a model: a KV-cached forward over new tokens, and rollback."""

    vocab_size: int  # size of the (target) vocabulary the returned logits cover
    max_context: int

    def reset(self) -> None: ...

    @property
    def cache_len(self) -> int: ...

    def forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Append ``token_ids`` to the cache; return fp32 logits ``[num_logits, vocab]`` of the last positions."""
        ...

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` cached positions."""
        ...


class SeqMirror:
    """A cache plus its view of the sequence and of the cache's contents. ``model`` needs only ``reset()``
    and ``crop(length)``: one slot of a ``core.batch.BatchedLM`` (``core.batch._SlotView``) or a ``CausalLM``.
    Its owner runs the forwards and extends ``cached`` (and counts ``forwards``) with what it fed."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.tokens: list[int] = []
        self.cached: list[int] = []
        self.forwards = 0

    def start(self, prompt_ids: list[int]) -> None:
        self.model.reset()
        self.tokens = list(prompt_ids)
        self.cached = []
        self.forwards = 0

    def apply(self, update: SeqUpdate | None) -> None:
        if update is None:
            return
        if update.committed_len_before > len(self.tokens):
            raise RuntimeError(f"update for round {update.round_id} starts past the mirror "
                               f"({update.committed_len_before} > {len(self.tokens)})")
        self.tokens = self.tokens[: update.committed_len_before] + list(update.appended_token_ids) + list(
            update.pending_token_ids)
        limit = min(len(self.cached), len(self.tokens) - 1)
        keep = 0
        while keep < limit and self.cached[keep] == self.tokens[keep]:
            keep += 1
        if keep < len(self.cached):
            self.model.crop(keep)
            self.cached = self.cached[:keep]


def time_forward(model: CausalLM, context_ids: list[int], num_tokens: int = 1, reps: int = 30,
                 warmup: int = 5) -> float:
    """Median wall time of a ``num_tokens``-token forward after prefilling ``context_ids`` (the cache is
    cropped back after each call, so every call sees the same context length)."""
    model.reset()
    model.forward(list(context_ids), 1)
    base = model.cache_len
    times = []
    for r in range(reps + warmup):
        feed = [context_ids[-1 - ((r + j) % 7) % len(context_ids)] for j in range(num_tokens)]
        t0 = time.perf_counter()
        model.forward(feed, 1)
        times.append(time.perf_counter() - t0)
        model.crop(base)
    model.reset()
    return statistics.median(times[warmup:])
