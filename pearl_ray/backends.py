"""Backends behind one small protocol. ``PearlEngine`` builds a ``config.Request`` and hands it to one:

- ``LocalBackend``: both models in this process; the batched loop (``core.batch``) runs the two sides one
  after the other over every request in flight (same tokens as Ray; batching is its speed-up).
- ``runtime.backend.RayBackend``: the draft and the target leader in Ray actors, running at once.

Each is built from the resolved ``EngineConfig`` (plus ``modeling.resolve.PairInfo`` or injected models)
and never sees the engine.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Generator
from typing import Protocol

import torch

from .config import EngineConfig, Request
from .core.batch import BatchedLM, BatchLoop, PerSlotLM, ThreadedDraftPhase, run_batch, torch_threads
from .core.logprobs import TokenIds
from .core.metrics import GenerationStats
from .core.policy import CostModel, SpeculationPolicy, measure_forward_costs, policy_widths
from .errors import InvalidParameterError

log = logging.getLogger(__name__)


class Backend(Protocol):
    max_context: int
    vocab_size: int
    measured: dict | None
    """Measured forward times and the automatic gamma (Ray with ``gamma=None``), else None."""

    def stream(self, request: Request, hold_s: float = 0.0
               ) -> Generator[list[int], None, tuple[list[int], GenerationStats]]:
        """Yields each round's newly committed token ids; returns (all output ids, stats). ``hold_s`` > 0:
        the caller wants the result more than each round's tokens, so a backend whose tokens cross a process
        boundary may gather them and send at most one list per ``hold_s`` after the first."""
        ...

    def shutdown(self) -> None: ...


def decoder(tokenizer):
    """Token ids -> text with special tokens kept (what stop strings are matched against), or None."""
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def as_batched(model) -> "BatchedLM":
    """A ``core.batch.BatchedLM`` over ``model``: a ``modeling.hf.HFCausalLM`` gets the slot cache of
    ``modeling.batched`` (sharing its weights); any other ``CausalLM`` the per-slot reference (copies)."""
    from .modeling.hf import HFCausalLM
    from .modeling.tp import TPBatchedLeader, TPLeaderModel

    if isinstance(model, TPLeaderModel):  # rank 0 of a tensor-parallel group: the batched ops go to every rank
        return TPBatchedLeader(as_batched(model.runner), model.group)
    if isinstance(model, HFCausalLM):
        from .modeling.batched import BatchedHFCausalLM

        lm = BatchedHFCausalLM(model.model, model.vocab_size, model.draft_to_target)
        lm.prefill_threads = model.prefill_threads
        return lm
    return PerSlotLM(lambda: copy.deepcopy(model))


def split_threads(whole: int) -> tuple[int, int] | None:
    """(target, draft) torch threads when the sides run at the same time on ``whole`` CPU threads: the draft,
    several times cheaper per step, gets a quarter (at least one); None below 2 threads (nothing to split)."""
    if whole < 2:
        return None
    draft = max(1, whole // 4)
    return whole - draft, draft


def _busy(lm, stop: threading.Event, width: int, context: int, token: int = 5) -> None:
    """Run ``width``-token forwards of one row on ``context`` cached positions until ``stop``: the other
    side's load while a side is measured at the same time."""
    vocab = max(1, int(getattr(lm, "vocab_size", 0) or 1))
    lm.forward({0: ([(token + i % 7) % vocab for i in range(context)], 1)})
    try:
        while not stop.is_set():
            lm.forward({0: ([token % vocab] * width, 1)})
            lm.crop(0, context)
    finally:
        lm.release(0)


def _on_stream(stream):
    """``torch.cuda.stream(stream)``, or nothing for None (CPU)."""
    import contextlib

    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _while_busy(measure, background):
    """``measure()`` while ``background(stop)`` runs on a thread of its own (which ends with it)."""
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="pearl-measure") as pool:
        future = pool.submit(background, stop)
        try:
            return measure()
        finally:
            stop.set()
            future.result(timeout=600)


def local_cost_model(target_model, draft_model, max_num_seqs: int, max_gamma: int, context: int = 128,
                     concurrent: ThreadedDraftPhase | None = None, target_split_threads: int | None = None
                     ) -> CostModel:
    """Measure the pair for the policy on fresh slot caches over the same weights (a few seconds; the live
    caches keep their slots): each side with the whole device (the sides in turn), and with ``concurrent``
    (the draft's own thread or stream) each side again while the other runs beside it, the target on
    ``target_split_threads``: what a round costs when they share the device at once, contention included."""
    widths = policy_widths(max_gamma)
    t = measure_forward_costs(as_batched(target_model), max_num_seqs, widths, context)
    d = measure_forward_costs(as_batched(draft_model), max_num_seqs, (), context)
    if concurrent is None:
        return CostModel(t, d, parallel=False)

    stream = concurrent.target_stream  # CUDA: the target's own stream in rounds at once, as there

    def target_at_once():
        with torch_threads(target_split_threads), _on_stream(stream):
            return measure_forward_costs(as_batched(target_model), max_num_seqs, widths, context)

    def target_load(stop):
        with torch_threads(target_split_threads), _on_stream(stream):
            _busy(as_batched(target_model), stop, max(widths), context)

    t_split = _while_busy(target_at_once, lambda stop: concurrent.run(_busy, as_batched(draft_model), stop, 1, context))
    d_split = _while_busy(lambda: concurrent.run(measure_forward_costs, as_batched(draft_model), max_num_seqs, (),
                                                 context), target_load)
    return CostModel(t, d, parallel=False, split=CostModel(t_split, d_split, parallel=True))


