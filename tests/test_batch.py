"""Batched PEARL rounds (core.batch, modeling.batched, core.policy): one pair decodes many requests at once.

- The slot cache against the single-request runner: same logits (fp32 to 1e-5, bf16 to its precision) over
  random feeds, crops, joins and releases, for a full and a reduced-vocabulary model.
- Greedy: a request's tokens in a batch equal its tokens alone and target-only decoding's, for PEARL, SD
  and AR, with rows of different lengths, joins mid-flight, a cancelled row, mixed methods and sampled rows
  beside greedy ones. Where batched float arithmetic could flip a token, the test demands a numerical tie
  (the target's top-2 logits within 1e-4) and counts them (0 expected on the tiny fp32 model).
- Sampling: chi-square of the joint law of 2 sampled tokens for a request inside a batch of 4 others, for
  PEARL and SD (false-alarm rate 1e-4 per test); a seeded request gives the same tokens alone and batched.
- Memory: slots are reused over 200 requests; rollbacks do not grow the cache without bound.
- The policy's choice on injected costs.
"""

import random
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.pair import as_batched
from pearl_ray.config import EngineConfig, Request
from pearl_ray.core.batch import BatchLoop, run_batch
from pearl_ray.core.sides import PerSlotLM
from pearl_ray.core.policy import CostModel, ForwardCosts, SeqView, SpeculationPolicy, breakeven_acceptance
from pearl_ray.modeling.batched import BatchedHFCausalLM
from pearl_ray.modeling.hf import HFCausalLM
from pearl_ray.testing import TabularLM

from test_lossless_stats import chi_square_p


def _script(rng, prompt_len, steps=14, max_new=5):
    ops, length = [("feed", [rng.randint(3, 95) for _ in range(prompt_len)], 1)], prompt_len
    for _ in range(steps):
        if rng.random() < 0.3 and length > prompt_len + 1:
            length = rng.randint(prompt_len, length - 1)
            ops.append(("crop", length))
        n = rng.randint(1, max_new)
        ops.append(("feed", [rng.randint(3, 95) for _ in range(n)], rng.randint(1, n)))
        length += n
    return ops


def _replay(make_single, batched, scripts, rng):
    """Run each script alone on a single-request runner and interleaved on the batched one (slots skip
    rounds at random, finished slots are released); return both logits lists."""
    want = []
    for ops in scripts:
        single = make_single()
        single.reset()
        outs = []
        for op in ops:
            outs.append(single.forward(op[1], op[2])) if op[0] == "feed" else single.crop(op[1])
        want.append([o for o in outs if o is not None])
    got = [[] for _ in scripts]
    pos = [0] * len(scripts)
    while any(p < len(s) for p, s in zip(pos, scripts)):
        feeds = {}
        for i, ops in enumerate(scripts):
            if pos[i] >= len(ops) or rng.random() < 0.25:
                continue
            while ops[pos[i]][0] == "crop":
                batched.crop(i, ops[pos[i]][1])
                pos[i] += 1
            feeds[i] = ops[pos[i]][1:]
            pos[i] += 1
        if feeds:
            for i, logits in batched.forward(feeds).items():
                got[i].append(logits)
        for i, ops in enumerate(scripts):
            if pos[i] >= len(ops):
                batched.release(i)
    return want, got


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.15)])
def test_slot_cache_matches_the_single_request_runner(tiny_pair, dtype, tol):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=dtype)
    rng = random.Random(0)
    scripts = [_script(rng, n) for n in (5, 11, 3, 40, 7)]
    batched = BatchedHFCausalLM(model)
    want, got = _replay(lambda: HFCausalLM(model), batched, scripts, rng)
    for w, g in zip(want, got):
        assert len(w) == len(g)
        for a, b in zip(w, g):
            assert a.shape == b.shape and a.dtype == torch.float32
            assert (a - b).abs().max().item() < tol
    assert batched.slots == [] and batched.held_positions() == 0


def test_prefill_groups_keep_padding_bounded():
    from pearl_ray.modeling.batched import prefill_groups

    assert prefill_groups({0: 10}, 1.25) == [[0]]
    assert prefill_groups({0: 9, 1: 12, 2: 10, 3: 11}, 1.25) == [[1, 3, 2, 0]]  # 4 x 12 <= 1.25 x 42
    assert prefill_groups({0: 40, 1: 5, 2: 4}, 1.25) == [[0], [1, 2]]  # 40 would pad 5 and 4 to 120
    assert prefill_groups({0: 3, 1: 3}, 1.0) == [[0, 1]] and prefill_groups({0: 4, 1: 3}, 1.0) == [[0], [1]]


