"""Per-side round work: what the draft and the target each do in one round. No Ray, no decisions.

Each side keeps a mirror of the sequence (committed + pending) and of what its KV cache holds. A round's
``SeqUpdate`` rewrites the mirror; the cache is then cropped to the longest prefix it shares with the new
sequence (never the whole sequence: the next forward must feed at least one token). After a rejection that
is exactly len(committed) - 1 positions, as the spec asks; after an accept nothing is cropped.

The same classes run in-process (``backend="local"``) and inside the Ray actors, so both backends give the
same tokens.
"""

from __future__ import annotations

import statistics
import time
from typing import Protocol

import torch

from .messages import DraftChunk, DraftRequest, SeqUpdate, TargetOutput, TargetRequest
from .sampling import sample, warp_probs


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
    """A model plus its view of the sequence and of its cache contents."""

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

    def feed(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        logits = self.model.forward(token_ids, num_logits)
        self.cached.extend(token_ids)
        self.forwards += 1
        return logits


class DraftSide:
    """Drafts ``num_steps`` tokens with one-token forwards after catching the cache up."""

    def __init__(self, model: CausalLM):
        self.mirror = SeqMirror(model)

    def start(self, prompt_ids: list[int], temperature: float, top_k: int, top_p: float, draft_greedy: bool,
              generator: torch.Generator | None) -> None:
        self.mirror.start(prompt_ids)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.argmax = temperature == 0.0 or draft_greedy
        self.send_probs = not self.argmax
        self.generator = generator

    def draft(self, req: DraftRequest) -> DraftChunk:
        started = time.time()
        t0 = time.perf_counter()
        m = self.mirror
        m.apply(req.update)
        if len(m.tokens) != req.start_pos:
            raise RuntimeError(f"draft mirror has {len(m.tokens)} tokens, round {req.round_id} expects {req.start_pos}")
        ids: list[int] = []
        rows: list[torch.Tensor] = []
        feed = m.tokens[len(m.cached):]
        for _ in range(req.num_steps):
            logits = m.feed(feed, 1)[-1]
            if self.argmax:
                token = int(torch.argmax(logits))
            else:
                q = warp_probs(logits, self.temperature, self.top_k, self.top_p)
                token = sample(q, self.generator)
                rows.append(q)
            ids.append(token)
            feed = [token]
        probs = torch.stack(rows) if (self.send_probs and rows) else None
        return DraftChunk(req.round_id, req.start_pos, ids, probs, time.perf_counter() - t0, started)


class TargetSide:
    """Runs one forward over the unverified tail and returns p rows (or their argmax when greedy)."""

    def __init__(self, model: CausalLM):
        self.mirror = SeqMirror(model)

    def start(self, prompt_ids: list[int], temperature: float, top_k: int, top_p: float) -> None:
        self.mirror.start(prompt_ids)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def verify(self, req: TargetRequest) -> TargetOutput:
        started = time.time()
        t0 = time.perf_counter()
        m = self.mirror
        m.apply(req.update)
        if req.num_rows == 0:
            return TargetOutput(req.round_id, req.start_pos, busy_s=0.0, started_at=started)
        if len(m.cached) > len(m.tokens) - req.num_rows:  # a repeated request (retry): recompute its rows
            m.model.crop(len(m.tokens) - req.num_rows)
            m.cached = m.cached[: len(m.tokens) - req.num_rows]
        feed = m.tokens[len(m.cached):]
        if len(m.tokens) - req.num_rows + 1 != req.start_pos or len(feed) < req.num_rows:
            raise RuntimeError(f"target mirror out of step in round {req.round_id}: {len(m.tokens)} tokens, "
                               f"{len(m.cached)} cached, {req.num_rows} rows from position {req.start_pos}")
        logits = m.feed(feed, req.num_rows)
        if self.temperature == 0.0:
            out = TargetOutput(req.round_id, req.start_pos, target_argmax_ids=logits.argmax(-1).tolist())
        else:
            out = TargetOutput(req.round_id, req.start_pos,
                               target_probs=warp_probs(logits, self.temperature, self.top_k, self.top_p))
        out.busy_s, out.started_at = time.perf_counter() - t0, started
        return out


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
