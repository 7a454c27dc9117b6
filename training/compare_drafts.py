"""Compare drafts (or checkpoints of one) in about a minute each: greedy SD acceptance by prompt family from a
single teacher-forced draft pass, on the held-out prompts of ``measure_pair.py``.

With greedy decoding, vanilla SD with window gamma accepts, from each window start, the leading run of positions
where the draft's argmax equals the target's next token; the first miss is replaced by the target's token and the
next window starts after it. While a run lasts, the draft's proposal *is* its argmax given the true prefix, so
one forward of the draft over prompt + target output yields the acceptance SD would measure
(``pearl_ray.core.metrics.greedy_sd_acceptance``; equal up to rounding between one batched and many incremental
forwards). The target's outputs (EOS protocol) are computed once and cached (``--cache``), so scoring another
draft costs one forward per prompt. ``make measure`` stays the reference (both protocols, c, tokens/s).

  python -m training.compare_drafts models/default-draft ~/ckpt-export --num-prompts 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training.measure_pair import FAMILIES, family_prompts, params_for  # noqa: E402


def target_outputs(target: str, families: list[str], n: int, max_new_tokens: int, cache: Path) -> tuple[dict, int]:
    """({family: [(prompt ids, target greedy output ids), ...]}, the target's vocabulary size), read from
    ``cache`` when it holds these settings (``target`` is a resolved path); the target loads only on a miss."""
    from pearl_ray import PearlEngine

    key = hashlib.md5(json.dumps([target, families, n, max_new_tokens]).encode()).hexdigest()
    if cache.exists():
        doc = json.loads(cache.read_text())
        if doc.get("key") == key:
            return doc["outputs"], doc["vocab_size"]
    eng = PearlEngine(target=target, method="ar")
    vocab_size = eng.backend.vocab_size
    outputs = {}
    for f in families:
        outs = eng.generate(family_prompts(f, eng.tokenizer, n), params_for(f, "eos", max_new_tokens))
        outputs[f] = [(o.prompt_token_ids, o.token_ids) for o in outs]
        print(f"[compare] target outputs for {f}: {sum(len(o.token_ids) for o in outs)} tokens", flush=True)
    eng.shutdown()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "vocab_size": vocab_size, "outputs": outputs}))
    return outputs, vocab_size


def score(draft: str, target_vocab_size: int, outputs: dict, gamma: int) -> dict:
    """{family: (acceptance, accepted, verified)} for ``draft`` on the cached target outputs."""
    from pearl_ray.core.metrics import greedy_sd_acceptance
    from pearl_ray.modeling.hf import load_model

    runner = load_model(draft, target_vocab_size=target_vocab_size).runner
    res = {}
    for f, items in outputs.items():
        acc = ver = 0
        for prompt, out in items:
            if not out:
                continue
            runner.reset()
            logits = runner.forward(list(prompt) + list(out[:-1]), len(out))
            matches = [int(a) == int(b) for a, b in zip(logits.argmax(-1).tolist(), out)]
            a, v = greedy_sd_acceptance(matches, gamma)
            acc, ver = acc + a, ver + v
        res[f] = (round(acc / ver, 3) if ver else 0.0, acc, ver)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafts", nargs="+", help="draft dirs or names")
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="results/compare/target_outputs.json")
    ap.add_argument("--out", default="results/compare/compare_drafts.csv")
    args = ap.parse_args(argv)
    families = args.families.split(",")
    if set(families) - set(FAMILIES) or args.num_prompts < 1 or args.gamma < 1:
        raise SystemExit(f"error: families must be among {FAMILIES}; --num-prompts and --gamma must be >= 1")

    import pandas as pd
    import torch

    from pearl_ray.modeling.resolve import resolve_path

    torch.set_num_threads(args.threads)
    outputs, vocab = target_outputs(resolve_path(args.target), families, args.num_prompts, args.max_new_tokens,
                                    Path(args.cache))
    rows = []
    for d in args.drafts:
        res = score(d, vocab, outputs, args.gamma)
        rows.append({"draft": d} | {f: res[f][0] for f in families})
    table = pd.DataFrame(rows)
    table["mean"] = table[families].mean(axis=1).round(3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
