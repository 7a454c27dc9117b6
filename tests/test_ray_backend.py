"""The Ray backend: concurrent draft/target actors, transports, streaming, faults, auto gamma.

A private local Ray instance (2 CPUs, 2 fake GPUs) for the module; every engine is shut down by its test.
"""

import time

import pytest
import ray

from pearl_ray import PearlEngine, SamplingParams, TargetUnavailable
from pearl_ray.runtime.coordinator import choose_gamma
from pearl_ray.testing import SlowLM

from ray_utils import private_ray, toy_pair, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PROMPTS = [[1, 2], [3], [4, 5, 1]]


shared_ray = pytest.fixture(scope="module", autouse=True)(private_ray)


@pytest.fixture
def engines():
    made = []
    yield made
    for e in made:
        e.shutdown()


@pytest.mark.parametrize("transport", ["actor", "gloo"])
def test_transport_invariance(engines, transport):
    target, draft = toy_pair()
    eng = PearlEngine(draft_model=draft, target_model=target, gamma=3, backend="ray", colocate=False, transport=transport)
    engines.append(eng)
    local = PearlEngine(draft_model=draft, target_model=target, gamma=3)
    for params in (SamplingParams(max_new_tokens=17, ignore_eos=True),
                   SamplingParams(max_new_tokens=17, ignore_eos=True, temperature=1.0, seed=9),
                   SamplingParams(max_new_tokens=17, ignore_eos=True, temperature=0.7, top_k=3, top_p=0.9, seed=2)):
        for method in ("pearl", "sd", "ar"):
            want = [o.token_ids for o in local.generate(PROMPTS, params, method=method)]
            got = eng.generate(PROMPTS, params, method=method)
            assert [o.token_ids for o in got] == want, (transport, method, params)
    # the token stream carries exactly the output, in order
    streamed = {}
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=17, ignore_eos=True),
                        on_tokens=lambda i, ids: streamed.setdefault(i, []).extend(ids))
    assert [streamed[i] for i in range(3)] == [o.token_ids for o in outs]
    s = outs[0].stats
    assert len(s.round_timings) == s.rounds and s.bytes_moved > 0
    # idle = round span - busy: a side busier than its round would mean clocks or bookkeeping are wrong
    assert all(t.draft_busy_s <= t.round_s + 1e-3 and t.target_busy_s <= t.round_s + 1e-3 for t in s.round_timings)


