"""The draft's batched round messages as tensors (``runtime.wire``) and the target leader's gloo link to the
draft (``runtime.link``, ``transports.GlooDraftPhase``), without Ray: both ends of the link run in this
process, the draft's loop on a thread. The reference is the in-process batched loop (``core.batch``) over
the per-slot models (``PerSlotLM``)."""

import threading
import time

import pytest
import torch

from pearl_ray.runtime import wire
from pearl_ray.runtime.link import GlooLink, draft_frame_handler, serve_rounds
from pearl_ray.runtime.transports import GlooDraftPhase
from pearl_ray.core.batch import BatchLoop, run_batch
from pearl_ray.core.proposer import BatchedDraftSide
from pearl_ray.core.sides import PerSlotLM
from pearl_ray.config import EngineConfig, Request, SamplingParams
from pearl_ray.core.messages import DraftChunk, DraftRequest, DraftStart, SeqUpdate
from pearl_ray.testing import SlowLM, TabularLM


def _no_more(shape, dtype):
    raise AssertionError("unexpected extra tensor")


def _feeder(tensors):
    it = iter(tensors)

    def recv(shape, dtype):
        t = next(it)
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype
        return t

    return recv


@pytest.mark.parametrize("prompt_len", [3, wire.INLINE_IDS + 40])
def test_batched_rounds_round_trip(prompt_len):
    """Every slot's work in one message: starts (with their float settings), releases, requests with and
    without updates; ids past the frame's inline area go in the overflow tensor."""
    starts = {2: DraftStart(list(range(prompt_len)), 0.7, 5, 0.9, False, 12345), 0: DraftStart([9], 0.0, 0, 1.0, True, 7)}
    reqs = {2: DraftRequest(4, prompt_len, 3, None), 5: DraftRequest(9, 30, 0, SeqUpdate(8, 27, [1, 2], [3])),
            1: DraftRequest(9, 12, 4, SeqUpdate(8, 0, list(range(10)), [2**40])),
            7: DraftRequest(0, 900, 0, None, prefill_to=512)}  # a chunk of a long prompt
    tensors = wire.encode_batch(starts, [3, 6], reqs)
    assert tensors[0].dtype == torch.int64 and tensors[-1].dtype == torch.float64
    assert wire.decode_batch(tensors[0], _feeder(tensors[1:])) == (starts, [3, 6], reqs)
    tensors = wire.encode_batch({}, [], {4: DraftRequest(1, 2, 3, None)})
    assert len(tensors) == 1  # a plain round is a single 1 KiB frame
    assert wire.decode_batch(tensors[0], _no_more) == ({}, [], {4: DraftRequest(1, 2, 3, None)})
    with pytest.raises(ValueError, match="not a batched round"):
        wire.decode_batch(wire.stop_frame(), _no_more)


def test_batched_replies_round_trip():
    g = torch.Generator().manual_seed(0)
    q1, q2 = (torch.softmax(torch.randn(n, 300, generator=g), -1) for n in (3, 2))
    chunks = {4: DraftChunk(3, 50, [5, 6, 2**40], q1, 0.0123, 1.7e9 + 0.25), 0: DraftChunk(8, 9, [], None),
              1: DraftChunk(2, 47, list(range(wire.INLINE_IDS + 9)), None, 0.05, 1.7e9),
              6: DraftChunk(5, 11, [1, 2], q2, 0.01, 1.7e9)}
    tensors = wire.encode_batch_reply(chunks)
    got = wire.decode_batch_reply(tensors[0], _feeder(tensors[1:]))
    assert list(got) == list(chunks)
    for slot, want in chunks.items():
        c = got[slot]
        assert (c.round_id, c.start_pos, c.draft_token_ids) == (want.round_id, want.start_pos, want.draft_token_ids)
        assert (c.draft_probs is None) == (want.draft_probs is None)
        if want.draft_probs is not None:
            assert torch.equal(c.draft_probs, want.draft_probs)  # bit-exact fp32
        assert abs(c.busy_s - want.busy_s) < 1e-8 and abs(c.started_at - want.started_at) < 1e-5
    with pytest.raises(ValueError, match="not a batched"):
        wire.decode_batch_reply(wire.encode_batch({}, [], {})[0], _no_more)


