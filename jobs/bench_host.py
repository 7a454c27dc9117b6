"""Host time per round outside the model forwards, on the local engine with the embedded default pair.

Every forward of both slot caches is wrapped with a timer, and so is each ``BatchLoop.step`` (one round): a
round's host time is its wall time minus the time spent inside forwards. That covers planning, mirrors,
drafting's per-step sampling, the warp, the accept / recover / bonus decisions, stop rules and bookkeeping.
The sides run in turn (``schedule="turn"``) with a fixed window, so a round's forwards never overlap the
host code, and each cell decodes ``batch`` requests together (``max_num_seqs = batch``), all joining in the
first round. Rounds that carry a prompt pass are left out of the per-round figures (their host work is a
prompt's, not a decode round's). Uses only the public engine, so the same script measures any commit:

    python jobs/bench_host.py --batch-sizes 1,8,16 --max-new-tokens 48 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, top_p=0.9)}


class ForwardTimer:
    """Wraps ``lm.forward`` of the given slot caches; ``inside`` sums the seconds spent in them and
    ``prompt`` is set when a forward carried more than ``prompt_min`` ids for one slot (a prompt pass)."""

    def __init__(self, lms, prompt_min: int = 24):
        self.inside, self.prompt, self.prompt_min = 0.0, False, prompt_min
        for lm in lms:
            self._wrap(lm)

    def _wrap(self, lm) -> None:
        real = lm.forward

        def timed(feeds):
            if any(len(ids) > self.prompt_min for ids, _ in feeds.values()):
                self.prompt = True
            t0 = time.perf_counter()
            try:
                return real(feeds)
            finally:
                self.inside += time.perf_counter() - t0

        lm.forward = timed


def run_cell(engine, prompts, batch: int, mode: str, max_new_tokens: int, gamma: int, seed: int) -> dict:
    from pearl_ray import SamplingParams

    loop = engine.backend.loop
    loop.max_num_seqs = batch
    timer = engine._bench_timer
    rounds = []  # (wall s, inside forwards s) of each decode round
    real_step = loop.step

    def step():
        timer.inside, timer.prompt = 0.0, False
        t0 = time.perf_counter()
        events = real_step()
        wall = time.perf_counter() - t0
        if not timer.prompt:
            rounds.append((wall, timer.inside))
        return events

    loop.step = step
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, seed=seed, **MODES[mode])
        outs = engine.generate(prompts[:batch], params, method="pearl", gamma=gamma)
    finally:
        loop.step = real_step
    host = [w - f for w, f in rounds]
    return {"batch": batch, "mode": mode, "rounds": len(rounds),
            "host_ms_median": round(statistics.median(host) * 1e3, 3),
            "host_ms_mean": round(statistics.fmean(host) * 1e3, 3),
            "forward_ms_median": round(statistics.median(f for _, f in rounds) * 1e3, 2),
            "host_share": round(sum(host) / sum(w for w, _ in rounds), 4),
            "tokens": sum(len(o.token_ids) for o in outs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="cells per (batch, mode); their rounds are pooled")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args()

    from jobs.bench_throughput import heldout_prompts
    from pearl_ray import PearlEngine, SamplingParams
    from pearl_ray.modeling.hf import quiet_loading

    quiet_loading()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    engine = PearlEngine(draft=args.draft, target=args.target, gamma=args.gamma, schedule="turn",
                         max_num_seqs=max(sizes))
    engine._bench_timer = ForwardTimer([engine.backend.target_lm, engine.backend.draft_lm])
    prompts_all = heldout_prompts(engine.tokenizer)
    prompts = [prompts_all[i % len(prompts_all)] for i in range(max(sizes))]
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1))  # warm-up
    import pearl_ray

    print(f"pearl_ray from {Path(pearl_ray.__file__).parent}")
    print(f"torch threads: {__import__('torch').get_num_threads()}, gamma {args.gamma}, "
          f"{args.max_new_tokens} new tokens, {args.repeats} repeats")
    print("| batch | mode | decode rounds | host ms/round (median) | host ms/round (mean) | forwards ms/round "
          "(median) | host share |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for batch in sizes:
        for mode in modes:
            cells = [run_cell(engine, prompts, batch, mode, args.max_new_tokens, args.gamma, seed=100 + r)
                     for r in range(args.repeats)]
            host = [c["host_ms_median"] for c in cells]
            row = {"batch": batch, "mode": mode, "rounds": sum(c["rounds"] for c in cells),
                   "host_ms_median": round(statistics.median(host), 3),
                   "host_ms_mean": round(statistics.fmean(c["host_ms_mean"] for c in cells), 3),
                   "forward_ms_median": round(statistics.median(c["forward_ms_median"] for c in cells), 2),
                   "host_share": round(statistics.fmean(c["host_share"] for c in cells), 4)}
            rows.append(row)
            print(f"| {batch} | {mode} | {row['rounds']} | {row['host_ms_median']:.2f} | {row['host_ms_mean']:.2f} | "
                  f"{row['forward_ms_median']:.1f} | {row['host_share']:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    engine.shutdown()


if __name__ == "__main__":
    main()
