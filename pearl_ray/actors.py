"""Ray actors: thin shells over ``workers.DraftSide`` / ``workers.TargetSide``. No acceptance math here.

Each worker builds its model through an injected ``model_factory`` (a picklable callable returning a
``workers.CausalLM``), so tests hand in tiny models and the real job hands in ``HFModelFactory``. On CPU
each worker pins torch to its own thread count (one core each by default).

The target side is a *target group* with one leader (``TargetWorker``): the coordinator talks only to the
leader, so a tensor-parallel group (DeepSpeed AutoTP shards driven SPMD by the leader) can replace it
without changing the coordinator.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import ray
import torch

from .messages import DraftRequest, TargetRequest
from .workers import DraftSide, TargetSide


@dataclass(frozen=True)
class HFModelFactory:
    """Loads a Hugging Face model (path, preset or hub id) inside the worker."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"
    target_vocab_size: int | None = None

    def __call__(self):
        from .models import load_model

        device = self.device
        if device == "cuda" and ray.get_gpu_ids():
            device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
        return load_model(self.name, device, self.dtype, target_vocab_size=self.target_vocab_size).runner


@dataclass(frozen=True)
class ObjectFactory:
    """Hands a ready, picklable model object to the worker (tests, toy models)."""

    model: object

    def __call__(self):
        return self.model


def _time_forwards(model, context_len: int, num_tokens: int, reps: int, warmup: int) -> float:
    """Median wall time of a ``num_tokens``-token forward after a ``context_len``-token prefill."""
    vocab = max(2, min(model.vocab_size, 1000))
    model.reset()
    model.forward([(7 * i) % vocab for i in range(context_len)], 1)
    times = []
    for r in range(reps + warmup):
        base = model.cache_len
        t0 = time.perf_counter()
        model.forward([(3 * r + j) % vocab for j in range(num_tokens)], 1)
        times.append(time.perf_counter() - t0)
        model.crop(base)
    model.reset()
    return statistics.median(times[warmup:])


class _WorkerBase:
    def __init__(self, model_factory, num_threads: int | None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = model_factory()

    def info(self) -> dict:
        return {"vocab_size": self.model.vocab_size, "max_context": self.model.max_context, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids(),
                "threads": torch.get_num_threads()}

    def time_forward(self, context_len: int = 128, num_tokens: int = 1, reps: int = 30, warmup: int = 5) -> float:
        return _time_forwards(self.model, context_len, num_tokens, reps, warmup)

    def ping(self) -> bool:
        return True


@ray.remote
class DraftWorker(_WorkerBase):
    def __init__(self, model_factory, num_threads: int | None = 1):
        super().__init__(model_factory, num_threads)
        self.side = DraftSide(self.model)

    def start(self, prompt_ids, temperature, top_k, top_p, draft_greedy, seed) -> bool:
        from .sampling import make_generator

        gen = make_generator(seed, 1) if temperature > 0 and not draft_greedy else None
        self.side.start(prompt_ids, temperature, top_k, top_p, draft_greedy, gen)
        return True

    def draft(self, req: DraftRequest):
        return self.side.draft(req)

    def forwards(self) -> int:
        return self.side.mirror.forwards


@ray.remote
class TargetWorker(_WorkerBase):
    """Leader of the target group (a group of one here)."""

    def __init__(self, model_factory, num_threads: int | None = 1):
        super().__init__(model_factory, num_threads)
        self.side = TargetSide(self.model)

    def start(self, prompt_ids, temperature, top_k, top_p) -> bool:
        self.side.start(prompt_ids, temperature, top_k, top_p)
        return True

    def verify(self, req: TargetRequest):
        return self.side.verify(req)

    def forwards(self) -> int:
        return self.side.mirror.forwards
