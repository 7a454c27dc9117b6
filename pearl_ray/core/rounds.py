"""The PEARL round state machine (Liu et al., ICLR 2025, arXiv 2408.11850). Pure: no Ray, no HF.

Notation as in ``verify``: p = target, q = draft, ``gamma`` = draft window. *Committed* tokens are
verified and final; *pending* tokens were drafted but not yet verified.

One round: the draft drafts ``gamma`` tokens while the target runs one forward over the last committed
token plus the pending tokens (PRE: 1 token, POST: gamma tokens); then ``pearl_step`` decides once.
Candidates are ``pending + [d0]``: in PRE mode that is *pre-verify* (the first new draft token is checked
in the round that drafted it), in POST mode *post-verify* (the pending window is checked while the draft
already drafted the next one). The mode follows from the state (``VerifyMode``).

Ablations are options of the same loop (``RoundOptions``):
- ``pre_verify=False``: in PRE rounds the target sits out and the whole window becomes pending;
- ``post_verify=False``: in POST rounds the draft sits out; the target verifies the pending tokens and,
  if all pass, takes a bonus token from its extra row (as vanilla SD).
With both off the schedule is exactly vanilla speculative decoding, a window every two rounds. Where the sides
take turns in one round (the draft's window, then the target's forward), ``fused=True`` runs vanilla SD in one
round instead: the target's forward also carries the window drafted this round (``fuse``), so every candidate
is verified in the round that drafted it and nothing stays pending. The coins are drawn in the same order as
in the two-round form, so both give the same tokens. A round whose draft produced nothing (draft failure or
timeout) is verified the same way: pending tokens, then a bonus row (docs/pearl-algorithm.md §7.6).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import torch

from .messages import DraftChunk, DraftRequest, Outcome, SeqUpdate, TargetOutput, TargetRequest
from .verify import NO_TOKEN, verify_greedy, verify_sampled


class VerifyMode(enum.Enum):
    PRE = "pre"  # nothing pending: the target pre-verifies the first token of the window being drafted
    POST = "post"  # a window is pending: the target post-verifies it while the draft drafts the next


@dataclass(frozen=True)
class RoundOptions:
    gamma: int
    greedy: bool  # temperature 0: ids only, no coins
    draft_greedy: bool = False  # sampling target with an argmax draft (q one-hot, ids only on the wire)
    pre_verify: bool = True
    post_verify: bool = True
    use_draft: bool = True  # False: target-only rounds (AR through this loop; fallback after a draft failure)
    adaptive: bool = False  # the batched loop's speculation policy picks each round's window (gamma: its cap)
    fused: bool = False  # in turn: the target verifies this round's window too (vanilla SD in one round)


@dataclass
class PearlState:
    committed: list[int]  # prompt + verified output ids
    prompt_len: int
    pending: list[int] = field(default_factory=list)
    pending_q: torch.Tensor | None = None  # [len(pending), vocab] fp32, only when the draft samples
    pending_positions: list[int] = field(default_factory=list)  # index of each pending token in its window
    round_id: int = 0
    last_update: SeqUpdate | None = None  # sent to the workers with the next round's requests

    @property
    def mode(self) -> VerifyMode:
        return VerifyMode.POST if self.pending else VerifyMode.PRE


@dataclass(frozen=True)
class RoundPlan:
    round_id: int
    mode: VerifyMode
    draft: DraftRequest
    target: TargetRequest
    verify_first_draft: bool  # whether d[0] of this round is a candidate
    fused: bool = False  # every token drafted this round is a candidate (``fuse`` sized the target's rows)


def plan_round(state: PearlState, opts: RoundOptions) -> RoundPlan:
    """Build both workers' requests for the next round from the state alone. A fused round's target rows
    cover the pending tokens only until ``fuse`` adds the window the draft returned."""
    mode = state.mode
    round_id = state.round_id + 1
    post_idle = mode is VerifyMode.POST and not opts.post_verify and not opts.fused
    num_steps = 0 if (not opts.use_draft or post_idle) else opts.gamma
    target_sits_out = mode is VerifyMode.PRE and not opts.pre_verify and num_steps > 0 and not opts.fused
    num_rows = 0 if target_sits_out else len(state.pending) + 1
    seq_len = len(state.committed) + len(state.pending)
    return RoundPlan(
        round_id=round_id,
        mode=mode,
        draft=DraftRequest(round_id, seq_len, num_steps, state.last_update),
        target=TargetRequest(round_id, len(state.committed), num_rows, state.last_update),
        verify_first_draft=num_rows > 0 and num_steps > 0,
    )


def fuse(plan: RoundPlan, num_drafted: int) -> RoundPlan:
    """A fused round's plan once its draft returned ``num_drafted`` tokens: the target's forward carries them
    after the pending ones and gives a row per candidate plus the bonus row."""
    return replace(plan, target=replace(plan.target, num_rows=plan.target.num_rows + num_drafted),
                   verify_first_draft=num_drafted > 0, fused=True)


@dataclass(frozen=True)
class RoundCandidates:
    """What one request's round verifies (``round_candidates``): the decision's input, whoever decides it."""

    token_ids: list[int]  # the pending window, then this round's drafted tokens that are candidates
    positions: list[int]  # index of each candidate in its draft window
    q_parts: tuple[torch.Tensor, ...]  # q rows of the candidates in order (pending, then drafted); () if q is one-hot
    num_rows: int  # target rows this round: one per candidate, then a bonus row if allow_bonus; 0: the target sat out
    take: int  # how many of this round's drafted tokens are candidates

    @property
    def allow_bonus(self) -> bool:
        return self.num_rows > len(self.token_ids)

    @property
    def draft_probs(self) -> torch.Tensor | None:
        """``[len(token_ids), vocab]`` q rows, or None for a greedy or argmax draft (q one-hot)."""
        if not self.q_parts:
            return None
        return self.q_parts[0] if len(self.q_parts) == 1 else torch.cat(self.q_parts)


def round_candidates(state: PearlState, plan: RoundPlan, chunk: DraftChunk, target_out: TargetOutput | None,
                     opts: RoundOptions, target_rows: int | None = None) -> RoundCandidates:
    """Check that both messages belong to this round and position, and list the candidates.

    ``target_rows``: how many rows the target computed, where ``target_out`` carries none itself (the batched
    loop keeps them on the device); None: ``target_out.num_rows``.
    """
    # 1. Check that both messages belong to this round and this position.
    if chunk.round_id != plan.round_id or chunk.start_pos != plan.draft.start_pos:
        raise RuntimeError(f"stale draft chunk: got round {chunk.round_id} pos {chunk.start_pos}, "
                           f"expected round {plan.round_id} pos {plan.draft.start_pos}")
    num_rows = plan.target.num_rows
    if num_rows:
        if target_out is None or target_out.round_id != plan.round_id or target_out.start_pos != plan.target.start_pos:
            raise RuntimeError(f"stale target output for round {plan.round_id}")
        got = target_out.num_rows if target_rows is None else target_rows
        if got != num_rows:
            raise RuntimeError(f"target returned {got} rows, expected {num_rows}")
    drafted = chunk.draft_token_ids
    # 2. Candidates: the pending window, then d[0] unless the target sits out or the draft produced nothing
    # (a fused round: the whole window drafted this round).
    take_first = bool(drafted) and plan.verify_first_draft
    take = (len(drafted) if plan.fused else 1) if take_first else 0
    if plan.fused and num_rows != len(state.pending) + len(drafted) + 1:
        raise RuntimeError(f"fused round {plan.round_id} planned {num_rows} rows for {len(state.pending)} pending "
                           f"and {len(drafted)} drafted tokens")
    candidates = list(state.pending) + list(drafted[:take])
    positions = list(state.pending_positions) + list(range(take))
    q_parts: tuple[torch.Tensor, ...] = ()
    if not opts.greedy and not opts.draft_greedy:
        q_parts = tuple(t for t in (state.pending_q, chunk.draft_probs[:take] if take else None) if t is not None)
    return RoundCandidates(candidates, positions, q_parts, num_rows, take)


def verify_round(cands: RoundCandidates, target_out: TargetOutput | None, generator: torch.Generator | None,
                 opts: RoundOptions) -> tuple[int, int]:
    """The per-request reference decision: (accepted count, recovered or bonus id or ``NO_TOKEN``). One coin
    per candidate in order; a bonus row exists only when the target has a row to spare."""
    if not cands.num_rows:
        return 0, NO_TOKEN
    if opts.greedy:
        return verify_greedy(target_out.target_argmax_ids, cands.token_ids, cands.allow_bonus)
    return verify_sampled(target_out.target_probs, cands.token_ids, cands.draft_probs, generator, cands.allow_bonus)


def commit_round(state: PearlState, plan: RoundPlan, chunk: DraftChunk, cands: RoundCandidates,
                 num_accepted: int, extra: int) -> Outcome:
    """Advance ``state`` by a round's decision: commit the accepted tokens (+ the recovered or bonus token),
    carry the rest of the window as pending."""
    candidates, drafted = cands.token_ids, chunk.draft_token_ids
    if not 0 <= num_accepted <= len(candidates):
        raise RuntimeError(f"round {plan.round_id}: {num_accepted} accepted of {len(candidates)} candidates")
    committed_before = len(state.committed)
    recovered = bonus = NO_TOKEN
    if extra != NO_TOKEN:
        appended = candidates[:num_accepted] + [extra]
        if num_accepted < len(candidates):
            recovered = extra
        else:
            bonus = extra
        new_pending, new_q, new_pos = [], None, []
    else:
        if num_accepted < len(candidates):
            raise RuntimeError(f"round {plan.round_id}: a rejection without a recovered token")
        appended = candidates
        skip = cands.take
        new_pending = list(drafted[skip:])
        new_pos = list(range(skip, len(drafted)))
        new_q = chunk.draft_probs[skip:] if chunk.draft_probs is not None and new_pending else None
    state.committed.extend(appended)
    state.pending, state.pending_q, state.pending_positions = new_pending, new_q, new_pos
    state.round_id = plan.round_id
    update = SeqUpdate(plan.round_id, committed_before, appended, list(new_pending))
    state.last_update = update
    return Outcome(plan.round_id, len(candidates), num_accepted, recovered, bonus, len(drafted), update,
                   cands.positions[: len(candidates)])


def pearl_step(
    state: PearlState,
    plan: RoundPlan,
    chunk: DraftChunk,
    target_out: TargetOutput | None,
    generator: torch.Generator | None,
    opts: RoundOptions,
) -> Outcome:
    """Decide one round with the per-request reference and advance ``state`` in place.

    ``chunk.draft_token_ids`` may be empty even if the plan asked for a window (draft failure): then the
    round verifies the pending tokens and takes a bonus token from the target's last row. The batched loop
    runs the same three steps with the decision of the whole round made at once (``core.decide``).
    """
    cands = round_candidates(state, plan, chunk, target_out, opts)
    num_accepted, extra = verify_round(cands, target_out, generator, opts)
    return commit_round(state, plan, chunk, cands, num_accepted, extra)
