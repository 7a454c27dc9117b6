"""Batched PEARL rounds: one draft/target pair decodes many requests at once. No Ray.

The per-request core stays per request: each request has its own ``PearlState``, plan (``plan_round``),
candidates and state update (``round_candidates``, ``commit_round``), coins from its own seed, stop rule and
method (pearl / sd / ar). What is shared is the models' work and the decisions: one round runs every drafting
request's draft steps as batched draft forwards (each step's tokens drawn for all slots at once), then every
request's verify rows in **one** target forward (``BatchedLM``: a KV cache with one slot per request), then
every request's accept / recover / bonus decision in one batched call on the target's device
(``core.decide``; ``rounds.pearl_step`` is the per-request reference). Only ids and counts come to the host:
once per draft step, once per round for the target side. Requests join at a round boundary (their prompt
pass is their first forward, run on its own and merged into the batch's cache) and leave when they finish or
are cancelled; the others carry on (continuous batching, not lock-step). With ``max_prefill_tokens`` a round feeds at most that many prompt
tokens: a longer prompt goes to both sides in chunks over several rounds (no logits; the draft must see
the prompt too), and the running requests decode in each of those rounds (``_prefill_plan``).

Each round's window comes from the ``SpeculationPolicy`` for requests built with ``adaptive`` options
(0: plain decoding that round); a request with a fixed ``gamma`` keeps it. A draft failure turns the
requests it touched into target-only decoding (still lossless: the same greedy output).

This loop serves every request: the local backend steps it in the caller's thread, the Ray target leader
in its loop thread (``runtime.leader_loop``). The draft is reached through a ``DraftPhase``: in this process
in turn (``LocalDraftPhase``) or at once on its own thread (``ThreadedDraftPhase``), both in
``core.proposer``, or in another actor (``runtime.transports``). ``core.sides.PerSlotLM`` is the slow
reference of ``BatchedLM`` (one single-request model per slot), and the ``BatchedLM`` of models that have
no slot cache of their own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .decide import gather_rows, rows_not_finite, verify_greedy_rows, verify_sampled_rows, warp_rows
from .logprobs import TokenIds, logprob_rows, token_logprobs
from .messages import DraftChunk, DraftRequest, SeqUpdate, TargetOutput
from .metrics import GenerationStats, RoundTiming, overlap_s
from .policy import SeqView, SpeculationPolicy
from .request import draft_start
from .rounds import PearlState, RoundOptions, RoundPlan, commit_round, fuse, plan_round, round_candidates
from .proposer import BatchedDraftSide, DraftPhase, LocalDraftPhase, ThreadedDraftPhase
from .sampling import make_generator, uniforms
from .sides import BatchedLM, SeqMirror, SlotView, keep_logits_on_device
from .stopping import StopRule
from .verify import NO_TOKEN
from ..errors import CacheBudgetError, RequestFailed
from ..platform import torch_threads

if TYPE_CHECKING:
    from .request import Request

log = logging.getLogger(__name__)


def reservation(request: "Request") -> int:
    """KV positions ``request`` may need at most: prompt + max_new_tokens + its draft window + 1."""
    window = request.rounds.gamma if request.rounds.use_draft else 0
    return len(request.prompt_ids) + request.params.max_new_tokens + window + 1


def budget_message(request: "Request", budget: int) -> str:
    return (f"this request needs up to {reservation(request)} KV-cache positions ({len(request.prompt_ids)} prompt + "
            f"{request.params.max_new_tokens} max_new_tokens + the draft window + 1), more than the pair's "
            f"kv_budget_tokens of {budget}: shorten the prompt or max_new_tokens, or raise kv_budget_tokens")


def round_schedule(plan: RoundPlan, schedule: str) -> str:
    """How this request's round used the device: "plain" with nothing drafted or pending (the target
    alone), "turn" when only one side worked for it (SD's draft-only and verify-only rounds), else the
    batch round's ``schedule`` (both sides, one after the other or at once)."""
    drafts, verifies = plan.draft.num_steps > 0, plan.target.num_rows > 0
    if not drafts and plan.mode.value == "pre":
        return "plain"
    return schedule if (drafts and verifies) else "turn"


@dataclass
class Event:
    """What one round did for one request: newly visible tokens, and on the last event the result.
    ``logprobs``: the new tokens' ``TokenLogprob`` where the request asked for them (and ``output_ids`` is
    then a ``TokenIds`` that carries them all)."""

    key: object
    token_ids: list[int]
    finished: bool = False
    output_ids: list[int] | None = None
    stats: GenerationStats | None = None
    error: BaseException | None = None
    logprobs: list | None = None


def _stack_rows(blocks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], list[int]]:
    """``decide.gather_rows`` holding exactly these blocks' rows (a view that also spans other rows of the
    forward's buffer is copied): the rows, each block's first row and row count."""
    rows, first = gather_rows(blocks)
    counts = [b.shape[0] for b in blocks]
    if not _tiles(first, counts, rows.shape[0]):
        rows = torch.cat([rows[f: f + c] for f, c in zip(first, counts)])
        first = [sum(counts[:i]) for i in range(len(counts))]
    return rows, first, counts


