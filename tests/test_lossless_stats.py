"""Statistical losslessness: PEARL (all windows, both ablations, greedy draft) and SD sample exactly the
target's warped distribution.

Tabular toy LMs (vocabulary 6, logits depend on the last two tokens) let us enumerate the exact joint of
length-3 continuations (216 cells). Each configuration draws N continuations through the full engine (so
PRE/POST switches, crops and the stop rule are all exercised) and runs a chi-square goodness-of-fit test,
merging cells with expected count < 5. Each test fails at p < 1e-4: a false-alarm rate of 1e-4 per
configuration, about 1.7e-3 for the whole file (two more for forced schedule switches); seeds are fixed so a
run is reproducible.
"""

import pytest
import torch
from scipy.stats import chisquare

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.testing import TabularLM

PROMPT = [1, 2]
LENGTH = 3
N = 2000
ALPHA = 1e-4


def chi_square_p(counts: dict, exact: dict, n: int) -> float:
    obs, exp = [], []
    small_obs, small_exp = 0, 0.0
    for cell, prob in exact.items():
        e = prob * n
        if e < 5:
            small_obs += counts.get(cell, 0)
            small_exp += e
        else:
            obs.append(counts.get(cell, 0))
            exp.append(e)
    unexpected = sum(c for cell, c in counts.items() if cell not in exact)
    assert unexpected == 0, f"{unexpected} samples fell on cells of probability 0"
    if small_exp > 0:
        obs.append(small_obs)
        exp.append(small_exp)
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def sample_continuations(engine, params, n):
    counts = {}
    prompts = [PROMPT] * n
    for i, out in enumerate(engine.generate(prompts, params)):
        assert len(out.token_ids) == LENGTH
        key = tuple(out.token_ids)
        counts[key] = counts.get(key, 0) + 1
    return counts


CONFIGS = [
    dict(method="pearl", gamma=1),
    dict(method="pearl", gamma=2),
    dict(method="pearl", gamma=4),
    dict(method="pearl", gamma=2, pre_verify=False),
    dict(method="pearl", gamma=2, post_verify=False),
    dict(method="pearl", gamma=3, draft_greedy=True),
    dict(method="sd", gamma=2),
    dict(method="ar", gamma=2),
]


T1 = dict(temperature=1.0)
FILTERED = dict(temperature=0.8, top_k=3, top_p=0.9)
CASES = [(c, T1) for c in CONFIGS] + [(CONFIGS[i], FILTERED) for i in (1, 2, 5, 6)]


def case_id(case):
    cfg, warp = case
    return "-".join(f"{k}={v}" for k, v in cfg.items()) + ("-t1" if warp is T1 else "-topk-topp")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_output_distribution_equals_target(case):
    cfg, warp = case
    target = TabularLM(6, seed=0, sharpness=1.2)
    draft = TabularLM(6, seed=5, sharpness=1.2)  # a different, imperfect draft
    engine = PearlEngine(draft_model=draft, target_model=target, **cfg)
    params = SamplingParams(max_new_tokens=LENGTH, ignore_eos=True, seed=11, **warp)
    exact = target.continuation_probs(PROMPT, LENGTH, **warp)
    counts = sample_continuations(engine, params, N)
    pvalue = chi_square_p(counts, exact, N)
    assert pvalue > ALPHA, f"{cfg} {warp}: chi-square p = {pvalue:.2e} < {ALPHA} over {N} samples"


def test_seeded_sampling_repeats_and_requests_differ():
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    engine = PearlEngine(draft_model=draft, target_model=target, gamma=2)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    a = [o.token_ids for o in engine.generate([PROMPT] * 4, params)]
    b = [o.token_ids for o in engine.generate([PROMPT] * 4, params)]
    assert a == b
    assert len({tuple(x) for x in a}) > 1, "requests must use different per-request seeds"
    torch.manual_seed(123)  # the global RNG is never used: reseeding it changes nothing
    c = [o.token_ids for o in engine.generate([PROMPT] * 4, params)]
    assert c == a


@pytest.mark.slow
def test_the_check_has_power_against_a_lossy_decoder():
    """The draft's own distribution must fail the same test (else the test could not fail)."""
    target, draft = TabularLM(6, seed=0, sharpness=1.2), TabularLM(6, seed=5, sharpness=1.2)
    engine = PearlEngine(target_model=draft, method="ar")
    params = SamplingParams(max_new_tokens=LENGTH, ignore_eos=True, seed=11, temperature=1.0)
    counts = sample_continuations(engine, params, N)
    exact = target.continuation_probs(PROMPT, LENGTH, temperature=1.0)
    assert all(c in exact for c in counts)
    assert chi_square_p(counts, exact, N) < ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("warp", [T1, FILTERED], ids=["t1", "topk-topp"])
def test_distribution_holds_across_forced_schedule_switches(warp):
    """Adaptive PEARL requests whose rounds switch between plain decoding, SD in turn and PEARL at once (the
    draft on its own thread) by a fixed script, so most requests change schedule mid-way: the joint law of
    the continuation is still the target's (the same chi-square test, false-alarm rate 1e-4)."""
    from test_batch import SWITCHES, _SchedulePolicy

    target = TabularLM(6, seed=0, sharpness=1.2)
    draft = TabularLM(6, seed=5, sharpness=1.2)
    engine = PearlEngine(draft_model=draft, target_model=target, num_threads=2, max_num_seqs=5)
    assert engine.backend.concurrent is not None
    engine.backend.loop.policy = policy = _SchedulePolicy(SWITCHES)
    params = SamplingParams(max_new_tokens=LENGTH, ignore_eos=True, seed=11, **warp)
    counts = sample_continuations(engine, params, N)
    assert {s for s, _ in policy.chosen} == {"plain", "turn", "once"}
    pvalue = chi_square_p(counts, target.continuation_probs(PROMPT, LENGTH, **warp), N)
    assert pvalue > ALPHA, f"{warp}: chi-square p = {pvalue:.2e} < {ALPHA} over {N} samples"
