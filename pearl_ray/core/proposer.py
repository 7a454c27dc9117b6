"""The proposer: the draft's half of batched rounds. No Ray.

``BatchedDraftSide`` keeps a mirror and a sampling generator per slot over the draft's ``BatchedLM`` and
drafts every asked window as batched one-token steps. The loop (``core.batch``) reaches it through a
``DraftPhase``: in its own process in turn (``LocalDraftPhase``), at once on a thread of its own
(``ThreadedDraftPhase``; on CUDA, its own stream), or in another actor (``runtime.transports``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from .decide import gather_rows, warp_rows
from .messages import DraftChunk, DraftRequest, DraftStart
from .sampling import inverse_cdf, make_generator, uniforms
from .sides import BatchedLM, SeqMirror, SlotView, keep_logits_on_device
from ..platform import adopt_thread_count


class BatchedDraftSide:
    """The draft's half of batched rounds: a mirror and a sampling generator per slot over a ``BatchedLM``.
    ``draft`` applies every request's update, then drafts the windows asked for as batched one-token steps
    (the first step of a slot also feeds what its cache lacks). The same code runs in the loop's process
    (local) and in a draft worker (Ray), so both give the same tokens."""

    def __init__(self, lm: BatchedLM):
        self.lm = lm
        self.mirrors: dict[int, SeqMirror] = {}
        self.starts: dict[int, DraftStart] = {}
        self.gens: dict[int, torch.Generator | None] = {}

    def start(self, slot: int, start: DraftStart) -> None:
        mirror = SeqMirror(SlotView(self.lm, slot))
        mirror.start(list(start.prompt_ids))
        self.mirrors[slot], self.starts[slot] = mirror, start
        sampled = start.temperature > 0 and not start.draft_greedy
        self.gens[slot] = make_generator(start.seed, 1) if sampled else None

    def release(self, slot: int) -> None:
        self.mirrors.pop(slot, None)
        self.starts.pop(slot, None)
        self.gens.pop(slot, None)
        self.lm.release(slot)

    def forwards(self, slot: int) -> int:
        return self.mirrors[slot].forwards if slot in self.mirrors else 0

    def draft(self, reqs: dict[int, DraftRequest]) -> dict[int, DraftChunk]:
        started = time.time()
        t0 = time.perf_counter()
        chunks = {slot: DraftChunk(r.round_id, r.start_pos, []) for slot, r in reqs.items()}
        for slot, req in reqs.items():
            m = self.mirrors[slot]
            m.apply(req.update)  # every round, drafting or not, so the mirror never misses a decision
            if len(m.tokens) != req.start_pos:
                raise RuntimeError(f"draft mirror of slot {slot} has {len(m.tokens)} tokens, round {req.round_id} "
                                   f"expects {req.start_pos}")
        # chunks of long prompts: cached without logits, so the draft sees the prompt as the target does
        # (at least one token stays uncached: the slot's first drafting step feeds it)
        for slot, r in reqs.items():
            if r.prefill_to >= len(self.mirrors[slot].tokens):
                raise RuntimeError(f"slot {slot}: a prompt chunk up to {r.prefill_to} of "
                                   f"{len(self.mirrors[slot].tokens)} tokens leaves nothing to draft from")
        prefill = {slot: self.mirrors[slot].tokens[len(self.mirrors[slot].cached):r.prefill_to]
                   for slot, r in reqs.items() if r.prefill_to > len(self.mirrors[slot].cached)}
        if prefill:
            self.lm.forward({slot: (ids, 0) for slot, ids in prefill.items()})
            for slot, ids in prefill.items():
                self.mirrors[slot].cached.extend(ids)
                self.mirrors[slot].forwards += 1
        drafting = [slot for slot, r in reqs.items() if r.num_steps > 0]
        if not drafting:
            if prefill:
                busy = time.perf_counter() - t0
                for slot in prefill:
                    chunks[slot].busy_s, chunks[slot].started_at = busy, started
            return chunks
        feeds = {slot: self.mirrors[slot].tokens[len(self.mirrors[slot].cached):] for slot in drafting}
        ids: dict[int, list[int]] = {slot: [] for slot in drafting}
        rows: dict[int, list[torch.Tensor]] = {slot: [] for slot in drafting}
        cut: set[int] = set()  # slots whose window ended early: their row could not be sampled
        for k in range(max(reqs[slot].num_steps for slot in drafting)):
            live = [slot for slot in drafting if k < reqs[slot].num_steps and slot not in cut]
            if not live:
                break
            logits = self.lm.forward({slot: (feeds[slot], 1) for slot in live})
            for slot in live:
                self.mirrors[slot].cached.extend(feeds[slot])
                self.mirrors[slot].forwards += 1
            tokens, ok, q = self._sample_step(live, logits)
            for j, slot in enumerate(live):
                if not ok[j]:  # not a distribution (e.g. NaN): a shorter window for this slot only
                    cut.add(slot)
                    continue
                if q is not None and self.gens[slot] is not None:
                    rows[slot].append(q[j])
                ids[slot].append(tokens[j])
                feeds[slot] = [tokens[j]]
        busy = time.perf_counter() - t0
        for slot in drafting:
            r = reqs[slot]
            probs = torch.stack(rows[slot]) if rows[slot] else None
            chunks[slot] = DraftChunk(r.round_id, r.start_pos, ids[slot], probs, busy, started)
        return chunks

    def _sample_step(self, live: list[int], logits: dict[int, torch.Tensor]
                     ) -> tuple[list[int], list[bool], torch.Tensor | None]:
        """One draft step's tokens for the ``live`` slots at once, on the logits' device: argmax for greedy
        slots, a draw from the warped row for sampling ones (one uniform from the slot's own generator, by
        inverse CDF, as ``sampling.sample``). Returns the ids, whether each row was a distribution, and the
        warped rows ``[len(live), vocab]`` (None when no slot samples). The ids come to the host in one
        copy: the step's only sync, as the next forward takes them as Python ints."""
        rows, first = gather_rows([logits[slot][-1:] for slot in live])
        if first != list(range(len(live))):
            rows = rows[first]
        sampled = [j for j, slot in enumerate(live) if self.gens[slot] is not None]
        if not sampled:
            return rows.argmax(-1).tolist(), [True] * len(live), None
        starts = [self.starts[slot] for slot in live]
        greedy = len(sampled) < len(live)
        # argmax draft slots take a one-hot row here (temperature 0), so every slot has a row of q
        q = warp_rows(rows, [st.temperature if self.gens[slot] is not None else 0.0 for slot, st in zip(live, starts)],
                      [st.top_k for st in starts], [st.top_p for st in starts])
        u = torch.tensor([float(uniforms(self.gens[slot], 1)[0]) if self.gens[slot] is not None else 0.0
                          for slot in live], dtype=torch.float64).to(q.device)
        tokens = inverse_cdf(q, u)
        if greedy:
            argmax = rows.argmax(-1)
            pick = torch.tensor([self.gens[slot] is None for slot in live]).to(q.device)
            tokens = torch.where(pick, argmax, tokens)
        finite = torch.isfinite(q).all(-1)
        out = torch.cat([tokens, finite.long()]).tolist()
        n = len(live)
        return out[:n], [bool(f) for f in out[n:]], q


