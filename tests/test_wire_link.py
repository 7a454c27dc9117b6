"""The draft's round messages as tensors (``runtime.wire``) and the target leader's gloo link to the draft
(``runtime.link``, ``runtime.transports``), without Ray: both ends of the link run in this process, the
draft loop on a thread."""

import threading
import time

import pytest
import torch

from pearl_ray.runtime import wire
from pearl_ray.runtime.link import GlooLink, draft_frame_handler, serve_rounds
from pearl_ray.runtime.transports import GlooDraftChannel, GlooDraftPhase
from pearl_ray.core.batch import BatchedDraftSide, BatchLoop, PerSlotLM, run_batch
from pearl_ray.config import EngineConfig, Request, SamplingParams
from pearl_ray.core.loop import LocalChannel, iter_request, start_draft
from pearl_ray.core.messages import DraftChunk, DraftRequest, DraftStart, SeqUpdate
from pearl_ray.core.stopping import StopRule
from pearl_ray.testing import SlowLM, TabularLM
from pearl_ray.core.sides import DraftSide, TargetSide


def _no_more(shape, dtype):
    raise AssertionError("unexpected extra tensor")


def _feeder(tensors):
    it = iter(tensors)

    def recv(shape, dtype):
        t = next(it)
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype
        return t

    return recv


