"""Ray actors around the batched loop (``core.batch``). No acceptance math here.

Each worker builds its model through an injected factory (a picklable callable returning
``(CausalLM, tokenizer or None)``), so tests hand in tiny models and real runs hand in ``HFModelFactory``.
On CPU each worker pins torch to its own thread count.

``TargetLeader`` is the leader of the target group (rank 0): its continuous loop (``leader_loop.LeaderLoop``)
runs batched rounds over every request in flight, reaches the draft through a draft phase (the gloo link, or
one actor call per round; colocated: the draft in this worker), and streams each request's committed tokens
back as a Ray streaming generator. With a tensor-parallel target its model is a ``modeling.tp.TPLeaderModel``
and the other ranks are ``TargetShard`` actors sitting in ``follow``. ``DraftWorker`` drafts the leader's
batched rounds (``batch_round``: one actor call, or one message on the gloo link, per round).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import ray
import torch

from ..core.proposer import BatchedDraftSide, LocalDraftPhase
from ..core.sides import time_forward
from ..pair import as_batched, concurrent_draft, decoder, local_cost_model
from ..platform import adopt_thread_count, borrowed_threads, on_fresh_thread, torch_threads


@dataclass(frozen=True)
class HFModelFactory:
    """Loads a transformers model (a resolved path) inside the worker; the target also loads its tokenizer
    (for stop strings)."""

    path: str
    device: str = "cpu"
    dtype: str = "float32"
    target_vocab_size: int | None = None
    with_tokenizer: bool = False
    cpu_kernels: str = "onednn"

    def __call__(self):
        from ..modeling.hf import load_model

        device = self.device
        if device == "cuda" and ray.get_gpu_ids():
            device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
        loaded = load_model(self.path, device, self.dtype, target_vocab_size=self.target_vocab_size,
                            cpu_kernels=self.cpu_kernels)
        return loaded.runner, (loaded.tokenizer if self.with_tokenizer else None)


@dataclass(frozen=True)
class ObjectFactory:
    """Hands a ready, picklable model object (and optionally a tokenizer) to the worker."""

    model: object
    tokenizer: object = None

    def __call__(self):
        return self.model, self.tokenizer


def _param_bytes(model) -> int | None:
    """Bytes of the weights this worker holds (its shard, for a tensor-parallel rank); None if unknown."""
    module = getattr(getattr(model, "runner", model), "model", None)
    if module is None or not hasattr(module, "parameters"):
        return None
    return sum(p.numel() * p.element_size() for p in module.parameters())


class _WorkerBase:
    def __init__(self, model_factory, num_threads: int):
        # torch's count is per thread: each thread that runs forwards adopts ``self.threads`` (Ray's task
        # threads start from the worker's OMP_NUM_THREADS, whatever this one set)
        self.threads = max(1, int(num_threads))
        torch.set_num_threads(self.threads)
        # Loading and measuring run on short-lived threads, the rounds on one long-lived one (the leader's
        # loop, the draft's link loop): see ``platform`` for why this matters on CPU.
        self.model, self.tokenizer = on_fresh_thread(model_factory, name="pearl-load")
        # This thread lives as long as the actor and runs no forwards. With GNU OpenMP a thread that ever ran a
        # parallel region keeps a team, and once the teams outnumber the cores every team's workers sleep
        # between regions: a colocated leader (2 threads) whose set-up ran here decoded at 1 thread's speed
        torch.set_num_threads(1)
        # Round work arrives by actor calls and from the link loop's thread: one at a time.
        self.lock = threading.Lock()

    def info(self) -> dict:
        pg = ray.util.get_current_placement_group()
        return {"vocab_size": self.model.vocab_size, "max_context": self.model.max_context, "pid": os.getpid(),
                "device": str(getattr(getattr(self.model, "runner", self.model), "device", "cpu")),
                "param_bytes": _param_bytes(self.model),
                "colocated_draft": getattr(self, "draft_model", None) is not None,
                "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids(),
                "threads": self.threads, "prefill_threads": getattr(self.model, "prefill_threads", None),
                "placement_group": pg.id.hex() if pg else None}

    def time_forward(self, context_len: int = 128, num_tokens: int = 1, reps: int = 30, warmup: int = 5) -> float:
        """Median time of a ``num_tokens``-token forward of one sequence after ``context_len`` cached
        positions (``core.sides.time_forward``, on the model's own cache; ``Coordinator.measure``)."""
        vocab = max(2, min(self.model.vocab_size, 1000))
        context = [(7 * i) % vocab for i in range(context_len)]
        with self.lock:
            return on_fresh_thread(time_forward, self.model, context, num_tokens, reps, warmup, threads=self.threads)

    def ping(self) -> bool:
        return True


@ray.remote
class DraftWorker(_WorkerBase):
    def __init__(self, model_factory, num_threads: int = 1):
        super().__init__(model_factory, num_threads)
        self.batched = None  # the batched rounds' slots (built on first use)

    def batch_round(self, starts: dict, releases: list, reqs: dict) -> dict:
        """Release and start slots, then draft every slot's round (``BatchedDraftSide``); returns slot ->
        ``DraftChunk``. One call per round carries every slot's work: ``transports.RemoteDraftPhase`` calls it,
        and over the gloo link ``serve_link`` does for each round's message."""
        with self.lock:
            if self.batched is None:
                self.batched = BatchedDraftSide(as_batched(self.model))
            for slot in releases:
                self.batched.release(slot)
            for slot, start in starts.items():
                self.batched.start(slot, start)
            return self.batched.draft(reqs) if reqs else {}

    def measure_batched(self, max_rows: int, context: int = 128) -> object:
        """Seconds per batched one-token draft step against rows (``core.policy.ForwardCosts``), on a fresh slot
        cache over this worker's model."""
        from ..core.policy import measure_forward_costs

        with self.lock:
            return on_fresh_thread(measure_forward_costs, as_batched(self.model), max_rows, (), context)

    def serve_link(self, host: str, port: int, name: str, reply_timeout_s: float, idle_timeout_s: float,
                   connect_timeout_s: float, lane: str | None = None) -> str:
        """The draft's end of the leader's gloo link (rank 1 of 2): answers each batched round's message with
        ``batch_round`` until stopped, the link breaks or it sits idle too long. Returns why it ended."""
        from .link import GlooLink, draft_frame_handler, serve_rounds

        link = GlooLink(host, port, 1, 2, name, timeout_s=idle_timeout_s, connect_timeout_s=connect_timeout_s,
                        lane=lane)
        adopt_thread_count(self.threads)  # this thread runs the draft's forwards from now on
        return serve_rounds(link, draft_frame_handler(self), reply_timeout_s, idle_timeout_s)


@ray.remote
class TargetLeader(_WorkerBase):
    """Leader of the target group: runs the batched loop over every request in flight and decides (the draft
    is reached over the transport the coordinator set up: a gloo link, or the draft's actor handle; or it
    sits in this worker too)."""

    def __init__(self, model_factory, num_threads: int = 1, prefill_threads: int = 0, draft_factory=None,
                 schedule: str = "auto"):
        """``draft_factory``: a colocated pair, the draft in this worker too (no draft actor): its rounds run
        in turn or at once on the draft's own thread (``schedule``, as the local backend)."""
        super().__init__(model_factory, num_threads)
        self.draft_model, self.concurrent, self.split_threads = None, None, None
        self.phase = None  # how the batched rounds reach the draft (``attach_draft``; colocated: in this process)
        if draft_factory is not None:
            self.draft_model = on_fresh_thread(lambda: draft_factory()[0], name="pearl-load", threads=self.threads)
            side = BatchedDraftSide(as_batched(self.draft_model))
            self.phase = LocalDraftPhase(side)
            device = torch.device(getattr(self.model, "device", None) or "cpu")
            self.concurrent, self.split_threads = concurrent_draft(side, device, schedule, self.threads)
            prefill_threads = 0  # the target has the pair's threads already
        self.schedule = schedule
        borrowed = borrowed_threads(prefill_threads, self.threads)
        if borrowed and getattr(self.model, "device", None) == torch.device("cpu"):
            self.model.prefill_threads = borrowed  # HFCausalLM: prompt passes borrow the draft's cores
        self.link = None  # the newest gloo link to the draft (held by ``phase`` once attached)
        self.draft_handle = None
        self.batch = None  # the continuous loop (leader_loop.LeaderLoop), started by the first request
        self.policy = None  # the adaptive speculation policy (prepare_policy), if measured
        self.batch_lock = threading.Lock()
        self.round_timeout_s = 30.0

    # -- transport setup (called by the coordinator) -----------------------------------------------------
    def open_link(self, name: str, idle_timeout_s: float, connect_timeout_s: float,
                  lane: str | None = None) -> tuple[str, int]:
        """Create rank 0 of a new gloo link; returns (host, port) for the draft. An old link that no draft
        phase holds is closed now; one the loop's phase holds stays until ``attach_draft`` replaces it."""
        from .link import GlooLink

        if self.link is not None and self.link is not getattr(self.phase, "link", None):
            self._drop_link(self.link)
        host = ray.util.get_node_ip_address()
        self.link = GlooLink(host, 0, 0, 2, name, timeout_s=idle_timeout_s, connect_timeout_s=connect_timeout_s,
                             lane=lane)
        return host, self.link.port

    def connect_link(self) -> bool:
        self.link.connect()
        return True

    def link_ok(self) -> bool:
        return self.link is not None and self.link.pg is not None

    def link_lane(self) -> str | None:
        """What carries the probability rows on the current link: None (gloo itself), "gloo" or "nccl"."""
        return None if self.link is None or self.link.lane is None else self.link.lane.backend

    def close_link(self) -> None:
        """Close the current link (the draft's loop gets a stop frame). A phase holding a link is detached
        and closes it at the loop's next round boundary."""
        held = getattr(self.phase, "link", None)
        if held is not None:
            self.attach_draft(None)
        link, self.link = self.link, None
        if link is not None and link is not held:
            self._drop_link(link)

    @staticmethod
    def _drop_link(link) -> None:
        if link.pg is not None:
            from . import wire
            from .link import LinkError

            try:
                link.send([wire.stop_frame()], 1, 5.0)
            except LinkError:
                pass
        link.close()

    def attach_draft(self, draft_handle, via_link: bool = False, round_timeout_s: float | None = None) -> bool:
        """The draft the batched rounds reach: over the current gloo link (``via_link``,
        ``transports.GlooDraftPhase``) or by one actor call per round (``RemoteDraftPhase`` ->
        ``DraftWorker.batch_round``); None detaches it. Requests that join after this use it; the phase it
        replaces is closed at the loop's next round boundary (it may be in a round now)."""
        from .transports import GlooDraftPhase, RemoteDraftPhase

        if round_timeout_s is not None:
            self.round_timeout_s = float(round_timeout_s)
        if draft_handle is None:
            phase = None
        elif via_link:
            if not self.link_ok():
                raise RuntimeError("attach_draft(via_link=True) without a connected link")
            phase = GlooDraftPhase(self.link, self.round_timeout_s)
        else:
            phase = RemoteDraftPhase(draft_handle, self.round_timeout_s)
        old, self.phase, self.draft_handle = self.phase, phase, draft_handle
        if getattr(old, "link", None) is self.link and phase is None:
            self.link = None  # the old phase takes its link with it
        if self.batch is not None:
            self.batch.set_draft(phase)  # the loop closes ``old`` between rounds
        elif old is not None and hasattr(old, "close"):
            old.close()
        return True

    # -- requests ----------------------------------------------------------------------------------------
    def submit(self, request, round_timeout_s: float, max_num_seqs: int = 8, kv_budget: int | None = None,
               hold_s: float = 0.0, max_prefill_tokens: int | None = None):
        """Decode one request in the leader's continuous loop, beside every other request in flight. Yields
        ``list[int]`` of newly committed tokens as rounds commit them (with ``hold_s`` > 0 at most once per
        ``hold_s`` after the first: ``RequestStream.next_item``), then a final ``{"token_ids", "stats"}``
        dict. Every wait is bounded; a caller that goes away cancels the request (its slot is freed)."""
        from .leader_loop import LeaderLoop

        with self.batch_lock:
            if self.batch is None:
                self.round_timeout_s = round_timeout_s
                self.batch = LeaderLoop(as_batched(self.model), decoder(self.tokenizer), max_num_seqs, self.lock,
                                        self.policy, getattr(self.model, "prefill_threads", None), self.threads)
                self.batch.set_draft(self.phase)
                from ..modeling.tp import TPLeaderModel

                # a tensor-parallel group's ranks run the same forwards: one that raised is the group's error
                self.batch.loop.retry_without_joiners = not isinstance(self.model, TPLeaderModel)
                if self.draft_model is not None:  # before any request: the loop thread reads these in rounds
                    self.batch.loop.set_concurrent(self.concurrent, self.split_threads)
                    self.batch.loop.schedule = None if self.schedule == "auto" else self.schedule
            # the engine's settings (the same for every request)
            self.batch.loop.kv_budget, self.batch.loop.max_prefill_tokens = kv_budget, max_prefill_tokens
        stream = self.batch.open(request)
        try:
            while True:
                item = stream.next_item(round_timeout_s * 4 + 60, hold_s)
                yield item
                if isinstance(item, dict):
                    return
        finally:
            if not stream.done:
                self.batch.cancel(stream)

    def prepare_policy(self, draft_handle, max_num_seqs: int, max_gamma: int, context: int = 128) -> dict | None:
        """Measure the pair for the adaptive speculation policy on the actual placement (the target here over
        a few token counts, the draft's batched steps in its actor; a few seconds) and use it for the batched
        rounds: each round's window from these costs and the requests' running acceptance, the sides running
        at the same time (``CostModel(parallel=True)``). A tensor-parallel group keeps fixed windows."""
        from ..core.policy import CostModel, SpeculationPolicy, measure_forward_costs, policy_widths
        from ..modeling.tp import TPLeaderModel

        if self.draft_model is not None:
            return self._prepare_colocated_policy(max_num_seqs, max_gamma, context)
        if draft_handle is None or isinstance(self.model, TPLeaderModel):
            return None
        alone = getattr(self.model, "prefill_threads", None)
        def measure():
            t = measure_forward_costs(as_batched(self.model), max_num_seqs, policy_widths(max_gamma), context)
            t_alone = None
            if alone:  # rounds without drafting run on the draft's threads too
                with torch_threads(alone):
                    t_alone = measure_forward_costs(as_batched(self.model), max_num_seqs, (), context)
            return t, t_alone

        with self.lock:
            t, t_alone = on_fresh_thread(measure, name="pearl-measure")
        d = ray.get(draft_handle.measure_batched.remote(max_num_seqs, context), timeout=600)
        self.policy = SpeculationPolicy(CostModel(t, d, parallel=True, target_alone=t_alone), max_gamma=max_gamma)
        if self.batch is not None:
            self.batch.loop.policy = self.policy
        return self.policy.describe()

    def _prepare_colocated_policy(self, max_num_seqs: int, max_gamma: int, context: int) -> dict | None:
        """Both models here: each side's costs with the worker's threads (in turn) and, where the device can
        be split, while the other works beside it (at once), as the local backend measures them."""
        from ..core.policy import SpeculationPolicy
        from ..modeling.tp import TPLeaderModel

        if isinstance(self.model, TPLeaderModel):  # as for a TP group's own draft actor: fixed windows
            return None

        def measure():
            return on_fresh_thread(local_cost_model, self.model, self.draft_model, max_num_seqs, max_gamma, context,
                                   self.concurrent, self.split_threads, name="pearl-measure", threads=self.threads)

        forced = None if self.schedule == "auto" or self.concurrent is None else self.schedule
        with self.lock:
            self.policy = SpeculationPolicy(measure(), max_gamma=max_gamma, remeasure=measure, schedule=forced)
        if self.batch is not None:
            self.batch.loop.policy = self.policy
        return self.policy.describe()

    def time_forward(self, context_len: int = 128, num_tokens: int = 1, reps: int = 30, warmup: int = 5,
                     side: str = "target") -> float:
        """A one-request forward's time; ``side="draft"``: the colocated draft's."""
        if side == "target":
            return super().time_forward(context_len, num_tokens, reps, warmup)
        vocab = max(2, min(self.draft_model.vocab_size, 1000))
        context = [(7 * i) % vocab for i in range(context_len)]
        with self.lock:
            return on_fresh_thread(time_forward, self.draft_model, context, num_tokens, reps, warmup, threads=self.threads)

    def loop_status(self) -> dict:
        """Requests running and waiting in the continuous loop, and rounds run so far."""
        return self.batch.status() if self.batch is not None else {"running": 0, "waiting": 0, "rounds": 0}

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """The target's logits at every position of ``token_ids`` (on the model's own single-sequence cache,
        apart from the loop's slot cache; for checks)."""
        def run():
            self.model.reset()
            try:
                return self.model.forward(list(token_ids), len(token_ids))
            finally:
                self.model.reset()

        with self.lock:
            return on_fresh_thread(run)

    def stop_group(self) -> bool:
        """Release a tensor-parallel group's followers (no-op for a group of one)."""
        stop = getattr(self.model, "stop_group", None)
        if stop is not None:
            with self.lock:
                stop()
        return True


@ray.remote
class TargetShard(_WorkerBase):
    """A non-leader rank of a tensor-parallel target: holds its slice of the weights and its own KV cache, and
    runs whatever rank 0 broadcasts (``modeling.tp.follow``) inside one long-running ``follow`` call."""

    def __init__(self, model_factory, num_threads: int = 1):
        super().__init__(model_factory, num_threads)
        self.factory = model_factory

    def follow(self) -> str:
        from ..modeling.tp import follow, rank_group

        adopt_thread_count(self.threads)  # this call's thread runs every broadcast forward of this rank
        return follow(self.model, rank_group(self.factory))

    def time_forward(self, *args, **kwargs) -> float:
        raise RuntimeError("a follower rank runs only what rank 0 broadcasts")
