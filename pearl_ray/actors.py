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
import threading
from dataclasses import dataclass

import ray
import torch

from .messages import DraftRequest, TargetRequest
from .workers import DraftSide, TargetSide, time_forward


def stream_call(run, item_timeout_s: float):
    """Run ``run(on_tokens) -> (ids, stats)`` in a thread and yield its token lists as they come, then
    {"done": True, "token_ids": ids, "stats": stats}. Each wait for the next item is bounded."""
    import queue

    q: queue.Queue = queue.Queue()
    result = {}

    def work():
        try:
            result["out"] = run(lambda ids: q.put(list(ids)))
        except BaseException as exc:  # re-raised below, in the caller's thread
            result["error"] = exc
        q.put(None)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get(timeout=item_timeout_s)
        if item is None:
            break
        yield {"token_ids": item}
    if "error" in result:
        raise result["error"]
    ids, stats = result["out"]
    yield {"done": True, "token_ids": ids, "stats": stats}


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
        # Round work arrives by actor calls and, with the collective channel, from the worker's link loop
        # thread; the lock keeps them one at a time (a fallback call waits for a late loop round to end).
        self.lock = threading.Lock()

    def info(self) -> dict:
        return {"vocab_size": self.model.vocab_size, "max_context": self.model.max_context, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids(),
                "threads": torch.get_num_threads()}

    def time_forward(self, context_len: int = 128, num_tokens: int = 1, reps: int = 30, warmup: int = 5) -> float:
        vocab = max(2, min(self.model.vocab_size, 1000))
        context = [(7 * i) % vocab for i in range(context_len)]
        with self.lock:
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
        with self.lock:
            self.side.start(prompt_ids, temperature, top_k, top_p, draft_greedy, gen)
        return True

    def draft(self, req: DraftRequest):
        with self.lock:
            return self.side.draft(req)

    def forwards(self) -> int:
        return self.side.mirror.forwards

    def serve_link(self, host: str, port: int, name: str, reply_timeout_s: float, idle_timeout_s: float,
                   connect_timeout_s: float) -> str:
        """The draft's end of the target leader's ``DraftLinkChannel`` (rank 1 of 2): a long-running call that
        answers start / draft / count frames until stopped, the link breaks or it sits idle too long."""
        from .collective import GlooLink, draft_frame_handler, serve_rounds

        link = GlooLink(host, port, 1, 2, name, timeout_s=idle_timeout_s, connect_timeout_s=connect_timeout_s)
        return serve_rounds(link, draft_frame_handler(self), reply_timeout_s, idle_timeout_s)


@ray.remote
class TargetWorker(_WorkerBase):
    """Leader of the target group (a group of one here)."""

    def __init__(self, model_factory, num_threads: int | None = 1):
        super().__init__(model_factory, num_threads)
        self.side = TargetSide(self.model)

    def start(self, prompt_ids, temperature, top_k, top_p) -> bool:
        with self.lock:
            self.side.start(prompt_ids, temperature, top_k, top_p)
        return True

    def verify(self, req: TargetRequest):
        with self.lock:
            return self.side.verify(req)

    # The leader as decider (channel "collective"): it owns a gloo link to the draft and runs the loop.

    def open_link(self, name: str, idle_timeout_s: float, connect_timeout_s: float) -> tuple[str, int]:
        """Create rank 0 of a new link (closing any old one); returns (host, port) for the draft to join."""
        from .collective import GlooLink

        self.close_link()
        host = ray.util.get_node_ip_address()
        self.link = GlooLink(host, 0, 0, 2, name, timeout_s=idle_timeout_s, connect_timeout_s=connect_timeout_s)
        return host, self.link.port

    def connect_link(self) -> bool:
        self.link.connect()
        return True

    def close_link(self) -> None:
        link, self.link = getattr(self, "link", None), None
        if link is None:
            return
        if link.pg is not None:
            from . import wire
            from .collective import LinkError

            try:
                link.send([wire.stop_frame()], 1, 5.0)
            except LinkError:
                pass
        link.close()

    def link_ok(self) -> bool:
        link = getattr(self, "link", None)
        return link is not None and link.pg is not None

    def generate(self, prompt_ids, opts, stop, seed, temperature, top_k, top_p, method, round_timeout_s: float,
                 use_link: bool = True, stream: bool = True):
        """Runs the whole request here (``loop.run_pearl`` over a ``DraftLinkChannel``). Yields
        {"token_ids": [...]} per round with new committed tokens (only if ``stream``: each item costs
        a Ray report), then {"done": True, ...}."""
        from .collective import DraftLinkChannel
        from .loop import run_pearl

        channel = DraftLinkChannel(self.side, getattr(self, "link", None) if use_link else None, round_timeout_s,
                                   self.lock)

        def run(on_tokens):
            try:
                return run_pearl(channel, prompt_ids, opts, stop, seed, temperature, top_k, top_p,
                                 on_tokens if stream else None, method=method)
            finally:
                channel.close()

        yield from stream_call(run, item_timeout_s=round_timeout_s * 4 + 60)  # a broken link closes itself

    def forwards(self) -> int:
        return self.side.mirror.forwards
