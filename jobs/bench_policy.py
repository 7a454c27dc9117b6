"""Where the speculation policy spends drafting rounds: a Ray engine, B closed-loop callers, target-only and
PEARL in ABBA order (so drift hits both alike), on the held-out hand-written prompts (greedy, EOS stop).

Reported per cell: tokens/s on the callers' clock, request-rounds (each request's rounds, summed: a round of
B requests counts B times), how many of them drafted, the median time of a plain and of a drafting round,
and the acceptance in the drafting rounds; per batch size, PEARL / target-only over the two passes each.
This is the instrument behind the policy's probe rules: the probes' cost (a wide forward plus the draft's
catch-up over every skipped token) shows as few, slow drafting rounds.

    python jobs/bench_policy.py --batch-sizes 1,4,8 --prompts 16 --max-new-tokens 64
    python jobs/bench_policy.py --batch-sizes 1 --fixed-gammas 2,4   # the windows the policy declines
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_cell(engine, prompts, method: str, batch: int, max_new_tokens: int, timeout_s: float,
             gamma: int | None = None) -> dict:
    from pearl_ray import SamplingParams

    todo: queue.Queue = queue.Queue()
    for p in prompts:
        todo.put(p)
    outs, errors = [], []
    lock = threading.Lock()

    def caller() -> None:
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            try:
                out = engine.generate([p], SamplingParams(max_new_tokens=max_new_tokens), method=method,
                                      gamma=gamma)[0]
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                outs.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller, daemon=True) for _ in range(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"{method} at batch {batch} did not finish within {timeout_s} s")
    wall = time.perf_counter() - t0
    rounds = [r for o in outs for r in o.stats.round_timings]
    drafting = [r for r in rounds if r.window > 0]
    plain = [r for r in rounds if r.window == 0]
    cand = sum(r.num_candidates for r in rounds)

    def med_ms(rs):
        return round(statistics.median(r.round_s for r in rs) * 1e3, 1) if rs else None

    return {"tok_s": sum(len(o.token_ids) for o in outs) / wall, "request_rounds": len(rounds),
            "drafting": len(drafting), "plain_ms": med_ms(plain), "drafting_ms": med_ms(drafting),
            "acceptance": round(sum(r.num_accepted for r in rounds) / cand, 3) if cand else None,
            "errors": len(errors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--fixed-gammas", default="",
                    help="also PEARL with these fixed windows (policy off), e.g. 2,4: what the policy declines")
    ap.add_argument("--cell-timeout-s", type=float, default=900.0)
    args = ap.parse_args()

    from jobs.bench_throughput import heldout_prompts
    from pearl_ray import PearlEngine, SamplingParams
    from pearl_ray.modeling.hf import quiet_loading

    quiet_loading()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    with PearlEngine(draft=args.draft, target=args.target, backend="ray", max_num_seqs=max(sizes),
                     max_queued=max(sizes)) as engine:
        prompts_all = heldout_prompts(engine.tokenizer)
        prompts = [prompts_all[i % len(prompts_all)] for i in range(args.prompts)]
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=8))  # warm-up
        print("| batch | method | pass | tok/s | request-rounds | drafting | plain ms | drafting ms | acceptance |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        summary = []
        fixed = [f"pearl@{g}" for g in args.fixed_gammas.split(",") if g.strip()]
        order = ["ar", "pearl", *fixed, *reversed(fixed), "pearl", "ar"]  # ABBA: drift hits all alike
        for batch in sizes:
            got: dict[str, list[float]] = {}
            for label in order:
                method, _, g = label.partition("@")
                r = run_cell(engine, prompts, method, batch, args.max_new_tokens, args.cell_timeout_s,
                             int(g) if g else None)
                got.setdefault(label, []).append(r["tok_s"])
                print(f"| {batch} | {label} | {len(got[label])} | "
                      f"{r['tok_s']:.1f} | {r['request_rounds']} | {r['drafting']} | {r['plain_ms']} | "
                      f"{r['drafting_ms']} | {r['acceptance']} |", flush=True)
            summary += [(batch, label, sum(v) / sum(got["ar"])) for label, v in got.items() if label != "ar"]
        print()
        for batch, label, ratio in summary:
            print(f"batch {batch}: {label} / target-only {ratio:.3f}")
        print_breakeven(engine.measured, sizes)


def print_breakeven(measured: dict | None, sizes: list[int]) -> None:
    """What draft this machine would need: by the policy's own model over the pair's measured costs, the
    acceptance per candidate at which PEARL breaks even with target-only decoding, and at which it is 1.2x."""
    from pearl_ray.core.policy import CostModel, breakeven_acceptance

    policy = (measured or {}).get("policy")
    if not policy:
        return
    costs = CostModel.from_dict(policy["costs"])
    print("\nacceptance per candidate PEARL needs on these measured costs (window), by the policy's model:")
    for batch in sizes:
        cells = []
        for speedup in (1.0, 1.2):
            got = breakeven_acceptance(costs, batch, speedup, max_gamma=policy["max_gamma"])
            cells.append(f"{speedup:.1f}x: " + (f"{got[0]:.2f} (window {got[1]})" if got else "none below 0.98"))
        print(f"batch {batch}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
