"""GPU check of the whole stack: AR, SD and PEARL, on the local and the Ray backend (each schedule of a pair
in one process: the policy's, in turn, at once; Ray pairs colocated and in two actors), in float32 and
bfloat16, on the embedded default pair (``default-draft`` / ``default-target``). A few minutes on one CUDA
GPU; each run reports its rounds per schedule and the median round's cost.

    python jobs/gpu_check.py                       # cuda, float32+bfloat16, local+ray, 3 prompts, 96 tokens
    python jobs/gpu_check.py --device cpu --dtypes float32 --backends local --max-new-tokens 16 --prompts 1

What it checks: greedy decoding is lossless, so for one dtype every method on every backend must produce
the same tokens as target-only decoding (AR) on the first backend. A difference is a mismatch: it is listed
in the report, ``"ok"`` is false and the exit code is 1. One exception, which ``--strict`` removes: where
the target's logits for the two tokens lie within ``--tie-ulps`` of each other at the divergence, the swap
is a rounding tie-break (a k-token verification rounds differently from k one-token steps, which matters in
bfloat16), listed with its margin but not failed. float32 and bfloat16 differ from each other anyway; their
agreement is reported, not checked.

What it measures: tokens/s of each method (fixed length: EOS ignored, methods alternating prompt by prompt
after a warm-up) and the draft's acceptance rate. On Ray the draft and the target are two actors sharing
the one GPU (``draft_num_gpus = target_num_gpus = 0.5``); Ray binds to 127.0.0.1 unless ``$RAY_ADDRESS``
names a cluster to join, and a Ray this script started is shut down at the end.

Writes a JSON report (``--out``, default ``results/gpu_check/report.json``) and prints a table.
Exit codes: 0 all identical; 1 a mismatch, an SD/PEARL run the draft took no part in, or a failed run;
2 cannot run here (no CUDA for ``--device cuda``, models missing, bad options); 3 ``--timeout-s`` passed
(a partial report is written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("RAY_ADDRESS"):
    # a private local Ray: loopback only (read by Ray when it is imported, so set before any import of it)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

DRAFT, TARGET = "default-draft", "default-target"
METHODS = ("ar", "sd", "pearl")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("local", "local-turn", "local-once", "ray", "ray-colocated")
"""Where the pair runs: one process with the policy's schedule per round (local), every drafting round in
turn or at once (the draft on a CUDA stream of its own); on Ray two actors sharing the GPU, or one actor
holding both models (colocated, the schedules as locally)."""
DEFAULT_OUT = "results/gpu_check/report.json"
EXIT_OK, EXIT_MISMATCH, EXIT_CANNOT_RUN, EXIT_TIMEOUT = 0, 1, 2, 3
_RAY_TEMP_DIRS: list[str] = []
"""Temp dirs of the private Ray this script started: removed once it is shut down."""

CHAT_REQUESTS = (
    "Give me three tips for keeping a small vegetable garden healthy through a dry summer.",
    "Explain in a short paragraph why the sky looks blue during the day and red at sunset.",
    "Write a friendly two-sentence note inviting a neighbour to a weekend barbecue.",
)
CODE_PROMPTS = (
    'def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:\n'
    '    """Merge overlapping closed intervals and return them sorted by start."""\n',
    'def is_palindrome(text: str) -> bool:\n'
    '    """True if text reads the same backwards, ignoring case and non-letters."""\n',
    'class Stack:\n    """A last-in, first-out stack backed by a Python list."""\n\n    def __init__(self):\n',
)
FALLBACK_QUESTION = ("A baker makes 48 rolls in the morning and 36 in the afternoon. She sells 70 of them and "
                     "gives away half of the rest. How many rolls does she have left?")


class CannotRun(Exception):
    """This machine cannot run the check as asked (exit code 2)."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    ap.add_argument("--max-new-tokens", type=int, default=96, help="tokens per prompt, EOS ignored (default 96)")
    ap.add_argument("--prompts", type=int, default=3,
                    help="prompts per run, cycling chat, code, GSM8K (default 3, at most 9)")
    ap.add_argument("--gamma", type=int, default=4, help="draft window (default 4)")
    ap.add_argument("--num-threads", type=int, default=None,
                    help="torch threads per model (local) or per Ray worker (default: torch's / 1 per worker)")
    ap.add_argument("--timeout-s", type=float, default=900.0,
                    help="wall-clock limit of the whole check; also bounds every Ray wait (default 900)")
    ap.add_argument("--tie-ulps", type=float, default=8.0,
                    help="a divergence where the target's two candidate logits lie within this many ulps of the "
                         "dtype is a tie-break, reported but not failed (default 8)")
    ap.add_argument("--strict", action="store_true", help="fail on every divergence, tie-breaks included")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES] + [b for b in args.backends if b not in BACKENDS]
    if bad or not args.dtypes or not args.backends:
        ap.error(f"unknown or missing dtypes/backends {bad}; dtypes: {DTYPES}, backends: {BACKENDS}")
    if not 1 <= args.prompts <= 9:
        ap.error("--prompts must lie in [1, 9]")
    if args.max_new_tokens < 1 or args.timeout_s <= 0:
        ap.error("--max-new-tokens and --timeout-s must be positive")
    if not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    return args


