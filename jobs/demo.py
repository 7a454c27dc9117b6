"""Demo on the embedded default pair: target-only (AR), vanilla SD and PEARL on GSM8K test prompts,
by default on the Ray backend (draft and target as concurrent actors).

Prints each method's output for the first prompt, a table of speed and acceptance, and checks that all
three methods produced the same tokens (greedy decoding is lossless).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--backend", default="ray", choices=["local", "ray"],
                    help="ray: draft and target in concurrent actors (PEARL overlaps them); local: one process")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from pearl_ray import GenerationStats, PearlEngine, SamplingParams
    from pearl_ray.evals.gsm8k import build_prompt, load_split

    torch.set_num_threads(1)
    questions = [r["question"] for r in load_split("test")[: args.num_prompts]]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    rows, outputs = [], {}
    engine = PearlEngine(draft="default-draft", target="default-target", method="pearl", gamma=args.gamma,
                         backend=args.backend)
    prompts = [build_prompt(q) for q in questions]
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=4))  # warm-up, not timed
    for method in ("ar", "sd", "pearl"):
        outs = engine.generate(prompts, params, method=method)
        outputs[method] = [o.token_ids for o in outs]
        s = GenerationStats.merge([o.stats for o in outs])
        rows.append({"method": method, "tokens": s.new_tokens, "wall_s": round(s.wall_s, 2),
                     "tokens_per_s": round(s.tokens_per_s, 1),
                     "acceptance_rate": round(s.acceptance_rate, 3) if method != "ar" else None,
                     "tokens_per_target_forward": round(s.tokens_per_target_forward, 2) if s.target_forwards else None})
        if method == "pearl":
            print(f"\nPEARL output for question 1:\n{outs[0].text}\n")
    engine.shutdown()
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    same = outputs["ar"] == outputs["sd"] == outputs["pearl"]
    print(f"\nlossless (identical greedy tokens for AR, SD and PEARL): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