def _tiles(first: list[int], counts: list[int], total: int) -> bool:
    """Whether row spans (first row, count) cover rows 0 .. total - 1 exactly, each once."""
    at = 0
    for f, c in sorted(zip(first, counts)):
        if f != at:
            return False
        at += c
    return at == total


@dataclass
class _RoundRows:
    """A round's target rows for the decisions, on the forward's device (``BatchLoop._round_rows``)."""

    argmax: torch.Tensor | None = None  # [greedy rows] the argmax id of each greedy request's row
    first: dict = field(default_factory=dict)  # greedy seq -> its first row in ``argmax``
    probs: torch.Tensor | None = None  # [sampled rows, vocab] warped p of the sampled requests
    sampled_first: dict = field(default_factory=dict)  # sampled seq -> its first row in ``probs``
    owner: dict = field(default_factory=dict)  # seq -> its index in ``bad``
    bad: torch.Tensor | None = None  # [requests] count of bad rows (``BatchLoop._round_rows``)


@dataclass(eq=False)
class _Seq:
    key: object
    request: "Request"
    stop: StopRule
    slot: int
    state: PearlState
    coins: torch.Generator | None
    stats: GenerationStats
    target: SeqMirror
    drafts: bool = False  # the draft side holds this request's slot
    draft_stale: bool = False  # the draft's mirror missed a round's update (it sat the round out)
    draft_seen: int = 0  # committed tokens when the draft last drafted for this request (its cache has them)
    ready: bool = False  # plans decoding rounds: the rest of its prompt fits this round's prefill budget, or went in
    t_start: float = field(default_factory=time.perf_counter)
    emitted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    cancelled: bool = False
    logprobs: list | None = None  # one TokenLogprob per committed output token, where the request asked
    round_rows: torch.Tensor | None = None  # [rows, vocab] this round's target log-probabilities (same requests)
    round_logits: torch.Tensor | None = None  # [rows, vocab] this round's target logits, until it is decided

    @property
    def opts(self) -> RoundOptions:
        return self.request.rounds

    @property
    def draft_ok(self) -> bool:
        return self.drafts

    def round_options(self, window: int | None, in_turn: bool = False) -> RoundOptions:
        """This round's options: ``window`` is the policy's choice (None: no policy, the request's own cap);
        ``in_turn``: the sides take turns this round, so vanilla SD requests (and adaptive PEARL ones, which
        run vanilla SD in turn) verify their window in the round that drafted it (``RoundOptions.fused``)."""
        o = self.opts
        if window is None:
            window = o.gamma
        if not o.use_draft or not self.draft_ok or (o.adaptive and window == 0):
            return replace(o, use_draft=False, pre_verify=True)
        if o.adaptive:
            o = replace(o, gamma=min(window, o.gamma))
            if in_turn:
                o = replace(o, pre_verify=False, post_verify=False)
        if in_turn and not o.pre_verify and not o.post_verify:
            o = replace(o, fused=True)
        return o

    def view(self) -> SeqView:
        st = self.state
        return SeqView(self.request.method if self.draft_ok else "ar", self.stats.accepted_tokens,
                       self.stats.verified_tokens, self.opts.adaptive, self.opts.gamma,
                       behind=max(0, len(st.committed) - self.draft_seen),
                       remaining=max(0, self.request.params.max_new_tokens - (len(st.committed) - st.prompt_len)),
                       context=len(st.committed))