class _DraftEnd:
    """The draft worker's end of the link, as ``runtime.workers.DraftWorker.serve_link`` runs it, on a thread.
    ``fail_after``: rounds answered before ``batch_round`` raises ``failure`` (None: never)."""

    def __init__(self, model, port, name, lane=None, fail_after=None, failure=None):
        self.batched = BatchedDraftSide(PerSlotLM(lambda: TabularLM(table=model.table)))
        self.batch_calls = 0
        self.fail_after, self.failure = fail_after, failure
        self.link = GlooLink("127.0.0.1", port, 1, 2, name, timeout_s=60, connect_timeout_s=20, lane=lane)
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def batch_round(self, starts, releases, reqs):  # as DraftWorker.batch_round
        self.batch_calls += 1
        if self.fail_after is not None and self.batch_calls > self.fail_after:
            raise self.failure
        for slot in releases:
            self.batched.release(slot)
        for slot, start in starts.items():
            self.batched.start(slot, start)
        return self.batched.draft(reqs) if reqs else {}

    def _run(self):
        self.result = serve_rounds(self.link, draft_frame_handler(self), reply_timeout_s=10, idle_timeout_s=30)


def _linked(draft_model, name, lane=None, **end_options):
    leader = GlooLink("127.0.0.1", 0, 0, 2, name, timeout_s=60, connect_timeout_s=20, lane=lane)
    end = _DraftEnd(draft_model, leader.port, name, lane, **end_options)
    leader.connect()
    return leader, end


def test_choose_lane():
    from pearl_ray.runtime.link import choose_lane

    gpu = lambda node, ids: {"device": "cuda:0", "node_id": node, "gpu_ids": ids}  # noqa: E731
    cpu = {"device": "cpu", "node_id": "a", "gpu_ids": []}
    assert choose_lane("auto", cpu, cpu)[0] is None
    assert choose_lane("auto", gpu("a", ["0"]), gpu("a", ["0"]))[0] is None  # one shared GPU
    assert choose_lane("auto", gpu("a", ["0"]), gpu("a", ["1"]))[0] == "nccl"
    assert choose_lane("auto", gpu("a", ["0"]), gpu("b", ["0"]))[0] == "nccl"  # same index, other node
    assert choose_lane("gloo", cpu, cpu)[0] == "gloo"
    with pytest.raises(ValueError, match="different CUDA GPUs"):
        choose_lane("nccl", cpu, cpu)
    with pytest.raises(ValueError):
        GlooLink("127.0.0.1", 0, 0, 3, "x", lane="gloo")


# -- batched rounds over the link (transports.GlooDraftPhase, what the Ray leader's loop uses) -------------
BATCH = [([1, 2], "pearl", 0.0, 21), ([4, 5, 1], "sd", 0.0, 9), ([3], "ar", 0.0, 14), ([2, 2], "pearl", 1.0, 17),
         ([5], "pearl", 0.0, 30), ([0, 3, 4], "sd", 1.0, 12)]


def _batch_requests():
    out = []
    for i, (prompt, method, temperature, n) in enumerate(BATCH):
        params = SamplingParams(max_new_tokens=n, temperature=temperature, seed=40 + i, ignore_eos=True)
        opts = EngineConfig().round_options(method, 3, params.greedy)
        out.append(Request(tuple(prompt), params, method, opts, 40 + i))
    return out