def test_new_slots_joining_together_share_one_prompt_pass(tiny_pair):
    """Slots that join in the same forward are prefilled as one right-padded pass, and what each then
    computes equals its single-request run (prompt logits and the decoding steps after)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=torch.float32)
    rng = random.Random(3)
    prompts = {s: [rng.randint(3, 95) for _ in range(n)] for s, n in enumerate((9, 12, 10, 11))}
    batched = BatchedHFCausalLM(model)
    calls = []
    hook = batched.base.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        got = batched.forward({s: (p, 2) for s, p in prompts.items()})
        assert len(calls) == 1 and [batched.cache_len(s) for s in prompts] == [9, 12, 10, 11]
        steps = [{s: ([rng.randint(3, 95) for _ in range(1 + s % 2)], 1) for s in prompts} for _ in range(3)]
        later = [batched.forward(f) for f in steps]
    finally:
        hook.remove()
    for s, p in prompts.items():
        single = HFCausalLM(model)
        single.reset()
        assert (single.forward(p, 2) - got[s]).abs().max().item() < 1e-5
        for f, out in zip(steps, later):
            assert (single.forward(*f[s]) - out[s]).abs().max().item() < 1e-5


def test_slot_cache_reduced_vocabulary(tiny_pair):
    """A reduced-vocabulary draft: outputs scattered into the full row (-inf elsewhere), inputs mapped."""
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["draft"], dtype=torch.float32)
    keep = list(range(0, 96, 2))  # the model's 96 outputs stand for the first 48 of these ids
    rng = random.Random(1)
    scripts = [_script(rng, n) for n in (4, 9)]
    want, got = _replay(lambda: HFCausalLM(model, 120, keep), BatchedHFCausalLM(model, 120, keep), scripts, rng)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert a.shape[-1] == 120 and torch.isinf(b[:, 1]).all()
            finite = torch.isfinite(a)
            assert torch.equal(finite, torch.isfinite(b)) and (a[finite] - b[finite]).abs().max() < 1e-5


# -- greedy: batched == alone == target-only ----------------------------------------------------------------
PROMPTS = [[5, 9, 14, 3], [7], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [40, 41], [8, 8, 8],
           [60, 61, 62, 63, 64, 65], [11, 12], [90, 2, 33, 44, 55]]


def _ties(target_path, prompt, got, want):
    """0 if identical; else assert that the first difference is a numerical tie of the target and count it."""
    if got == want:
        return 0
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([list(prompt) + want[:k]])).logits[0, -1]
    top2 = torch.topk(logits, 2).values
    assert float(top2[0] - top2[1]) < 1e-4, f"token {k} differs and is not a numerical tie"
    return 1


def test_greedy_batched_equals_alone_and_target_only(tiny_pair):
    params = SamplingParams(max_new_tokens=21, ignore_eos=True)
    ar = PearlEngine(target=tiny_pair["target"], method="ar", gamma=4)
    want = [ar.generate([p], params)[0].token_ids for p in PROMPTS]  # one at a time
    ties = 0
    for method in ("pearl", "sd", "ar"):
        for gamma in (None, 3):
            eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], method=method, gamma=gamma,
                              max_num_seqs=3)  # 8 prompts through 3 slots: joins mid-flight
            outs = eng.generate(PROMPTS, params)
            for p, o, w in zip(PROMPTS, outs, want):
                ties += _ties(tiny_pair["target"], p, o.token_ids, w)
            assert max(t.batch_size for o in outs for t in o.stats.round_timings) == 3
    assert ties == 0, f"{ties} numerical ties on the tiny model in float32"


def test_mixed_methods_sampled_rows_and_a_cancelled_row(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=4)
    greedy = SamplingParams(max_new_tokens=18, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=18, ignore_eos=True, temperature=0.9, top_k=20, seed=7)
    alone = {}
    for i, (p, method, params) in enumerate([(PROMPTS[0], "pearl", greedy), (PROMPTS[2], "sd", greedy),
                                             (PROMPTS[3], "ar", greedy), (PROMPTS[5], "pearl", sampled)]):
        alone[i] = eng.make_request(p, params, method=method, index=i)
    backend = eng.backend
    solo = {i: run_batch(BatchLoop(backend.target_lm, backend.draft_lm, None, 1), [r])[0][0] for i, r in alone.items()}
    loop = BatchLoop(backend.target_lm, backend.draft_lm, None, 4)
    doomed = loop.add(eng.make_request(PROMPTS[4], greedy, method="pearl"), key="doomed")
    for i, r in alone.items():
        loop.add(r, key=i)
    got, rounds = {}, 0
    while len(got) < 4:
        for ev in loop.step():
            if ev.finished:
                got[ev.key] = ev.output_ids
        rounds += 1
        if rounds == 3:
            assert loop.cancel(doomed) and not loop.cancel(doomed)
    assert "doomed" not in got and got == solo
    assert got[0] == eng.generate([PROMPTS[0]], greedy, method="ar")[0].token_ids
    assert backend.target_lm.slots == [] and backend.draft_lm.slots == []


def test_a_request_failing_in_its_own_rows_ends_alone(tiny_pair):
    """Non-finite target rows for one sampled request, and a stop rule that raises for another: each ends with
    ``RequestFailed``; the three beside them give exactly their solo tokens, and every slot is freed."""
    from pearl_ray.errors import RequestFailed

    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=5)
    greedy = SamplingParams(max_new_tokens=18, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=18, ignore_eos=True, temperature=0.9, seed=3)
    good = {0: eng.make_request(PROMPTS[0], greedy, method="pearl"),
            1: eng.make_request(PROMPTS[2], sampled, method="sd", index=1),
            2: eng.make_request(PROMPTS[3], greedy, method="ar")}
    backend = eng.backend
    solo = {i: run_batch(BatchLoop(backend.target_lm, backend.draft_lm, None, 1), [r])[0][0] for i, r in good.items()}

    def broken_decode(ids):
        raise ValueError("the decoder fell over")

    loop = BatchLoop(backend.target_lm, backend.draft_lm, None, 5, broken_decode)
    real_forward = backend.target_lm.forward

    def nan_rows(feeds):
        out = real_forward(feeds)
        for seq in loop.active:
            if seq.key == "nan" and seq.slot in out and seq.target_forwards >= 2:
                out[seq.slot] = torch.full_like(out[seq.slot], float("nan"))
        return out

    backend.target_lm.forward = nan_rows
    try:
        loop.add(eng.make_request(PROMPTS[4], sampled, method="pearl", index=4), key="nan")
        loop.add(eng.make_request(PROMPTS[5], SamplingParams(max_new_tokens=18, stop=("w1",)), method="pearl"),
                 key="stop")
        for i, r in good.items():
            loop.add(r, key=i)
        got, errors = {}, {}
        while not loop.idle:
            for ev in loop.step():
                if ev.finished:
                    (errors if ev.error is not None else got)[ev.key] = ev.error or ev.output_ids
    finally:
        del backend.target_lm.forward
    assert set(errors) == {"nan", "stop"} and all(isinstance(e, RequestFailed) for e in errors.values()), errors
    assert got == solo and loop.request_failures == 2
    assert backend.target_lm.slots == [] and backend.draft_lm.slots == []


def test_draft_failure_in_a_batch_turns_those_rows_target_only(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=4)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = [eng.generate([p], params, method="ar")[0].token_ids for p in PROMPTS[:4]]
    draft = eng.backend.draft_lm
    real, calls = draft.forward, {"n": 0}

    def flaky(feeds):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("draft fell over")
        return real(feeds)

    draft.forward = flaky
    outs = eng.generate(PROMPTS[:4], params)
    assert [o.token_ids for o in outs] == want
    assert sum(o.stats.draft_failures for o in outs) >= 1 and any(o.stats.fallback_rounds for o in outs)


class _ScriptedPolicy:
    """Windows from a fixed script (the real policy's interface: choose / observe / finished)."""

    def __init__(self, windows):
        self.windows, self.chosen, self.views = list(windows), [], []

    def choose(self, views):
        w = self.windows[len(self.chosen) % len(self.windows)]
        self.chosen.append(w)
        self.views.append(views)
        return w

    def decide(self, views, prompt_tokens=0):
        w = self.choose(views)
        return ("plain" if w == 0 else "turn"), w

    def observe(self, *args):
        pass

    def finished(self, *args):
        pass


class _CountingPhase:
    """A local draft phase that counts the rounds it is asked to draft."""

    def __init__(self, inner):
        self.inner, self.submits = inner, 0

    def start(self, slot, start):
        self.inner.start(slot, start)

    def release(self, slot):
        self.inner.release(slot)

    def submit(self, reqs):
        assert reqs and all(r.num_steps > 0 for r in reqs.values())
        self.submits += 1
        self.inner.submit(reqs)

    def collect(self):
        return self.inner.collect()

    def forwards(self, slot):
        return self.inner.forwards(slot)


def test_rounds_without_drafting_make_no_draft_call_and_stay_lossless(tiny_pair):
    """Plain-decoding rounds (window 0) skip the draft entirely; the draft's mirror is resynchronised by the
    whole sequence when drafting resumes, so greedy output still equals target-only decoding."""
    from pearl_ray.core.proposer import BatchedDraftSide, LocalDraftPhase

    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], max_num_seqs=4)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    want = [eng.generate([p], params, method="ar")[0].token_ids for p in PROMPTS[:4]]
    for method in ("pearl", "sd"):
        policy = _ScriptedPolicy([0, 0, 3, 0, 2, 2, 0, 0, 0, 4, 1, 0])
        phase = _CountingPhase(LocalDraftPhase(BatchedDraftSide(eng.backend.draft_lm)))
        loop = BatchLoop(eng.backend.target_lm, phase, policy, 4)
        got = run_batch(loop, [eng.make_request(p, params, method=method, index=i) for i, p in enumerate(PROMPTS[:4])])
        assert [ids for ids, _ in got] == want, method
        assert sum(st.draft_failures for _, st in got) == 0
        assert 0 < phase.submits <= sum(1 for w in policy.chosen if w > 0) < len(policy.chosen)
        # what the policy reads of each row: the tokens the draft lacks, and the new tokens left to decode
        lens = [len(eng.encode(p)) for p in PROMPTS[:4]]
        first, before, after = policy.views[0], policy.views[2], policy.views[3]  # round 2 drafts (window 3)
        assert [v.behind for v in first] == lens and all(v.remaining == 20 for v in first)
        assert [v.behind for v in before] == [n + 2 for n in lens]  # two plain rounds: one token each
        assert all(v.behind <= 4 for v in after)  # caught up in round 2: at most its committed tokens
        assert all(b.remaining == 18 and a.remaining <= 18 for a, b in zip(after, before))


