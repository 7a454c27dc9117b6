"""Throughput benchmark: one pair decoding many requests at once, side by side in one run.

For each batch size B (default 1, 2, 4, 8, 16) the same max(B, --min-prompts) hand-written held-out prompts
(``data/heldout/prompts.json``, chat and code, in the target's chat template; greedy, EOS stop) go through:

- ``ar``, ``sd``, ``pearl``: this engine's local backend, ``max_num_seqs = B`` (continuous batching: B
  decode at once, the rest join as slots free up); SD and PEARL with the adaptive speculation policy
  (``--gamma 0``) or a fixed window;
- ``hf``: plain transformers ``generate`` of the target on the same prompts, B at a time, left-padded (the
  external peer; its tokens are counted up to each row's first EOS);
- at batch 1 only (``--batch1-extras``): ``ar-1thread`` (target-only on one thread: what each side of a
  Ray pair gets on a 2-core machine) and ``pearl-ray`` (PEARL on Ray, draft and target in their own actors,
  one thread each, auto gamma), with the caller's end-to-end time against the engine's own ``stats.wall_s``
  (``e2e_over_engine``: per-request cost of the Ray path). Until the Ray loop batches, Ray rows exist at
  batch 1 only.

Cells run in an order that rotates per batch size, so machine drift hits every method alike. Reported per
cell: aggregate tokens/s (all new tokens over the caller's wall time), per-request latency (p50 / p95 of the
time from the call's start to the request's last token), and ratios: each method against its own batch 1,
and the engine's AR against ``hf``. Greedy outputs of ar/sd/pearl are checked identical. Writes
``table.md``, ``results.csv`` and ``throughput.png`` under ``--out``.
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

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "data" / "heldout" / "prompts.json"


def heldout_prompts(tokenizer, families=("chat", "code")) -> list[str]:
    """The held-out prompts of ``families``, interleaved, each wrapped in the chat template."""
    from pearl_ray.modeling.chat import user_turn

    data = json.loads(HELDOUT.read_text())["families"]
    lists = [data[f] for f in families]
    out = []
    for i in range(max(len(x) for x in lists)):
        for x in lists:
            if i < len(x):
                out.append(user_turn(tokenizer, x[i]))
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return 0.0
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def run_engine(engine, prompts, params, method, batch) -> dict:
    engine.backend.loop.max_num_seqs = batch
    last: dict[int, float] = {}
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, method=method,
                           on_tokens=lambda i, ids: last.__setitem__(i, time.perf_counter()))
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    lat = [last.get(i, t0) - t0 for i in range(len(prompts))]
    windows = [t.window for o in outs for t in o.stats.round_timings]
    verified = sum(o.stats.verified_tokens for o in outs)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "acceptance": (sum(o.stats.accepted_tokens for o in outs) / verified) if verified else None,
            "mean_window": statistics.mean(windows) if windows else 0.0, "ids": [o.token_ids for o in outs]}


def run_ray(engine, prompts, params) -> dict:
    """PEARL on Ray, one request at a time (the Ray loop does not batch yet); also the caller's time per
    request against the engine's ``stats.wall_s``."""
    lat, e2e, inside, outs = [], 0.0, 0.0, []
    t0 = time.perf_counter()
    for p in prompts:
        t1 = time.perf_counter()
        out = engine.generate([p], params)[0]
        e2e += time.perf_counter() - t1
        inside += out.stats.wall_s
        lat.append(time.perf_counter() - t0)
        outs.append(out)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    verified = sum(o.stats.verified_tokens for o in outs)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "acceptance": sum(o.stats.accepted_tokens for o in outs) / verified if verified else None,
            "mean_window": float(engine.gamma), "e2e_over_engine": e2e / inside if inside else None,
            "ids": [o.token_ids for o in outs]}


