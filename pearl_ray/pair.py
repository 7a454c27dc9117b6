"""A draft/target pair's models as the batched loop uses them, for the local backend and the Ray workers:

- ``as_batched``: the slot cache (``core.sides.BatchedLM``) over a model's weights;
- ``decoder``: token ids -> text, for stop strings;
- one process holding both models (the local backend, a colocated Ray leader): the draft's own thread or
  CUDA stream for rounds that run the sides at once (``concurrent_draft``, ``split_threads``), and the
  pair's costs for the speculation policy, measured in turn and at once (``local_cost_model``).
"""

from __future__ import annotations

import copy
import threading

import torch

from .core.proposer import ThreadedDraftPhase
from .core.sides import BatchedLM, PerSlotLM
from .core.policy import CostModel, measure_forward_costs, policy_widths
from .errors import InvalidParameterError
from .platform import torch_threads


def decoder(tokenizer):
    """Token ids -> text with special tokens kept (what stop strings are matched against), or None."""
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def as_batched(model) -> "BatchedLM":
    """A ``core.sides.BatchedLM`` over ``model``: a ``modeling.hf.HFCausalLM`` gets the slot cache of
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