@pytest.mark.parametrize("lane", [None, "gloo"])
def test_batched_rounds_over_the_link_match_the_local_loop(lane):
    """Six requests (greedy and seeded sampled, pearl / sd / ar), at most 4 at once, so slots are started and
    released mid-batch: the same tokens, rounds and draft forwards as the in-process batched loop, every
    round's drafting one message. Two batches over one link: the link serves request after request.
    ``lane="gloo"``: the probability rows take a second group (the CPU twin of the NCCL lane)."""
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    local = BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)),
                      PerSlotLM(lambda: TabularLM(table=draft.table)), None, 4)
    # the link's rounds run at once (vanilla SD: a draft-only round, then a verify-only one); the reference
    # labels its rounds the same, so it does not fuse SD's two rounds into one as rounds in turn do
    local.schedule = "once"
    leader, end = _linked(draft, f"t-batch-{lane}", lane)
    phase = GlooDraftPhase(leader, 10.0)
    try:
        assert (leader.lane is not None) == (lane is not None)
        loop = BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)), phase, None, 4)
        for batch in range(2):
            want = run_batch(local, _batch_requests())
            calls, rounds = end.batch_calls, loop.rounds
            got = run_batch(loop, _batch_requests())
            assert [ids for ids, _ in got] == [ids for ids, _ in want], batch
            assert all(s.draft_failures == 0 and s.fallback_rounds == 0 for _, s in got)
            assert [s.drafted_tokens for _, s in got] == [s.drafted_tokens for _, s in want]
            assert [s.draft_forwards for _, s in got] == [s.draft_forwards for _, s in want]
            assert [s.rounds for _, s in got] == [s.rounds for _, s in want]
            assert any(s.draft_forwards > 0 for _, s in got)
            assert 0 < end.batch_calls - calls <= loop.rounds - rounds
            # every slot still held on the draft is released with the next round's message
            assert set(end.batched.mirrors) <= set(phase._releases)
    finally:
        phase.close()
        end.thread.join(10)
    assert end.result == "stopped"


def _greedy_target_only(target):
    """The batch's greedy requests, and what the target alone decodes for them (every fault must give these)."""
    greedy = [r for r in _batch_requests() if r.params.temperature == 0]
    return greedy, run_batch(BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)), None, None, 4), greedy)


def _check_target_only(got, want, greedy, loop, leader):
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert loop.draft_failures == 1 and leader.pg is None  # the link was closed: the coordinator relinks
    drafting = [s for (_, s), r in zip(got, greedy) if r.uses_draft]
    assert drafting and all(s.draft_failures == 1 and s.fallback_rounds > 0 for s in drafting)


def test_a_stalled_draft_over_the_link_turns_the_batch_target_only():
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    greedy, want = _greedy_target_only(target)
    leader, end = _linked(draft, "t-batch-stall")
    end.batched = BatchedDraftSide(PerSlotLM(lambda: SlowLM(TabularLM(table=draft.table), 3.0, after=4)))
    loop = BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)), GlooDraftPhase(leader, 0.5), None, 4)
    t0 = time.monotonic()
    got = run_batch(loop, greedy)
    assert time.monotonic() - t0 < 8
    _check_target_only(got, want, greedy, loop, leader)
    end.thread.join(15)
    assert end.result is not None and end.result.startswith("link closed")


def test_a_round_the_draft_fails_turns_the_batch_target_only_at_once():
    """The draft's round raises: its loop answers with an error frame (no wait for the round timeout), the
    leader closes the link and the batch goes on target-only; the draft's loop then ends."""
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    greedy, want = _greedy_target_only(target)
    leader, end = _linked(draft, "t-batch-error", fail_after=3, failure=RuntimeError("the draft's round broke"))
    loop = BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)), GlooDraftPhase(leader, 20.0), None, 4)
    t0 = time.monotonic()
    got = run_batch(loop, greedy)
    assert time.monotonic() - t0 < 10
    _check_target_only(got, want, greedy, loop, leader)
    assert end.batch_calls == 4
    end.thread.join(15)
    assert end.result is not None and end.result.startswith("link closed")

