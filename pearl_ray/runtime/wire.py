"""The draft's batched round messages as tensors, for the gloo link (``runtime.link``,
``transports.GlooDraftPhase``).

A message is one fixed-size int64 *frame* (header plus up to ``INLINE_IDS`` ints of body, so a typical
round is a single send each way), then, only when needed, an int64 tensor with the body that did not fit,
and a float tensor (fp64 settings of the slots a round starts; fp32 ``[rows, vocab]`` probabilities of the
draft's reply when it samples). Token ids always travel as int64; nothing is packed into float tensors.
Pure torch, no transport: ``encode_*`` return the tensors to send in order, ``decode_*`` take the frame
plus a ``recv(shape, dtype)`` callable that fetches the next tensor. Besides the two round messages there
are a stop frame (the leader ends the draft's loop) and an error frame (the draft failed a round).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.messages import DraftChunk, DraftRequest, DraftStart, SeqUpdate

HEADER = 16
INLINE_IDS = 112
FRAME = HEADER + INLINE_IDS  # 128 int64 = 1 KiB

# op codes (frame[0])
OP_STOP, OP_ERROR = 3, 5
OP_BATCH, OP_BATCH_REPLY = 9, 10  # a batched round (``core.batch``): every slot's work in one message

Recv = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def _build(header: list[int], ids: list[int] = ()) -> list[torch.Tensor]:
    """One frame from a header and ids (one tensor construction: this runs on the round's critical path),
    plus the overflow tensor for ids that do not fit inline."""
    ids = list(ids)
    inline = ids[:INLINE_IDS]
    frame = torch.tensor(header + [0] * (HEADER - len(header)) + inline + [0] * (INLINE_IDS - len(inline)),
                         dtype=torch.int64)
    return [frame] + ([torch.tensor(ids[INLINE_IDS:], dtype=torch.int64)] if len(ids) > INLINE_IDS else [])


def _get_ids(frame: torch.Tensor, count: int, recv: Recv) -> list[int]:
    ids = frame[HEADER:HEADER + min(count, INLINE_IDS)].tolist()
    if count > INLINE_IDS:
        ids += recv((count - INLINE_IDS,), torch.int64).tolist()
    return ids


def stop_frame() -> torch.Tensor:
    return _build([OP_STOP])[0]


def error_frame(round_id: int, code: int = 1) -> torch.Tensor:
    return _build([OP_ERROR, round_id, code])[0]


# -- batched rounds: one message per round each way, every slot's work in it --------------------------------
# The frame's header holds the op and the counts; its inline area and the overflow tensor hold one flat int
# body (``_build``), so a round with a few requests and short updates is a single frame.


def encode_batch(starts: dict[int, DraftStart], releases: list[int],
                 reqs: dict[int, DraftRequest]) -> list[torch.Tensor]:
    """A batched round (``DraftWorker.batch_round``'s arguments). frame: OP_BATCH, n_releases, n_starts,
    n_reqs, body length; body = releases, then per start (slot, n_prompt, top_k, draft_greedy, seed, prompt
    ids), then per request (slot, round_id, start_pos, num_steps, prefill_to, has_update[, u.round_id,
    committed_len_before, n_appended, n_pending, ids]); then, with starts, fp64 [temperature, top_p] each."""
    body = [int(slot) for slot in releases]
    for slot, s in starts.items():
        body += [int(slot), len(s.prompt_ids), int(s.top_k), int(s.draft_greedy), int(s.seed), *s.prompt_ids]
    for slot, r in reqs.items():
        body += [int(slot), r.round_id, r.start_pos, r.num_steps, r.prefill_to, int(r.update is not None)]
        if r.update is not None:
            u = r.update
            body += [u.round_id, u.committed_len_before, len(u.appended_token_ids), len(u.pending_token_ids),
                     *u.appended_token_ids, *u.pending_token_ids]
    out = _build([OP_BATCH, len(releases), len(starts), len(reqs), len(body)], body)
    if starts:
        out.append(torch.tensor([v for s in starts.values() for v in (s.temperature, s.top_p)], dtype=torch.float64))
    return out


def decode_batch(frame: torch.Tensor, recv: Recv) -> tuple[dict[int, DraftStart], list[int], dict[int, DraftRequest]]:
    op, n_rel, n_starts, n_reqs, n_body = frame[:5].tolist()
    if op != OP_BATCH:
        raise ValueError(f"not a batched round frame (op {op})")
    body = _get_ids(frame, n_body, recv)
    floats = recv((2 * n_starts,), torch.float64).tolist() if n_starts else []
    releases, i = body[:n_rel], n_rel
    starts: dict[int, DraftStart] = {}
    for k in range(n_starts):
        slot, n, top_k, greedy, seed = body[i:i + 5]
        starts[slot] = DraftStart(body[i + 5:i + 5 + n], floats[2 * k], top_k, floats[2 * k + 1], bool(greedy), seed)
        i += 5 + n
    reqs: dict[int, DraftRequest] = {}
    for _ in range(n_reqs):
        slot, round_id, start_pos, num, prefill_to, has_update = body[i:i + 6]
        i += 6
        update = None
        if has_update:
            u_round, before, n_app, n_pend = body[i:i + 4]
            ids = body[i + 4:i + 4 + n_app + n_pend]
            update = SeqUpdate(u_round, before, ids[:n_app], ids[n_app:])
            i += 4 + n_app + n_pend
        reqs[slot] = DraftRequest(round_id, start_pos, num, update, prefill_to)
    if i != n_body:
        raise ValueError(f"batched round frame: body has {n_body} ints, decoded {i}")
    return starts, releases, reqs


def encode_batch_reply(chunks: dict[int, DraftChunk]) -> list[torch.Tensor]:
    """The draft's answer to a batched round. frame: OP_BATCH_REPLY, n_chunks, body length, prob rows, vocab;
    body = per chunk (slot, round_id, start_pos, n_ids, prob_rows, busy_ns, started_at_us, ids); then the
    fp32 probability rows of every sampled chunk stacked in body order (only when some draft samples)."""
    body, probs = [], []
    for slot, c in chunks.items():
        rows = 0 if c.draft_probs is None else int(c.draft_probs.shape[0])
        body += [int(slot), c.round_id, c.start_pos, len(c.draft_token_ids), rows, int(c.busy_s * 1e9),
                 int(c.started_at * 1e6), *c.draft_token_ids]
        if rows:
            probs.append(c.draft_probs.detach().to("cpu", torch.float32))
    cols = int(probs[0].shape[1]) if probs else 0
    out = _build([OP_BATCH_REPLY, len(chunks), len(body), sum(int(p.shape[0]) for p in probs), cols], body)
    if probs:
        out.append(torch.cat(probs).contiguous())
    return out


def decode_batch_reply(frame: torch.Tensor, recv: Recv) -> dict[int, DraftChunk]:
    op, n_chunks, n_body, n_rows, cols = frame[:5].tolist()
    if op != OP_BATCH_REPLY:
        raise ValueError(f"not a batched reply frame (op {op})")
    body = _get_ids(frame, n_body, recv)
    probs = recv((n_rows, cols), torch.float32) if n_rows else None
    chunks: dict[int, DraftChunk] = {}
    i = row = 0
    for _ in range(n_chunks):
        slot, round_id, start_pos, n_ids, rows, busy_ns, started_us = body[i:i + 7]
        ids = body[i + 7:i + 7 + n_ids]
        i += 7 + n_ids
        p = None
        if rows:
            p, row = probs[row:row + rows], row + rows
        chunks[slot] = DraftChunk(round_id, start_pos, ids, p, busy_ns / 1e9, started_us / 1e6)
    return chunks
