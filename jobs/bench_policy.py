"""Where the speculation policy spends drafting rounds: a Ray engine, B closed-loop callers, target-only and
PEARL in ABBA order (so drift hits both alike), on the held-out hand-written prompts (greedy, EOS stop).

Reported per cell: tokens/s on the callers' clock, request-rounds (each request's rounds, summed: a round of
B requests counts B times), how many of them drafted, the median time of a plain and of a drafting round,
and the acceptance in the drafting rounds; per batch size, PEARL / target-only over the two passes each.
This is the instrument behind the policy's probe rules: the probes' cost (a wide forward plus the draft's
catch-up over every skipped token) shows as few, slow drafting rounds.

    python jobs/bench_policy.py --batch-sizes 1,4,8 --prompts 16 --max-new-tokens 64
    python jobs/bench_policy.py --batch-sizes 1 --fixed-gammas 2,4   # the windows the policy declines
    python jobs/bench_policy.py --schedules --batch-sizes 1,2,4,8 --prompts 8   # one device, three schedules
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

    if engine.config.backend == "local":  # one call: its loop batches ``batch`` requests at a time
        engine.backend.loop.max_num_seqs = batch
        t0 = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens), method=method, gamma=gamma)
        return cell_result(outs, time.perf_counter() - t0, [])
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
    return cell_result(outs, time.perf_counter() - t0, errors)


def cell_result(outs, wall: float, errors: list) -> dict:
    rounds = [r for o in outs for r in o.stats.round_timings]
    drafting = [r for r in rounds if r.window > 0]
    plain = [r for r in rounds if r.window == 0]
    cand = sum(r.num_candidates for r in rounds)

    def med_ms(rs):
        return round(statistics.median(r.round_s for r in rs) * 1e3, 1) if rs else None

    return {"tok_s": sum(len(o.token_ids) for o in outs) / wall, "request_rounds": len(rounds),
            "drafting": len(drafting), "plain_ms": med_ms(plain), "drafting_ms": med_ms(drafting),
            "acceptance": round(sum(r.num_accepted for r in rounds) / cand, 3) if cand else None,
            "errors": len(errors),
            "schedules": [sum(o.stats.plain_rounds for o in outs), sum(o.stats.turn_rounds for o in outs),
                          sum(o.stats.once_rounds for o in outs)]}


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
    ap.add_argument("--schedules", action="store_true",
                    help="compare target-only, SD in turn, PEARL at once, the default policy and Ray pairs "
                         "(colocated and separate) on the held-out families and 8-shot GSM8K")
    ap.add_argument("--configs", default="", help="with --schedules: a subset of " + ",".join(SCHEDULE_CONFIGS))
    ap.add_argument("--families", default="", help="with --schedules: a subset of the families")
    ap.add_argument("--prompts-per-cell", type=int, default=4, help="with --schedules: at least this many")
    args = ap.parse_args()
    if args.schedules:
        from pearl_ray.modeling.hf import quiet_loading

        quiet_loading()
        return run_schedules(args)

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


# -- schedules: one device, one worker ----------------------------------------------------------------------
SCHEDULE_CONFIGS = {
    # label: (engine options, per-call method, per-call gamma)
    "target-only": (dict(backend="local"), "ar", None),
    "sd-turn@2": (dict(backend="local", schedule="turn"), "sd", 2),
    "sd-turn@4": (dict(backend="local", schedule="turn"), "sd", 4),
    "pearl-once@4": (dict(backend="local", schedule="once"), "pearl", 4),
    "default": (dict(backend="local"), "pearl", None),
    "ray-colocated": (dict(backend="ray", colocate=True), "pearl", None),
    "ray-separate": (dict(backend="ray", colocate=False), "pearl", None),
}


def schedule_families(tokenizer, per_family: int) -> dict[str, list[str]]:
    """The held-out hand-written families (chat template) and 8-shot GSM8K test questions (plain text)."""
    import json

    from jobs.bench_throughput import HELDOUT
    from pearl_ray.evals.gsm8k import build_prompt, load_split
    from pearl_ray.modeling.chat import user_turn

    data = json.loads(HELDOUT.read_text())["families"]
    out = {name: [user_turn(tokenizer, p) for p in items] for name, items in data.items()}
    out["gsm8k_fewshot"] = [build_prompt(q["question"]) for q in load_split("test")[:per_family]]
    order = ["gsm8k_fewshot", "code", *sorted(set(out) - {"gsm8k_fewshot", "code"})]  # the goals' families first
    return {name: [out[name][i % len(out[name])] for i in range(per_family)] for name in order}


def _engine_process(label: str, draft: str, target: str, max_batch: int, conn) -> None:
    """One configuration's engine in a process of its own: GNU OpenMP slows every team of a process once its
    threads outnumber the cores, so engines sharing the benchmark's process would run slower than a user's
    lone engine. Answers ``("cell", args)`` with ``run_cell``'s result until ``("stop",)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pearl_ray import PearlEngine
    from pearl_ray.modeling.hf import quiet_loading

    quiet_loading()
    options, _, _ = SCHEDULE_CONFIGS[label]
    try:
        engine = PearlEngine(draft=draft, target=target, max_num_seqs=max_batch, max_queued=max_batch, **options)
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which stops the run
        conn.send(("error", repr(exc)))
        return
    conn.send(("ready", None))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            try:
                conn.send(("ok", run_cell(engine, *msg[1])))
            except Exception as exc:  # noqa: BLE001 - reported by the parent
                conn.send(("error", repr(exc)))
    finally:
        engine.shutdown()