@pytest.mark.parametrize("n_ids", [0, 3, wire.INLINE_IDS, wire.INLINE_IDS + 57])
def test_requests_round_trip(n_ids):
    ids = list(range(1000, 1000 + n_ids))
    for req in (DraftRequest(7, 120, 5, SeqUpdate(6, 100, ids[: n_ids // 2], ids[n_ids // 2:])),
                DraftRequest(7, 101, 0, SeqUpdate(6, 100, ids[:1], ids[1:])),
                DraftRequest(1, 9, 0, None)):
        tensors = wire.encode_request(req)
        assert all(t.dtype == torch.int64 for t in tensors)  # ids never ride in a float tensor
        assert wire.decode_request(tensors[0], _feeder(tensors[1:])) == req


def test_replies_round_trip():
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(4, 300, generator=g), -1)
    replies = [DraftChunk(3, 50, [5, 6, 7, 2**40], q, 0.0123, 1.7e9 + 0.25),
               DraftChunk(3, 50, [], None, 0.0, 0.0),
               DraftChunk(3, 47, list(range(wire.INLINE_IDS + 9)), None, 0.05, 1.7e9)]
    for msg in replies:
        tensors = wire.encode_reply(msg)
        got = wire.decode_reply(tensors[0], _feeder(tensors[1:]))
        assert got.draft_token_ids == msg.draft_token_ids and (got.round_id, got.start_pos) == (3, msg.start_pos)
        if msg.draft_probs is None:
            assert got.draft_probs is None
        else:
            assert torch.equal(got.draft_probs, msg.draft_probs)  # bit-exact fp32
        assert abs(got.busy_s - msg.busy_s) < 1e-8 and abs(got.started_at - msg.started_at) < 1e-5


def test_start_round_trip():
    prompt = list(range(300))
    tensors = wire.encode_start(DraftStart(prompt, 0.7, 5, 0.9, True, 12345))
    assert wire.decode_start(tensors[0], _feeder(tensors[1:])) == (prompt, 0.7, 5, 0.9, True, 12345)
    with pytest.raises(ValueError):
        wire.decode_request(wire.stop_frame(), _no_more)


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


def run_request(channel, request, stop):
    """``iter_request`` drained: (output ids, stats)."""
    it = iter_request(channel, request, stop)
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value


class _DraftEnd:
    """The draft worker's side of the link, as ``runtime.workers.DraftWorker`` runs it, on a thread."""

    def __init__(self, model, port, name, lane=None):
        self.side = DraftSide(model)
        self.batched = BatchedDraftSide(PerSlotLM(lambda: TabularLM(table=model.table)))
        self.batch_calls = 0
        self.link = GlooLink("127.0.0.1", port, 1, 2, name, timeout_s=60, connect_timeout_s=20, lane=lane)
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def start(self, start):
        start_draft(self.side, start)

    def draft(self, req):
        return self.side.draft(req)

    def forwards(self):
        return self.side.mirror.forwards

    def batch_round(self, starts, releases, reqs):  # as DraftWorker.batch_round
        self.batch_calls += 1
        for slot in releases:
            self.batched.release(slot)
        for slot, start in starts.items():
            self.batched.start(slot, start)
        return self.batched.draft(reqs) if reqs else {}

    def _run(self):
        self.result = serve_rounds(self.link, draft_frame_handler(self), reply_timeout_s=10, idle_timeout_s=30)


def _request(prompt, gamma, temperature, seed, max_new_tokens):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, ignore_eos=True)
    req = Request(tuple(prompt), params, "pearl", EngineConfig().round_options("pearl", gamma, params.greedy), seed)
    return req, StopRule.for_request(req, None)


def _linked(draft_model, name, lane=None):
    leader = GlooLink("127.0.0.1", 0, 0, 2, name, timeout_s=60, connect_timeout_s=20, lane=lane)
    end = _DraftEnd(draft_model, leader.port, name, lane)
    leader.connect()
    return leader, end


@pytest.mark.parametrize("temperature,lane", [(0.0, None), (1.0, None), (1.0, "gloo")])
def test_link_channel_matches_local_and_survives_requests(temperature, lane):
    """``lane="gloo"``: the probability rows take a second group (the CPU twin of the NCCL lane)."""
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    leader, end = _linked(draft, f"t-link-{lane}", lane)
    try:
        for prompt, seed in (([1, 2], 3), ([4, 5, 1], 4)):  # two requests over one link
            req, stop = _request(prompt, 3, temperature, seed, 25)
            want, want_stats = run_request(LocalChannel(draft, target), req, stop)
            ch = GlooDraftChannel(TargetSide(target), leader, round_timeout_s=10)
            got, stats = run_request(ch, req, stop)
            ch.close()
            assert got == want and ch.draft_ok
            assert (leader.lane is not None) == (lane is not None)
            assert stats.draft_forwards == want_stats.draft_forwards > 0
            assert stats.rounds == want_stats.rounds
    finally:
        leader.send([wire.stop_frame()], 1, 5)
        end.thread.join(10)
        leader.close()
    assert end.result == "stopped"


def test_link_draft_timeout_finishes_on_target_alone():
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    stalls = SlowLM(draft, 3.0, after=5)  # fine for 5 forwards, then 3 s per forward
    leader, end = _linked(stalls, "t-stall")
    req, stop = _request([1, 2], 2, 0.0, 0, 20)
    want, _ = run_request(LocalChannel(draft, target), req, stop)
    ch = GlooDraftChannel(TargetSide(target), leader, round_timeout_s=0.5)
    t0 = time.monotonic()
    got, stats = run_request(ch, req, stop)
    ch.close()
    assert got == want and not ch.draft_ok and stats.draft_failures == 1 and stats.fallback_rounds > 0
    assert time.monotonic() - t0 < 5
    end.thread.join(15)  # its reply fails on the closed link and the loop ends
    assert end.result is not None and end.result.startswith("link closed")


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
    released mid-batch: the same tokens as the in-process batched loop, every round's drafting one message."""
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    want = run_batch(BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)),
                               PerSlotLM(lambda: TabularLM(table=draft.table)), None, 4), _batch_requests())
    leader, end = _linked(draft, f"t-batch-{lane}", lane)
    try:
        phase = GlooDraftPhase(leader, 10.0)
        loop = BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)), phase, None, 4)
        got = run_batch(loop, _batch_requests())
        assert [ids for ids, _ in got] == [ids for ids, _ in want]
        assert all(s.draft_failures == 0 for _, s in got)
        assert [s.drafted_tokens for _, s in got] == [s.drafted_tokens for _, s in want]
        assert 0 < end.batch_calls <= loop.rounds
        # every slot still held on the draft is released with the next round's message
        assert set(end.batched.mirrors) <= set(phase._releases)
    finally:
        phase.close()
        end.thread.join(10)
    assert end.result == "stopped"


def test_a_stalled_draft_over_the_link_turns_the_batch_target_only():
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    greedy = [r for r in _batch_requests() if r.params.temperature == 0]
    want = run_batch(BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)), None, None, 4), greedy)
    leader, end = _linked(draft, "t-batch-stall")
    end.batched = BatchedDraftSide(PerSlotLM(lambda: SlowLM(TabularLM(table=draft.table), 3.0, after=4)))
    loop = BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)), GlooDraftPhase(leader, 0.5), None, 4)
    t0 = time.monotonic()
    got = run_batch(loop, greedy)
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert time.monotonic() - t0 < 8
    assert loop.draft_failures == 1 and leader.pg is None  # the link was closed: the coordinator relinks
    assert all(s.draft_failures == 1 for (_, s), r in zip(got, greedy) if r.uses_draft)
    end.thread.join(15)
    assert end.result is not None and end.result.startswith("link closed")