def test_kv_budget_holds_requests_back_and_refuses_what_never_fits(tiny_pair):
    """The pair's KV budget: (running + 1) x the longest reservation must fit, so a 40-position budget runs
    two 20-position requests at once and makes the 29-position one wait; outputs are unchanged. A request
    that could never fit is refused before it queues, with the numbers."""
    from pearl_ray.core.batch import reservation
    from pearl_ray.errors import CacheBudgetError

    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ar = PearlEngine(target=tiny_pair["target"], method="ar")
    want = [ar.generate([p], params)[0].token_ids for p in PROMPTS[:4]]
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=4,
                      kv_budget_tokens=40)
    assert [reservation(eng.make_request(p, params)) for p in PROMPTS[:4]] == [20, 17, 29, 18]
    outs = eng.generate(PROMPTS[:4], params)
    assert [o.token_ids for o in outs] == want
    sizes = [t.batch_size for o in outs for t in o.stats.round_timings]
    assert max(sizes) == 2
    assert max(t.batch_size for t in outs[2].stats.round_timings) == 1  # 2 x 29 > 40: it ran alone
    with pytest.raises(CacheBudgetError, match=r"needs up to 41 KV-cache positions .* kv_budget_tokens of 40"):
        eng.make_request(PROMPTS[2], SamplingParams(max_new_tokens=24))
    # the loop itself ends such a request with the error, never leaving it waiting
    loop = BatchLoop(eng.backend.target_lm, eng.backend.draft_lm, None, 4)
    loop.kv_budget = 10
    loop.add(eng.make_request(PROMPTS[1], SamplingParams(max_new_tokens=4, ignore_eos=True)), key="fits")
    loop.add(ar.make_request(PROMPTS[2], params), key="never")
    events = loop.step()
    assert [(e.key, type(e.error).__name__) for e in events if e.finished] == [("never", "CacheBudgetError")]
    with pytest.raises(Exception, match="kv_budget_tokens"):
        PearlEngine(target=tiny_pair["target"], kv_budget_tokens=0)


# -- sampling -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["pearl", "sd"])
def test_sampled_request_inside_a_batch_keeps_the_target_law(method):
    target, draft = TabularLM(6, seed=0, sharpness=1.2), TabularLM(6, seed=5, sharpness=1.2)
    eng = PearlEngine(draft_model=draft, target_model=target, method=method, gamma=2, max_num_seqs=5)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, seed=17, temperature=1.0)
    n, others = 2000, [[3], [4, 5, 1], [2, 2, 2, 2], [5, 0]]
    prompts = [p for _ in range(n) for p in ([[1, 2]] + others)]
    outs = eng.generate(prompts, params)
    counts = {}
    for out in outs[:: 1 + len(others)]:
        counts[tuple(out.token_ids)] = counts.get(tuple(out.token_ids), 0) + 1
    p = chi_square_p(counts, target.continuation_probs([1, 2], 2, temperature=1.0), n)
    assert p > 1e-4, f"{method} in a batch: chi-square p = {p:.2e}"


def test_seeded_request_same_alone_and_in_a_batch(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=4)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=1.0, seed=5)
    batched = eng.generate(PROMPTS[:4], params)
    for i, p in enumerate(PROMPTS[:4]):
        req = eng.make_request(p, params, index=i)
        alone = run_batch(BatchLoop(eng.backend.target_lm, eng.backend.draft_lm, None, 1), [req])[0][0]
        assert alone == batched[i].token_ids


