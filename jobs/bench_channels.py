"""Per-round coordination overhead of each Ray transport, with near-zero model compute.

A tabular toy pair (forwards cost microseconds), greedy, gamma 4: every round's wall time is then almost
pure coordination (send, exchange, wait, decide). Reports ms per round for the actor-call reference and the
gloo link, side by side in one run, plus their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transports", default="actor,gloo")
    ap.add_argument("--out", default=f"results/bench/channels-{time.strftime('%Y%m%d-%H%M%S')}.json",
                    help="output file (default: under the ignored results/bench/)")
    args = ap.parse_args(argv)

    import ray

    from pearl_ray import PearlEngine, SamplingParams
    from pearl_ray.runtime.backend import connect_ray
    from pearl_ray.testing import TabularLM

    connect_ray(num_cpus=2)
    target, draft = TabularLM(16, seed=0), TabularLM(16, seed=0)  # same table: every draft token accepted
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    engines = {ch: PearlEngine(draft_model=draft, target_model=target, gamma=4, backend="ray", transport=ch,
                               draft_num_cpus=0.25, target_num_cpus=0.25) for ch in args.transports.split(",")}
    per_round = {ch: [] for ch in engines}
    for ch, eng in engines.items():
        eng.generate([[1, 2]], SamplingParams(max_new_tokens=20, ignore_eos=True))  # warm-up
    for _ in range(args.repeats):  # alternate transports
        for ch, eng in engines.items():
            s = eng.generate([[1, 2]], params)[0].stats
            overhead = [t.round_s - max(t.draft_busy_s, t.target_busy_s) for t in s.round_timings[1:]]
            per_round[ch].extend(overhead)
    for eng in engines.values():
        eng.shutdown()
    ray.shutdown()
    result = {ch: {"median_ms_per_round": round(1e3 * statistics.median(v), 3),
                   "mean_ms_per_round": round(1e3 * statistics.fmean(v), 3), "rounds": len(v)}
              for ch, v in per_round.items()}
    if "actor" in per_round:
        for ch in per_round:
            if ch != "actor":
                result[f"{ch}_over_actor"] = round(result[ch]["median_ms_per_round"]
                                                   / result["actor"]["median_ms_per_round"], 3)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
