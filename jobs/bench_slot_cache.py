"""One decoding step of the embedded default pair's target over the slot cache: the preallocated store
(``modeling.batched``, "store") against the earlier ``DynamicCache`` slot cache that concatenates at every
forward (``tests/dynamic_slot_cache.py``, "dynamic"), at batch 1 and 8, in one process, interleaved.

Two kinds of step, each over ``--context`` cached positions per row to start with:
- ``decode``: every row feeds one token and gets its logits (the cache grows by one per step);
- ``verify``: every row feeds ``--window`` + 1 tokens, gets all their logits, and rolls back all but 2 of
  them (a speculative round that accepted one token: the old cache keeps the rolled-back entries as holes
  until it compacts them).

Prints a Markdown table: median milliseconds per step and tokens per second (rows x tokens fed per step
for decode, rows x 2 kept tokens for verify), with the CPU model and the torch thread count.

Usage: ``python jobs/bench_slot_cache.py`` [--batches 1,8] [--context 128] [--steps 48] [--threads 2]
[--compile] (``--compile`` adds the store with compiled forwards, inductor: minutes to compile on a CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the old cache lives beside the tests, as their slow reference
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run(lm, kind: str, batch: int, context: int, steps: int, window: int, token: int = 5) -> float:
    """Median seconds of one step of ``kind`` over ``batch`` rows of ``context`` positions (after 4 warm-up
    steps), the slots released at the end."""
    prompt = [(token + i % 7) for i in range(context)]
    lm.forward({s: (prompt[s:] + prompt[:s], 1) for s in range(batch)})
    times = []
    try:
        for i in range(steps + 4):
            t0 = time.perf_counter()
            if kind == "decode":
                lm.forward({s: ([token + i % 5], 1) for s in range(batch)})
            else:
                feed = [token + (i + j) % 5 for j in range(window + 1)]
                lm.forward({s: (feed, window + 1) for s in range(batch)})
                for s in range(batch):
                    lm.crop(s, lm.cache_len(s) - window + 1)
            if i >= 4:
                times.append(time.perf_counter() - t0)
    finally:
        for s in range(batch):
            lm.release(s)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration (median kept)")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    import torch

    from dynamic_slot_cache import DynamicSlotLM
    from pearl_ray.modeling.batched import BatchedHFCausalLM
    from pearl_ray.modeling.hf import load_model

    torch.set_num_threads(args.threads)
    runner = load_model("default-target").runner  # fp32, oneDNN-packed linears: the engine's defaults
    batches = [int(b) for b in args.batches.split(",")]
    impls = {"dynamic": DynamicSlotLM(runner.model, runner.vocab_size),
             "store": BatchedHFCausalLM(runner.model, runner.vocab_size)}
    if args.compile:
        impls["store, compiled"] = BatchedHFCausalLM(runner.model, runner.vocab_size)
        impls["store, compiled"].enable_compile()
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, fp32, context {args.context}, "
          f"window {args.window}, median of {args.repeats} runs of {args.steps} steps", flush=True)
    print("| step | batch | cache | ms per step | tokens/s |")
    print("|---|---|---|---|---|", flush=True)
    for kind in ("decode", "verify"):
        for batch in batches:
            runs: dict[str, list[float]] = {name: [] for name in impls}
            for _ in range(args.repeats):  # interleaved, so that a load change touches every cache alike
                for name, lm in impls.items():
                    runs[name].append(run(lm, kind, batch, args.context, args.steps, args.window))
            for name, secs in runs.items():
                secs = statistics.median(secs)
                tokens = batch * (1 if kind == "decode" else 2)
                print(f"| {kind} | {batch} | {name} | {secs * 1e3:.2f} | {tokens / secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
