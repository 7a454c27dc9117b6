"""Tensor-parallel targets on CPU: a DeepSpeed AutoTP group of two Ray actors (gloo + DeepSpeed's shared-memory
all-reduce) leads the rounds, gives the same tokens as an unsharded target, and survives a rank's death."""

import os
import time

import pytest
import ray

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.errors import InvalidParameterError, TargetUnavailable

from ray_utils import private_ray, run_threads

pytestmark = [pytest.mark.ray, pytest.mark.slow]

shared_ray = pytest.fixture(scope="module", autouse=True)(private_ray)
PROMPTS = [[1, 5, 9, 13], [2, 7]]
RES = {"draft_num_cpus": 0.5, "target_num_cpus": 0.5}


@pytest.fixture(scope="module")
def tp_engine(tiny_pair):
    target, draft = tiny_pair["target"], tiny_pair["draft"]
    eng = PearlEngine(str(draft), str(target), backend="ray", gamma=3, tensor_parallel_size=2, **RES)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_pair):
    target, draft = tiny_pair["target"], tiny_pair["draft"]
    # the group's ranks run DeepSpeed's layers over torch's default linears: the unsharded reference too
    with PearlEngine(str(draft), str(target), gamma=3, cpu_kernels="eager") as eng:
        yield eng


def test_sharded_logits_match_the_unsharded_model(tp_engine, reference):
    import torch

    leader = tp_engine.backend.status()["handles"]["target"]
    ids = [1, 5, 9, 13, 17, 21]
    got = ray.get(leader.score.remote(ids), timeout=60)
    model = reference.backend.target_model
    model.reset()
    want = model.forward(ids, len(ids))
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    info = tp_engine.backend.info["target"]
    assert len(info["ranks"]) == 2 and len({r["pid"] for r in info["ranks"]}) == 2
    full = sum(p.numel() * p.element_size() for p in model.model.parameters())
    assert all(r["param_bytes"] < full for r in info["ranks"])  # each rank holds a slice, never the whole model


def shm_buffers(pid: int) -> list[str]:
    """The lines of ``pid``'s memory map that map DeepSpeed's shared-memory all-reduce buffers."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.strip() for line in f if "deepspeed_allreduce_buffer" in line]


def test_the_ranks_shared_memory_leaves_no_file_behind(tp_engine):
    """Each rank maps both ranks' all-reduce buffers, and none of them is still a file in /dev/shm (RAM), so
    the memory goes when the group's processes do, even when they are killed."""
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    assert tp_engine.generate([PROMPTS[0]], params)[0].token_ids  # the all-reduce has run
    pids = [r["pid"] for r in tp_engine.backend.info["target"]["ranks"]]
    maps = {pid: shm_buffers(pid) for pid in pids}
    if not any(maps.values()):
        pytest.skip("DeepSpeed's shared-memory all-reduce op is not built here (no compiler): plain gloo, no files")
    for pid, lines in maps.items():
        assert len({ln.split()[-2] if ln.endswith("(deleted)") else ln.split()[-1] for ln in lines}) == 2, lines
        assert all(ln.endswith("(deleted)") for ln in lines), lines


@pytest.mark.parametrize("method", ["pearl", "sd", "ar"])
def test_greedy_output_equals_tp1_and_target_only(tp_engine, reference, method):
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in reference.generate(PROMPTS, params, method="ar")]
    assert [o.token_ids for o in tp_engine.generate(PROMPTS, params, method=method)] == want


def test_four_concurrent_requests_equal_tp1(tp_engine, reference):
    """4 requests of different lengths and methods at once through the TP=2 group's batched loop (one
    broadcast per round carries every slot's new ids): the TP=1 engine's tokens, in far fewer rounds."""
    prompts = [[1, 5, 9, 13], [2, 7], [3, 3, 8, 1, 4, 6], [11]]
    methods = ["pearl", "sd", "ar", "pearl"]
    params = [SamplingParams(max_new_tokens=14 + 3 * i, ignore_eos=True) for i in range(4)]
    want = [reference.generate([p], q, method="ar")[0].token_ids for p, q in zip(prompts, params)]
    leader = tp_engine.backend.status()["handles"]["target"]
    before = ray.get(leader.loop_status.remote(), timeout=30)["rounds"]
    results, errors = run_threads(lambda i: tp_engine.generate([prompts[i]], params[i], method=methods[i])[0], 4)
    assert not errors, errors
    got = [results[i] for i in range(4)]
    assert [o.token_ids for o in got] == want
    rounds = ray.get(leader.loop_status.remote(), timeout=30)["rounds"] - before
    assert rounds < sum(o.stats.rounds for o in got), (rounds, [o.stats.rounds for o in got])
    assert max(t.batch_size for o in got for t in o.stats.round_timings) > 1


def test_sampling_with_a_seed_gives_the_tp1_tokens(tp_engine, reference):
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=1.0, seed=11)
    want = [o.token_ids for o in reference.generate(PROMPTS, params)]
    outs = tp_engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == want
    assert all(o.stats.draft_forwards > 0 for o in outs)


def test_a_killed_rank_fails_the_request_and_the_group_is_rebuilt(tp_engine, reference):
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    handles = tp_engine.backend.status()["handles"]
    follower = handles["target_ranks"][1]
    stream = tp_engine.stream(PROMPTS[0], params)
    next(stream)  # the request is running
    t0 = time.monotonic()
    ray.kill(follower)
    with pytest.raises(TargetUnavailable, match="rank"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < tp_engine.config.round_timeout_s
    short = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = reference.generate([PROMPTS[1]], short, method="ar")[0].token_ids
    assert tp_engine.generate([PROMPTS[1]], short)[0].token_ids == want
    status = tp_engine.backend.status()
    assert status["restarts"]["target"] == 1
    assert follower not in status["handles"]["target_ranks"]


def test_tensor_parallel_needs_the_ray_backend(tiny_pair):
    target, draft = tiny_pair["target"], tiny_pair["draft"]
    with pytest.raises(InvalidParameterError, match="backend='ray'"):
        PearlEngine(str(draft), str(target), tensor_parallel_size=2)
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size"):
        PearlEngine(str(draft), str(target), backend="ray", tensor_parallel_size=0)


def test_a_draft_beside_rank_0_of_a_tensor_parallel_target(tiny_pair, reference):
    """colocate=True with a TP target: no draft actor; rank 0's worker holds the draft, in one bundle with the
    pair's CPUs, the other rank keeps its own; greedy output equals the unsharded target's (the sides at once,
    rank 0 and the draft splitting the worker's two threads)."""
    target, draft = tiny_pair["target"], tiny_pair["draft"]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in reference.generate(PROMPTS, params, method="ar")]
    with PearlEngine(str(draft), str(target), backend="ray", gamma=3, tensor_parallel_size=2, colocate=True,
                     schedule="once", num_threads=2, draft_num_cpus=0.1, target_num_cpus=0.1) as eng:
        status = eng.backend.status()
        assert status["handles"]["draft"] is None and len(status["handles"]["target_ranks"]) == 2
        info = eng.backend.info["target"]
        assert info["colocated_draft"] and len(info["ranks"]) == 2
        pg = ray.util.placement_group_table(eng.backend.pg)
        assert [b.get("CPU") for b in pg["bundles"].values()] == [0.2, 0.1]
        outs = eng.generate(PROMPTS, params, method="pearl")
        assert [o.token_ids for o in outs] == want
        assert all(o.stats.draft_forwards > 0 for o in outs) and sum(o.stats.once_rounds for o in outs) > 0
