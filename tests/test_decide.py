"""The batched decisions (``core.decide``) against the per-request host reference (``sampling.warp_probs``,
``verify.verify_greedy``, ``verify.verify_sampled``).

Greedy decisions must equal the reference exactly. Sampled ones draw the same uniforms from the same
generators, so on CPU they give the reference's ids too (a float rounding difference could only flip a draw
whose uniform falls within an ulp of a cumulative boundary: about 1e-12 per draw here, and the seeds are fixed).
Their law is checked on its own by chi-square tests: each fails at p < 1e-4, a false-alarm rate of 1e-4 per
test, 3e-4 for the file's three; a fourth test shows the check has power.
"""

import random

import pytest
import torch
from scipy.stats import chisquare

from pearl_ray.core.decide import gather_rows, rows_not_finite, verify_greedy_rows, verify_sampled_rows, warp_rows
from pearl_ray.core.sampling import inverse_cdf, make_generator, uniforms, warp_probs
from pearl_ray.core.verify import NO_TOKEN, residual_probs, verify_greedy, verify_sampled

ALPHA = 1e-4


# -- warp -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [50, 3000])  # 3000 > TOP_P_PREFIX: the CPU shortcut and its full-sort fallback
def test_warp_rows_equals_the_reference_row_by_row(vocab):
    g = torch.Generator().manual_seed(vocab)
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9), (1.3, 20, 0.8), (1e-39, 0, 1.0),
                (1.0, 0, 0.999), (2.0, vocab, 0.5), (0.0, 3, 0.5), (1.0, 0, 1e-46)]
    scales = [0.5, 3.0, 8.0, 0.05]  # 0.05: a flat row whose nucleus is most of the vocabulary
    logits = torch.cat([torch.randn(len(settings), vocab, generator=g) * s for s in scales])
    settings = settings * len(scales)
    temps, ks, ps = zip(*settings)
    got = warp_rows(logits, temps, ks, ps)
    for r, (t, k, p) in enumerate(settings):
        want = warp_probs(logits[r], t, k, p)
        assert torch.equal(got[r] > 0, want > 0), f"row {r} {settings[r]}: a different support"
        torch.testing.assert_close(got[r], want, atol=1e-6, rtol=1e-5)


def test_warp_rows_checks_its_settings():
    with pytest.raises(ValueError, match="settings"):
        warp_rows(torch.zeros(2, 4), [1.0], [0, 0], [1.0, 1.0])


def test_gather_rows_views_one_buffer_and_concatenates_others():
    buf = torch.arange(20.0).reshape(5, 4)
    rows, first = gather_rows([buf[3:5], buf[0:2]])
    assert rows.data_ptr() == buf.data_ptr() and first == [3, 0] and rows.shape == (5, 4)
    a, b = torch.ones(2, 4), torch.zeros(1, 4)
    rows, first = gather_rows([a, b])
    assert first == [0, 2] and torch.equal(rows, torch.cat([a, b]))


# -- inverse CDF ------------------------------------------------------------------------------------------
def test_inverse_cdf_never_draws_a_token_of_probability_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]] * 4)
    top = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    u = torch.stack([torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64),
                     torch.tensor(0.49999, dtype=torch.float64), top])
    assert inverse_cdf(probs, u).tolist() == [1, 3, 1, 3]
    # unnormalised rows: u scales the row's total
    assert inverse_cdf(torch.tensor([2.0, 0.0, 6.0]), torch.tensor(0.3, dtype=torch.float64)).item() == 2


# -- greedy -----------------------------------------------------------------------------------------------
def _random_rounds(rng: random.Random, vocab: int, num: int):
    """Random requests of a round: candidates, whether a bonus row exists, and their rows' count."""
    out = []
    for _ in range(num):
        n = rng.randint(0, 5)
        bonus = n == 0 or rng.random() < 0.5
        out.append(([rng.randrange(vocab) for _ in range(n)], bonus, n + int(bonus)))
    return out


def test_greedy_rows_equal_the_reference():
    rng = random.Random(0)
    vocab = 7  # a small vocabulary: candidates often match the argmax, so prefixes of every length occur
    for trial in range(30):
        reqs = _random_rounds(rng, vocab, rng.randint(1, 9))
        argmax = [rng.randrange(vocab) for _ in range(sum(r[2] for r in reqs))]
        for i, (cand, _, _) in enumerate(reqs):  # make accepted prefixes likely
            cut = rng.randint(0, len(cand))
            first = sum(r[2] for r in reqs[:i])
            argmax[first: first + cut] = cand[:cut]
        firsts = [sum(r[2] for r in reqs[:i]) for i in range(len(reqs))]
        got = verify_greedy_rows(torch.tensor(argmax), [r[0] for r in reqs], firsts, [r[1] for r in reqs]).tolist()
        want = [list(verify_greedy(argmax[f: f + rows], cand, bonus)) for (cand, bonus, rows), f in zip(reqs, firsts)]
        assert got == want, f"trial {trial}"


