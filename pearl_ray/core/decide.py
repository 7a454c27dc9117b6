"""A round's decisions for all its requests at once, on the logits' device: the warp, greedy argmax, and
speculative accept / recover / bonus. Pure torch.

The per-request host code is the reference these functions are tested against: ``sampling.warp_probs`` for
``warp_rows``, ``verify.verify_greedy`` and ``verify.verify_sampled`` for ``verify_greedy_rows`` and
``verify_sampled_rows``. Names and the vocabulary (p = target, q = draft, accepted / recovered / bonus,
``NO_TOKEN``) are ``verify``'s.

Layout. The target's rows of a round are one tensor ``[R, vocab]``; request ``b`` owns the rows from
``first_rows[b]`` on: one per candidate, then its bonus row if it has one. Its candidates are given as a
Python list; here they become a padded ``[B, W]`` tensor (``W``: the most candidates of any request) with
per-request counts.

Randomness. Each request draws its uniforms from its own ``torch.Generator`` on the host, ``n + 1`` for
``n`` candidates whatever the outcome (``verify``'s rule), so a seeded request gets the same numbers alone and
in any batch. They go to the device in one tensor, and tokens are drawn by inverse CDF
(``sampling.inverse_cdf``), never ``torch.multinomial``, whose use of a generator depends on the device.

Host syncs. Nothing here copies to the host: each function returns device tensors (``[B, 2]``: accepted count
and extra token per request), and the caller brings a round's results back with one ``.tolist()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import MIN_TEMPERATURE, inverse_cdf
from .verify import NO_TOKEN

TOP_P_PREFIX = 1024
"""On CPU, top-p first looks at each row's ``TOP_P_PREFIX`` most likely tokens (a partial selection, far
cheaper than sorting the vocabulary); rows whose nucleus does not fit in them are sorted in full."""


def gather_rows(blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Blocks ``[k_i, vocab]`` -> one ``[R, vocab]`` tensor and the row where each block starts.

    When the blocks are row slices of one contiguous buffer (a batched forward returns its slots' logits
    that way) the result is a view of that buffer and nothing is copied; otherwise they are concatenated.

    Example:
        >>> buf = torch.arange(12.0).reshape(4, 3)
        >>> rows, first = gather_rows([buf[2:4], buf[0:1]])
        >>> first, rows.data_ptr() == buf.data_ptr()
        ([2, 0], True)
    """
    if not blocks:
        raise ValueError("no rows to gather")
    base = blocks[0]
    vocab = base.shape[-1]
    shared = all(b.dim() == 2 and b.is_contiguous() and b.dtype == base.dtype and b.device == base.device
                 and b.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for b in blocks)
    if shared:
        offsets = [b.storage_offset() for b in blocks]
        start = min(offsets)
        if all((o - start) % vocab == 0 for o in offsets):
            end = max(o + b.numel() for o, b in zip(offsets, blocks))
            rows = torch.as_strided(base, ((end - start) // vocab, vocab), (vocab, 1), start)
            return rows, [(o - start) // vocab for o in offsets]
    first, at = [], 0
    for b in blocks:
        first.append(at)
        at += b.shape[0]
    return torch.cat(list(blocks)), first


def _top_p_drop(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which entries of the rows ``x`` ([r, vocab] scaled logits) top-p drops: a token goes when the mass of
    the tokens before it (in descending order) already reaches the row's ``top_p``; the top token stays.
    As ``warp_probs``, with a shortcut on CPU (``TOP_P_PREFIX``)."""
    rows, vocab = x.shape
    limit = top_p.to(x.device)[:, None]
    if x.device.type == "cpu" and vocab > TOP_P_PREFIX:
        vals, idx = torch.topk(x, TOP_P_PREFIX, dim=-1)  # descending
        probs = torch.exp(vals - torch.logsumexp(x, dim=-1, keepdim=True))
        mass = torch.cumsum(probs, dim=-1)
        keep = (mass - probs) < limit
        keep[:, 0] = True
        drop = torch.ones_like(x, dtype=torch.bool).scatter_(-1, idx, ~keep)
        # every token past the prefix has at least the prefix's mass before it: dropped if that reaches top_p
        wide = (mass[:, -1:] < limit).squeeze(-1).nonzero().squeeze(-1).tolist()  # CPU: no device sync
        if wide:
            drop[wide] = _top_p_drop_sorted(x[wide], limit[wide])
        return drop
    return _top_p_drop_sorted(x, limit)


def _top_p_drop_sorted(x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_x, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= limit
    drop_sorted[:, 0] = False
    return torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)


def warp_rows(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int],
              top_p: Sequence[float]) -> torch.Tensor:
    """``warp_probs`` for every row of ``logits`` ``[R, vocab]`` at once, each row with its own settings
    (host sequences of length R). Returns fp32 probabilities ``[R, vocab]`` on the logits' device; rows with
    temperature 0 are one-hot at their argmax. The settings are host values, so which rows need top-k or
    top-p is known without a device sync.

    Example:
        >>> logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 10.0]])
        >>> warp_rows(logits, [0.0, 1.0], [0, 1], [1.0, 1.0]).tolist()
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    """
    num_rows, vocab = logits.shape
    if not (len(temperature) == len(top_k) == len(top_p) == num_rows):
        raise ValueError(f"{num_rows} rows but {len(temperature)}, {len(top_k)}, {len(top_p)} settings")
    logits = logits.float()
    device = logits.device
    greedy = [r for r, t in enumerate(temperature) if t == 0.0]
    if len(greedy) == num_rows:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # as warp_probs: shift by the row's max, then divide (a tiny temperature sends the rest to -inf)
    temps = torch.tensor([max(float(t), MIN_TEMPERATURE) for t in temperature], dtype=torch.float32)
    x = (logits - logits.amax(-1, keepdim=True)) / temps.to(device)[:, None]
    k_rows = [r for r, k in enumerate(top_k) if 0 < k < vocab and temperature[r] != 0.0]
    if k_rows:
        ks = torch.tensor([top_k[r] for r in k_rows], dtype=torch.long, device=device)
        sub = x[k_rows]
        kth = torch.topk(sub, max(top_k[r] for r in k_rows), dim=-1).values.gather(-1, (ks - 1)[:, None])
        x[k_rows] = sub.masked_fill(sub < kth, float("-inf"))
    p_rows = [r for r, p in enumerate(top_p) if p < 1.0 and temperature[r] != 0.0]
    if p_rows:
        # float32 like warp_probs' comparison: a top_p below float32's smallest value compares as 0
        limit = torch.tensor([float(top_p[r]) for r in p_rows], dtype=torch.float32)
        if len(p_rows) == num_rows:
            x = x.masked_fill(_top_p_drop(x, limit), float("-inf"))
        else:
            sub = x[p_rows]
            x[p_rows] = sub.masked_fill(_top_p_drop(sub, limit), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if greedy:
        probs[greedy] = torch.zeros_like(probs[greedy]).scatter_(-1, logits[greedy].argmax(-1, keepdim=True), 1.0)
    return probs


def _layout(candidates: Sequence[Sequence[int]], first_rows: Sequence[int], allow_bonus: Sequence[bool],
            device: torch.device) -> tuple[torch.Tensor, ...]:
    """The requests' host lists as device tensors (one copy): candidates ``[B, W]`` (padded with 0), counts,
    first rows and bonus flags ``[B]``."""
    width = max((len(c) for c in candidates), default=0)
    packed = torch.tensor([[*cand, *([0] * (width - len(cand))), len(cand), first, int(bool(bonus))]
                           for cand, first, bonus in zip(candidates, first_rows, allow_bonus)], dtype=torch.long)
    packed = packed.reshape(len(candidates), width + 3).to(device)
    return packed[:, :width], packed[:, width], packed[:, width + 1], packed[:, width + 2].bool()


def _first_rejection(accept: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Accepted prefix length per request: the index of the first valid candidate not accepted, else the count."""
    if accept.shape[-1] == 0:  # no request has candidates
        return counts.clone()
    rejected = ~accept & valid
    return torch.where(rejected.any(-1), rejected.int().argmax(-1), counts)


def verify_greedy_rows(argmax_ids: torch.Tensor, candidates: Sequence[Sequence[int]], first_rows: Sequence[int],
                       allow_bonus: Sequence[bool]) -> torch.Tensor:
    """``verify_greedy`` for every request of a round: ``argmax_ids`` ``[R]`` are the target rows' argmax ids
    (on the device). Returns ``[B, 2]``: accepted count and recovered / bonus id (``NO_TOKEN`` if none).

    Example:
        >>> verify_greedy_rows(torch.tensor([5, 6, 9, 4]), [[5, 7], []], [0, 3], [True, True]).tolist()
        [[1, 6], [0, 4]]
    """
    device = argmax_ids.device
    cand, counts, first, bonus = _layout(candidates, first_rows, allow_bonus, device)
    last = argmax_ids.shape[0] - 1
    width = cand.shape[1]
    at = torch.arange(width, device=device)
    valid = at[None, :] < counts[:, None]
    target = argmax_ids[(first[:, None] + at).clamp(max=last)]  # [B, W]
    accepted = _first_rejection(target == cand, valid, counts)
    extra = argmax_ids[(first + accepted).clamp(max=last)]
    extra = torch.where((accepted < counts) | bonus, extra, torch.full_like(extra, NO_TOKEN))
    return torch.stack([accepted, extra], dim=1)


def verify_sampled_rows(target_probs: torch.Tensor, candidates: Sequence[Sequence[int]], first_rows: Sequence[int],
                        allow_bonus: Sequence[bool], draft_probs: Sequence[torch.Tensor | None],
                        coins: Sequence[torch.Tensor]) -> torch.Tensor:
    """``verify_sampled`` for every request of a round.

    ``target_probs`` ``[R, vocab]``: warped p rows (request ``b``'s from ``first_rows[b]``).
    ``draft_probs[b]``: its q rows ``[n_b, vocab]`` (any device: moved here), or None for an argmax draft
    (q one-hot at each candidate). ``coins[b]``: its ``n_b + 1`` host uniforms (``sampling.uniforms``): coin
    ``i`` tests candidate ``i``, the last draws the recovered or bonus token.
    Returns ``[B, 2]`` on the device: accepted count and extra token (``NO_TOKEN`` if none).

    Example:
        >>> p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> u = [torch.tensor([0.5, 0.5], dtype=torch.float64)]
        >>> verify_sampled_rows(p, [[1]], [0], [True], [None], u).tolist()   # accepted, then bonus 0
        [[1, 0]]
    """
    device = target_probs.device
    num_req = len(candidates)
    cand, counts, first, bonus = _layout(candidates, first_rows, allow_bonus, device)
    width = cand.shape[1]
    u = []  # [B, W + 1]: the coins, padded, then the draw's uniform in the last column
    for b, c in enumerate(coins):
        c = c.tolist() if isinstance(c, torch.Tensor) else list(c)
        n = len(candidates[b])
        if len(c) != n + 1:
            raise ValueError(f"request {b}: {n} candidates need {n + 1} uniforms, got {len(c)}")
        u.append([*c[:n], *([0.0] * (width - n)), c[n]])
    u = torch.tensor(u, dtype=torch.float64).reshape(num_req, width + 1)
    u = u.to(device)
    last = target_probs.shape[0] - 1
    at = torch.arange(width, device=device)
    valid = at[None, :] < counts[:, None]
    p_rows = (first[:, None] + at).clamp(max=last)  # [B, W]
    p_x = target_probs[p_rows, cand].double()
    q_parts = [q for q in draft_probs if q is not None]
    q_first, q_at = [], 0
    for b, q in enumerate(draft_probs):
        if q is not None and q.shape[0] != len(candidates[b]):
            raise ValueError(f"request {b}: {q.shape[0]} draft rows for {len(candidates[b])} candidates")
        q_first.append(q_at if q is not None else -1)
        q_at += q.shape[0] if q is not None else 0
    if q_parts and q_at:
        q = torch.cat([t.to(device) for t in q_parts]).float()
        q_first_t = torch.tensor(q_first, dtype=torch.long).to(device)
        has_q = q_first_t >= 0
        q_rows = (q_first_t[:, None] + at).clamp(min=0, max=q.shape[0] - 1)
        q_x = torch.where(has_q[:, None], q[q_rows, cand].double(), torch.ones_like(p_x))
    else:
        q, has_q = None, None
        q_x = torch.ones_like(p_x)
    # accept candidate i when u_i * q(x) < p(x): probability min(1, p/q), never a token with p(x) = 0
    accepted = _first_rejection(u[:, :width] * q_x < p_x, valid, counts)
    rejected = accepted < counts
    dist = target_probs[(first + accepted).clamp(max=last)]  # [B, vocab]: the recovered or bonus row's p
    if width:
        x = cand.gather(1, accepted.clamp(max=width - 1)[:, None])  # the rejected candidate
        q_row = torch.zeros_like(dist).scatter_(1, x, 1.0)  # an argmax draft's q: one-hot
        if q is not None:
            q_row = torch.where(has_q[:, None], q[(q_first_t + accepted).clamp(min=0, max=q.shape[0] - 1)], q_row)
        residual = torch.clamp(dist - q_row, min=0.0)
        total = residual.sum(-1, keepdim=True)
        # norm(max(p - q, 0)), or p where the residual has no mass (round-off only), as ``residual_probs``
        residual = torch.where(total > 0, residual / total, dist)
        dist = torch.where(rejected[:, None], residual, dist)
    extra = inverse_cdf(dist, u[:, width])
    extra = torch.where(rejected | bonus, extra, torch.full_like(extra, NO_TOKEN))
    return torch.stack([accepted, extra], dim=1)


def rows_not_finite(probs: torch.Tensor, owners: Sequence[int], num_owners: int) -> torch.Tensor:
    """``[num_owners]`` int64 on the device: how many of each owner's rows of ``probs`` ``[R, vocab]`` hold a
    non-finite value (``owners[r]``: the owner of row r), so that a request with bad numbers can fail alone
    once the round's results reach the host."""
    bad = (~torch.isfinite(probs).all(-1)).long()
    owner = torch.tensor(list(owners), dtype=torch.long).to(probs.device)
    return torch.zeros(num_owners, dtype=torch.long, device=probs.device).index_add_(0, owner, bad)