# -- memory -------------------------------------------------------------------------------------------------
def test_slots_are_reused_and_rollbacks_do_not_grow_the_cache(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=4, max_num_seqs=4)
    rng = random.Random(3)
    prompts = [[rng.randint(3, 95) for _ in range(rng.randint(1, 12))] for _ in range(200)]
    backend = eng.backend
    peak = {"rows": 0, "len": 0, "slot": 0}
    real = backend.target_lm.forward

    def watch(feeds):
        out = real(feeds)
        peak["rows"] = max(peak["rows"], len(backend.target_lm.slots))
        peak["len"] = max(peak["len"], backend.target_lm.last_shape[2])
        peak["slot"] = max(peak["slot"], *feeds)
        return out

    backend.target_lm.forward = watch
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert len(outs) == 200 and all(len(o.token_ids) == 10 for o in outs)
    assert peak["rows"] <= 4 and peak["slot"] <= 3  # four slot ids serve 200 requests
    assert peak["len"] <= 12 + 10 + 5  # attention spans the longest live row and one window, no holes
    assert backend.target_lm.slots == [] and backend.target_lm.held_positions() == 0
    # one long request with a rejection in most rounds beside short ones: a decoding forward's keys never
    # span more than the longest live row, however many positions were rolled back
    lm, worst = backend.target_lm, {"excess": 0}

    def watch_long(feeds):
        lm.last_shape = (0, 0, 0)  # a forward without decoding rows leaves it so
        out = real(feeds)
        live = max(lm.cache_len(s) for s in lm.slots)
        worst["excess"] = max(worst["excess"], lm.last_shape[2] - live)
        return out

    lm.forward = watch_long
    long = eng.generate([[5, 9, 14]] + prompts[:3], SamplingParams(max_new_tokens=200, ignore_eos=True),
                        method="sd")
    assert long[0].stats.recovered_tokens > 50 and worst["excess"] <= 0


# -- the policy ---------------------------------------------------------------------------------------------
def _costs(draft_s, target_base=0.030, per_token=0.001, parallel=False):
    tokens = (1, 2, 4, 8, 16, 32, 64, 128)
    return CostModel(ForwardCosts(tokens, tuple(target_base + per_token * n for n in tokens)),
                     ForwardCosts(tokens, tuple(draft_s + draft_s * 0.02 * n for n in tokens)), parallel)


def test_policy_window_follows_the_costs():
    good = [SeqView("sd", accepted=70, verified=100)]
    cheap = SpeculationPolicy(_costs(0.002), max_gamma=8)
    costly = SpeculationPolicy(_costs(0.030), max_gamma=8)
    g_cheap, g_costly = cheap.choose(good), costly.choose(good)
    assert g_cheap >= 3 and g_costly == 0
    # a big batch on a target whose cost grows with tokens: a smaller window (or none) than alone
    steep = SpeculationPolicy(_costs(0.002, per_token=0.004), max_gamma=8)
    alone, crowd = steep.choose(good), steep.choose(good * 16)
    assert alone > crowd
    # a draft whose worth is still unknown (6 of 10: at its estimate drafting loses, at an optimistic one it
    # would win): plain decoding, with a probe every probe_every rounds, the period doubling after each probe
    # that changes nothing, up to probe_backoff x probe_every (a PEARL request in turn runs vanilla SD rounds)
    unsure = [SeqView("pearl", accepted=6, verified=10)]
    probe = SpeculationPolicy(_costs(0.014), max_gamma=8, probe_every=4, probe_backoff=4)
    picks = [probe.choose(unsure) for _ in range(50)]
    assert [i for i, g in enumerate(picks) if g > 0] == [3, 11, 27, 43]  # periods 4, 8, 16, 16
    assert probe.probes == 4 and probe.skipped_probes == 0
    # a window chosen again resets the gap
    good_again = [SeqView("pearl", accepted=95, verified=100)]
    assert probe.choose(good_again) > 0
    picks = [probe.choose(unsure) for _ in range(5)]
    assert [i for i, g in enumerate(picks) if g > 0] == [3]
    # a draft known to be rarely right (5 of 100): no acceptance it plausibly has pays for drafting, so the
    # probes are skipped (each still backs off), and the policy never leaves plain decoding
    bad = [SeqView("pearl", accepted=5, verified=100)]
    skip = SpeculationPolicy(_costs(0.014), max_gamma=8, probe_every=4, probe_backoff=4)
    assert not any(skip.choose(bad) for _ in range(50))
    assert skip.probes == 0 and skip.skipped_probes == 4 and skip.last_choice["window"] == 0
    # target-only requests only: nothing to choose
    assert cheap.choose([SeqView("ar")] * 4) == 0


class _ContextTimedLM:
    """A BatchedLM stand-in whose forward takes 2 ms plus 2 us per new token per cached position of the
    longest row (attention over a padded slot cache), so its costs are known."""

    max_context, vocab_size = 4096, 32

    def __init__(self):
        self.lens = {}

    def forward(self, feeds):
        import time

        for slot, (toks, _) in feeds.items():
            self.lens[slot] = self.lens.get(slot, 0) + len(toks)
        n = sum(len(toks) for toks, _ in feeds.values())
        if n < 64:  # not a prompt pass
            time.sleep(0.002 + 2e-6 * n * max(self.lens.values()))
        return {}

    def crop(self, slot, length):
        self.lens[slot] = length

    def release(self, slot):
        self.lens.pop(slot, None)


def test_forward_costs_grow_with_the_context_they_attend_over():
    """measure_forward_costs times the widest forward again on a long context and keeps the extra seconds per
    token per cached position; the costs then price a forward at any context, and survive to_dict."""
    from pearl_ray.core.policy import measure_forward_costs

    costs = measure_forward_costs(_ContextTimedLM(), 4, (5,), context=128, reps=3, warmup=0)
    assert costs.context == 128 and 1.2e-6 < costs.per_context < 3.2e-6
    assert costs(20, 1024) > 2 * costs(20) and costs(20, 128) == costs(20)
    assert costs(20, 16) == costs(20)  # no discount below the measured context
    again = CostModel.from_dict(CostModel(costs).to_dict()).target
    assert (again.context, again.per_context) == (costs.context, costs.per_context)
    assert again(20, 1024) == pytest.approx(costs(20, 1024), rel=1e-3)