class BatchLoop:
    """Continuous batching over one pair: ``add`` requests, call ``step`` until ``idle``.

    ``max_num_seqs`` requests decode at once; more wait in arrival order and join as slots free up."""

    def __init__(self, target: BatchedLM, draft: "BatchedLM | DraftPhase | None" = None,
                 policy: SpeculationPolicy | None = None, max_num_seqs: int = 8,
                 decode: Callable[[list[int]], str] | None = None):
        """``draft``: a ``BatchedLM`` (drafted here, ``LocalDraftPhase``) or any ``DraftPhase``."""
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if draft is not None and not hasattr(draft, "submit"):
            draft = LocalDraftPhase(BatchedDraftSide(draft))
        self.target, self.draft, self.policy = target, draft, policy
        keep_logits_on_device(target)  # the decisions run on the target's device (``_round_rows``, ``_verdicts``)
        self.concurrent: ThreadedDraftPhase | None = None
        self._deferred_releases: set[int] = set()  # draft slots to free once a timed-out round ends
        """The draft on its own thread, for rounds whose sides run at once (``set_concurrent``); None: every
        drafting round runs ``draft`` (in turn here, or remote)."""
        self.split_threads: int | None = None
        """Torch threads for the target's forward while the concurrent draft runs (its share of the cores)."""
        self.schedule: str | None = None
        """Force every drafting round's schedule ("turn" or "once"); None: the policy's choice, else "once"
        where there is a concurrent draft."""
        self.alone_threads: int | None = None
        """Torch threads for a round's target forward when no request drafts in it (on CPU the draft's
        cores then idle: Ray's leader borrows them, as for prompt passes). None: leave the count alone."""
        self.max_num_seqs, self.decode = max_num_seqs, decode
        self.kv_budget: int | None = None
        """KV positions the running requests may reserve together (``EngineConfig.kv_budget_tokens``)."""
        self.max_prefill_tokens: int | None = None
        """Prompt tokens one round may feed (``EngineConfig.max_prefill_tokens_per_round``): a longer prompt
        goes in chunks over several rounds, beside the running requests' rows (``_prefill_plan``). None:
        a request's first round feeds its whole prompt."""
        self.active: list[_Seq] = []
        self.waiting: deque = deque()
        self.rounds = 0
        self.draft_failures = 0
        self.request_failures = 0
        """Requests ended alone with ``RequestFailed`` (the batch went on)."""
        self.retry_without_joiners = True
        """A target forward that carried prompt passes and raised fails those requests alone and runs again
        without them (``_target_forward``); False: its error is the batch's."""

    # -- membership --------------------------------------------------------------------------------------
    def add(self, request: "Request", key: object = None) -> object:
        key = object() if key is None else key
        self.waiting.append((key, request))
        return key

    def cancel(self, key: object) -> bool:
        """Drop a request (waiting or running) at once; its slots are freed. False if unknown."""
        for item in list(self.waiting):
            if item[0] is key or item[0] == key:
                self.waiting.remove(item)
                return True
        for seq in self.active:
            if seq.key is key or seq.key == key:
                self._leave(seq)
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    def _fits(self, request: "Request") -> bool:
        """Whether ``request`` may join now under ``kv_budget``: the slot cache is one row per request, each
        as long as the longest, so (running + 1) x the longest reservation must fit."""
        if self.kv_budget is None:
            return True
        longest = max([reservation(s.request) for s in self.active] + [reservation(request)])
        return (len(self.active) + 1) * longest <= self.kv_budget

    def _free_slot(self) -> int:
        used = {s.slot for s in self.active}
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def _join(self, key: object, request: "Request") -> _Seq:
        slot = self._free_slot()
        opts = request.rounds
        stats = GenerationStats(method=request.method, gamma=opts.gamma if opts.use_draft else 0)
        target = SeqMirror(SlotView(self.target, slot))
        target.start(list(request.prompt_ids))
        seq = _Seq(key, request, StopRule.for_request(request, self.decode), slot,
                   PearlState(committed=list(request.prompt_ids), prompt_len=len(request.prompt_ids)),
                   None if opts.greedy else make_generator(request.seed, 0), stats, target)
        if request.params.logprobs is not None:
            seq.logprobs = []
        if opts.use_draft:
            if self.draft is None or self._draft_busy():
                stats.draft_failures += 1
            else:
                try:
                    self.draft.start(slot, draft_start(request))
                    seq.drafts = True
                except Exception:  # noqa: BLE001 - a broken draft: this request runs on the target alone
                    stats.draft_failures += 1
        return seq

    def _prefill_plan(self) -> dict[_Seq, int]:
        """Which requests decode this round (``ready``) and which feed a chunk of their prompt instead
        (seq -> tokens). Without ``max_prefill_tokens`` every request is ready (its first round feeds its
        whole prompt). With it, a round's prompt tokens stay within it: the requests still reading their
        prompt, in join order, either finish it this round (their first decoding round feeds the rest)
        when the rest fits what the round has left, or take all that is left as a chunk; later ones wait.
        Requests already decoding never wait for a prompt: their rows run every round."""
        chunks: dict[_Seq, int] = {}
        left = self.max_prefill_tokens
        for s in self.active:
            if s.ready:
                continue
            if left is None:
                s.ready = True
                continue
            rest = len(s.target.tokens) - len(s.target.cached)
            if rest <= left:
                s.ready, left = True, left - rest
            elif left > 0:
                chunks[s], left = left, 0  # at least one prompt token stays for the first decoding round
        return chunks

    def _leave(self, seq: _Seq) -> None:
        if seq in self.active:
            self.active.remove(seq)
        self.target.release(seq.slot)
        if seq.drafts and self.draft is not None:
            seq.drafts = False
            self._release_draft(seq.slot)
        if self.policy is not None and seq.stats.verified_tokens:
            self.policy.finished(seq.stats.accepted_tokens, seq.stats.verified_tokens)

    def _draft_down(self, seqs: Iterable[_Seq]) -> None:
        """The draft failed: every request it held goes on without it (target-only rounds, still lossless)."""
        for seq in seqs:
            if seq.drafts:
                seq.drafts = False
                seq.stats.draft_failures += 1
                self._release_draft(seq.slot)
        self.draft_failures += 1

    def _reads_chunks(self, seq: _Seq) -> bool:
        """Whether the draft caches ``seq``'s prompt chunk by chunk, with the target. An adaptive request on a
        draft in this process does not: its chunks would lengthen rounds that the policy may never draft in,
        so the draft reads the prompt in the first round that drafts for it (the policy prices that catch-up
        as ``SeqView.behind``). A draft in another worker reads chunks while the target works."""
        return seq.drafts and not (seq.opts.adaptive and isinstance(self.draft, LocalDraftPhase))

    def _draft_busy(self) -> bool:
        """A timed-out round at once still runs on the draft's thread (``ThreadedDraftPhase.busy``)."""
        return self.concurrent is not None and self.concurrent.busy()

    def _release_draft(self, slot: int) -> None:
        """Free ``slot`` on the draft, or later, once no timed-out round still runs there."""
        self._deferred_releases.add(slot)
        if not self._draft_busy():
            self._flush_draft_releases()

    def _flush_draft_releases(self) -> None:
        for slot in sorted(self._deferred_releases):
            try:
                self.draft.release(slot)
            except Exception:  # noqa: BLE001 - a broken draft: nothing of this request is lost
                pass
        self._deferred_releases.clear()

    def set_concurrent(self, phase: ThreadedDraftPhase | None, split_threads: int | None) -> None:
        """Let rounds run the draft at the same time as the target: ``phase`` must draft on the same side as
        the in-turn ``draft`` phase (one cache per request whatever the schedule)."""
        self.concurrent, self.split_threads = phase, split_threads

    def set_draft(self, draft: "DraftPhase | None") -> None:
        """A new draft (the old one failed and was replaced): requests that join from now on use it; the
        running ones hold no slot on it and go on target-only."""
        for seq in self.active:
            seq.drafts = False
        self.draft = draft
        self._deferred_releases.clear()  # the old draft's
        if self.concurrent is not None and getattr(draft, "side", None) is not self.concurrent.side:
            self.concurrent = None  # it drafted on the old side: rounds with the new one run in turn

    # -- one round ---------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Admit waiting requests, run one round over every active request, return what each committed."""
        refused = []
        if self.kv_budget is not None:  # a request that could never fit ends now (the engine checks it first)
            for key, request in [w for w in self.waiting if reservation(w[1]) > self.kv_budget]:
                self.waiting.remove((key, request))
                refused.append(Event(key, [], finished=True, error=CacheBudgetError(budget_message(
                    request, self.kv_budget))))
        while self.waiting and len(self.active) < self.max_num_seqs and self._fits(self.waiting[0][1]):
            key, request = self.waiting.popleft()  # in arrival order: one that must wait holds the others back
            try:
                self.active.append(self._join(key, request))
            except Exception as exc:  # noqa: BLE001 - e.g. its stop rule cannot be built: this request's alone
                self.request_failures += 1
                refused.append(Event(key, [], True, error=_request_failed(exc)))
        if not self.active:
            return refused
        # A request whose own work raises (its plan, its rows' sampling, its stop rule) ends alone with
        # ``RequestFailed``; only the shared forwards' errors escape this method and end the batch.
        failed: dict[_Seq, BaseException] = {}
        # requests still reading a long prompt feed a chunk of it to both sides this round instead of decoding
        prompt_chunks = self._prefill_plan()
        ready = [s for s in self.active if s.ready]
        # a round that carries prompt tokens costs more than its decoding rows: the policy does not learn from it
        prompt_pass = bool(prompt_chunks) or any(len(s.target.cached) < s.state.prompt_len for s in ready)
        window = None
        # without a policy: the forced schedule, else at once wherever the draft can work meanwhile (its own
        # thread here, or another worker), in turn where it drafts in this thread
        in_turn = self.concurrent is None and isinstance(self.draft, LocalDraftPhase)
        schedule = self.schedule or ("turn" if in_turn else "once")
        if self.policy is not None and any(s.opts.adaptive and s.draft_ok for s in ready):
            prompt_tokens = sum(prompt_chunks.values()) + sum(
                len(s.target.tokens) - len(s.target.cached) for s in ready if len(s.target.cached) < s.state.prompt_len)
            schedule, window = self.policy.decide([s.view() for s in ready], prompt_tokens)
        if prompt_pass and schedule == "once" and self.schedule is None and isinstance(self.draft, LocalDraftPhase):
            # prompt tokens are most of this round's work, on both sides: at once each side would read them
            # on its share of the cores (the target on half of 2); in turn each takes them all
            schedule = "turn"
        # in turn, vanilla SD requests (adaptive PEARL ones included) draft and verify a window in one round
        in_turn = schedule == "turn"
        plans, fused = {}, set()
        for s in ready:
            try:
                opts = s.round_options(window, in_turn)
                plans[s] = plan_round(s.state, opts)
                if opts.fused:
                    fused.add(s)
            except Exception as exc:  # noqa: BLE001 - this request's alone
                failed[s] = exc
        seqs = [s for s in ready if s not in failed]
        context = max((len(s.state.committed) for s in seqs), default=0)  # the forwards' longest row, before
        # a drafting request whose first step reads more than rounds leave behind (a deferred prompt, rounds
        # it sat out): that forward is no draft step's cost, and the policy must not learn from it
        catch_up = any(len(s.state.committed) - s.draft_seen > 2 * (s.opts.gamma + 1)
                       for s in seqs if s.drafts and plans[s].draft.num_steps > 0)
        at_once = schedule == "once" and self.concurrent is not None
        phase = self.concurrent if at_once else self.draft
        wall0, t0 = time.time(), time.perf_counter()
        # the draft works on its round meanwhile, where it can
        collect = self._draft_phase(seqs, plans, phase, prompt_chunks)
        windows = {}
        if fused:  # the draft's turn ends before the target's forward, which carries the windows it returned
            drafted = collect()
            collect = (lambda: drafted)
            for s in fused:
                windows[s] = drafted[0][s].draft_token_ids
                plans[s] = fuse(plans[s], len(windows[s]))
        t1 = time.perf_counter()
        drafting = any(s.drafts and plans[s].draft.num_steps > 0 for s in seqs)
        if not drafting:
            schedule = "plain"
        draft_busy = drafting or any(self._reads_chunks(s) for s in prompt_chunks)  # drafting, or caching a chunk
        # the draft idles (plain, or its turn is over): the target takes its cores; at once: its share only
        threads = self.split_threads if (draft_busy and at_once) else (None if draft_busy else self.alone_threads)
        for s in seqs:
            s.round_logits = None
        with torch_threads(threads), self._target_stream(draft_busy and at_once):
            outs, width = self._target_forward(seqs, plans, failed, prompt_chunks, windows)
            rows = self._round_rows([s for s in seqs if s.round_logits is not None and s not in failed])
        t_target = time.perf_counter() - t1
        chunks, draft_rows, draft_steps = collect()
        t2 = time.perf_counter()
        if self.policy is not None and not prompt_pass:
            draft_s = max((c.busy_s for c in chunks.values()), default=0.0)
            if catch_up:
                draft_s = 0.0
            self.policy.observe(len(seqs), width, t_target, draft_rows, draft_steps, draft_s,
                                schedule if schedule != "plain" else None, context)
        self.rounds += 1
        events = refused
        verdicts = self._verdicts(seqs, plans, chunks, outs, rows, failed)
        for s in seqs:
            s.round_logits = None
        for seq in seqs:
            if seq in failed:
                continue
            try:
                events.append(self._decide(seq, plans[seq], chunks[seq], outs[seq], verdicts[seq], wall0, t0, t1, t2,
                                           len(seqs), schedule))
            except Exception as exc:  # noqa: BLE001 - this request's alone
                failed[seq] = exc
        for seq, exc in failed.items():
            events.append(self._fail_one(seq, exc))
        return events

    def _fail_one(self, seq: _Seq, exc: BaseException) -> Event:
        """End one request with ``RequestFailed``; its slots are freed and the others carry on."""
        self._leave(seq)
        self.request_failures += 1
        return Event(seq.key, [], True, error=_request_failed(exc))

    def _target_forward(self, seqs: list[_Seq], plans: dict, failed: dict, prompt_chunks: dict[_Seq, int],
                        windows: dict[_Seq, list[int]]) -> tuple[dict, int]:
        """``_target_phase``, where a forward that carried prompt tokens and raised is taken for the joining
        requests' fault, not the batch's: a prompt pass is the part of a forward that grows with one request
        (a long prompt that runs the device out of memory), and the slot cache runs it apart from the
        decoding rows. The joining requests (their prompt not yet all cached) give up their slots, the
        others' slots are cropped back to what their mirrors hold (the decoding rows may have run before the
        prompt pass raised), and the forward runs again without them. If that one raises too, the error is
        the batch's and propagates (the loop's owner fails every request; on Ray the worker is replaced).
        Then each joining request runs its part alone, unless it was the only one: those that raise again
        fail alone (``RequestFailed``), the others carry on. ``retry_without_joiners`` False (a
        tensor-parallel group, whose ranks must run the same forwards) always propagates."""
        forwards = {s: s.target.forwards for s in [*seqs, *prompt_chunks]}
        try:
            return self._target_phase(seqs, plans, failed, prompt_chunks, windows)
        except Exception as exc:
            joining = [s for s in [*seqs, *prompt_chunks]
                       if s not in failed and len(s.target.cached) < s.state.prompt_len]
            returned = any(s.target.forwards != n for s, n in forwards.items())  # it raised after the forward
            if not joining or returned or not self.retry_without_joiners:
                raise
            log.warning("a forward with %d prompt pass(es) failed (%s: %s); it runs again without them",
                        len(joining), type(exc).__name__, str(exc)[:200])
            for s in joining:  # whatever part of its prompt pass went in: a retry reads the prompt from the start
                self.target.release(s.slot)
                s.target.cached = []
            for s in self.active:
                if s not in failed and s not in joining:
                    self.target.crop(s.slot, len(s.target.cached))
            rest = [s for s in seqs if s not in joining]
            outs, width = self._target_phase(rest, plans, failed, {s: n for s, n in prompt_chunks.items()
                                                                   if s not in joining}, windows)
            if len(joining) == 1:
                failed[joining[0]] = exc
                return outs, width
            for s in joining:  # which of them it was: each alone
                try:
                    alone, w = self._target_phase([s] if s in seqs else [], plans, failed,
                                                  {s: prompt_chunks[s]} if s in prompt_chunks else {}, windows)
                except Exception as own:  # noqa: BLE001 - this request's alone
                    failed[s] = own
                    self.target.release(s.slot)
                    continue
                outs.update(alone)
                width = max(width, w)
            return outs, width

    @contextlib.contextmanager
    def _target_stream(self, at_once: bool):
        """On CUDA, a round at once runs the target's forward on a stream of its own too: kernels on the
        legacy default stream would wait for the draft's stream and serialise the sides."""
        stream = getattr(self.concurrent, "target_stream", None) if at_once else None
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(stream.device))  # what the round queued before it
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()  # the round's host-side decisions read its outputs; the next round reuses its buffers

    def _draft_phase(self, seqs: list[_Seq], plans: dict, phase: "DraftPhase",
                     prompt_chunks: dict[_Seq, int] | None = None) -> Callable[[], tuple[dict, int, int]]:
        """Send every drafting request's round, and the prompt chunks of requests still reading their
        prompt, to the draft (it may work meanwhile, e.g. in another actor) and return a function that
        collects the chunks."""
        chunks = {s: DraftChunk(plans[s].round_id, plans[s].draft.start_pos, []) for s in seqs}
        prefill = {s: len(s.target.cached) + n for s, n in (prompt_chunks or {}).items() if self._reads_chunks(s)}
        # Only requests that draft this round are sent: a round with no drafting at all makes no call (on Ray,
        # no actor round trip). A holder left out misses this round's mirror update; the next time it
        # drafts it carries its whole sequence instead (the draft keeps its cache where it still matches).
        drafting = [s for s in seqs if s.drafts and plans[s].draft.num_steps > 0]
        for s in seqs:
            if s.drafts and s not in drafting:
                s.draft_stale = True
        if not drafting and not prefill:
            return (lambda: (chunks, 0, 0))
        if self._draft_busy():  # the shared side is not ours to use yet: these requests go on target-only
            self._draft_down([*drafting, *prefill])
            return (lambda: (chunks, 0, 0))
        reqs = {}
        for s, upto in prefill.items():  # the same tokens the target caches this round
            reqs[s.slot] = DraftRequest(s.state.round_id, len(s.state.committed), 0, None, prefill_to=upto)
            s.draft_seen = upto
        for s in drafting:
            s.draft_seen = len(s.state.committed)
            req = plans[s].draft
            if s.draft_stale:
                st = s.state
                req = replace(req, update=SeqUpdate(req.round_id, 0, list(st.committed), list(st.pending)))
                s.draft_stale = False
            reqs[s.slot] = req
        try:
            phase.submit(reqs)
        except Exception:  # noqa: BLE001 - a broken draft: these requests finish on the target alone
            self._draft_down([*seqs, *prefill])  # one fault rule for the batch: every request goes on target-only
            return (lambda: (chunks, 0, 0))

        def collect():
            try:
                got = phase.collect()
                for s in drafting:
                    chunk = got[s.slot]
                    if chunk.round_id != plans[s].round_id or chunk.start_pos != plans[s].draft.start_pos:
                        raise RuntimeError(f"stale draft chunk for slot {s.slot}")
                    chunks[s] = chunk
            except Exception:  # noqa: BLE001
                self._draft_down([*seqs, *prefill])
                return {s: DraftChunk(plans[s].round_id, plans[s].draft.start_pos, []) for s in seqs}, 0, 0
            for s in drafting:
                s.draft_forwards += plans[s].draft.num_steps
            steps = max((plans[s].draft.num_steps for s in drafting), default=0)
            return chunks, len(drafting), steps

        return collect

    def _target_phase(self, seqs: list[_Seq], plans: dict, failed: dict,
                      prompt_chunks: dict[_Seq, int] | None = None,
                      windows: dict[_Seq, list[int]] | None = None) -> tuple[dict, int]:
        """The target's forward over every request's rows (and the prompt chunks, which ask for no logits),
        then each request's decision rows. ``windows``: the tokens a fused round drafted for a request, fed
        after its pending ones. A request whose own part raises goes into ``failed``; the forward's own error
        is the batch's and propagates. Returns the outputs and the decoding rows' width."""
        started = time.time()
        t0 = time.perf_counter()
        outs: dict[_Seq, TargetOutput | None] = {}
        feeds = {}
        for s in seqs:
            req = plans[s].target
            m = s.target
            try:
                m.apply(req.update)
                if req.num_rows == 0:
                    outs[s] = TargetOutput(req.round_id, req.start_pos, busy_s=0.0, started_at=started)
                    continue
                window = (windows or {}).get(s, [])
                feed = m.tokens[len(m.cached):] + list(window)  # the cache keeps the window's accepted prefix
                if len(m.tokens) + len(window) - req.num_rows + 1 != req.start_pos or len(feed) < req.num_rows:
                    raise RuntimeError(f"target mirror out of step in round {req.round_id}: {len(m.tokens)} "
                                       f"tokens, {len(m.cached)} cached, {req.num_rows} rows from position "
                                       f"{req.start_pos}")
            except Exception as exc:  # noqa: BLE001 - this request's alone
                failed[s] = exc
                continue
            feeds[s] = feed
        width = max((len(f) for f in feeds.values()), default=0)
        prompt = {s: s.target.tokens[len(s.target.cached): len(s.target.cached) + n]
                  for s, n in (prompt_chunks or {}).items()}
        if not feeds and not prompt:
            return outs, 0
        batch = {s.slot: (feeds[s], plans[s].target.num_rows) for s in feeds}
        batch.update({s.slot: (ids, 0) for s, ids in prompt.items()})
        logits = self.target.forward(batch)
        busy = time.perf_counter() - t0
        for s, ids in prompt.items():
            s.target.cached.extend(ids)
            s.target.forwards += 1
            s.target_forwards += 1
        for s, feed in feeds.items():
            s.target.cached.extend(feed)
            s.target.forwards += 1
            s.target_forwards += 1
            req = plans[s].target
            s.round_logits = logits[s.slot]  # the decisions read them after the forward (``_round_rows``)
            if s.logprobs is not None:  # only requests that asked: the raw distribution of each verified row
                s.round_rows = logprob_rows(logits[s.slot])
            outs[s] = TargetOutput(req.round_id, req.start_pos, busy_s=busy, started_at=started)
        return outs, width

    def _round_rows(self, seqs: list[_Seq]) -> "_RoundRows":
        """The decision rows of a round's requests (their ``round_logits``), on the forward's device: the
        argmax of the greedy ones' rows and the warped p of the sampled ones' (``decide.warp_rows``, each row
        with its request's settings), and per request a count of bad rows: for greedy ones a row with NaN,
        +inf or no finite logit (its row max is not finite: argmax would pick a NaN's index), for sampled ones
        any non-finite p. Nothing comes to the host here: ``_verdicts`` copies the counts with the decisions."""
        greedy = [s for s in seqs if s.request.params.temperature == 0.0]
        sampled = [s for s in seqs if s.request.params.temperature != 0.0]
        rows = _RoundRows()
        bad = []
        if greedy:
            block, first, counts = _stack_rows([s.round_logits for s in greedy])
            rows.argmax = block.argmax(-1)
            rows.first.update(zip(greedy, first))
            owners = [0] * block.shape[0]
            for b, (f, c) in enumerate(zip(first, counts)):
                owners[f: f + c] = [b] * c
            bad.append(rows_not_finite(block.amax(-1, keepdim=True), owners, len(greedy)))
        if sampled:
            block, first, counts = _stack_rows([s.round_logits for s in sampled])
            settings = [None] * block.shape[0]
            owners = [0] * block.shape[0]
            for b, (s, f, c) in enumerate(zip(sampled, first, counts)):
                p = s.request.params
                settings[f: f + c] = [(p.temperature, p.top_k, p.top_p)] * c
                owners[f: f + c] = [b] * c
            temps, ks, ps = zip(*settings)
            rows.probs = warp_rows(block, temps, ks, ps)
            bad.append(rows_not_finite(rows.probs, owners, len(sampled)))
            rows.sampled_first.update(zip(sampled, first))
        rows.owner.update((s, b) for b, s in enumerate(greedy + sampled))
        rows.bad = torch.cat(bad) if bad else None
        return rows

    def _verdicts(self, seqs: list[_Seq], plans: dict, chunks: dict, outs: dict, rows: "_RoundRows",
                  failed: dict) -> dict:
        """Every request's decision of this round: one batched call per kind (greedy, sampled) on the target's
        device, and one copy of the results to the host. Returns seq -> (candidates, accepted count, extra
        token). A request whose own part raises, or whose rows are not finite, goes into ``failed``."""
        cands, greedy, sampled = {}, [], []
        for s in seqs:
            if s in failed:
                continue
            try:
                got = plans[s].target.num_rows if (s in rows.first or s in rows.sampled_first) else 0
                cands[s] = c = round_candidates(s.state, plans[s], chunks[s], outs[s], s.opts, target_rows=got)
            except Exception as exc:  # noqa: BLE001 - this request's alone
                failed[s] = exc
                continue
            if c.num_rows:
                (greedy if s in rows.first else sampled).append(s)
        # each sampled request's uniforms from its own generator: n + 1 per round, whatever it decides
        coins = {s: uniforms(s.coins, len(cands[s].token_ids) + 1) for s in sampled}

        def decide(g: list[_Seq], sm: list[_Seq]) -> dict:
            parts = []
            if g:
                parts.append(verify_greedy_rows(rows.argmax, [cands[s].token_ids for s in g],
                                                [rows.first[s] for s in g], [cands[s].allow_bonus for s in g]))
            if sm:
                parts.append(verify_sampled_rows(
                    rows.probs, [cands[s].token_ids for s in sm], [rows.sampled_first[s] for s in sm],
                    [cands[s].allow_bonus for s in sm], [cands[s].draft_probs for s in sm], [coins[s] for s in sm]))
            if g or sm:  # each request's count of bad rows, in the same copy
                bad = rows.bad[torch.tensor([rows.owner[s] for s in g + sm]).to(rows.bad.device)]
                parts.append(torch.stack([bad, bad], dim=1))
            host = torch.cat(parts).tolist() if parts else []  # the round's one copy to the host
            n = len(g) + len(sm)
            return {s: (a, e, bool(bad)) for s, (a, e), (bad, _) in zip(g + sm, host[:n], host[n:])}

        try:
            decided = decide(greedy, sampled)
        except Exception:  # noqa: BLE001 - find whose it is: each request alone, the same uniforms
            decided = {}
            for s in greedy + sampled:
                try:
                    decided.update(decide([s] if s in rows.first else [], [s] if s in rows.sampled_first else []))
                except Exception as exc:  # noqa: BLE001 - this request's alone
                    failed[s] = exc
        verdicts = {s: (c, 0, NO_TOKEN) for s, c in cands.items() if not c.num_rows}
        for s, (accepted, extra, bad) in decided.items():
            if bad:
                what = "logits" if s in rows.first else "probabilities"
                failed[s] = FloatingPointError(f"the target's {what} for this request are not finite")
            else:
                verdicts[s] = (cands[s], accepted, extra)
        return verdicts

    def _decide(self, seq: _Seq, plan: RoundPlan, chunk: DraftChunk, target_out: TargetOutput | None,
                verdict: tuple, wall0: float, t0: float, t1: float, t2: float, batch: int, schedule: str = "") -> Event:
        outcome = commit_round(seq.state, plan, chunk, *verdict)
        if seq.logprobs is not None:
            # the i-th appended token was scored by the target's row i (``core.logprobs``)
            appended = outcome.update.appended_token_ids
            if appended:
                seq.logprobs.extend(token_logprobs(seq.round_rows, appended, seq.request.params.logprobs))
            seq.round_rows = None
        state = seq.state
        output = state.committed[state.prompt_len:]
        decision = seq.stop.check(output, len(outcome.update.appended_token_ids))
        t3 = time.perf_counter()
        timing = RoundTiming(
            plan.round_id, plan.mode.value, draft_busy_s=chunk.busy_s,
            target_busy_s=target_out.busy_s if target_out else 0.0, round_s=t3 - t0, decide_s=t3 - t2,
            overlap_s=overlap_s(chunk, target_out),
            bytes_moved=chunk.num_bytes() + (target_out.num_bytes() if target_out else 0),
            num_candidates=outcome.num_candidates, num_accepted=outcome.num_accepted, started_at=wall0,
            draft_started_at=chunk.started_at if chunk.busy_s else 0.0,
            target_started_at=target_out.started_at if target_out and target_out.busy_s else 0.0,
            batch_size=batch, window=plan.draft.num_steps,
            schedule=round_schedule(plan, schedule))
        seq.stats.observe_round(outcome.num_drafted, outcome.num_candidates, outcome.num_accepted,
                                outcome.recovered_token_id >= 0, outcome.bonus_token_id >= 0,
                                outcome.candidate_positions, timing)
        if seq.opts.use_draft and not seq.draft_ok:
            seq.stats.fallback_rounds += 1
        visible = min(len(output), decision.keep)
        new = output[seq.emitted:visible] if visible > seq.emitted else []
        new_logprobs = None if seq.logprobs is None else seq.logprobs[seq.emitted:visible]
        seq.emitted = max(seq.emitted, visible)
        if not decision.finished:
            return Event(seq.key, new, logprobs=new_logprobs)
        output = output[: decision.keep]
        if seq.logprobs is not None:
            output = TokenIds(output, seq.logprobs[: decision.keep])
        seq.stats.draft_forwards, seq.stats.target_forwards = seq.draft_forwards, seq.target_forwards
        seq.stats.finish(len(output), time.perf_counter() - seq.t_start, decision.reason)
        self._leave(seq)
        return Event(seq.key, new, True, output, seq.stats, logprobs=new_logprobs)

    # -- drivers -----------------------------------------------------------------------------------------
    def fail_all(self, error: BaseException) -> list[Event]:
        """The target failed: every request (running and waiting) ends with ``error``."""
        events = [Event(s.key, [], True, None, None, error) for s in self.active]
        events += [Event(key, [], True, None, None, error) for key, _ in self.waiting]
        for s in list(self.active):
            self.active.remove(s)
        self.waiting.clear()
        for lm in (self.target, self.draft):
            clear = getattr(lm, "clear", None)
            if clear is not None:
                clear()
        return events


def _request_failed(exc: BaseException) -> RequestFailed:
    return RequestFailed(f"this request failed in the decoding loop and was ended; the others went on: "
                         f"{type(exc).__name__}: {str(exc)[:300]}")


def run_batch(loop: BatchLoop, requests: list["Request"],
              on_event: Callable[[int, Event], None] | None = None) -> list[tuple[list[int], GenerationStats]]:
    """Decode ``requests`` through ``loop`` (continuous batching); returns (output ids, stats) per request."""
    results: dict[int, tuple[list[int], GenerationStats]] = {}
    for i, r in enumerate(requests):
        loop.add(r, key=i)
    try:
        while len(results) < len(requests):
            for ev in loop.step():
                if on_event is not None:
                    on_event(ev.key, ev)
                if ev.finished:
                    if ev.error is not None:
                        raise ev.error
                    results[ev.key] = (ev.output_ids, ev.stats)
    finally:
        for i in range(len(requests)):
            if i not in results:
                loop.cancel(i)
    return [results[i] for i in range(len(requests))]