def test_greedy_tokens_through_the_tiny_pair_equal_the_reference(tiny_pair):
    """The batched loop (greedy PEARL and SD, 4 requests at once) gives the host reference decoders' tokens."""
    from pearl_ray import PearlEngine, SamplingParams
    from pearl_ray.core.baselines import generate_ar
    from pearl_ray.core.stopping import StopRule

    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=4)
    assert eng.backend.target_lm.to_host is False  # the loop's decisions read the logits where they are
    prompts = [[5, 9, 14, 3], [7], [20, 21, 22, 23, 24], [40, 41], [8, 8, 8]]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = [generate_ar(eng.backend.target_model, p, StopRule(16, (), True), 0, 0.0)[0] for p in prompts]
    for method in ("pearl", "sd"):
        assert [o.token_ids for o in eng.generate(prompts, params, method=method)] == want


# -- sampled ----------------------------------------------------------------------------------------------
def _sampled_case(g: torch.Generator, vocab: int, n: int, with_q: bool, bonus: bool):
    p = torch.softmax(torch.randn(n + int(bonus), vocab, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(n, vocab, generator=g) * 2, -1) if with_q else None
    if n and with_q:
        p[0, :2] = 0.0  # tokens cut from p (as top-k / top-p do)
        p[0] /= p[0].sum()
    cand = [int(torch.multinomial(q[i], 1, generator=g)) if with_q else int(torch.randint(vocab, (), generator=g))
            for i in range(n)]
    return p, q, cand


def test_sampled_rows_equal_the_reference_with_the_same_generators():
    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    vocab = 11
    reqs = []
    for i in range(200):
        n, with_q, bonus = rng.randint(0, 4), rng.random() < 0.7, rng.random() < 0.5
        bonus = bonus or n == 0
        reqs.append((*_sampled_case(g, vocab, n, with_q, bonus), bonus, 1000 + i))
    p_all = torch.cat([r[0] for r in reqs])
    firsts = [sum(r[0].shape[0] for r in reqs[:i]) for i in range(len(reqs))]
    coins = [uniforms(make_generator(seed, 0), len(cand) + 1) for _, _, cand, _, seed in reqs]
    got = verify_sampled_rows(p_all, [r[2] for r in reqs], firsts, [r[3] for r in reqs], [r[1] for r in reqs],
                              coins).tolist()
    want = [list(verify_sampled(p, cand, q, make_generator(seed, 0), bonus)) for p, q, cand, bonus, seed in reqs]
    assert got == want
    kinds = {(a < len(r[2]), e == NO_TOKEN) for (a, e), r in zip(got, reqs)}
    assert kinds == {(True, False), (False, False), (False, True)}, "rejections, bonus tokens and plain accepts"


def test_a_seeded_request_decides_the_same_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(2)
    vocab = 9
    cases = [_sampled_case(g, vocab, n, n % 2 == 0, True) for n in (0, 1, 2, 3, 4, 3, 2, 1)]
    p_all = torch.cat([c[0] for c in cases])
    firsts = [sum(c[0].shape[0] for c in cases[:i]) for i in range(len(cases))]

    def coins(i):
        return uniforms(make_generator(50 + i, 0), len(cases[i][2]) + 1)

    batched = verify_sampled_rows(p_all, [c[2] for c in cases], firsts, [True] * len(cases), [c[1] for c in cases],
                                  [coins(i) for i in range(len(cases))]).tolist()
    for i, (p, q, cand) in enumerate(cases):
        alone = verify_sampled_rows(p, [cand], [0], [True], [q], [coins(i)]).tolist()
        assert alone == [batched[i]]


def _exact_law(p: torch.Tensor, q: torch.Tensor, cand: list[int], bonus: bool) -> dict:
    """P(accepted count, extra token) of speculative sampling with fixed candidates (the reference's law):
    accept candidate i with min(1, p_i(x)/q_i(x)); at the first rejection draw from norm(max(p_i - q_i, 0)),
    after all accepted from the bonus row."""
    law, reach = {}, 1.0
    for i, x in enumerate(cand):
        acc = min(1.0, float(p[i, x]) / float(q[i, x]))
        for t, r in enumerate(residual_probs(p[i], q[i]).tolist()):
            if r > 0:
                law[(i, t)] = law.get((i, t), 0.0) + reach * (1 - acc) * r
        reach *= acc
    n = len(cand)
    for t, r in enumerate(p[n].tolist() if bonus else [1.0]):
        if r > 0:
            law[(n, t if bonus else NO_TOKEN)] = reach * r
    return law


def _chi_square(counts: dict, law: dict, n: int) -> float:
    assert set(counts) <= {k for k, v in law.items() if v > 0}, "outcomes of probability 0"
    obs, exp, small_obs, small_exp = [], [], 0, 0.0
    for cell, prob in law.items():
        if prob * n < 5:
            small_obs, small_exp = small_obs + counts.get(cell, 0), small_exp + prob * n
        else:
            obs.append(counts.get(cell, 0))
            exp.append(prob * n)
    if small_exp > 0:
        obs.append(small_obs)
        exp.append(small_exp)
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


N = 20000


def _batched_counts(p, q, cand, bonus, n=N):
    """``n`` requests with the same rows, each with its own seeded generator, decided in one batched call."""
    rows = p.shape[0]
    p_all = p.repeat(n, 1)
    got = verify_sampled_rows(p_all, [cand] * n, [i * rows for i in range(n)], [bonus] * n, [q] * n,
                              [uniforms(make_generator(i, 0), len(cand) + 1) for i in range(n)]).tolist()
    counts = {}
    for a, e in got:
        counts[(a, e)] = counts.get((a, e), 0) + 1
    return counts


@pytest.mark.parametrize("bonus", [True, False])
def test_sampled_rows_follow_the_reference_law(bonus):
    g = torch.Generator().manual_seed(3)
    vocab = 6
    p = torch.softmax(torch.randn(3, vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, vocab, generator=g) * 1.5, -1)
    cand = [int(q[0].argmax()), int(q[1].argmax())]
    p[1, (cand[1] + 1) % vocab] = 0.0  # a token top-k / top-p would cut
    p[1] /= p[1].sum()
    law = _exact_law(p, q, cand, bonus)
    pvalue = _chi_square(_batched_counts(p, q, cand, bonus), law, N)
    assert pvalue > ALPHA, f"chi-square p = {pvalue:.2e} < {ALPHA} over {N} requests"


def test_the_first_committed_token_follows_p():
    """Candidates drawn from q, each request's own: the first committed token (accepted or recovered) is
    exactly p-distributed (speculative sampling is lossless), argmax draft rows (q one-hot) included."""
    g = torch.Generator().manual_seed(4)
    vocab = 8
    p = torch.softmax(torch.randn(2, vocab, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(1, vocab, generator=g) * 2, -1)
    cands = [[int(torch.multinomial(q[0], 1, generator=g))] for _ in range(N)]
    one_hot = [i % 3 == 0 for i in range(N)]  # every third request has an argmax draft: candidate 0 always
    for i in range(N):
        if one_hot[i]:
            cands[i] = [int(q[0].argmax())]
    got = verify_sampled_rows(p.repeat(N, 1), cands, [2 * i for i in range(N)], [True] * N,
                              [None if one_hot[i] else q for i in range(N)],
                              [uniforms(make_generator(7 + i, 0), 2) for i in range(N)]).tolist()
    first = [c[0] if a >= 1 else e for c, (a, e) in zip(cands, got)]
    counts = [first.count(t) for t in range(vocab)]
    expected = p[0].double() / p[0].double().sum() * N
    pvalue = float(chisquare(counts, (expected * sum(counts) / expected.sum()).tolist()).pvalue)
    assert pvalue > ALPHA, f"chi-square p = {pvalue:.2e} < {ALPHA} over {N} requests"


def test_the_law_check_has_power():
    """The same check rejects a wrong law: the draft's q in place of p at the bonus row."""
    g = torch.Generator().manual_seed(3)
    vocab = 6
    p = torch.softmax(torch.randn(3, vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, vocab, generator=g) * 1.5, -1)
    cand = [int(q[0].argmax()), int(q[1].argmax())]
    wrong = p.clone()
    wrong[2] = q[1]
    assert _chi_square(_batched_counts(p, q, cand, True), _exact_law(wrong, q, cand, True), N) < ALPHA


def test_rows_not_finite_counts_each_owners_bad_rows():
    probs = torch.ones(5, 3)
    probs[1, 2] = float("nan")
    probs[4, 0] = float("inf")
    assert rows_not_finite(probs, [0, 0, 1, 2, 2], 3).tolist() == [1, 0, 1]


def test_bad_layouts_raise():
    p = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="uniforms"):
        verify_sampled_rows(p, [[1]], [0], [True], [None], [torch.zeros(1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="draft rows"):
        verify_sampled_rows(p, [[1]], [0], [True], [torch.ones(2, 3) / 3], [torch.zeros(2, dtype=torch.float64)])


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