def test_the_policy_prices_wide_rounds_at_the_batchs_context():
    """Attention over long contexts makes a wide verify forward cost more than at the measured context: a batch
    of 8 that drafts on short contexts decodes plainly on long ones, where the same acceptance no longer pays
    for the padded forward."""
    tokens = (1, 2, 4, 8, 16, 32, 64, 128)
    per_context = 2e-6  # seconds per new token per cached position past the measured 128
    costs = CostModel(ForwardCosts(tokens, tuple(0.030 + 0.0005 * n for n in tokens), 128, per_context),
                      ForwardCosts(tokens, tuple(0.003 + 0.0001 * n for n in tokens), 128, 0.2 * per_context))
    pol = SpeculationPolicy(costs, max_gamma=4)

    def batch(context):
        return [SeqView("sd", accepted=600, verified=1000, context=context)] * 8

    assert pol.choose(batch(150)) > 0
    assert pol.choose(batch(1500)) == 0
    # the same costs without the context term cannot tell the two apart
    flat = SpeculationPolicy(CostModel(ForwardCosts(tokens, costs.target.seconds),
                                       ForwardCosts(tokens, costs.draft.seconds)), max_gamma=4)
    assert flat.choose(batch(1500)) == flat.choose(batch(150)) > 0


def test_policy_drafts_on_evidence_not_on_a_lucky_start():
    """The window is chosen at the acceptance's lower bound: 7 of 10 accepted (a lucky start) keeps plain
    decoding where 70 of 100 drafts, and with confidence=0 (the estimate alone) both draft."""
    lucky, proven = [SeqView("pearl", accepted=7, verified=10)], [SeqView("pearl", accepted=70, verified=100)]
    costs = _costs(0.020, per_token=0.004, parallel=True)  # PEARL at once, where a window barely pays at 0.6
    cautious = SpeculationPolicy(costs, max_gamma=8)
    assert cautious.choose(lucky) == 0 and cautious.choose(proven) >= 2
    assert cautious.acceptance(lucky[0], -1.0) < cautious.acceptance(proven[0], -1.0) < cautious.acceptance(proven[0])
    naive = SpeculationPolicy(costs, max_gamma=8, confidence=0.0)
    assert naive.choose(lucky) >= 2 and naive.choose(proven) >= 2


def test_policy_probes_where_drafting_could_pay_and_skips_where_it_cannot():
    """With the default pair's costs as a Ray pair measured them on a 2-core CPU (2026-12-05), and a new
    request at the pair's running acceptance of 0.42: alone, an optimistic acceptance would pay for drafting,
    so it is probed; at batch 8 the padded wide forward costs nearly as much per token as plain rounds and no
    plausible acceptance pays, so the probes (a wide forward and the draft's catch-up each) are skipped."""
    costs = CostModel(
        ForwardCosts((1, 2, 3, 4, 5, 6, 8, 16, 32, 48, 80, 96),
                     (0.0252, 0.0279, 0.0286, 0.0311, 0.0311, 0.0311, 0.0399, 0.0513, 0.0816, 0.0990, 0.137, 0.294)),
        ForwardCosts((1, 2, 4, 8, 16), (0.00526, 0.00547, 0.00639, 0.00815, 0.0131)), parallel=True,
        target_alone=ForwardCosts((1, 2, 4, 8, 16), (0.0188, 0.0201, 0.0225, 0.0310, 0.0633)))
    def probes(seqs, rounds=30):
        pol = SpeculationPolicy(costs, max_gamma=5, probe_every=4, probe_backoff=4)
        pol.finished(420, 1000)
        assert abs(pol.pair_acceptance - 0.42) < 0.02
        picks = [pol.choose(seqs) for _ in range(rounds)]
        assert [g > 0 for g in picks].count(True) == pol.probes
        assert pol.probes + pol.skipped_probes == 3
        return pol.probes

    assert probes([SeqView("pearl")]) == 3 and probes([SeqView("pearl")] * 8) == 0
    # what the requests have left must repay the probe: a new request (64 tokens to go, its 60-token prompt to
    # catch up on) is probed; one 4 tokens from its end is not, nor a draining batch of 3 with 30 tokens left
    # each and 130 tokens each for the draft to catch up on
    assert probes([SeqView("pearl", behind=60, remaining=64)]) == 3
    assert probes([SeqView("pearl", behind=120, remaining=4)]) == 0
    assert probes([SeqView("pearl", behind=130, remaining=30)] * 3) == 0


def test_breakeven_acceptance_is_where_drafting_starts_to_pay():
    """The acceptance ``breakeven_acceptance`` returns is the edge of the policy's own model: just above it the
    best window's predicted rate reaches the asked speedup over plain decoding, just below it none does. The
    harder goal needs more, a parallel pair (PEARL on Ray) needs less than one run side after side, and a draft
    as costly as the target never pays."""
    def best(costs, a, b, method="pearl"):
        pol = SpeculationPolicy(costs, max_gamma=8, confidence=0.0)
        seqs = [SeqView(method, accepted=round(a * 10 ** 9), verified=10 ** 9)] * b
        return max(pol.rate(seqs, g) for g in range(1, 9)) / pol.rate(seqs, 0)

    base = _costs(0.004)
    ray_pair = CostModel(base.target, base.draft, True, target_alone=base.target.scaled(0.75))
    for costs, b, method in [(base, 1, "sd"), (ray_pair, 1, "pearl"), (ray_pair, 4, "pearl")]:
        even, _ = breakeven_acceptance(costs, b, 1.0, method)
        more, window = breakeven_acceptance(costs, b, 1.2, method)
        assert 0.05 < even < more < 0.98 and 1 <= window <= 8
        assert best(costs, even + 0.002, b, method) > 1.0 > best(costs, even - 0.002, b, method)
        assert best(costs, more + 0.002, b, method) > 1.2 > best(costs, more - 0.002, b, method)
    serial = CostModel(base.target, base.draft, False, target_alone=base.target.scaled(0.75))
    assert breakeven_acceptance(ray_pair, 1, 1.2)[0] < breakeven_acceptance(serial, 1, 1.2)[0]
    assert breakeven_acceptance(_costs(0.2), 1, 1.0, "sd") is None
    # a policy's describe() carries its costs (rounded to the microsecond); they come back whole
    back = CostModel.from_dict(SpeculationPolicy(ray_pair).describe()["costs"])
    assert back.parallel and back.target.tokens == ray_pair.target.tokens
    for got, want in [(back.target, ray_pair.target), (back.draft, ray_pair.draft),
                      (back.target_alone, ray_pair.target_alone)]:
        assert got.seconds == pytest.approx(want.seconds, abs=1e-6)