def run_hf(model, tokenizer, prompts, max_new_tokens, eos_ids, batch) -> dict:
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokens, lat, ids_out = 0, [], []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        enc = tokenizer(prompts[start: start + batch], return_tensors="pt", padding=True, add_special_tokens=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos_ids),
                                 pad_token_id=tokenizer.pad_token_id)
        done = time.perf_counter() - t0
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            k = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
            tokens += k
            ids_out.append(row[:k])
            lat.append(done)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "acceptance": None, "mean_window": 0.0, "ids": ids_out}


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["batch"], r["tok_s"]) for r in rows if r["method"] == method]
        if len(pts) == 1:  # a batch-1-only row: a marker, not a line
            ax.plot(*pts[0], marker="x", ls="none", label=method)
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["batch"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size (requests decoding at once)")
    ax.set_ylabel("aggregate new tokens / s")
    ax.set_title("Throughput against batch size", fontsize=11)
    fig.suptitle(title, fontsize=8, y=0.995)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--methods", default="ar,sd,pearl,hf")
    ap.add_argument("--min-prompts", type=int, default=8, help="prompts per cell at small batch sizes")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=0, help="0: the adaptive speculation policy; else a fixed window")
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--families", default="chat,code")
    ap.add_argument("--batch1-extras", default="ar-1thread,pearl-ray",
                    help="extra methods at batch 1 only (comma-separated; empty for none)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_throughput" / time.strftime("%Y%m%d-%H%M%S")))
    args = ap.parse_args(argv)

    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM

    from pearl_ray import PearlEngine, SamplingParams
    from pearl_ray.modeling.hf import quiet_loading

    quiet_loading()

    torch.set_num_threads(args.num_threads)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    methods = args.methods.split(",")
    t_load = time.perf_counter()
    engine = PearlEngine(draft=args.draft, target=args.target, gamma=args.gamma or None, max_num_seqs=max(sizes),
                         num_threads=args.num_threads)
    print(f"engine ready in {time.perf_counter() - t_load:.1f} s; policy: "
          f"{(engine.measured or {}).get('measure_s', '-')} s of cost measurement", flush=True)
    prompts_all = heldout_prompts(engine.tokenizer, tuple(args.families.split(",")))
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    hf_model = None
    if "hf" in methods:
        hf_model = AutoModelForCausalLM.from_pretrained(engine.config.target, dtype=torch.float32).eval()
    # warm-up (not reported)
    engine.generate(prompts_all[:2], SamplingParams(max_new_tokens=8), method="pearl" if engine.has_draft else "ar")
    extras = [m for m in args.batch1_extras.split(",") if m]
    ray_engine = None
    if "pearl-ray" in extras:
        t_ray = time.perf_counter()
        ray_engine = PearlEngine(draft=args.draft, target=args.target, gamma=None, backend="ray")
        ray_engine.generate(prompts_all[:1], SamplingParams(max_new_tokens=8))  # warm-up
        print(f"ray engine ready in {time.perf_counter() - t_ray:.1f} s, auto gamma {ray_engine.gamma}", flush=True)
    rows = []
    for bi, batch in enumerate(sizes):
        n = max(batch, args.min_prompts)
        prompts = [prompts_all[i % len(prompts_all)] for i in range(n)]
        order = methods[bi % len(methods):] + methods[: bi % len(methods)]
        if batch == 1:
            order = order + extras
        ids = {}
        for method in order:
            if method == "hf":
                r = run_hf(hf_model, engine.tokenizer, prompts, args.max_new_tokens, set(engine.eos_token_ids), batch)
            elif method == "ar-1thread":
                torch.set_num_threads(1)
                try:
                    r = run_engine(engine, prompts, params, "ar", batch)
                finally:
                    torch.set_num_threads(args.num_threads)
            elif method == "pearl-ray":
                r = run_ray(ray_engine, prompts, params)
            else:
                r = run_engine(engine, prompts, params, method, batch)
            ids[method] = r.pop("ids")
            rows.append({"batch": batch, "method": method, "prompts": n, **r})
            print(f"B={batch:2d} {method:5s} {r['tok_s']:7.1f} tok/s  p50 {r['p50_s']:6.2f} s  "
                  f"tokens {r['tokens']}  window {r['mean_window']:.2f}", flush=True)
        same = [ids[m] == ids["ar"] for m in ("sd", "pearl", "ar-1thread", "pearl-ray") if m in ids and "ar" in ids]
        for row in rows[-len(order):]:
            row["identical_to_ar"] = all(same) if row["method"] != "hf" else (ids["hf"] == ids.get("ar"))
    df = pd.DataFrame(rows)
    base = {m: df[(df.method == m) & (df.batch == sizes[0])].tok_s.iloc[0] for m in df.method.unique()}
    df["vs_own_batch1"] = [r.tok_s / base[r.method] for r in df.itertuples()]
    hf_by = {r.batch: r.tok_s for r in df.itertuples() if r.method == "hf"}
    ar_by = {r.batch: r.tok_s for r in df.itertuples() if r.method == "ar"}
    df["vs_hf"] = [r.tok_s / hf_by[r.batch] if r.batch in hf_by else None for r in df.itertuples()]
    df["vs_ar"] = [r.tok_s / ar_by[r.batch] if r.batch in ar_by else None for r in df.itertuples()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    if "e2e_over_engine" not in df:
        df["e2e_over_engine"] = None
    show = df[["batch", "method", "prompts", "tokens", "tok_s", "p50_s", "p95_s", "vs_own_batch1", "vs_ar", "vs_hf",
               "mean_window", "acceptance", "identical_to_ar", "e2e_over_engine"]]
    table = show.to_markdown(index=False, floatfmt=".3g")
    title = (f"{Path(engine.config.target).name} + {Path(engine.config.draft or '-').name}, held-out "
             f"{args.families} prompts (chat template), greedy, EOS stop, <= {args.max_new_tokens} new tokens, "
             f"{args.num_threads} threads, {os.cpu_count()}-CPU machine")
    (out / "table.md").write_text(f"{title}\n\n{table}\n")
    plot(rows, out / "throughput.png", title)
    (out / "config.json").write_text(json.dumps({"args": vars(args), "engine": engine.config.to_dict(),
                                                  "measured": engine.measured}, indent=1, default=str))
    print(table)
    print(f"\nwritten under {out}")
    engine.shutdown()
    if ray_engine is not None:
        ray_engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
