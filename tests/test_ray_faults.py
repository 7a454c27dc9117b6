"""The control plane on a real Ray engine: a request's own failure (non-finite rows, an out-of-memory prompt
pass) ends it alone with ``RequestFailed`` while the requests decoding beside it finish exactly as without it
and the target worker stays up; routes are asked of the coordinator once and kept until it pushes a change
or a request fails on them; a killed target still fails its batch with ``TargetUnavailable`` and the next
request succeeds on a new one.

A private local Ray instance (2 CPUs, 2 fake GPUs) for the module; every engine is shut down by its test.
"""

import threading

import pytest
import ray

from pearl_ray import PearlEngine, SamplingParams, TargetUnavailable
from pearl_ray.errors import RequestFailed
from pearl_ray.testing import FaultyLM, SlowLM

from ray_utils import private_ray, toy_pair, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
MARK = [5, 5, 5]
PROMPTS = [[1, 2], [3], [4, 5, 1]]

shared_ray = pytest.fixture(scope="module", autouse=True)(private_ray)


@pytest.mark.parametrize("fault", ["nan", "oom"])
def test_a_request_failing_alone_leaves_its_batch_and_the_worker(fault):
    """Three streams decode; a marked request joins them and fails (NaN rows from its third forward, or its
    prompt pass runs out of memory). It raises ``RequestFailed``; the three give the tokens of a run without
    it, having shared rounds with it; the target was not restarted, and the next request runs on it."""
    target, draft = toy_pair()
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    want = [o.token_ids for o in PearlEngine(draft_model=draft, target_model=target, gamma=3).generate(PROMPTS, params)]
    faulty = FaultyLM(target, MARK, fault, after=3, delay_s=0.01)
    with PearlEngine(draft_model=draft, target_model=faulty, gamma=3, backend="ray", max_num_seqs=4) as eng:
        handle = eng.backend.status()["handles"]["target"]
        started, results = threading.Semaphore(0), {}

        def one(i):
            try:
                ids, sizes = [], [0]
                for n, chunk in enumerate(eng.stream(PROMPTS[i], params)):
                    if n == 0:
                        started.release()
                    ids.extend(chunk.token_ids)
                    if chunk.stats is not None:
                        sizes = [t.batch_size for t in chunk.stats.round_timings]
                results[i] = (ids, max(sizes))
            except Exception as exc:  # noqa: BLE001 - checked below
                results[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        assert all(started.acquire(timeout=120) for _ in PROMPTS)
        with pytest.raises(RequestFailed):
            eng.generate([MARK + [1]], params)
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert not any(isinstance(r, Exception) for r in results.values()), results
        assert [results[i][0] for i in range(len(PROMPTS))] == want
        assert max(results[i][1] for i in results) == len(PROMPTS) + 1  # rounds shared with the failing one
        status = eng.backend.status()
        assert status["restarts"]["target"] == 0 and status["handles"]["target"] == handle
        assert eng.generate([PROMPTS[0]], params)[0].token_ids == want[0]


def test_routes_are_kept_and_renewed_after_a_killed_target():
    """Requests of every method, one after another and at once, ask the coordinator for a route once. A
    killed target fails its request with ``TargetUnavailable``; the next request gets a new route to the
    restarted target and succeeds."""
    target, draft = toy_pair()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want = PearlEngine(target_model=target, method="ar").generate(PROMPTS, params)
    with PearlEngine(draft_model=draft, target_model=SlowLM(target, 0.005), gamma=2, backend="ray", colocate=False,
                     round_timeout_s=5) as eng:
        for method in ("pearl", "pearl", "sd", "ar"):
            assert eng.generate([PROMPTS[0]], params, method=method)[0].token_ids == want[0].token_ids
        assert [o.token_ids for o in eng.generate(PROMPTS, params)] == [o.token_ids for o in want]
        status = eng.backend.status()
        assert status["routes"] == 1, status
        handle = status["handles"]["target"]
        with pytest.raises(TargetUnavailable):
            eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=40, ignore_eos=True),
                         on_tokens=lambda i, ids: ray.kill(handle))
        out = eng.generate([PROMPTS[0]], params)[0]
        assert out.token_ids == want[0].token_ids and out.stats.draft_forwards > 0
        status = eng.backend.status()
        assert status["restarts"]["target"] == 1 and status["handles"]["target"] != handle
        assert status["routes"] == 2, status


def test_a_change_is_pushed_to_the_kept_route():
    """The draft dies while the engine is idle: its link's loop ends, the coordinator pushes the change (the
    backend's ``watch`` returns without a request asking), and the next request is routed anew and gives the
    same tokens."""
    target, draft = toy_pair()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want = PearlEngine(target_model=target, method="ar").generate([PROMPTS[0]], params)[0].token_ids
    with PearlEngine(draft_model=draft, target_model=target, gamma=2, backend="ray", colocate=False,
                     transport="gloo") as eng:
        assert eng.generate([PROMPTS[0]], params)[0].token_ids == want
        kept = eng.backend.kept
        assert kept is not None and kept.drafts
        ray.kill(eng.backend.status()["handles"]["draft"])
        assert ray.wait([kept.watch], timeout=60)[0], "no change was pushed"
        assert wait_for(lambda: eng.generate([PROMPTS[0]], params)[0].token_ids == want, timeout_s=60)
        assert eng.backend.status()["routes"] >= 2