@pytest.mark.parametrize("transport", ["actor", "gloo"])
def test_draft_and_target_are_busy_at_the_same_time(engines, transport):
    target, draft = toy_pair()
    slow_t, slow_d = SlowLM(target, 0.03), SlowLM(draft, 0.01)
    eng = PearlEngine(draft_model=slow_d, target_model=slow_t, gamma=3, backend="ray", colocate=False, transport=transport)
    engines.append(eng)
    info = eng.backend.info
    assert info["draft"]["pid"] != info["target"]["pid"]
    out = eng.generate([[1, 2]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    s = out.stats
    overlapped = [t for t in s.round_timings if t.overlap_s > 0]
    assert len(overlapped) >= s.rounds - 1, [t.overlap_s for t in s.round_timings]
    assert s.overlap_s > 0.5 * min(s.draft_busy_s, s.target_busy_s)


@pytest.mark.parametrize("transport", ["actor", "gloo"])
def test_draft_killed_mid_request_finishes_on_target_alone(engines, transport):
    target, draft = toy_pair()
    slow_d = SlowLM(draft, 0.005)
    eng = PearlEngine(draft_model=slow_d, target_model=target, gamma=2, backend="ray", colocate=False, transport=transport,
                      round_timeout_s=10)
    engines.append(eng)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    want = PearlEngine(target_model=target, method="ar").generate([[1, 2]], params)[0].token_ids
    draft_handle = eng.backend.status()["handles"]["draft"]
    killed = []

    def kill_once(i, ids):
        if not killed:
            ray.kill(draft_handle)
            killed.append(True)

    t0 = time.monotonic()
    out = eng.generate([[1, 2]], params, on_tokens=kill_once)[0]
    assert out.token_ids == want
    assert out.stats.draft_failures == 1 and out.stats.fallback_rounds > 0
    assert time.monotonic() - t0 < 20
    # the draft was restarted: once it is up, a later request speculates again
    assert wait_for(lambda: eng.backend.status()["draft_ready"], timeout_s=120)
    again = eng.generate([[1, 2]], params)[0]
    assert again.token_ids == want and again.stats.draft_failures == 0 and again.stats.verified_tokens > 0
    assert eng.backend.status()["handles"]["draft"] != draft_handle


@pytest.mark.parametrize("transport", ["actor", "gloo"])
def test_draft_timeout_falls_back_and_stays_lossless(engines, transport):
    target, draft = toy_pair()
    stalls = SlowLM(draft, 5.0, after=6)  # fine for 6 forwards, then each forward takes 5 s
    eng = PearlEngine(draft_model=stalls, target_model=target, gamma=3, backend="ray", colocate=False, transport=transport,
                      round_timeout_s=1.0)
    engines.append(eng)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    want = PearlEngine(target_model=target, method="ar").generate([[1, 2]], params)[0].token_ids
    t0 = time.monotonic()
    out = eng.generate([[1, 2]], params)[0]
    assert out.token_ids == want and out.stats.draft_failures == 1
    assert time.monotonic() - t0 < 20  # one 1 s timeout, then target-only rounds


@pytest.mark.parametrize("transport", ["actor", "gloo"])
def test_dead_target_raises_a_typed_error_promptly(engines, transport):
    target, draft = toy_pair()
    eng = PearlEngine(draft_model=draft, target_model=SlowLM(target, 0.01), gamma=2, backend="ray", colocate=False,
                      transport=transport, round_timeout_s=5)
    engines.append(eng)
    handle = eng.backend.status()["handles"]["target"]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    t0 = time.monotonic()
    with pytest.raises(TargetUnavailable):
        eng.generate([[1, 2]], params, on_tokens=lambda i, ids: ray.kill(handle))
    assert time.monotonic() - t0 < 10
    # the target was replaced for later requests
    out = eng.generate([[1, 2]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_auto_gamma_from_measured_forwards(engines):
    assert choose_gamma(0.01, 0.05) == 5
    assert choose_gamma(0.01, 0.5) == 16  # clamped
    assert choose_gamma(0.5, 0.05) == 1
    target, draft = toy_pair()
    eng = PearlEngine(draft_model=SlowLM(draft, 0.004), target_model=SlowLM(target, 0.02), gamma=None,
                      backend="ray", transport="actor", colocate=False)
    engines.append(eng)
    m = eng.measured
    assert m["t_target_s"] > m["t_draft_s"] > 0
    assert 3 <= eng.gamma <= 6, m  # ~0.02 / 0.004 = 5, give or take sleep jitter
    out = eng.generate([[1, 2]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert out.stats.gamma == eng.gamma


def test_bad_ray_options_are_refused():
    from pearl_ray import InvalidParameterError

    target, draft = toy_pair()
    with pytest.raises(InvalidParameterError, match="placement"):
        PearlEngine(draft_model=draft, target_model=target, backend="ray", placement="ANYWHERE")
    with pytest.raises(InvalidParameterError, match="transport"):
        PearlEngine(draft_model=draft, target_model=target, backend="ray", transport="carrier-pigeon")


def test_real_forwards_overlap_within_rounds(engines, tmp_path_factory, tiny_tokenizer_dir):
    """Tiny random Llamas doing real CPU work: the actors' own timestamps show both busy at once."""
    import statistics

    from pearl_ray.testing import save_tiny_llama

    root = tmp_path_factory.mktemp("mid")
    target = save_tiny_llama(root / "t", seed=0, hidden_size=512, num_layers=8, tokenizer_dir=tiny_tokenizer_dir)
    draft = save_tiny_llama(root / "d", seed=1, hidden_size=256, num_layers=2, tokenizer_dir=tiny_tokenizer_dir)
    eng = PearlEngine(draft=str(draft), target=str(target), gamma=3, backend="ray", transport="gloo", colocate=False)
    engines.append(eng)
    out = eng.generate([[1] + list(range(10, 70))], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
    assert out.stats.draft_forwards > 0 and out.stats.draft_failures == 0
    rounds = out.stats.round_timings[1:]  # round 1 is the prefill
    busy = statistics.median(max(t.draft_busy_s, t.target_busy_s) for t in rounds)
    overhead = statistics.median(t.round_s - max(t.draft_busy_s, t.target_busy_s) for t in rounds)
    assert busy > 2 * overhead, (busy, overhead)  # forwards dominate the round
    overlapping = sum(t.overlap_s > 0 for t in rounds)
    assert overlapping >= 0.8 * len(rounds), [round(t.overlap_s * 1e3, 2) for t in rounds]


def test_cli_on_the_ray_backend_matches_local(tiny_pair, run_main):
    """``python -m pearl_ray generate --backend ray --transport gloo`` in its own process (its own Ray); the
    local run is the same command's ``main`` in this process."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from pearl_ray.cli import main

    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="rcli", dir="/tmp"))
    args = ["generate", "--draft", tiny_pair["draft"], "--target", tiny_pair["target"], "--prompt", "w1 w2",
            "--max-new-tokens", "12", "--temperature", "0", "--ignore-eos", "--json", "--gamma", "3"]
    local = run_main(main, args)
    assert local.returncode == 0, local.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "pearl_ray", *args, "--backend", "ray", "--transport", "gloo"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    outs = {"local": json.loads(local.stdout)["outputs"][0], "ray": json.loads(res.stdout)["outputs"][0]}
    assert outs["ray"]["token_ids"] == outs["local"]["token_ids"]
    assert outs["ray"]["stats"]["draft_forwards"] > 0