def test_policy_rescales_and_remeasures_on_drift():
    calls = []
    pol = SpeculationPolicy(_costs(0.002), remeasure=lambda: calls.append(1) or _costs(0.002), drift_rounds=5)
    for _ in range(4):
        pol.observe(rows=1, width=1, target_s=pol.costs.target(1))
    assert abs(pol.scale_target - 1.0) < 1e-9 and not calls
    for _ in range(30):  # a busy machine: every forward 3x slower
        pol.observe(rows=1, width=1, target_s=3 * pol.costs.target(1))
    assert calls and pol.remeasures == len(calls)
    # a drift that re-measuring does not fix (the forwards stay 3x what is measured): the k-th measurement
    # waits for 5 x 2^k off rounds (each stalls the batch), so the gaps between them double
    at = []
    pol = SpeculationPolicy(_costs(0.002), remeasure=lambda: at.append(n) or _costs(0.002), drift_rounds=5)
    for n in range(200):
        pol.observe(rows=1, width=1, target_s=3 * pol.costs.target(1))
    gaps = [b - a for a, b in zip(at, at[1:])]
    assert len(at) == 5 and all(b > 1.6 * a for a, b in zip(gaps, gaps[1:])), at  # 7, 20, 43, 86, 169


def test_policy_scales_rounds_without_drafting_by_their_own_costs():
    """On Ray's CPU pairs a round without drafting runs on the draft's threads too (``target_alone``, here
    half the cost): such rounds at their measured speed must not make drafting rounds look cheaper."""
    base = _costs(0.002)
    costs = CostModel(base.target, base.draft, parallel=True, target_alone=base.target.scaled(0.5))
    pol = SpeculationPolicy(costs, max_gamma=4)
    for _ in range(20):
        pol.observe(rows=8, width=1, target_s=costs.target_alone(8))  # alone rounds, as measured
    assert abs(pol.scale_target - 1.0) < 1e-9
    for _ in range(20):
        pol.observe(rows=8, width=3, target_s=costs.target(24), draft_rows=8, draft_steps=2,
                    draft_s=2 * costs.draft(8))  # drafting rounds, as measured
    assert abs(pol.scale_target - 1.0) < 1e-9


def test_policy_keeps_plain_and_drafting_rounds_on_separate_scales():
    """Plain rounds running faster than measured (0.6x) must not make drafting rounds look cheaper: with one
    scale for both, 0.6x plain rounds predicted drafting at 0.6x too and the policy drafted where it lost."""
    base = _costs(0.002)
    costs = CostModel(base.target, base.draft, parallel=True, target_alone=base.target.scaled(0.9))
    pol = SpeculationPolicy(costs, max_gamma=4)
    seqs = [SeqView("pearl", accepted=50, verified=100)] * 2
    for _ in range(40):
        pol.observe(rows=2, width=1, target_s=0.6 * costs.target_alone(2))
    assert abs(pol.scale_alone - 0.6) < 0.01 and abs(pol.scale_target - 1.0) < 1e-9
    plain = pol.rate(seqs, 0)
    assert abs(plain / (2 / (0.6 * costs.target_alone(2))) - 1) < 1e-3
    for _ in range(40):  # drafting rounds 1.5x what was measured
        pol.observe(rows=2, width=3, target_s=1.5 * costs.target(6), draft_rows=2, draft_steps=2,
                    draft_s=2 * costs.draft(2))
    assert abs(pol.scale_target - 1.5) < 0.01 and abs(pol.scale_alone - 0.6) < 0.01
    assert pol.rate(seqs, 2) < pol.rate(seqs, 0)


def test_engine_policy_is_the_default_and_explicit_gamma_is_fixed(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"])
    assert eng.config.adaptive and eng.measured["policy"]["costs"]["target"]["tokens"]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    out = eng.generate([PROMPTS[0]], params)[0]
    assert {t.window for t in out.stats.round_timings} <= set(range(0, 9))
    fixed = eng.generate([PROMPTS[0]], params, gamma=2)[0]
    assert {t.window for t in fixed.stats.round_timings} <= {0, 2} and fixed.token_ids == out.token_ids


def test_as_batched_wraps_any_causal_lm():
    lm = as_batched(TabularLM(6, seed=0))
    assert isinstance(lm, PerSlotLM)
    out = lm.forward({0: ([1, 2], 1), 3: ([4], 1)})
    assert out[0].shape == (1, 6) and lm.cache_len(3) == 1
    lm.release(3)
    assert lm.cache_len(3) == 0 and len(lm.pool) == 1


def test_request_options_carry_the_policy_flag():
    cfg = EngineConfig()
    assert cfg.round_options("pearl", 8, True, adaptive=True).adaptive
    assert not cfg.round_options("ar", 8, True, adaptive=True).adaptive
    req = Request((1, 2), SamplingParams(), "sd", cfg.round_options("sd", 4, True), 0)
    assert not req.rounds.adaptive


# -- the tensor-parallel leader's batched op ------------------------------------------------------------------
def _tp_rank(rank: int, path: str, init: str, out: str) -> None:
    """One rank of a 2-process group over gloo (each holds the whole tiny model: this checks the op
    protocol, not AutoTP's sharding, which tests/test_tensor_parallel.py covers)."""
    import torch.distributed as dist

    from pearl_ray.modeling.tp import TPBatchedLeader, TPGroup, follow

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    group = TPGroup(rank, 2, torch.device("cpu"))
    if rank == 1:
        status = follow(HFCausalLM(model), group)
        _leave_group(dist, f"{out}.rank1", status)
    rng = random.Random(4)
    scripts = [_script(rng, n) for n in (6, 2, 9)]
    lead = TPBatchedLeader(BatchedHFCausalLM(model), group)
    want, got = _replay(lambda: HFCausalLM(model), lead, scripts, rng)
    group.send_op(4)  # OP_STOP
    worst = max((a - b).abs().max().item() for w, g in zip(want, got) for a, b in zip(w, g))
    Path(out).write_text(f"{worst} {sum(map(len, got))} {sum(map(len, want))}")
    _leave_group(dist, f"{out}.rank0", "led")


def _leave_group(dist, marker: str, status: str) -> None:
    """Tear the gloo group down in step, record that this rank got that far, and leave without the
    interpreter's teardown: gloo's threads can abort there ("terminate called without an active exception",
    1 run in ~30 on 2 cores), after the work this test checks is done."""
    import os

    dist.barrier()
    dist.destroy_process_group()
    Path(marker).write_text(status)
    os._exit(0)


def test_tensor_parallel_leader_carries_the_batched_forward_in_one_op(tiny_pair, tmp_path):
    import torch.multiprocessing as mp

    from pearl_ray.modeling.tp import decode_feeds, encode_feeds

    feeds = {3: ([5, 6, 7], 2), 0: ([9], 1)}
    assert decode_feeds(encode_feeds(feeds)) == feeds
    out = tmp_path / "result"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_tp_rank, args=(r, tiny_pair["target"], f"file://{tmp_path}/store", str(out)))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert Path(f"{out}.rank0").read_text() == "led" and Path(f"{out}.rank1").read_text() == "stopped"
    worst, n_got, n_want = out.read_text().split()
    assert float(worst) < 1e-5 and n_got == n_want


