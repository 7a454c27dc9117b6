"""What crosses the wire between the draft side, the target side and the decider, each round.

Plain dataclasses of Python ints / lists and CPU tensors. Token ids always travel as ints (never packed
into a float tensor); draft probabilities travel in the fp32 they were sampled from. Every message
carries ``round_id`` and ``start_pos`` so that a stale or misrouted message raises instead of corrupting
state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class DraftStart(NamedTuple):
    """What the draft needs to start a request: plain values, so that every transport can carry them."""

    prompt_ids: list[int]
    temperature: float
    top_k: int
    top_p: float
    draft_greedy: bool
    seed: int


@dataclass
class SeqUpdate:
    """How a worker's mirror of (committed + pending) changes after a round's decision.

    New sequence = old[:committed_len_before] + appended_token_ids + pending_token_ids.
    """

    round_id: int
    committed_len_before: int
    appended_token_ids: list[int]  # tokens committed this round (accepted, then recovered/bonus if any)
    pending_token_ids: list[int]  # drafted tokens carried to the next round unverified


@dataclass
class DraftRequest:
    round_id: int
    start_pos: int  # len(committed) + len(pending) once ``update`` is applied
    num_steps: int  # 0 (idle this round) or gamma
    update: SeqUpdate | None = None  # the previous round's decision, applied first
    prefill_to: int = 0  # a chunk of a long prompt's pass: cache the sequence's first prefill_to tokens (no logits)


@dataclass
class TargetRequest:
    round_id: int
    start_pos: int  # len(committed) once ``update`` is applied: row 0 of the output is p at this position
    num_rows: int  # len(pending) + 1, or 0 when the target sits this round out (ablation without pre-verify)
    update: SeqUpdate | None = None


@dataclass
class DraftChunk:
    round_id: int
    start_pos: int  # position of draft_token_ids[0]
    draft_token_ids: list[int]  # [k], k in {0, gamma}
    draft_probs: torch.Tensor | None = None  # [k, vocab] fp32 q rows; None when greedy or draft_greedy
    busy_s: float = 0.0  # time spent computing, for the timeline
    started_at: float = 0.0  # time.time() when the worker began (for overlap measurement)

    def num_bytes(self) -> int:
        size = 8 * (3 + len(self.draft_token_ids))
        if self.draft_probs is not None:
            size += self.draft_probs.numel() * self.draft_probs.element_size()
        return size


@dataclass
class TargetOutput:
    round_id: int
    start_pos: int
    target_argmax_ids: list[int] | None = None  # [num_rows], greedy
    target_probs: torch.Tensor | None = None  # [num_rows, vocab] fp32, sampling
    busy_s: float = 0.0
    started_at: float = 0.0

    @property
    def num_rows(self) -> int:
        if self.target_argmax_ids is not None:
            return len(self.target_argmax_ids)
        return 0 if self.target_probs is None else int(self.target_probs.shape[0])

    def num_bytes(self) -> int:
        size = 8 * 3
        if self.target_argmax_ids is not None:
            size += 8 * len(self.target_argmax_ids)
        if self.target_probs is not None:
            size += self.target_probs.numel() * self.target_probs.element_size()
        return size


@dataclass
class Outcome:
    """The decision of one round (see ``rounds.pearl_step``)."""

    round_id: int
    num_candidates: int  # draft tokens verified against p this round
    num_accepted: int
    recovered_token_id: int  # -1 if none
    bonus_token_id: int  # -1 if none
    num_drafted: int  # draft tokens produced this round
    update: SeqUpdate = field(default=None)  # type: ignore[assignment]
    candidate_positions: list[int] = field(default_factory=list)  # index of each candidate in its draft window
