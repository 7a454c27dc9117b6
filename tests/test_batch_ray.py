"""Batched rounds with the draft in a Ray actor (``transports.RemoteDraftPhase`` -> ``DraftWorker.batch_round``,
or ``GlooDraftPhase`` over the leader's gloo link): one call or message per round carries every slot's work, the draft drafts while this process runs the target,
and a draft killed mid-batch turns every request target-only with identical greedy output."""

import pytest
import ray

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.pair import as_batched
from pearl_ray.core.batch import BatchLoop, run_batch
from pearl_ray.runtime.transports import RemoteDraftPhase
from pearl_ray.runtime.workers import DraftWorker, HFModelFactory

from ray_utils import private_ray, run_threads, wait_for

pytestmark = pytest.mark.ray
shared_ray = pytest.fixture(scope="module", autouse=True)(private_ray)
PROMPTS = [[5, 9, 14, 3], [7], [20, 21, 22, 23, 24, 25, 26], [40, 41], [8, 8, 8], [60, 61, 62]]


def _setup(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3)
    draft = DraftWorker.options(num_cpus=0).remote(
        HFModelFactory(tiny_pair["draft"], target_vocab_size=eng.vocab_size), 1)
    return eng, draft


def test_batched_rounds_with_the_draft_in_an_actor(tiny_pair):
    eng, draft = _setup(tiny_pair)
    params = SamplingParams(max_new_tokens=19, ignore_eos=True)
    want = [eng.generate([p], params, method="ar")[0].token_ids for p in PROMPTS]
    methods = ["pearl", "sd", "ar", "pearl", "sd", "pearl"]
    reqs = [eng.make_request(p, params, method=m, index=i) for i, (p, m) in enumerate(zip(PROMPTS, methods))]
    loop = BatchLoop(as_batched(eng.backend.target_model), RemoteDraftPhase(draft, 30.0), None, 4)
    results = run_batch(loop, reqs)
    assert [ids for ids, _ in results] == want
    drafted = [s for (_, s), m in zip(results, methods) if m != "ar"]
    assert all(s.drafted_tokens > 0 and s.draft_failures == 0 for s in drafted)
    # the draft's slots were all released: a second batch reuses them
    assert [ids for ids, _ in run_batch(loop, reqs[:3])] == want[:3]
    ray.kill(draft)


def test_a_draft_killed_mid_batch_leaves_greedy_output_unchanged(tiny_pair):
    eng, draft = _setup(tiny_pair)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    want = [eng.generate([p], params, method="ar")[0].token_ids for p in PROMPTS[:4]]
    loop = BatchLoop(as_batched(eng.backend.target_model), RemoteDraftPhase(draft, 10.0), None, 4)
    for i, p in enumerate(PROMPTS[:4]):
        loop.add(eng.make_request(p, params, method="pearl", index=i), key=i)
    got, stats, rounds = {}, {}, 0
    while len(got) < 4:
        for ev in loop.step():
            if ev.finished:
                got[ev.key], stats[ev.key] = ev.output_ids, ev.stats
        rounds += 1
        if rounds == 3:
            ray.kill(draft)
    assert [got[i] for i in range(4)] == want
    assert all(stats[i].draft_failures == 1 and stats[i].fallback_rounds > 0 for i in range(4))


# -- the target leader's continuous loop behind a Ray engine (issue 20) ---------------------------------------
CONCURRENT = [([5, 9, 14, 3], "pearl", 17), ([7], "sd", 9), ([20, 21, 22, 23, 24, 25, 26], "ar", 21),
              ([40, 41], "pearl", 13), ([8, 8, 8], "sd", 25), ([60, 61, 62], "pearl", 6), ([11, 12], "ar", 15),
              ([90, 2, 33], "pearl", 19)]