# -- schedules: plain, SD in turn, PEARL at once -------------------------------------------------------------
class _SchedulePolicy(_ScriptedPolicy):
    """(schedule, window) pairs from a fixed script, one per round: forced switches mid-request."""

    def decide(self, views, prompt_tokens=0):
        schedule, w = self.windows[len(self.chosen) % len(self.windows)]
        self.chosen.append((schedule, w))
        self.views.append(views)
        return schedule, w


SWITCHES = [("once", 3), ("turn", 2), ("plain", 0), ("once", 4), ("once", 1), ("turn", 3), ("turn", 1),
            ("plain", 0), ("once", 2)]


def test_policy_picks_the_schedule_from_its_costs():
    """In turn each side has the whole device; at once each has its share (the ``split`` costs). Where the
    sides slow each other down (split target 2x) turn wins; where the split costs are close to the whole
    ones, once wins; a forced schedule holds for drafting rounds; each schedule keeps its own scales."""
    whole = _costs(0.004)
    good = [SeqView("pearl", accepted=80, verified=100)]
    contended = CostModel(whole.target, whole.draft, split=CostModel(whole.target.scaled(2.0),
                                                                       whole.draft.scaled(2.0), parallel=True))
    schedule, w = SpeculationPolicy(contended, max_gamma=8).decide(good)
    assert (schedule, w > 0) == ("turn", True)
    cheap = CostModel(whole.target, whole.draft, split=CostModel(whole.target.scaled(1.05),
                                                                   whole.draft.scaled(1.05), parallel=True))
    pol = SpeculationPolicy(cheap, max_gamma=8)
    schedule, w = pol.decide(good)
    assert (schedule, w > 0) == ("once", True) and pol.describe()["schedules"] == ["turn", "once"]
    slower = CostModel(whole.target, whole.draft, split=CostModel(whole.target.scaled(1.5), whole.draft.scaled(1.5),
                                                                    parallel=True))
    assert SpeculationPolicy(slower, max_gamma=8).decide(good)[0] == "turn"
    assert SpeculationPolicy(slower, max_gamma=8, schedule="once").decide(good)[0] == "once"  # forced
    # forced or not, a schedule that loses to plain decoding is not taken: the target decodes alone
    assert SpeculationPolicy(contended, max_gamma=8, schedule="once").decide(good) == ("plain", 0)
    assert SpeculationPolicy(cheap, max_gamma=8).decide([SeqView("pearl", accepted=2, verified=100)]) == ("plain", 0)
    with pytest.raises(ValueError):
        SpeculationPolicy(whole, schedule="once")  # no split costs: it cannot run the sides at once
    for _ in range(40):  # rounds at once run 1.5x slower than measured: only that schedule's scales move
        pol.observe(rows=1, width=5, target_s=1.5 * cheap.split.target(5), draft_rows=1, draft_steps=4,
                    draft_s=4 * cheap.split.draft(1), schedule="once")
    assert abs(pol.scales["once"][0] - 1.5) < 0.01 and pol.scales["turn"] == [1.0, 1.0]
    assert pol.decide(good)[0] == "turn"


def test_prompt_tokens_in_a_round_are_priced_as_its_fixed_cost():
    """A round that carries prompt chunks pays their forwards on both sides whatever its window; more tokens
    per round amortise that, so a window that loses to plain decoding in a decoding round wins in a round
    with 256 prompt tokens, and the predicted rates count the chunk's cost."""
    pol = SpeculationPolicy(_costs(0.010), max_gamma=8, probe_every=0)
    seqs = [SeqView("pearl", accepted=55, verified=100)] * 4
    assert pol.decide(seqs) == ("plain", 0)
    schedule, window = pol.decide(seqs, prompt_tokens=256)
    assert schedule == "turn" and window >= 2
    chunk = pol.prompt_s(256)
    assert chunk > _costs(0.010).target(256) and pol.prompt_s(0) == 0.0
    assert abs(1 / pol.rate(seqs[:1], 0, prompt=256) - (_costs(0.010).target(1) + chunk)) < 1e-9


