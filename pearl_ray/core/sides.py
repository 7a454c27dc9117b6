"""What each side of the batched loop keeps per request, and the model protocol under it. No Ray, no decisions.

``CausalLM`` is one sequence's model: a KV-cached forward over new tokens, and rollback. The model runners
implement it (``modeling.hf.HFCausalLM``), the per-slot reference ``PerSlotLM`` holds one per
slot, and ``core.baselines`` decodes with it. ``BatchedLM`` is many sequences' model: a KV cache with one
slot per request, one forward over many slots (``modeling.batched``); ``SlotView`` is one of its slots.

Each side keeps, per request, a mirror of the sequence (committed + pending) and of what its KV cache holds
(``SeqMirror``, over one slot of a ``BatchedLM``). A round's ``SeqUpdate`` rewrites the mirror;
the cache is then cropped to the longest prefix it shares with the new sequence (never the whole sequence:
the next forward must feed at least one token). After a rejection that is exactly len(committed) - 1
positions, as the spec asks; after an accept nothing is cropped.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
    and ``crop(length)``: one slot of a ``BatchedLM`` (``SlotView``) or a ``CausalLM``.
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


class BatchedLM(Protocol):
    """A KV cache with one slot per request and one forward over several slots."""

    vocab_size: int
    max_context: int

    def forward(self, feeds: dict[int, tuple[list[int], int]]) -> dict[int, torch.Tensor]:
        """slot -> (new token ids, number of last positions that need logits); returns slot -> fp32 logits
        ``[num_logits, vocab]`` for the slots that asked for some. A slot not seen before starts from an
        empty cache (its prompt pass); 0 logits only caches the ids (a chunk of a long prompt's pass)."""
        ...

    def crop(self, slot: int, length: int) -> None:
        """Keep only the first ``length`` cached positions of ``slot``."""
        ...

    def release(self, slot: int) -> None:
        """Forget ``slot`` (its memory is reused)."""
        ...

    def cache_len(self, slot: int) -> int: ...


class PerSlotLM:
    """The slow reference ``BatchedLM``: one single-request ``CausalLM`` per slot, forwards one by one.
    ``make_model()`` builds a model; released slots' models are reused."""

    def __init__(self, make_model: Callable[[], CausalLM]):
        self.make_model = make_model
        first = make_model()
        self.vocab_size, self.max_context = first.vocab_size, first.max_context
        self.pool: list[CausalLM] = [first]
        self.models: dict[int, CausalLM] = {}
        self.forwards = 0

    def _model(self, slot: int) -> CausalLM:
        if slot not in self.models:
            model = self.pool.pop() if self.pool else self.make_model()
            model.reset()
            self.models[slot] = model
        return self.models[slot]

    def forward(self, feeds):
        self.forwards += 1
        out = {slot: self._model(slot).forward(list(ids), max(k, 1)) for slot, (ids, k) in feeds.items()}
        return {slot: logits for slot, logits in out.items() if feeds[slot][1]}

    def crop(self, slot: int, length: int) -> None:
        if slot in self.models:
            self.models[slot].crop(length)
        elif length:
            raise ValueError(f"slot {slot} holds nothing")

    def release(self, slot: int) -> None:
        model = self.models.pop(slot, None)
        if model is not None:
            model.reset()
            self.pool.append(model)

    def cache_len(self, slot: int) -> int:
        return self.models[slot].cache_len if slot in self.models else 0


class SlotView:
    """One slot of a ``BatchedLM`` seen as the cache a ``SeqMirror`` rolls back."""

    def __init__(self, lm: BatchedLM, slot: int):
        self.lm, self.slot = lm, slot

    def reset(self) -> None:
        self.lm.release(self.slot)

    def crop(self, length: int) -> None:
        self.lm.crop(self.slot, length)

    @property
    def cache_len(self) -> int:
        return self.lm.cache_len(self.slot)


def keep_logits_on_device(lm) -> None:
    """Let ``lm``'s forwards leave their logits on the model's device: the batched loop decides there and
    copies only ids and counts to the host. A ``modeling.batched`` slot cache has a ``to_host`` switch; a
    tensor-parallel leader (``lm.lm``) passes its forwards to its shard's. Other models are left as they are."""
    for obj in (lm, getattr(lm, "lm", None)):
        if obj is not None and getattr(obj, "to_host", None) is True:
            obj.to_host = False
