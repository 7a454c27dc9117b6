"""Logits -> probabilities (temperature, top-k, top-p) and sampling from an explicit generator.

Owns the *warp*: the one transformation applied identically to draft and target logits, so that
"lossless" means lossless with respect to the warped target distribution. Pure torch; knows nothing of
models, Ray or tokenizers. Never touches the global RNG: every draw takes a ``torch.Generator``.
"""

from __future__ import annotations

import torch


MIN_TEMPERATURE = 1e-30
"""Temperatures below this are computed as this (the same point mass in float32)."""


def warp_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Turn raw logits ``[..., vocab]`` into normalised fp32 probabilities ``[..., vocab]``.

    ``temperature == 0`` means greedy: a one-hot row at the argmax (ties go to the lowest id, as
    ``torch.argmax``). ``top_k == 0`` and ``top_p == 1.0`` disable those filters. Tokens removed by a
    filter get probability exactly 0, so they can never be accepted or sampled.

    Example:
        >>> warp_probs(torch.tensor([0.0, 1.0, 2.0]), temperature=0.0).tolist()
        [0.0, 0.0, 1.0]
        >>> warp_probs(torch.tensor([0.0, 0.0, 10.0]), temperature=1.0, top_k=1).tolist()
        [0.0, 0.0, 1.0]
    """
    logits = logits.float()
    if temperature == 0.0:
        probs = torch.zeros_like(logits)
        return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    # Shift by the row's max before dividing: a tiny temperature (1e-39) then sends the other logits to
    # -inf, never the top one to +inf (which would make softmax NaN); below MIN_TEMPERATURE the float32
    # divisor itself would underflow, and the law is already a point mass on the argmax (ties shared).
    top = logits.max(dim=-1, keepdim=True).values
    logits = (logits - top) / max(float(temperature), MIN_TEMPERATURE)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p. The top token always stays,
        # whatever top_p: a top_p below float32's smallest value compares as 0, and the mass before the top
        # token (0) would then reach it, drop every token and leave a NaN row.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw from each row of ``probs`` (``[..., vocab]``, non-negative, any positive total) with the uniform
    ``u`` (``[...]`` in [0, 1)): the first id whose cumulative mass exceeds ``u`` times the row's total.

    The cumulative sum runs in float64. An id of probability 0 is never returned: it adds nothing to the
    sum, so the first id past ``u * total`` always has mass (``u * total`` is kept strictly below the total,
    which rounding could otherwise reach). A row that is not a distribution (NaN) gives some id in range;
    callers check such rows themselves.

    Example:
        >>> inverse_cdf(torch.tensor([0.25, 0.0, 0.75]), torch.tensor(0.3, dtype=torch.float64)).item()
        2
    """
    cdf = torch.cumsum(probs.double(), dim=-1)
    total = cdf[..., -1:]
    x = torch.minimum(u.double().unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return ids.clamp_(max=probs.shape[-1] - 1)


def uniforms(generator: torch.Generator, n: int) -> torch.Tensor:
    """``n`` float64 uniforms in [0, 1) from ``generator`` (on its device: the host for request generators)."""
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a normalised fp32 row ``[vocab]`` with one uniform from ``generator``
    (``inverse_cdf``; the batched decisions draw the same way, so both give the same ids)."""
    return int(inverse_cdf(probs, uniforms(generator, 1)[0]))


def make_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one request and one purpose (``stream``: 0 = decider coins and target draws, 1 = draft).

    Seeds derive from (seed, stream) by a fixed mixing rule, so no two purposes share a stream and
    nothing depends on the global RNG.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + 7919 * int(stream)) % (2**63 - 1))
    return gen
