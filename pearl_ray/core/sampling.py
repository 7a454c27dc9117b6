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


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a normalised fp32 row ``[vocab]`` using ``generator``."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def uniform(generator: torch.Generator) -> float:
    """One coin r ~ U[0, 1) from ``generator``."""
    return float(torch.rand((), generator=generator).item())


def make_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one request and one purpose (``stream``: 0 = decider coins and target draws, 1 = draft).

    Seeds derive from (seed, stream) by a fixed mixing rule, so no two purposes share a stream and
    nothing depends on the global RNG.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + 7919 * int(stream)) % (2**63 - 1))
    return gen