class DraftPhase(Protocol):
    """How the batched loop reaches the draft: start and release slots, and one round's work as ``submit``
    (may run in the background: another actor, at the same time as the target) then ``collect``. Any
    exception is a draft failure: the requests go on without it."""

    def start(self, slot: int, start: DraftStart) -> None: ...

    def release(self, slot: int) -> None: ...

    def submit(self, reqs: dict[int, DraftRequest]) -> None: ...

    def collect(self) -> dict[int, DraftChunk]: ...

    def forwards(self, slot: int) -> int: ...


class LocalDraftPhase:
    """The draft in this process: ``submit`` drafts at once (the sides run one after the other)."""

    def __init__(self, side: BatchedDraftSide):
        self.side = side
        keep_logits_on_device(side.lm)  # its chunks stay in this process: q rows need not visit the host
        self._chunks: dict[int, DraftChunk] = {}

    def start(self, slot, start):
        self.side.start(slot, start)

    def release(self, slot):
        self.side.release(slot)

    def submit(self, reqs):
        self._chunks = self.side.draft(reqs)

    def collect(self):
        chunks, self._chunks = self._chunks, {}
        return chunks

    def forwards(self, slot):
        return self.side.forwards(slot)

    def clear(self) -> None:
        for slot in list(self.side.mirrors):
            self.side.release(slot)


class ThreadedDraftPhase:
    """The draft in this process on a thread of its own, drafting while the caller runs the target's forward:
    PEARL's schedule with both models in one worker. On CPU each side keeps its share of the cores (torch's
    intra-op thread count is per thread: this thread keeps ``threads``); on CUDA the draft's kernels go to a
    stream of their own. It shares the ``BatchedDraftSide`` of the in-turn phase, so a request's draft cache
    and mirror carry over when a round changes schedule."""

    def __init__(self, side: BatchedDraftSide, threads: int | None, timeout_s: float = 300.0,
                 stream: "torch.cuda.Stream | None" = None):
        from concurrent.futures import ThreadPoolExecutor

        self.side, self.timeout_s, self.stream = side, timeout_s, stream
        # the target's stream for the same rounds (``BatchLoop._target_stream``): both sides off the legacy
        # default stream, which would serialise them
        self.target_stream = torch.cuda.Stream(device=stream.device) if stream is not None else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pearl-draft")
        self.pool.submit(adopt_thread_count, threads).result(timeout=timeout_s)
        self._future = None
        self.stuck = None  # a round that outlived ``collect``'s wait, maybe still drafting on the shared side

    def start(self, slot, start):
        self.side.start(slot, start)

    def release(self, slot):
        self.side.release(slot)

    def forwards(self, slot):
        return self.side.forwards(slot)

    def _on_stream(self, fn: Callable, *args):
        """``fn(*args)`` on the draft's stream (CUDA), after the work queued before it, and finished: its
        tokens are on the host already, its probability rows must be ready too."""
        if self.stream is None:
            return fn(*args)
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            out = fn(*args)
        self.stream.synchronize()
        return out

    def submit(self, reqs):
        self._future = self.pool.submit(self._on_stream, self.side.draft, reqs)

    def run(self, fn: Callable, *args):
        """``fn(*args)`` on the draft's thread (and stream), waited for: e.g. measuring the draft there."""
        return self.pool.submit(self._on_stream, fn, *args).result(timeout=self.timeout_s)

    def collect(self):
        from concurrent.futures import TimeoutError as FutureTimeout

        future, self._future = self._future, None
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.stuck = future
            raise

    def busy(self) -> bool:
        """Whether a round that timed out still runs on the draft's thread: until it ends nothing else may
        touch the shared side (the in-turn phase and slot releases run on the caller's thread)."""
        if self.stuck is not None and self.stuck.done():
            self.stuck = None
        return self.stuck is not None

    def close(self) -> None:
        self.pool.shutdown(wait=False)
