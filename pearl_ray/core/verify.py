"""Speculative-sampling verification: accept, recover, bonus. Pure torch.

Names follow the papers (Leviathan et al. arXiv 2211.17192; Chen et al. arXiv 2302.01318):
**p = target** probabilities, **q = draft** probabilities, both already warped by ``sampling.warp_probs``.
Vocabulary (as in vLLM's rejection sampler):
- *accepted* tokens: candidates that pass the test ``r * q(x) < p(x)`` (probability min(1, p/q));
- *recovered* token: drawn from norm(max(p - q, 0)) at the first rejection; later candidates are dropped;
- *bonus* token: drawn from p at the row after the last candidate when every candidate was accepted and
  that row exists (vanilla SD, fallback rounds). PEARL's normal rounds have no bonus row.

A verification returns ``(num_accepted, extra_token_id)`` where ``extra_token_id`` is the recovered token,
the bonus token, or ``NO_TOKEN`` (-1).

Randomness: a verification of ``n`` candidates draws ``n + 1`` uniforms from the request's generator, whatever
it decides: coin ``i`` for candidate ``i``, then one uniform for the recovered or bonus draw (by inverse CDF).
A seeded request thus consumes a fixed amount of its stream per round. This module is the per-request
reference; ``core.decide`` makes the same decisions for a whole round at once on the logits' device, with the
same uniforms, and is tested against it.
"""

from __future__ import annotations

import torch

from .sampling import inverse_cdf, uniforms

NO_TOKEN = -1


def residual_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)) for rows ``[vocab]``; falls back to p if the residual has no mass (round-off only)."""
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    if total <= 0:
        return p
    return residual / total


def verify_sampled(
    target_probs: torch.Tensor,  # [n_rows, vocab], n_rows >= len(candidate_ids); row i is p for candidate i
    candidate_ids: list[int],  # [n]
    draft_probs: torch.Tensor | None,  # [n, vocab] q rows, or None for a greedy draft (q one-hot at the id)
    generator: torch.Generator,
    allow_bonus: bool,
) -> tuple[int, int]:
    """Speculative sampling over ``candidate_ids`` in order: coin ``i`` decides candidate ``i``.

    With ``allow_bonus`` and every candidate accepted, a bonus token is drawn from
    ``target_probs[len(candidate_ids)]``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> verify_sampled(p, [1], None, g, allow_bonus=True)   # p(1) = 1: accepted, then bonus 0
        (1, 0)
    """
    n = len(candidate_ids)
    u = uniforms(generator, n + 1).tolist()  # n coins, then the recovered or bonus draw
    for i, x in enumerate(candidate_ids):
        p_row = target_probs[i]
        if draft_probs is None:
            q_x = 1.0
            q_row = torch.zeros_like(p_row)
            q_row[x] = 1.0
        else:
            q_row = draft_probs[i]
            q_x = float(q_row[x])
        if u[i] * q_x < float(p_row[x]):
            continue
        return i, int(inverse_cdf(residual_probs(p_row, q_row), torch.tensor(u[n], dtype=torch.float64)))
    if allow_bonus:
        return n, int(inverse_cdf(target_probs[n], torch.tensor(u[n], dtype=torch.float64)))
    return n, NO_TOKEN


def verify_greedy(
    target_argmax_ids: list[int],  # [n_rows] argmax of p per row
    candidate_ids: list[int],  # [n]
    allow_bonus: bool,
) -> tuple[int, int]:
    """Greedy special case: accept while the candidate equals the target argmax; no coins.

    Example:
        >>> verify_greedy([5, 6, 9], [5, 7], allow_bonus=True)   # 5 accepted, 7 rejected -> recovered 6
        (1, 6)
        >>> verify_greedy([5, 6, 9], [5, 6], allow_bonus=True)   # all accepted, bonus from row 2
        (2, 9)
    """
    for i, x in enumerate(candidate_ids):
        if x != target_argmax_ids[i]:
            return i, target_argmax_ids[i]
    n = len(candidate_ids)
    if allow_bonus:
        return n, target_argmax_ids[n]
    return n, NO_TOKEN
