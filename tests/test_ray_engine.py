"""The engine on Ray: streaming, concurrent callers, the bounded queue, joining a running cluster, handed-in
placement groups, seeds over the wire, and recovery (coordinator death, a draft that cannot start, resources
held elsewhere, engines dropped without shutdown).

A private local Ray instance (2 CPUs, 2 fake GPUs) for the module; every engine is shut down by its test.
"""

import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import ray

from pearl_ray import (CoordinatorUnavailable, DraftUnavailable, PearlEngine, QueueFullError, ResourcesUnavailable,
                       SamplingParams)
from pearl_ray.testing import SlowLM

from ray_utils import free_port, private_ray, stop_process, toy_pair, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PROMPTS = [[1, 2], [3], [4, 5, 1]]


shared_ray = pytest.fixture(scope="module", autouse=True)(private_ray)


def test_stream_threads_and_tasks_on_one_engine():
    target, draft = toy_pair()
    params = [SamplingParams(max_new_tokens=16, ignore_eos=True),
              SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=1.0, seed=time.time_ns())]
    local = PearlEngine(draft_model=draft, target_model=target, gamma=3)
    want = {(i, j): local.generate([p], sp)[0].token_ids for i, p in enumerate(PROMPTS) for j, sp in enumerate(params)}
    with PearlEngine(draft_model=SlowLM(draft, 0.001), target_model=SlowLM(target, 0.003), gamma=3, backend="ray",
                     num_threads=1) as eng:
        assert eng.backend.info["target"]["threads"] == 1
        for j, sp in enumerate(params):  # streamed deltas == generate == local, greedy and seeded sampling
            chunks = list(eng.stream(PROMPTS[0], sp))
            assert sum((c.token_ids for c in chunks), []) == want[(0, j)] == eng.generate([PROMPTS[0]], sp)[0].token_ids
            assert chunks[-1].stats.draft_forwards > 0
        got = {}

        def call(i, j):
            got[(i, j)] = eng.generate([PROMPTS[i]], params[j])[0].token_ids

        threads = [threading.Thread(target=call, args=(i, 0)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

        async def tasks():
            async def one(i, j):
                return [t for c in [c async for c in eng.astream(PROMPTS[i], params[j])] for t in c.token_ids]

            return await asyncio.gather(one(1, 1), one(2, 1))

        got[(1, 1)], got[(2, 1)] = asyncio.run(tasks())
        assert got == {k: want[k] for k in got}


def test_logprobs_cross_the_ray_path_and_equal_the_targets_forward(tiny_pair):
    """Greedy, every method, generate and stream: each committed token's log-probability and top-2 equal a plain
    transformers forward of the target over prompt + output (1e-4, fp32), after the leader's loop, its stream
    and the Ray hop."""
    from test_logprobs import assert_matches, reference_logprobs

    prompts = [[1, 5, 9, 20], [3, 7]]
    params = SamplingParams(max_new_tokens=14, ignore_eos=True, logprobs=2)
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, backend="ray",
                     num_threads=1) as eng:
        for method in ("pearl", "sd", "ar"):
            outs = eng.generate(prompts, params, method=method)
            for prompt, out in zip(prompts, outs):
                assert_matches(reference_logprobs(tiny_pair["target"], prompt, out.token_ids), out.token_ids,
                               out.logprobs, 2)
            chunks = list(eng.stream(prompts[0], params, method=method, result_only=True))
            streamed = [e for c in chunks for e in (c.logprobs or [])]
            assert [e.token_id for e in streamed] == outs[0].token_ids
            assert_matches(reference_logprobs(tiny_pair["target"], prompts[0], outs[0].token_ids),
                           outs[0].token_ids, streamed, 2)
        assert eng.generate(prompts[:1], SamplingParams(max_new_tokens=4))[0].logprobs is None


def test_the_target_borrows_the_drafts_threads_for_prompt_passes(tiny_pair):
    """On CPU the target leader reads prompts with the pair's threads (its own + the draft's) unless told not to;
    outputs stay the target's."""
    prompt = [1] + list(range(20, 70))  # longer than PREFILL_MIN_TOKENS
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = PearlEngine(target=tiny_pair["target"], method="ar").generate([prompt], params)[0].token_ids
    for prefill_threads, expect in ((None, 2), (0, None)):
        with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, backend="ray",
                         num_threads=1, prefill_threads=prefill_threads, colocate=False) as eng:
            assert eng.backend.info["target"]["threads"] == 1
            assert eng.backend.info["target"]["prefill_threads"] == expect
            assert eng.generate([prompt], params)[0].token_ids == want


