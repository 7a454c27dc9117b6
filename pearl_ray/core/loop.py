"""The PEARL decoding loop over any ``RoundChannel``: plan, run both sides, decide, stop. No Ray.

The same loop serves ``backend="local"`` (``LocalChannel``: both sides in this process, one after the
other: same tokens, no speed-up) and the Ray backend, where it runs in the target leader (its channel runs
the target in-process and the draft in another actor at the same time; ``runtime.transports``).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from .messages import DraftChunk, DraftRequest, DraftStart, TargetOutput, TargetRequest
from .metrics import GenerationStats, RoundTiming
from .rounds import PearlState, pearl_step, plan_round
from .sampling import make_generator
from .sides import CausalLM, DraftSide, TargetSide
from .stopping import StopRule

if TYPE_CHECKING:
    from .request import Request


class RoundChannel(Protocol):
    """Runs one PEARL round on both sides. Knows nothing about acceptance."""

    def start(self, request: "Request") -> None:
        """Reset both sides for a new request (the draft seeds its generator from ``request.seed``)."""
        ...

    def run_round(self, draft_req: DraftRequest, target_req: TargetRequest
                  ) -> tuple[DraftChunk, TargetOutput | None]: ...

    def forward_counts(self) -> tuple[int, int]:
        """(draft forwards, target forwards) since ``start``."""
        ...

    @property
    def draft_ok(self) -> bool:
        """False once the draft failed during this request: the rest runs on the target alone."""
        ...


def draft_start(request: "Request") -> DraftStart:
    """The ``DraftStart`` message of a request."""
    p = request.params
    return DraftStart(list(request.prompt_ids), p.temperature, p.top_k, p.top_p, request.rounds.draft_greedy,
                      request.seed)


def start_draft(side: DraftSide, start: DraftStart) -> None:
    """Reset a draft side; its sampling generator is stream 1 of the request's seed."""
    gen = make_generator(start.seed, 1) if start.temperature > 0 and not start.draft_greedy else None
    side.start(start.prompt_ids, start.temperature, start.top_k, start.top_p, start.draft_greedy, gen)


def start_target(side: TargetSide, request: "Request") -> None:
    p = request.params
    side.start(list(request.prompt_ids), p.temperature, p.top_k, p.top_p)


class LocalChannel:
    """Both sides in this process, run one after the other (same tokens as Ray, no speed-up)."""

    def __init__(self, draft_model: CausalLM | None, target_model: CausalLM):
        self.draft = DraftSide(draft_model) if draft_model is not None else None
        self.target = TargetSide(target_model)
        self.draft_ok = False  # whether this request uses the draft

    def start(self, request) -> None:
        start_target(self.target, request)
        self.draft_ok = self.draft is not None and request.uses_draft
        if self.draft_ok:
            start_draft(self.draft, draft_start(request))

    def run_round(self, draft_req, target_req):
        if not self.draft_ok:
            return DraftChunk(draft_req.round_id, draft_req.start_pos, []), self.target.verify(target_req)
        return self.draft.draft(draft_req), self.target.verify(target_req)

    def forward_counts(self) -> tuple[int, int]:
        return (self.draft.mirror.forwards if self.draft_ok else 0), self.target.mirror.forwards


def overlap_s(chunk: DraftChunk | None, target_out: TargetOutput | None) -> float:
    """Time both sides were busy at once, from their own start timestamps and busy durations."""
    if chunk is None or target_out is None or not chunk.busy_s or not target_out.busy_s:
        return 0.0
    start = max(chunk.started_at, target_out.started_at)
    end = min(chunk.started_at + chunk.busy_s, target_out.started_at + target_out.busy_s)
    return max(0.0, end - start)


def _bytes_moved(channel, chunk: DraftChunk, target_out: TargetOutput | None) -> int:
    """What the round moved: the channel's own count when it keeps one, else both replies' payloads."""
    counted = getattr(channel, "round_bytes", None)
    if counted is not None:
        return counted
    return chunk.num_bytes() + (target_out.num_bytes() if target_out else 0)


def iter_request(channel: RoundChannel, request: "Request", stop: StopRule
                 ) -> Generator[list[int], None, tuple[list[int], GenerationStats]]:
    """Generate one request: yields each round's newly committed tokens (after the stop cut) and returns
    (output ids after the stop rule, stats). PEARL, vanilla SD and target-only decoding all run here; they
    differ only in ``request.rounds``.
    """
    t_start = time.perf_counter()
    opts = request.rounds
    stats = GenerationStats(method=request.method, gamma=opts.gamma if opts.use_draft else 0)
    channel.start(request)
    if opts.use_draft and not channel.draft_ok:
        stats.draft_failures += 1  # the draft failed at the start of the request
    state = PearlState(committed=list(request.prompt_ids), prompt_len=len(request.prompt_ids))
    coins = None if opts.greedy else make_generator(request.seed, 0)
    emitted = 0
    fallback_opts = replace(opts, use_draft=False, pre_verify=True)
    while True:
        # 1. Plan both sides' work from the state; 2. run them (concurrently on Ray); 3. decide once.
        #    After a draft failure, the remaining rounds run on the target alone (still lossless, docs/pearl-algorithm.md §7.6).
        draft_ok = opts.use_draft and channel.draft_ok
        plan = plan_round(state, opts if draft_ok else fallback_opts)
        wall0, t0 = time.time(), time.perf_counter()
        chunk, target_out = channel.run_round(plan.draft, plan.target)
        t1 = time.perf_counter()
        outcome = pearl_step(state, plan, chunk, target_out, coins, opts)
        # 4. Stop rule on the newly committed tokens only.
        output = state.committed[state.prompt_len:]
        decision = stop.check(output, len(outcome.update.appended_token_ids))
        t2 = time.perf_counter()
        timing = RoundTiming(
            plan.round_id, plan.mode.value,
            draft_busy_s=chunk.busy_s, target_busy_s=target_out.busy_s if target_out else 0.0,
            round_s=t2 - t0, decide_s=t2 - t1, overlap_s=overlap_s(chunk, target_out),
            bytes_moved=_bytes_moved(channel, chunk, target_out),
            num_candidates=outcome.num_candidates, num_accepted=outcome.num_accepted, started_at=wall0,
            draft_started_at=chunk.started_at if chunk.busy_s else 0.0,
            target_started_at=target_out.started_at if target_out and target_out.busy_s else 0.0)
        stats.observe_round(outcome.num_drafted, outcome.num_candidates, outcome.num_accepted,
                            outcome.recovered_token_id >= 0, outcome.bonus_token_id >= 0,
                            outcome.candidate_positions, timing)
        if opts.use_draft and (not draft_ok or (plan.draft.num_steps and not chunk.draft_token_ids)):
            stats.fallback_rounds += 1
        if draft_ok and not channel.draft_ok:
            stats.draft_failures += 1
        visible = min(len(output), decision.keep)
        if visible > emitted:
            yield output[emitted:visible]
        emitted = max(emitted, visible)
        if decision.finished:
            output = output[: decision.keep]
            break
    stats.draft_forwards, stats.target_forwards = channel.forward_counts()
    stats.finish(len(output), time.perf_counter() - t_start, decision.reason)
    return output, stats