@pytest.mark.parametrize("transport,phase", [("actor", "RemoteDraftPhase"), ("gloo", "GlooDraftPhase")])
def test_concurrent_requests_on_one_ray_engine_are_batched_and_lossless(tiny_pair, transport, phase):
    local = PearlEngine(target=tiny_pair["target"], method="ar", gamma=3)
    want = [local.generate([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids
            for p, _, n in CONCURRENT]
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, backend="ray",
                     max_num_seqs=8, transport=transport, result_interval_s=30.0, colocate=False) as eng:
        def one(i):
            p, method, n = CONCURRENT[i]
            chunks = list(eng.stream(p, SamplingParams(max_new_tokens=n, ignore_eos=True), method=method))
            return sum((c.token_ids for c in chunks), []), chunks[-1].stats

        got, errors = run_threads(one, len(CONCURRENT))
        assert not errors, errors
        assert [got[i][0] for i in range(len(CONCURRENT))] == want
        batch = max(t.batch_size for _, s in got.values() for t in s.round_timings)
        assert batch >= 2, "the requests were not decoded together"
        # a caller that wants only the result: the first round's tokens at once, the rest gathered in the
        # leader (one message, not one per round), the same tokens; a stream gets a chunk per round
        p, method, n = CONCURRENT[4]
        per_round = list(eng.stream(p, SamplingParams(max_new_tokens=n, ignore_eos=True), method=method))
        held = list(eng.stream(p, SamplingParams(max_new_tokens=n, ignore_eos=True), method=method,
                               result_only=True))
        assert sum((c.token_ids for c in held), []) == want[4] == sum((c.token_ids for c in per_round), [])
        assert len(held) == 3 and len(per_round) > 4
        # a seeded sampled request gives the same tokens alone and beside others
        sampled = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=9)
        alone = eng.generate([[3, 4, 5]], sampled)[0].token_ids
        crowd, errors = run_threads(lambda i: eng.generate([[3, 4, 5] if i == 0 else CONCURRENT[i][0]], sampled)[0]
                                 .token_ids, 4)
        assert not errors and crowd[0] == alone
        leader = eng.backend.status()["handles"]["target"]
        status = ray.get(leader.loop_status.remote(), timeout=30)
        assert status["running"] == 0 and status["draft"] == phase  # gloo: the rounds ride the link
        assert all(s.draft_failures == 0 for i, (_, s) in got.items() if CONCURRENT[i][1] != "ar")


def test_a_cancelled_stream_frees_its_slot_and_leaves_the_others_unchanged(tiny_pair):
    local = PearlEngine(target=tiny_pair["target"], method="ar", gamma=3)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    want = local.generate([[5, 9], [7, 8]], params)
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, backend="ray",
                     max_num_seqs=4) as eng:
        def one(i):
            if i == 0:  # leaves after its first tokens
                stream = eng.stream([40, 41, 42], SamplingParams(max_new_tokens=200, ignore_eos=True))
                next(stream)
                stream.close()
                return None
            return eng.generate([[5, 9], [7, 8]][i - 1], params)[0].token_ids

        got, errors = run_threads(one, 3)
        assert not errors, errors
        assert [got[1], got[2]] == [w.token_ids for w in want]
        leader = eng.backend.status()["handles"]["target"]
        assert wait_for(lambda: ray.get(leader.loop_status.remote(), timeout=30)["running"] == 0, 30)
        # the cancelled request (200 tokens, about one per round with this draft) left after its first round:
        # the loop ran the others' ~30 rounds, not 200
        assert ray.get(leader.loop_status.remote(), timeout=30)["rounds"] < 120