def test_full_queue_on_ray():
    target, draft = toy_pair()
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    want = PearlEngine(target_model=target, method="ar").generate([[1, 2]], params)[0].token_ids
    with PearlEngine(draft_model=draft, target_model=SlowLM(target, 0.01), gamma=2, backend="ray",
                     max_queued=1, max_num_seqs=2) as eng:  # two decode at once (batched), one more may wait
        outs = []
        runners = [threading.Thread(target=lambda: outs.append(eng.generate([[1, 2]], params)[0].token_ids))
                   for _ in range(3)]
        for r in runners:
            r.start()
            assert wait_for(lambda n=len(outs): eng.queue_depth >= 1 + runners.index(r) or len(outs) > n, 10)
        t0 = time.monotonic()
        with pytest.raises(QueueFullError):
            eng.generate([[3]], params)
        assert time.monotonic() - t0 < 0.5
        for r in runners:
            r.join(60)
        assert outs == [want, want, want]


def test_joins_the_running_ray_and_uses_a_handed_in_placement_group():
    from ray.util.placement_group import placement_group, remove_placement_group

    target, draft = toy_pair()
    gcs = ray.get_runtime_context().gcs_address
    pg = placement_group([{"CPU": 0.01}, {"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_PACK")  # replica, draft, target
    ray.get(pg.ready(), timeout=30)
    try:
        with PearlEngine(draft_model=draft, target_model=target, gamma=3, backend="ray", placement_group=pg,
                         bundle_indices=(1, 2), colocate=False) as eng:
            assert ray.get_runtime_context().gcs_address == gcs  # no second cluster
            info = eng.backend.info
            assert info["draft"]["placement_group"] == info["target"]["placement_group"] == pg.id.hex()
            assert info["target"]["node_id"] == ray.get_runtime_context().get_node_id()
            assert len(eng.generate([[1, 2]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].token_ids) == 5
        assert ray.util.placement_group_table(pg)["state"] == "CREATED"  # not ours to remove
    finally:
        remove_placement_group(pg)


def test_any_seed_works_on_every_transport():
    target, draft = toy_pair()
    local = PearlEngine(draft_model=draft, target_model=target, gamma=3)
    every = [SamplingParams(max_new_tokens=14, ignore_eos=True, temperature=1.0, seed=seed)
             for seed in (time.time_ns(), 2**63 - 1)]  # past int64 once multiplied by the old per-request rule
    want = [[o.token_ids for o in local.generate(PROMPTS, params)] for params in every]
    for transport, lane in (("gloo", "auto"), ("gloo", "gloo"), ("actor", "auto")):
        with PearlEngine(draft_model=draft, target_model=target, gamma=3, backend="ray", transport=transport,
                         tensor_lane=lane, colocate=False) as eng:
            for params, expected in zip(every, want):
                outs = eng.generate(PROMPTS, params)
                assert [o.token_ids for o in outs] == expected and all(o.stats.draft_failures == 0 for o in outs)
            assert eng.backend.status()["restarts"] == {"draft": 0, "target": 0}
            if transport == "gloo":  # on CPU "auto" keeps everything on the gloo link
                leader = eng.backend.status()["handles"]["target"]
                assert ray.get(leader.link_lane.remote(), timeout=30) == (None if lane == "auto" else "gloo")


def test_a_dead_coordinator_is_rebuilt():
    target, draft = toy_pair()
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    want = PearlEngine(target_model=target, method="ar").generate([[1, 2]], params)[0].token_ids
    with PearlEngine(draft_model=draft, target_model=SlowLM(target, 0.01), gamma=2, backend="ray") as eng:
        coord = eng.backend.coordinator
        with pytest.raises(CoordinatorUnavailable, match="next one"):
            eng.generate([[1, 2]], params, on_tokens=lambda i, ids: ray.kill(coord))
        out = eng.generate([[1, 2]], params)[0]
        assert out.token_ids == want and out.stats.draft_forwards > 0
        assert eng.backend.coordinator != coord


def test_coordinator_killed_under_load_fails_every_stream_typed():
    """8 streams in flight; the coordinator (and so its workers) is killed: each of the 8 ends with
    ``CoordinatorUnavailable`` (none with an untyped error from racing over who forgets the coordinator), and
    the next request runs on a new one."""
    target, draft = toy_pair()
    params = SamplingParams(max_new_tokens=400, ignore_eos=True)
    with PearlEngine(draft_model=draft, target_model=SlowLM(target, 0.01), gamma=2, backend="ray",
                     max_num_seqs=8) as eng:
        coord = eng.backend.coordinator
        started, errors = threading.Semaphore(0), {}

        def one(i):
            try:
                for n, _ in enumerate(eng.stream([1 + i % 5, 2], params)):
                    if n == 0:
                        started.release()
                errors[i] = None
            except Exception as exc:  # noqa: BLE001 - checked below
                errors[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        assert all(started.acquire(timeout=120) for _ in range(8))
        ray.kill(coord)
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads)
        kinds = {i: type(e).__name__ for i, e in errors.items()}
        assert all(isinstance(e, CoordinatorUnavailable) for e in errors.values()), (kinds, errors)
        out = eng.generate([[1, 2]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
        assert len(out.token_ids) == 5 and eng.backend.coordinator != coord


def test_a_draft_that_cannot_start_raises_draft_unavailable(tmp_path):
    from pearl_ray.testing import FlakyLM

    target, draft = toy_pair()
    marker = tmp_path / "broken"
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    with PearlEngine(draft_model=FlakyLM(draft, str(marker)), target_model=target, gamma=2, backend="ray",
                     colocate=False) as eng:
        assert eng.generate([[1, 2]], params)[0].stats.draft_forwards > 0
        marker.write_text("from now on the draft fails to load")
        ray.kill(eng.backend.status()["handles"]["draft"])
        eng.generate([[1, 2]], params)  # finishes on the target alone; the draft is replaced

        def given_up():
            try:
                eng.generate([[1, 2]], params, method="sd")
            except DraftUnavailable:
                return True
            return False

        assert wait_for(given_up, timeout_s=90, interval_s=0.5)
        assert len(eng.generate([[1, 2]], params, method="ar")[0].token_ids) == 8  # the target still serves


def test_held_resources_fail_in_bounded_time_and_dropped_engines_free_theirs():
    target, draft = toy_pair()
    first = PearlEngine(draft_model=draft, target_model=target, backend="ray")  # takes both CPUs
    pg = first.backend.pg
    t0 = time.monotonic()
    with pytest.raises(ResourcesUnavailable, match=r"CPU.*free"):
        PearlEngine(draft_model=draft, target_model=target, backend="ray", placement_timeout_s=3)
    assert time.monotonic() - t0 < 15
    del first  # dropped without shutdown()
    gc.collect()
    assert wait_for(lambda: ray.util.placement_group_table(pg)["state"] == "REMOVED", timeout_s=30)
    with PearlEngine(draft_model=draft, target_model=target, backend="ray", placement_timeout_s=30) as again:
        assert again.generate([[1]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids


def test_joins_the_cluster_named_by_ray_address(tiny_pair, ray_default_ports):
    """A `ray start --head --block` cluster on free ports with its own temp dir, ended by its process handle;
    a fresh process with RAY_ADDRESS set builds an engine that joins it."""
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    port, dash = free_port(), free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # so that SIGTERM ends the head at once
    env.pop("RAY_ADDRESS", None)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", "--include-dashboard=false",
                             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={dash}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        script = (
            "import json, ray\n"
            "from pearl_ray import PearlEngine, SamplingParams\n"
            f"e = PearlEngine(draft={tiny_pair['draft']!r}, target={tiny_pair['target']!r}, gamma=2, backend='ray')\n"
            "out = e.generate([[5, 6]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]\n"
            "print(json.dumps({'gcs': ray.get_runtime_context().gcs_address, 'n': len(out.token_ids),\n"
            "                  'nodes': len(ray.nodes())}))\n"
            "e.shutdown()\n")
        res = None
        for _ in range(3):  # the head may still be starting
            res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                                 env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}", HF_HUB_OFFLINE="1"))
            if res.returncode == 0:
                break
            time.sleep(3)
        assert res.returncode == 0, res.stderr[-3000:]
        import json

        doc = json.loads(res.stdout.strip().splitlines()[-1])
        assert doc == {"gcs": f"127.0.0.1:{port}", "n": 4, "nodes": 1}
    finally:
        stop_process(head, 30)


# -- a colocated pair: both models in the target leader ----------------------------------------------------
def test_a_colocated_pair_is_one_actor_in_one_bundle(tiny_pair):
    """colocate=True: one placement bundle with the pair's CPUs, no draft actor, the leader holding both
    models on the pair's threads; the policy measures both schedules there, and every method decodes the
    target's greedy tokens, with each round's schedule counted."""
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    ref = PearlEngine(target=tiny_pair["target"], method="ar")
    want = [o.token_ids for o in ref.generate(PROMPTS, params)]
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], backend="ray", colocate=True) as eng:
        assert [b for b in eng.backend.pg.bundle_specs] == [{"CPU": 2.0}]
        status = ray.get(eng.backend.coordinator.status.remote(), timeout=30)
        assert status["handles"]["draft"] is None and status["draft_ready"]
        assert eng.backend.info["draft"] is None
        assert eng.backend.info["target"]["colocated_draft"] and eng.backend.info["target"]["threads"] == 2
        assert eng.measured["policy"]["schedules"] == ["turn", "once"]
        assert [o.token_ids for o in eng.generate(PROMPTS, params)] == want
        for method, gamma in (("pearl", 3), ("sd", 2), ("ar", None)):
            outs = eng.generate(PROMPTS, params, method=method, gamma=gamma)
            assert [o.token_ids for o in outs] == want, method
            s = outs[0].stats
            assert s.plain_rounds + s.turn_rounds + s.once_rounds == s.rounds
            if method == "pearl":  # a fixed window: PEARL's schedule, the draft on its own thread
                assert s.once_rounds > 0 and s.draft_forwards > 0
            if method == "sd":
                assert s.turn_rounds > 0 and s.once_rounds == 0


@pytest.mark.parametrize("schedule", ["once", "turn"])
def test_a_colocated_draft_that_raises_mid_round_turns_its_requests_target_only(schedule):
    """The draft in the leader breaks after a few forwards: the requests it drafted for finish on the target
    alone with the target's tokens, and the worker is not restarted."""
    from pearl_ray.testing import BrokenLM

    target, draft = toy_pair()
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in PearlEngine(target_model=target, method="ar").generate(PROMPTS, params)]
    with PearlEngine(draft_model=BrokenLM(draft, after=6), target_model=target, gamma=3, backend="ray",
                     colocate=True, schedule=schedule, num_threads=2) as eng:
        outs = eng.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == want
        assert any(o.stats.draft_failures for o in outs) and any(o.stats.fallback_rounds for o in outs)
        assert ray.get(eng.backend.coordinator.status.remote(), timeout=30)["restarts"] == {"draft": 0, "target": 0}
