"""Backends behind one small protocol. ``PearlEngine`` builds a ``config.Request`` and hands it to one:

- ``LocalBackend``: both models in this process; the batched loop (``core.batch``) runs over every request
  in flight, the two sides in turn or at once with the draft on its own thread (``EngineConfig.schedule``).
- ``runtime.backend.RayBackend``: the target leader's batched loop in a Ray actor, the draft in another
  actor (or beside the target in the leader: ``colocate``).

Each is built from the resolved ``EngineConfig`` (plus ``modeling.resolve.PairInfo`` or injected models)
and never sees the engine. What both backends do with a pair's models (slot caches, the draft's thread,
the cost measurement) is in ``pair``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from typing import Protocol

import torch

from .config import EngineConfig, Request
from .core.batch import BatchLoop, run_batch
from .core.logprobs import TokenIds
from .core.metrics import GenerationStats
from .core.policy import CostModel, SpeculationPolicy
from .pair import as_batched, concurrent_draft, decoder, local_cost_model

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
        if config.compile:  # the slot caches' decoding forwards through torch.compile (modeling.batched)
            for lm in (self.target_lm, self.draft_lm):
                if hasattr(lm, "enable_compile"):
                    lm.enable_compile()
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