def concurrent_draft(side, device: torch.device, schedule: str, threads: int
                     ) -> tuple[ThreadedDraftPhase | None, int | None]:
    """For one process holding both models: the draft's own thread (CPU: with a share of the ``threads``
    cores; CUDA: with a stream of its own) for rounds that run the sides at once, and the target's thread
    count meanwhile (None: leave it). (None, None) where every round runs in turn: ``schedule="turn"``, or
    a CPU with one thread (``schedule="once"`` is then an error)."""
    if schedule == "turn":
        return None, None
    if device.type == "cuda":
        return ThreadedDraftPhase(side, None, stream=torch.cuda.Stream(device=device)), None
    split = split_threads(threads)
    if split is None:
        if schedule == "once":
            raise InvalidParameterError(f"schedule='once' runs the sides at the same time: it needs CUDA or at "
                                        f"least 2 CPU threads (num_threads), this engine has {threads}")
        return None, None
    return ThreadedDraftPhase(side, split[1]), split[0]


class LocalBackend:
    """Both models in this process. Every request goes through one ``core.batch.BatchLoop`` (a stream is a
    batch of one; ``generate_batch`` decodes a call's prompts together, ``max_num_seqs`` at once)."""

    def __init__(self, config: EngineConfig, pair=None, draft_model=None, target_model=None, tokenizer=None):
        from .modeling.hf import load_model

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if target_model is None:
            loaded = load_model(pair.target_path, config.device, config.dtype, cpu_kernels=config.cpu_kernels)
            target_model, tokenizer = loaded.runner, loaded.tokenizer
        if draft_model is None and pair is not None and pair.draft_path is not None:
            draft_model = load_model(pair.draft_path, config.device, config.dtype,
                                     target_vocab_size=target_model.vocab_size, cpu_kernels=config.cpu_kernels).runner
        self.draft_model, self.target_model = draft_model, target_model
        self.decode = decoder(tokenizer)
        self.max_context, self.vocab_size = target_model.max_context, target_model.vocab_size
        self.target_lm = as_batched(target_model)
        self.draft_lm = as_batched(draft_model) if draft_model is not None else None
        self.loop = BatchLoop(self.target_lm, self.draft_lm, None, config.max_num_seqs, self.decode)
        self.loop.kv_budget = config.kv_budget_tokens
        self.loop.max_prefill_tokens = config.max_prefill_tokens_per_round
        self.concurrent = None
        if self.draft_lm is not None:
            device = torch.device(getattr(self.target_model, "device", None) or config.device)
            self.concurrent, split = concurrent_draft(self.loop.draft.side, device, config.schedule,
                                                      torch.get_num_threads())
            self.loop.set_concurrent(self.concurrent, split)
        self.loop.schedule = None if config.schedule == "auto" else config.schedule
        self.policy = None
        self.measured = None
        if config.adaptive and self.draft_lm is not None:
            def measure() -> CostModel:
                return local_cost_model(self.target_model, self.draft_model, config.max_num_seqs, config.gamma,
                                        config.measure_context, self.concurrent, self.loop.split_threads)

            t0 = time.perf_counter()
            self.policy = SpeculationPolicy(measure(), max_gamma=config.gamma, remeasure=measure,
                                            schedule=self.loop.schedule)
            self.loop.policy = self.policy
            self.measured = {"policy": self.policy.describe(), "measure_s": round(time.perf_counter() - t0, 2)}
            log.info("speculation policy: costs measured in %.1f s (%s)", time.perf_counter() - t0,
                     self.policy.costs.to_dict())

    def stream(self, request: Request, hold_s: float = 0.0):
        key = self.loop.add(request)  # in-process: every round's tokens at once, whatever ``hold_s``
        try:
            while True:
                for ev in self._step():
                    if ev.key is not key:
                        continue
                    if ev.token_ids:
                        yield TokenIds(ev.token_ids, ev.logprobs)
                    if ev.finished:
                        if ev.error is not None:
                            raise ev.error
                        return ev.output_ids, ev.stats
        finally:
            self.loop.cancel(key)

    def generate_batch(self, requests: list[Request], on_event=None):
        try:
            return run_batch(self.loop, requests, on_event)
        except Exception:
            self.loop.fail_all(RuntimeError("the batch was abandoned"))
            raise

    def _step(self):
        try:
            return self.loop.step()
        except Exception as exc:
            self.loop.fail_all(exc)
            raise

    def shutdown(self) -> None:
        if self.concurrent is not None:
            self.concurrent.close()
        self.concurrent = None
        self.draft_model = self.target_model = None
        self.loop = self.target_lm = self.draft_lm = None
