"""Log-probabilities of committed tokens, taken from the target's verify rows. Pure torch.

The target's forward in a round returns one row of logits per verified position: row ``i`` is the
distribution of the token at ``committed_len_before + i``. Whatever the round decides (accepted, recovered
or bonus tokens), the ``i``-th token it appends was scored by row ``i``; so a request that asks for
log-probabilities gets them from the rows the target computed anyway, with no extra forward. The values are
the model's raw distribution: ``log_softmax`` of the logits in fp32, before temperature, top-k or top-p (as
vLLM reports them by default). Requests that do not ask compute nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One committed token's log-probability and the ``n`` most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the most likely tokens, most likely first."""


class TokenIds(list):
    """Token ids (a plain ``list[int]`` to every reader) with, where the request asked for them, each id's
    ``TokenLogprob`` in ``logprobs`` (same length); ``logprobs`` is None otherwise."""

    def __init__(self, ids=(), logprobs: list[TokenLogprob] | None = None):
        super().__init__(ids)
        self.logprobs = logprobs

    def __reduce__(self):  # pickles (Ray) as ids + logprobs
        return (TokenIds, (list(self), self.logprobs))


def logprob_rows(logits: torch.Tensor) -> torch.Tensor:
    """Raw logits ``[rows, vocab]`` -> log-probabilities ``[rows, vocab]`` in fp32, on the logits' device
    (``token_logprobs`` copies only the picked and top entries to the host)."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_logprobs(rows: torch.Tensor, token_ids: list[int], n: int) -> list[TokenLogprob]:
    """Score ``token_ids[i]`` by row ``i`` of ``rows`` (``[>= len(token_ids), vocab]`` log-probabilities),
    with the ``n`` most likely tokens of each row.

    Example:
        >>> rows = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
        >>> [(t.token_id, round(t.logprob, 3), len(t.top)) for t in token_logprobs(rows, [1, 2], 2)]
        [(1, -1.204, 2), (2, -0.223, 2)]
    """
    if len(token_ids) > rows.shape[0]:
        raise ValueError(f"{len(token_ids)} tokens but only {rows.shape[0]} rows to score them")
    if not token_ids:
        return []
    k = min(n, rows.shape[1])
    at = torch.arange(len(token_ids), device=rows.device)
    picked = rows[at, torch.tensor(token_ids, device=rows.device)].tolist()
    if k:
        top_vals, top_ids = rows[: len(token_ids)].topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), top_vals.tolist())]
    else:
        tops = [()] * len(token_ids)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids, picked, tops)]