def check_device(device: str) -> str:
    """The device's name; ``CannotRun`` when CUDA is asked for and torch sees none."""
    import torch

    if device == "cpu":
        return platform.processor() or platform.machine() or "cpu"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise CannotRun(f"--device {device} asked for, but torch {torch.__version__} ({build}) sees no CUDA "
                        f"device. Run it on a machine with an NVIDIA GPU, or check on CPU with --device cpu.")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise CannotRun(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.cuda.get_device_name(index)


def build_prompts(tokenizer, n: int) -> list[dict]:
    """``n`` prompts cycling chat, code and GSM8K (zero-shot, in the chat template)."""
    from pearl_ray.evals import gsm8k

    try:
        questions = [row["question"] for row in gsm8k.load_split("test")[:3]]
    except OSError:
        questions = [FALLBACK_QUESTION]
    from pearl_ray.modeling.chat import has_chat_template, user_turn

    has_chat = has_chat_template(tokenizer)

    def chat(text: str) -> str:
        return user_turn(tokenizer, text) if has_chat else text

    out = []
    for i in range(n):
        kind, k = ("chat", "code", "gsm8k")[i % 3], i // 3
        if kind == "chat":
            text = chat(CHAT_REQUESTS[k % len(CHAT_REQUESTS)])
        elif kind == "code":
            text = CODE_PROMPTS[k % len(CODE_PROMPTS)]
        else:
            q = questions[k % len(questions)]
            text = gsm8k.chat_prompt(q, tokenizer) if has_chat else f"Q: {q}\nA: Let's think step by step."
        out.append({"name": f"{kind}-{k}", "text": text})
    return out


def engine_kwargs(backend: str, dtype: str, args) -> dict:
    backend, _, variant = backend.partition("-")
    kw = {"draft": DRAFT, "target": TARGET, "backend": backend, "dtype": dtype, "gamma": args.gamma,
          "device": args.device, "queue_timeout_s": args.timeout_s, "num_threads": args.num_threads}
    if variant in ("turn", "once"):
        kw["schedule"] = variant
    if backend == "ray":
        kw["colocate"] = variant == "colocated"  # plain "ray": two actors, even where both share the device
    if backend == "ray":
        import ray

        share = 0.5 if args.device.startswith("cuda") else 0.0
        kw.update(device="cuda" if share else "cpu",  # an actor sees its GPU as cuda:0
                  draft_num_gpus=share, target_num_gpus=share, start_timeout_s=args.timeout_s,
                  placement_timeout_s=min(120.0, args.timeout_s), round_timeout_s=min(60.0, args.timeout_s))
        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            # a private Ray: enough CPUs for both actors, a short temp dir (socket paths have a length limit)
            _RAY_TEMP_DIRS.append(tempfile.mkdtemp(prefix="rgc", dir="/tmp"))
            kw["ray_init"] = {"num_cpus": max(2, os.cpu_count() or 2), "_temp_dir": _RAY_TEMP_DIRS[-1]}
    return kw


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_pair(backend: str, dtype: str, prompts: list[dict], args) -> dict:
    """One engine for (backend, dtype): a warm-up, then every prompt with AR, SD and PEARL in turn."""
    from pearl_ray import PearlEngine, SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    counters = ("accepted_tokens", "verified_tokens", "drafted_tokens", "target_forwards", "draft_failures",
                "fallback_rounds")
    per = {m: {"tokens": [], "wall_s": [], "rounds": {}, **dict.fromkeys(counters, 0)} for m in METHODS}
    sync_on = args.device if backend == "local" else "cpu"  # Ray's results arrive after the GPU work ended
    t_load = time.perf_counter()
    with PearlEngine(**engine_kwargs(backend, dtype, args)) as engine:
        load_s = time.perf_counter() - t_load
        warm = SamplingParams(max_new_tokens=min(8, args.max_new_tokens), ignore_eos=True)
        for method in METHODS:
            engine.generate([prompts[0]["text"]], warm, method=method)
        for prompt in prompts:
            for method in METHODS:
                _sync(sync_on)
                t0 = time.perf_counter()
                out = engine.generate([prompt["text"]], params, method=method)[0]
                _sync(sync_on)
                rec = per[method]
                rec["wall_s"].append(time.perf_counter() - t0)
                rec["tokens"].append(list(out.token_ids))
                for t in out.stats.round_timings:
                    rec["rounds"].setdefault(t.schedule, []).append(t.round_s)
                for name in counters:
                    rec[name] += getattr(out.stats, name)
    results = {}
    for method, rec in per.items():
        n = sum(len(t) for t in rec["tokens"])
        wall = sum(rec["wall_s"])
        results[method] = {
            "tokens": rec["tokens"], "new_tokens": n, "wall_s": round(wall, 4),
            "tok_s": round(n / wall, 2) if wall > 0 else 0.0,
            "tok_s_per_prompt": [round(len(t) / w, 2) if w > 0 else 0.0 for t, w in zip(rec["tokens"], rec["wall_s"])],
            "acceptance": round(rec["accepted_tokens"] / rec["verified_tokens"], 4) if rec["verified_tokens"] else None,
            "tokens_per_target_forward": round(n / rec["target_forwards"], 3) if rec["target_forwards"] else None,
            # per schedule (plain / turn / once): how many rounds, and the median round's cost
            "rounds": {s: len(v) for s, v in rec["rounds"].items()},
            "round_ms": {s: round(1e3 * sorted(v)[len(v) // 2], 3) for s, v in rec["rounds"].items()},
            **{name: rec[name] for name in counters},
        }
    return {"load_s": round(load_s, 2), "methods": results}


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(runs: dict, prompts: list[dict], dtypes: list[str], backends: list[str]) -> tuple[list, dict]:
    """Mismatches within each dtype (against AR on the first backend that ran), and fp32-vs-other agreement."""
    mismatches = []
    for dtype in dtypes:
        done = [b for b in backends if "methods" in runs.get(b, {}).get(dtype, {})]
        if not done:
            continue
        ref_name = f"{done[0]}/ar"
        ref = runs[done[0]][dtype]["methods"]["ar"]["tokens"]
        for backend in done:
            for method in METHODS:
                toks = runs[backend][dtype]["methods"][method]["tokens"]
                for i, (got, want) in enumerate(zip(toks, ref)):
                    at = first_diff(got, want)
                    if at is not None:
                        mismatches.append({"dtype": dtype, "backend": backend, "method": method,
                                           "prompt": prompts[i]["name"], "prompt_index": i, "reference": ref_name,
                                           "first_diff": at, "got": got[at:at + 8], "expected": want[at:at + 8]})
    agreement = {}
    for backend in backends:
        have = {d: runs[backend][d]["methods"]["ar"]["tokens"] for d in dtypes
                if "methods" in runs.get(backend, {}).get(d, {})}
        if "float32" not in have:
            continue
        for dtype, toks in have.items():
            if dtype == "float32":
                continue
            prefixes = []
            for a, b in zip(have["float32"], toks):
                at = first_diff(a, b)
                prefixes.append(len(a) if at is None else at)
            total = sum(len(a) for a in have["float32"])
            agreement.setdefault(backend, {})[f"float32_vs_{dtype}"] = {
                "method": "ar", "identical_prompts": sum(p == len(a) for p, a in zip(prefixes, have["float32"])),
                "prompts": len(prefixes), "common_prefix_tokens": prefixes,
                "agreement": round(sum(prefixes) / total, 4) if total else None}
    return mismatches, agreement


def ulp(dtype: str, value: float) -> float:
    """The spacing of ``dtype``'s numbers near ``value``."""
    import math

    import torch

    eps = torch.finfo(getattr(torch, dtype)).eps
    return eps * 2.0 ** math.floor(math.log2(max(abs(value), 1e-30)))


def classify_mismatches(mismatches: list[dict], runs: dict, prompts: list[dict], tokenizer, args) -> None:
    """Add to each mismatch the target's logit margin between the expected and the produced token at the
    divergence (one full forward over prompt + the reference's tokens before it, same dtype and device), in
    units of the dtype's spacing there: ``near_tie`` when within ``--tie-ulps``. Greedy decoding is exact in
    arithmetic, not in rounding: a k-token verification and k one-token steps round differently, and in
    half precision two logits within a few ulps can swap. A real decoding bug shows up at a clear margin."""
    if not mismatches:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from pearl_ray.modeling.resolve import resolve_path

    device = args.device
    for dtype in sorted({m["dtype"] for m in mismatches}):
        model = AutoModelForCausalLM.from_pretrained(resolve_path(TARGET), dtype=getattr(torch, dtype))
        model = model.to(device).eval()
        for m in (m for m in mismatches if m["dtype"] == dtype):
            m.update(margin=None, margin_ulps=None, near_tie=False)
            if not m["got"] or not m["expected"]:
                continue  # one output is a prefix of the other: not a tie-break
            backend, method = m["reference"].split("/")
            ref = runs[backend][dtype]["methods"][method]["tokens"][m["prompt_index"]]
            ids = list(tokenizer(prompts[m["prompt_index"]]["text"])["input_ids"]) + ref[:m["first_diff"]]
            with torch.no_grad():
                logits = model(torch.tensor([ids], device=device)).logits[0, -1].float()
            want, got = logits[m["expected"][0]].item(), logits[m["got"][0]].item()
            spacing = ulp(dtype, max(abs(want), abs(got)))
            m.update(margin=round(want - got, 6), margin_ulps=round(abs(want - got) / spacing, 2))
            m["near_tie"] = m["margin_ulps"] <= args.tie_ulps
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def draft_problems(runs: dict) -> list[dict]:
    """SD and PEARL runs in which the draft did not take part (identical tokens would then prove nothing)."""
    out = []
    for backend, by_dtype in runs.items():
        for dtype, run in by_dtype.items():
            for method in ("sd", "pearl"):
                r = run.get("methods", {}).get(method)
                if r is None:
                    continue
                where = {"backend": backend, "dtype": dtype, "method": method}
                if r["drafted_tokens"] == 0:
                    out.append({**where, "problem": "the draft proposed no tokens: this ran target-only"})
                elif r["draft_failures"] or r["fallback_rounds"]:
                    out.append({**where, "problem": f"the draft failed {r['draft_failures']} time(s); "
                                                    f"{r['fallback_rounds']} round(s) fell back to the target"})
    return out


def flat_results(runs: dict) -> list[dict]:
    rows = []
    for backend, by_dtype in runs.items():
        for dtype, run in by_dtype.items():
            for method, r in run.get("methods", {}).items():
                ar = run["methods"]["ar"]["tok_s"]
                rows.append({"backend": backend, "dtype": dtype, "method": method, "tokens": r["tokens"],
                             "new_tokens": r["new_tokens"], "tok_s": r["tok_s"], "acceptance": r["acceptance"],
                             "drafted_tokens": r["drafted_tokens"], "round_ms": r.get("round_ms", {}),
                             "rounds": r.get("rounds", {}),
                             "speedup_vs_ar": round(r["tok_s"] / ar, 3) if ar else None})
    return rows


def print_table(rows: list[dict], errors: list[dict]) -> None:
    print(f"{'backend':13} {'dtype':9} {'method':6} {'tok/s':>9} {'vs AR':>6} {'accept':>7}  "
          f"rounds per schedule: count @ median ms")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        spd = "-" if r["speedup_vs_ar"] is None else f"{r['speedup_vs_ar']:.2f}x"
        sched = ", ".join(f"{s} {n} @ {r['round_ms'][s]:.2f}" for s, n in sorted(r["rounds"].items()))
        print(f"{r['backend']:13} {r['dtype']:9} {r['method']:6} {r['tok_s']:9.1f} {spd:>6} {acc:>7}  {sched}")
    for e in errors:
        print(f"{e['backend']:13} {e['dtype']:9} FAILED: {e['error']}")


class Report:
    """The report being built; written at the end, or partially when the time limit strikes."""

    def __init__(self, args, path: Path):
        self.path, self.lock = path, threading.Lock()
        self.data = {"ok": False, "complete": False, "mismatches": [], "problems": [], "errors": [],
                     "config": {"draft": DRAFT, "target": TARGET, "device": args.device, "dtypes": args.dtypes,
                                "backends": args.backends, "max_new_tokens": args.max_new_tokens,
                                "prompts": args.prompts, "gamma": args.gamma, "num_threads": args.num_threads,
                                "tie_ulps": args.tie_ulps, "strict": args.strict,
                                "timeout_s": args.timeout_s}}
        self.t0 = time.perf_counter()

    def write(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2))
            tmp.replace(self.path)


def _shutdown_ray(started_here: bool, timeout_s: float = 30.0) -> None:
    """Shut down a Ray this script started (bounded), then remove its temp dirs."""
    if not started_here or "ray" not in sys.modules:
        return
    import shutil

    import ray

    if ray.is_initialized():
        t = threading.Thread(target=ray.shutdown, name="gpu-check-ray-shutdown", daemon=True)
        t.start()
        t.join(timeout_s)
    if not ray.is_initialized():
        while _RAY_TEMP_DIRS:
            shutil.rmtree(_RAY_TEMP_DIRS.pop(), ignore_errors=True)


def _watchdog(report: Report, ray_started_here, timeout_s: float) -> threading.Timer:
    def fire() -> None:
        report.data["errors"].append({"backend": "-", "dtype": "-",
                                      "error": f"the check did not finish within --timeout-s {timeout_s:g}"})
        report.data["timed_out"] = True
        try:
            report.write()
        finally:
            print(f"error: timed out after {timeout_s:g} s; partial report in {report.path}", file=sys.stderr,
                  flush=True)
            _shutdown_ray(ray_started_here(), 20.0)
            os._exit(EXIT_TIMEOUT)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv=None) -> int:
    args = parse_args(argv)
    ray_running_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    report = Report(args, Path(args.out))
    timer = _watchdog(report, lambda: not ray_running_before, args.timeout_s)
    try:
        return _check(args, report)
    except CannotRun as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    finally:
        timer.cancel()
        _shutdown_ray(not ray_running_before)


def _check(args, report: Report) -> int:
    import torch
    import transformers

    from pearl_ray.errors import ModelNotFoundError
    from pearl_ray.modeling.resolve import load_tokenizer, resolve_path

    device_name = check_device(args.device)
    try:
        tokenizer = load_tokenizer(resolve_path(TARGET), TARGET)
        resolve_path(DRAFT)
    except ModelNotFoundError as exc:
        raise CannotRun(f"the default pair is not available here: {exc}") from None
    prompts = build_prompts(tokenizer, args.prompts)
    d = report.data
    d.update(device=device_name, device_kind="cuda" if args.device.startswith("cuda") else "cpu",
             torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
             python=platform.python_version(),
             prompts=[{"name": p["name"], "prompt_tokens": len(tokenizer(p["text"])["input_ids"])} for p in prompts])
    if "ray" in args.backends:
        try:
            import ray
        except ImportError:
            raise CannotRun("--backends ray needs Ray (pip install 'ray[default]'); or check with --backends local"
                            ) from None
        d["ray"] = ray.__version__
    runs: dict = {}
    d["runs"] = runs
    for backend in args.backends:
        for dtype in args.dtypes:
            print(f"[gpu_check] {backend} / {dtype} on {device_name} ...", file=sys.stderr, flush=True)
            try:
                runs.setdefault(backend, {})[dtype] = run_pair(backend, dtype, prompts, args)
            except Exception as exc:  # noqa: BLE001 - recorded; the other runs go on
                msg = f"{type(exc).__name__}: {exc}"
                runs.setdefault(backend, {})[dtype] = {"error": msg}
                d["errors"].append({"backend": backend, "dtype": dtype, "error": msg})
            report.write()  # progress survives a later crash or timeout
    mismatches, agreement = compare(runs, prompts, args.dtypes, args.backends)
    try:
        classify_mismatches(mismatches, runs, prompts, tokenizer, args)
    except Exception as exc:  # noqa: BLE001 - then every mismatch counts
        d["errors"].append({"backend": "-", "dtype": "-", "error": f"classifying mismatches: {exc!r}"})
    failing = [m for m in mismatches if args.strict or not m.get("near_tie")]
    problems = draft_problems(runs)
    rows = flat_results(runs)
    d.update(results=rows, mismatches=mismatches, failing_mismatches=len(failing),
             tie_breaks=len(mismatches) - len(failing), problems=problems, dtype_agreement=agreement,
             complete=True, ok=not failing and not problems and not d["errors"])
    report.write()
    print_table(rows, d["errors"])
    for m in mismatches:
        kind = "TIE-BREAK" if m.get("near_tie") and not args.strict else "MISMATCH"
        margin = "" if m.get("margin_ulps") is None else f" (logit margin {m['margin']:g} = {m['margin_ulps']:g} ulps)"
        print(f"{kind} {m['backend']}/{m['dtype']}/{m['method']} on {m['prompt']}: differs from "
              f"{m['reference']} at token {m['first_diff']}{margin}")
    for m in problems:
        print(f"PROBLEM {m['backend']}/{m['dtype']}/{m['method']}: {m['problem']}")
    for backend, pairs in agreement.items():
        for name, a in pairs.items():
            print(f"{backend} {name}: {a['identical_prompts']}/{a['prompts']} prompts identical, "
                  f"agreement {a['agreement']}")
    print(f"{'OK' if d['ok'] else 'FAILED'}: report in {report.path}")
    return EXIT_OK if d["ok"] else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
