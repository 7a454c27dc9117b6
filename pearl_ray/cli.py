"""Command line: ``python -m pearl_ray generate --draft D --target T --method pearl --prompt "..." --json``."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import PearlError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pearl_ray", description="PEARL speculative decoding")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("--preset", choices=["default"], help="use the embedded default pair (default-draft/default-target)")
    g.add_argument("--draft", help="draft model dir, preset name or hub id")
    g.add_argument("--target", help="target model dir, preset name or hub id")
    g.add_argument("--method", default="pearl", choices=["pearl", "sd", "ar"])
    g.add_argument("--gamma", type=int, default=4, help="draft window (0 = auto on the ray backend)")
    g.add_argument("--backend", default="local", choices=["local", "ray"])
    g.add_argument("--channel", choices=["collective", "compiled", "actor"],
                   help="ray backend only: how draft and target exchange rounds (default collective)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="fixed-length output (the paper's protocol)")
    g.add_argument("--no-pre-verify", action="store_true", help="PEARL ablation")
    g.add_argument("--no-post-verify", action="store_true", help="PEARL ablation")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import PearlEngine, SamplingParams

    draft, target = args.draft, args.target
    if args.preset == "default":
        draft, target = draft or "default-draft", target or "default-target"
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
        engine = PearlEngine(draft=draft, target=target, method=args.method, gamma=args.gamma or None,
                             backend=args.backend, device=args.device, dtype=args.dtype,
                             pre_verify=not args.no_pre_verify, post_verify=not args.no_post_verify,
                             **({"channel": args.channel} if args.channel else {}))
        prompts = args.prompt
        if args.chat:
            tok = engine.tokenizer
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        outs = engine.generate(prompts, params)
        engine.shutdown()
    except PearlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"method": args.method, "gamma": engine.gamma, "outputs": [
            {"prompt": p, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
             "stats": o.stats.as_dict()} for p, o in zip(args.prompt, outs)]}, indent=2))
    else:
        for p, o in zip(args.prompt, outs):
            s = o.stats
            print(f"--- {args.method} | {s.new_tokens} tokens in {s.wall_s:.2f} s ({s.tokens_per_s:.1f} tok/s), "
                  f"acceptance {s.acceptance_rate:.2f}, tokens/target forward {s.tokens_per_target_forward:.2f}")
            print(o.text)
    return 0