def test_plain_rounds_are_priced_and_scaled_with_the_whole_device():
    """Where drafting rounds may run at once (split costs), a plain round still has the whole device: it is
    predicted and rescaled on the whole-device costs, never the split ones. Pricing it at the split target's
    (here 2x) cost made plain decoding look slow, and rounds at their real speed drifted the scale until the
    policy re-measured in the middle of requests (a 7x slower call on the default pair)."""
    whole = _costs(0.004)
    costs = CostModel(whole.target, whole.draft, split=CostModel(whole.target.scaled(2.0), whole.draft.scaled(2.0),
                                                                   parallel=True))
    calls = []
    pol = SpeculationPolicy(costs, max_gamma=8, drift_rounds=5, remeasure=lambda: calls.append(1) or costs)
    seqs = [SeqView("pearl", accepted=50, verified=100)]
    assert abs(pol.rate(seqs, 0) - 1 / whole.target(1)) < 1e-9
    for _ in range(40):  # plain rounds at the whole device's measured speed
        pol.observe(rows=1, width=1, target_s=whole.target(1))
    assert not calls and abs(pol.scale_alone - 1.0) < 1e-9 and pol.scales["once"] == [1.0, 1.0]


def test_forced_schedule_switches_mid_request_stay_lossless(tiny_pair):
    """A request may change schedule every round (plain, SD in turn, PEARL at once on the draft's thread):
    greedy tokens still equal target-only decoding's, for single requests and a batch of 8 through 3 slots,
    and each round's schedule is counted in the request's stats."""
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], max_num_seqs=3, num_threads=2)
    assert eng.backend.concurrent is not None and eng.backend.loop.split_threads == 1
    params = SamplingParams(max_new_tokens=21, ignore_eos=True)
    want = [eng.generate([p], params, method="ar")[0].token_ids for p in PROMPTS]
    eng.backend.loop.policy = policy = _SchedulePolicy(SWITCHES)
    outs = eng.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == want
    stats = [o.stats for o in outs]
    assert all(s.plain_rounds + s.turn_rounds + s.once_rounds == s.rounds for s in stats)
    assert sum(s.turn_rounds for s in stats) and sum(s.once_rounds for s in stats)
    assert all(s.draft_failures == 0 for s in stats)
    assert {sch for sch, _ in policy.chosen} == {"plain", "turn", "once"}
    # one request alone, switching each round, decides the same
    eng.backend.loop.policy = _SchedulePolicy(SWITCHES[3:] + SWITCHES[:3])
    assert eng.generate([PROMPTS[2]], params)[0].token_ids == want[2]


def test_sd_in_turn_verifies_each_window_in_the_round_that_drafted_it(tiny_pair):
    """With the sides in turn, vanilla SD drafts and verifies a window in one round; in rounds labelled "at
    once" it takes two (a draft-only round, then a verify-only one). Both run here on the same thread, so the
    only difference is the fusing: the coins are drawn in the same order and seeded sampled requests give the
    same tokens, in about half the rounds; greedy ones equal target-only decoding."""
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], schedule="turn")
    loop = eng.backend.loop
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=24, ignore_eos=True)
    accepted = 0
    for params in (sampled, greedy):
        for p in PROMPTS[:3]:
            loop.schedule = "turn"
            fused = eng.generate([p], params, method="sd", gamma=3)[0]
            loop.schedule = "once"  # no draft thread in this engine: the same in-turn phase, two rounds a window
            split = eng.generate([p], params, method="sd", gamma=3)[0]
            assert fused.token_ids == split.token_ids
            assert fused.stats.turn_rounds == fused.stats.rounds
            accepted += fused.stats.accepted_tokens
            assert fused.stats.rounds * 1.5 < split.stats.rounds
            assert all(t.num_candidates == 3 for t in fused.stats.round_timings)  # each round verified its window
            if params is greedy:
                assert fused.token_ids == eng.generate([p], params, method="ar")[0].token_ids
    assert accepted > 0


def test_schedule_option_builds_what_it_names(tiny_pair):
    """"turn" never starts the draft's thread; "once" forces every drafting round at once; "auto" measures
    the sides at once too (split costs) and a one-thread engine cannot split, so "once" is refused there."""
    from pearl_ray.errors import InvalidParameterError

    turn = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], schedule="turn")
    assert turn.backend.concurrent is None and turn.measured["policy"]["schedules"] == ["turn"]
    auto = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], num_threads=2)
    assert auto.measured["policy"]["schedules"] == ["turn", "once"]
    assert auto.measured["policy"]["costs"]["split"]["parallel"] is True
    once = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], schedule="once", num_threads=2)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = once.generate([PROMPTS[0]], params, method="ar")[0].token_ids
    fixed = once.generate([PROMPTS[0]], params, gamma=3)[0]
    assert fixed.token_ids == want and fixed.stats.turn_rounds == 0 and fixed.stats.once_rounds > 0
    threads = torch.get_num_threads()
    try:
        with pytest.raises(InvalidParameterError):
            PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], schedule="once", num_threads=1)
    finally:
        torch.set_num_threads(threads)  # the engine set this process's count


def test_a_round_at_once_that_times_out_never_races_the_next_ones(tiny_pair):
    """The draft's thread outlives a round's wait (a stall): its requests go on target-only and stay lossless,
    and nothing else touches the shared draft side (slot releases, new requests' starts, rounds in turn) until
    that thread is done; then new requests draft again."""
    import threading

    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], schedule="once", num_threads=2)
    phase = eng.backend.concurrent
    phase.timeout_s = 0.3
    side, inside, lock = phase.side, {"now": 0, "most": 0, "stalls": 1}, threading.Lock()

    def watched(fn):
        def call(*args, **kwargs):
            with lock:
                inside["now"] += 1
                inside["most"] = max(inside["most"], inside["now"])
                stall = fn.__name__ == "draft" and inside["stalls"] > 0
                inside["stalls"] -= stall
            try:
                if stall:
                    time.sleep(1.5)
                return fn(*args, **kwargs)
            finally:
                with lock:
                    inside["now"] -= 1
        return call

    for name in ("draft", "start", "release"):
        setattr(side, name, watched(getattr(side, name)))
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in eng.generate(PROMPTS[:3], params, method="ar")]
    outs = eng.generate(PROMPTS[:3], params, gamma=3)
    assert [o.token_ids for o in outs] == want and all(o.stats.draft_failures for o in outs)
    time.sleep(1.5)  # the stalled round ends
    again = eng.generate(PROMPTS[:3], params, gamma=3)
    assert [o.token_ids for o in again] == want
    assert all(o.stats.draft_failures == 0 and o.stats.once_rounds > 0 for o in again)
    assert inside["most"] == 1