def test_a_killed_draft_or_target_with_four_requests_running(tiny_pair):
    from pearl_ray.errors import TargetUnavailable

    local = PearlEngine(target=tiny_pair["target"], method="ar", gamma=3)
    prompts = [[5, 9, 14], [7], [40, 41], [8, 8, 8]]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    want = [o.token_ids for o in local.generate(prompts, params)]
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, backend="ray",
                     max_num_seqs=4, round_timeout_s=10, colocate=False) as eng:
        eng.generate([[1, 2]], SamplingParams(max_new_tokens=4))  # warm: the draft is connected
        handles = eng.backend.status()["handles"]

        def one(i):
            chunks = []
            for c in eng.stream(prompts[i], params):
                chunks.append(c)
                if i == 0 and len(chunks) == 3:
                    ray.kill(handles["draft"])
            return sum((c.token_ids for c in chunks), []), chunks[-1].stats

        got, errors = run_threads(one, 4)
        assert not errors, errors
        assert [got[i][0] for i in range(4)] == want
        assert any(got[i][1].draft_failures for i in range(4))
        # the target: every running request gets TargetUnavailable, and the next one succeeds
        handles = eng.backend.status()["handles"]

        def doomed(i):
            for j, _ in enumerate(eng.stream(prompts[i], SamplingParams(max_new_tokens=200, ignore_eos=True))):
                if i == 0 and j == 2:
                    ray.kill(handles["target"])
            return "finished"

        got, errors = run_threads(doomed, 4)
        assert len(errors) == 4 and all(isinstance(e, TargetUnavailable) for _, e in errors), (got, errors)
        assert eng.generate([prompts[0]], params)[0].token_ids == want[0]


def test_the_kv_budget_reaches_the_leaders_loop(tiny_pair):
    """On Ray the leader's loop admits by the engine's KV budget: 4 calls at once, at most 2 decode together
    (2 x 20 positions fit in 40, 3 do not); a request that never fits is refused before it is sent."""
    from pearl_ray.errors import CacheBudgetError

    prompts = [[5, 9, 14, 3], [7], [40, 41], [8, 8, 8]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in PearlEngine(target=tiny_pair["target"], method="ar").generate(prompts, params)]
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, backend="ray",
                     max_num_seqs=4, kv_budget_tokens=40) as eng:
        outs = eng.generate(prompts, params)
        assert [o.token_ids for o in outs] == want
        assert max(t.batch_size for o in outs for t in o.stats.round_timings) == 2
        with pytest.raises(CacheBudgetError, match="kv_budget_tokens of 40"):
            eng.generate([prompts[0]], SamplingParams(max_new_tokens=40))


def test_a_hybrid_sliding_window_pair_on_a_ray_engine(family_pair):
    """Gemma-3 (sliding and full layers, window 6) loaded by the Ray workers: greedy PEARL equals the local
    target-only run on prompts longer than the window."""
    pair = family_pair("gemma3")
    prompts = [[1] + list(range(20, 50)), [5, 9, 14, 3], [40, 7, 7, 61, 3, 88, 12, 30]]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in PearlEngine(target=pair["target"], method="ar").generate(prompts, params)]
    with PearlEngine(draft=pair["draft"], target=pair["target"], gamma=3, backend="ray", max_num_seqs=4) as eng:
        outs = eng.generate(prompts, params)
        assert [o.token_ids for o in outs] == want
        assert all(o.stats.drafted_tokens > 0 and o.stats.draft_failures == 0 for o in outs)


def test_chunked_prompts_on_ray_give_the_whole_prompt_tokens(tiny_pair):
    """The leader's loop feeds a 120-token prompt in 16-token chunks (the engine's option reaches it) beside
    three short requests, the draft actor reading the same chunks over the gloo link: every request's
    greedy tokens equal target-only decoding's, and the long one took 7 chunk forwards before its rounds."""
    import random

    rng = random.Random(11)
    prompts = [[rng.randint(3, 95) for _ in range(120)], [5, 9, 14, 3], [7], [20, 21, 22]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ar = PearlEngine(target=tiny_pair["target"], method="ar")
    want = [ar.generate([p], params)[0].token_ids for p in prompts]
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, backend="ray",
                     max_num_seqs=4, max_prefill_tokens_per_round=16, colocate=False) as eng:
        outs = eng.generate(prompts, params, method="ar")
        assert [o.token_ids for o in outs] == want
        long = outs[0].stats
        assert long.target_forwards - len(long.round_timings) == 7  # AR: one target forward per round
        outs = eng.generate(prompts, params)
        assert [o.token_ids for o in outs] == want
        assert all(o.stats.draft_failures == 0 and o.stats.drafted_tokens > 0 for o in outs)
