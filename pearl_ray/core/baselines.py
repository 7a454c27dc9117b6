"""Reference decoders over the same ``CausalLM`` protocol: target-only autoregressive decoding and
vanilla speculative decoding. Straightforward sequential loops, written independently of ``core.rounds`` so
that they serve as PEARL's oracles in tests and as the baselines in benchmarks.
"""

from __future__ import annotations

import time

import torch

from .metrics import GenerationStats
from .sampling import make_generator, sample, warp_probs
from .stopping import StopRule
from .verify import verify_greedy, verify_sampled
from .sides import CausalLM


def generate_ar(target: CausalLM, prompt_ids: list[int], stop: StopRule, seed: int, temperature: float,
                top_k: int = 0, top_p: float = 1.0, on_tokens=None) -> tuple[list[int], GenerationStats]:
    """Target-only decoding: one target forward per token."""
    t0 = time.perf_counter()
    stats = GenerationStats(method="ar", gamma=0)
    gen = make_generator(seed, 0) if temperature > 0 else None  # the decider stream, as the Ray loop uses
    target.reset()
    logits = target.forward(list(prompt_ids), 1)[-1]
    stats.target_forwards = 1
    output: list[int] = []
    while True:
        token = int(torch.argmax(logits)) if gen is None else sample(warp_probs(logits, temperature, top_k, top_p), gen)
        output.append(token)
        stats.rounds += 1
        decision = stop.check(output, 1)
        if on_tokens is not None and decision.keep == len(output):
            on_tokens([token])
        if decision.finished:
            output = output[: decision.keep]
            break
        logits = target.forward([token], 1)[-1]
        stats.target_forwards += 1
    stats.finish(len(output), time.perf_counter() - t0, decision.reason)
    return output, stats


def generate_sd(draft: CausalLM, target: CausalLM, prompt_ids: list[int], gamma: int, stop: StopRule, seed: int,
                temperature: float, top_k: int = 0, top_p: float = 1.0, draft_greedy: bool = False,
                on_tokens=None) -> tuple[list[int], GenerationStats]:
    """Vanilla SD: draft ``gamma`` tokens, verify them in one target forward, bonus token on full acceptance."""
    t0 = time.perf_counter()
    stats = GenerationStats(method="sd", gamma=gamma)
    greedy = temperature == 0.0
    argmax_draft = greedy or draft_greedy
    coins = None if greedy else make_generator(seed, 0)
    draft_gen = None if argmax_draft else make_generator(seed, 1)
    draft.reset()
    target.reset()
    seq = list(prompt_ids)
    prompt_len = len(seq)
    while True:
        # 1. Draft gamma tokens, one forward each (the first feed catches the draft cache up).
        feed, drafted, q_rows = seq[draft.cache_len:], [], []
        for _ in range(gamma):
            logits = draft.forward(feed, 1)[-1]
            stats.draft_forwards += 1
            if argmax_draft:
                token = int(torch.argmax(logits))
            else:
                q = warp_probs(logits, temperature, top_k, top_p)
                token = sample(q, draft_gen)
                q_rows.append(q)
            drafted.append(token)
            feed = [token]
        # 2. One target forward over the unverified tail: gamma + 1 rows of p.
        tail = seq[target.cache_len:] + drafted
        target_logits = target.forward(tail, gamma + 1)
        stats.target_forwards += 1
        # 3. Accept a prefix, then a recovered or bonus token.
        if greedy:
            num_acc, extra = verify_greedy(target_logits.argmax(-1).tolist(), drafted, allow_bonus=True)
        else:
            p = warp_probs(target_logits, temperature, top_k, top_p)
            q = torch.stack(q_rows) if q_rows else None
            num_acc, extra = verify_sampled(p, drafted, q, coins, allow_bonus=True)
        appended = drafted[:num_acc] + [extra]
        stats.observe_round(gamma, gamma, num_acc, num_acc < gamma, num_acc == gamma, list(range(gamma)))
        before = len(seq) - prompt_len
        seq.extend(appended)
        # 4. Roll both caches back to the committed sequence minus its last token (fed next round).
        target.crop(min(target.cache_len, len(seq) - 1))
        draft.crop(min(draft.cache_len, len(seq) - 1 if num_acc < gamma else draft.cache_len))
        output = seq[prompt_len:]
        decision = stop.check(output, len(appended))
        if on_tokens is not None:
            visible = min(len(output), decision.keep)
            if visible > before:
                on_tokens(output[before:visible])
        if decision.finished:
            output = output[: decision.keep]
            break
    stats.finish(len(output), time.perf_counter() - t0, decision.reason)
    return output, stats
