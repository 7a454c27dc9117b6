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
from dataclasses import dataclass

import ray
import torch

from .messages import DraftRequest, TargetRequest
from .workers import DraftSide, TargetSide, time_forward


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
        vocab = max(2, min(self.model.vocab_size, 1000))
        context = [(7 * i) % vocab for i in range(context_len)]
        return time_forward(self.model, context, num_tokens, reps, warmup)

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
