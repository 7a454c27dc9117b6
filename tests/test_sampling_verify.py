"""Exact math of the warp and of speculative sampling (no sampling noise)."""

import pytest
import torch

from pearl_ray.core.sampling import make_generator, sample, warp_probs
from pearl_ray.core.verify import NO_TOKEN, residual_probs, verify_greedy, verify_sampled


def test_greedy_warp_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 5.0, 1.0]])
    probs = warp_probs(logits, 0.0)
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_top_k_and_top_p_zero_out_the_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (warp_probs(logits, 1.0, top_k=2) > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(warp_probs(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p = 0.8: 0.5 + 0.3 reaches 0.8, so only the first two stay
    assert (warp_probs(logits, 1.0, top_p=0.8) > 0).tolist() == [True, True, False, False]
    assert (warp_probs(logits, 1.0, top_p=0.81) > 0).tolist() == [True, True, True, False]
    assert (warp_probs(logits, 1.0, top_p=0.01) > 0).tolist() == [True, False, False, False]
    torch.testing.assert_close(warp_probs(logits, 1.0).sum(), torch.tensor(1.0))


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-46, 1e-44, 1e-30])
@pytest.mark.parametrize("temperature", [1e-300, 1e-39, 0.5, 2.0])
def test_extreme_top_p_keeps_the_most_likely_token(top_p, temperature):
    """A top_p below float32's smallest value compares as 0 against float32 masses; the top token stays, so the
    row is a point mass on it, never NaN (ties at the top: the first in sorted order)."""
    logits = torch.tensor([[0.3, 2.5, -1.0, 2.4], [9.0, -9.0, 0.0, 1.0]])
    probs = warp_probs(logits, temperature, top_k=0, top_p=top_p)
    assert torch.isfinite(probs).all()
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert sample(probs[0], make_generator(1, 0)) == 1


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(warp_probs(logits, 2.0), torch.softmax(logits / 2.0, -1))


def test_generators_are_explicit_and_reproducible():
    p = torch.full((10,), 0.1)
    a = [sample(p, make_generator(3, 0)) for _ in range(3)]
    b = [sample(p, make_generator(3, 0)) for _ in range(3)]
    assert a == b
    g1, g2 = make_generator(3, 0), make_generator(3, 1)
    assert [sample(p, g1) for _ in range(8)] != [sample(p, g2) for _ in range(8)]


@pytest.mark.parametrize("seed", range(20))
def test_accept_or_recover_yields_exactly_p(seed):
    g = torch.Generator().manual_seed(seed)
    vocab = 7
    p = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    if seed % 4 == 0:  # some zero-probability tokens on each side
        p[0] = 0
        q[1] = 0
        p, q = p / p.sum(), q / q.sum()
    accept = q * torch.clamp(p / torch.where(q > 0, q, torch.ones_like(q)), max=1.0)
    accept = torch.where(q > 0, accept, torch.zeros_like(accept))
    residual = residual_probs(p, q)
    torch.testing.assert_close(accept + (1 - accept.sum()) * residual, p, atol=1e-6, rtol=0)


def test_verify_sampled_accepts_when_p_equals_q_and_rejects_p_zero():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 5, generator=g), -1)
    n, extra = verify_sampled(p, [1, 2], p[:2].clone(), g, allow_bonus=False)
    assert (n, extra) == (2, NO_TOKEN)
    p2 = p.clone()
    p2[0, 4] = 0.0
    p2[0] /= p2[0].sum()
    for _ in range(50):  # a token with p = 0 is never accepted, whatever the coin
        n, extra = verify_sampled(p2, [4], None, g, allow_bonus=False)
        assert n == 0 and extra != 4


def test_verify_greedy_cases():
    assert verify_greedy([3, 4, 5], [3, 4], allow_bonus=True) == (2, 5)
    assert verify_greedy([3, 4, 5], [3, 9], allow_bonus=True) == (1, 4)
    assert verify_greedy([3, 4], [3, 4], allow_bonus=False) == (2, NO_TOKEN)
    assert verify_greedy([7], [], allow_bonus=True) == (0, 7)