class EngineProcess:
    """The parent's handle on one ``_engine_process``; every wait is bounded."""

    def __init__(self, label: str, args, max_batch: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.label, self.timeout_s = label, args.cell_timeout_s
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_process, args=(label, args.draft, args.target, max_batch, child),
                                daemon=True, name=f"bench-{label}")
        self.proc.start()
        self._answer(900.0)

    def _answer(self, timeout_s: float):
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"{self.label}: no answer within {timeout_s} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"{self.label}: {value}")
        return value

    def cell(self, prompts, method, batch, max_new_tokens, gamma) -> dict:
        self.conn.send(("cell", (prompts, method, batch, max_new_tokens, self.timeout_s, gamma)))
        return self._answer(self.timeout_s + 60)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(timeout=120)
        if self.proc.is_alive():
            self.proc.kill()  # our own child, by handle
            self.proc.join(timeout=30)


def run_schedules(args) -> None:
    """Every configuration of ``SCHEDULE_CONFIGS`` on each family at each batch size, in ABBA order per cell
    (so drift hits all alike), on the callers' clock, greedy, EOS stop. Each configuration's engine lives in a
    process of its own (``EngineProcess``), the others idle while it runs. Prints a table of tokens/s and the
    ratio to target-only, and the share of rounds per schedule under the default policy."""
    from pearl_ray.modeling.resolve import inspect_pair

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    labels = [x for x in args.configs.split(",") if x] if args.configs else list(SCHEDULE_CONFIGS)
    unknown = sorted(set(labels) - set(SCHEDULE_CONFIGS))
    if unknown:
        raise SystemExit(f"error: unknown configurations {unknown}; known: {list(SCHEDULE_CONFIGS)}")
    families = schedule_families(inspect_pair(args.target, args.draft).tokenizer, args.prompts)
    if args.families:
        families = {k: v for k, v in families.items() if k in args.families.split(",")}
    engines: dict[str, EngineProcess] = {}
    try:
        for label in labels:
            engines[label] = EngineProcess(label, args, max(sizes))
        warm = families[next(iter(families))][:1]
        for label, eng in engines.items():
            _, method, gamma = SCHEDULE_CONFIGS[label]
            eng.cell(warm, method, 1, 8, gamma)
        print("| family | batch | " + " | ".join(labels) + " | default's rounds plain/turn/once |")
        print("|---|---:|" + "---:|" * len(labels) + "---|")
        for family, prompts in families.items():
            for batch in sizes:
                got: dict[str, list[float]] = {}
                shares = [0, 0, 0]
                for label in labels + labels[::-1]:
                    _, method, gamma = SCHEDULE_CONFIGS[label]
                    r = engines[label].cell(prompts[:max(batch, args.prompts_per_cell)], method, batch,
                                            args.max_new_tokens, gamma)
                    got.setdefault(label, []).append(r["tok_s"])
                    if label == "default":
                        shares = [a + b for a, b in zip(shares, r["schedules"])]
                base = sum(got["target-only"]) if "target-only" in got else None
                cells = [f"{sum(v) / 2:.1f}" + (f" ({sum(v) / base:.2f}x)" if base else "") for v in
                         (got[label] for label in labels)]
                total = sum(shares) or 1
                print(f"| {family} | {batch} | " + " | ".join(cells) + " | "
                      + "/".join(f"{100 * s / total:.0f}%" for s in shares) + " |", flush=True)
    finally:
        for eng in engines.values():
            eng.close()


if __name__ == "__main__":
    main()
