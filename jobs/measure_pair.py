"""Measure a draft/target pair: acceptance rate (vanilla SD, gamma 4) and cost ratio c = t_target / t_draft.

Protocol (issue #3): 20 GSM8K *test* questions (never used in training), 8-shot CoT prompt, greedy, 128 new
tokens, one CPU thread per model. Acceptance = accepted draft tokens / draft tokens verified, also by
position in the window. c = median one-token target forward / median one-token draft forward, both after a
prefill of a real prompt (about 800 tokens of context), 30 timed calls after 5 warm-up calls.
Writes ``--out`` (JSON) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--num-questions", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--chat", action="store_true", help="use the chat-template prompt instead of plain 8-shot")
    ap.add_argument("--out", default="results/measure_pair.json")
    args = ap.parse_args(argv)

    import torch

    from pearl_ray import GenerationStats, PearlEngine, SamplingParams
    from pearl_ray.evals.gsm8k import build_prompt, load_split
    from pearl_ray.core.sides import time_forward

    torch.set_num_threads(1)
    engine = PearlEngine(draft=args.draft, target=args.target, method="sd", gamma=args.gamma)
    tok = engine.tokenizer
    questions = [r["question"] for r in load_split("test")[: args.num_questions]]
    prompts = [tok(build_prompt(q, chat=args.chat, tokenizer=tok))["input_ids"] for q in questions]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.time()
    outs = engine.generate(prompts, params, method="sd")
    sd_s = time.time() - t0
    s = GenerationStats.merge([o.stats for o in outs])
    t_target = time_forward(engine.backend.target_model, prompts[0])
    t_draft = time_forward(engine.backend.draft_model, prompts[0])
    result = {
        "draft": args.draft, "target": args.target, "questions": args.num_questions, "chat": args.chat,
        "max_new_tokens": args.max_new_tokens, "gamma": args.gamma, "threads_per_model": 1,
        "acceptance_rate": round(s.acceptance_rate, 4),
        "acceptance_by_position": [round(x, 4) for x in s.acceptance_by_position],
        "mean_accepted_len": round(s.mean_accepted_len, 3),
        "tokens_per_target_forward": round(s.tokens_per_target_forward, 3),
        "t_target_ms": round(t_target * 1e3, 2), "t_draft_ms": round(t_draft * 1e3, 2),
        "cost_ratio": round(t_target / t_draft, 2), "context_tokens": len(prompts[0]),
        "sd_wall_s": round(sd_s, 1),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
