"""Throughput benchmark: one pair decoding many requests at once, side by side in one run.

For each batch size B (default 1, 2, 4, 8, 16) the same max(B, --min-prompts) hand-written held-out prompts
(``data/heldout/prompts.json``, chat and code, in the target's chat template; greedy, EOS stop) go through:

- ``ar``, ``sd``, ``pearl``: this engine's local backend, ``max_num_seqs = B`` (continuous batching: B
  decode at once, the rest join as slots free up); SD and PEARL with the adaptive speculation policy
  (``--gamma 0``) or a fixed window;
- ``hf``: plain transformers ``generate`` of the target on the same prompts, B at a time, left-padded (the
  external peer; its tokens are counted up to each row's first EOS);
- ``ar-ray``, ``pearl-ray`` (``--ray-methods``): a Ray engine (draft and target in their own actors, one
  thread each), B callers on threads at once, which the target leader's continuous loop batches; with the
  callers' end-to-end time against the engine's own ``stats.wall_s`` (``e2e_over_engine``: the Ray path's
  per-request cost);
- at batch 1 only (``--batch1-extras``): ``ar-1thread`` (target-only on one thread: what each side of a
  Ray pair gets on a 2-core machine).

Cells run in an order that rotates per batch size, so machine drift hits every method alike. Reported per
cell: aggregate tokens/s (all new tokens over the caller's wall time), per-request latency (p50 / p95 of the
time from the call's start to the request's last token), and ratios: each method against its own batch 1,
and the engine's AR against ``hf``. Greedy outputs of ar/sd/pearl are checked identical. Writes
``table.md``, ``results.csv`` and ``throughput.png`` under ``--out``.

``--endpoint``: ``python -m pearl_ray serve`` in its own process under N concurrent ``openai`` chat clients
for each N, methods ``ar`` and ``pearl`` interleaved, beside transformers ``generate`` of the target at
batch N in this process while the server idles (row ``hf``; ``--no-hf-row`` skips it) and vLLM's server if
``--vllm-python`` names one; writes ``endpoint.md``, ``endpoint.csv`` and ``endpoint.png``. ``--repeats R``
goes over every cell R times: ``endpoint-runs.csv`` has each pass, the table the medians and the ratios
paired within a pass (vLLM runs after the pearl_ray server stops, so its ``vs_hf`` pairs with the ``hf``
cell of the same pass number, not of the same minutes). Use several prompts per client
(``--min-prompts``): with exactly N prompts for N clients a cell is one wave that starts at once, the case
static batching (``hf``) is built for; serving is closed-loop clients refilling the batch.
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


def run_ray(engine, prompts, params, method: str, batch: int) -> dict:
    """``batch`` callers on threads, each sending the next prompt as soon as its last one is done, to one Ray
    engine (its target leader's loop batches them); also the callers' time per request against the
    engine's own ``stats.wall_s``."""
    import queue
    import threading

    todo: queue.Queue = queue.Queue()
    for i, p in enumerate(prompts):
        todo.put((i, p))
    lat, e2e, inside = [0.0] * len(prompts), [0.0], [0.0]
    outs: list = [None] * len(prompts)
    lock = threading.Lock()
    t0 = time.perf_counter()

    def caller() -> None:
        while True:
            try:
                i, p = todo.get_nowait()
            except queue.Empty:
                return
            t1 = time.perf_counter()
            out = engine.generate([p], params, method=method)[0]
            with lock:
                e2e[0] += time.perf_counter() - t1
                inside[0] += out.stats.wall_s
            lat[i], outs[i] = time.perf_counter() - t0, out

    threads = [threading.Thread(target=caller) for _ in range(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    e2e, inside = e2e[0], inside[0]
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    verified = sum(o.stats.verified_tokens for o in outs)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "acceptance": sum(o.stats.accepted_tokens for o in outs) / verified if verified else None,
            "mean_window": _mean_window(outs), "e2e_over_engine": e2e / inside if inside else None,
            "ids": [o.token_ids for o in outs]}


def _mean_window(outs) -> float:
    windows = [t.window for o in outs for t in o.stats.round_timings]
    return statistics.mean(windows) if windows else 0.0


def run_hf(model, tokenizer, prompts, max_new_tokens, eos_ids, batch, per_batch: bool = False) -> dict:
    """``generate`` on ``batch`` prompts at a time. Latency: from the start of the run (every prompt arrived
    at once, as for ``run_engine``), or with ``per_batch`` from the start of the prompt's own batch (as a
    closed-loop client measures it: it sends when its last request is answered)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokens, lat, ids_out = 0, [], []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        began = time.perf_counter() - t0 if per_batch else 0.0
        enc = tokenizer(prompts[start: start + batch], return_tensors="pt", padding=True, add_special_tokens=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos_ids),
                                 pad_token_id=tokenizer.pad_token_id)
        done = time.perf_counter() - t0
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            k = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
            tokens += k
            ids_out.append(row[:k])
            lat.append(done - began)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "acceptance": None, "mean_window": 0.0, "ids": ids_out}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_load(base_url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
                extra: dict | None = None) -> dict:
    """``clients`` concurrent ``openai`` clients, each sending the next chat request as soon as its last one
    is answered, until ``prompts`` are used up; aggregate completion tokens/s and latency percentiles."""
    import queue
    import threading

    from openai import OpenAI

    todo: queue.Queue = queue.Queue()
    for p in prompts:
        todo.put(p)
    lat, tokens, errors = [], [0], []
    lock = threading.Lock()

    def client() -> None:
        api = OpenAI(base_url=base_url, api_key="unused", timeout=600, max_retries=0)
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            t1 = time.perf_counter()
            try:
                r = api.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                max_tokens=max_tokens, temperature=0, extra_body=extra or None)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(repr(exc)[:200])
                continue
            with lock:
                lat.append(time.perf_counter() - t1)
                tokens[0] += r.usage.completion_tokens

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tokens": tokens[0], "wall_s": wall, "tok_s": tokens[0] / wall, "p50_s": pct(lat, 0.5),
            "p95_s": pct(lat, 0.95), "errors": len(errors)}


def wait_http(url: str, timeout_s: float, proc=None) -> bool:
    """True once ``url`` answers 200; False past ``timeout_s`` or as soon as ``proc`` (the server) exits."""
    import requests

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(2.0)
    return False


def stop_server(proc, grace_s: float = 60.0) -> None:
    """End a server started in its own session: SIGTERM to it (it shuts down what it started), then
    SIGKILL to whatever of its session is still there (children it left behind, or the server itself
    after ``grace_s``)."""
    import signal
    import subprocess

    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(10)


def hf_reference(args, hf: dict, texts: list[str], batch: int) -> dict:
    """Plain transformers ``generate`` of the target on ``texts`` (in its chat template, as the endpoint
    applies it), ``batch`` at a time, on --num-threads threads in this process: the peer row beside the
    endpoint's, on the same cores while the server idles."""
    import torch

    if not hf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pearl_ray.modeling.chat import user_turn
        from pearl_ray.modeling.resolve import eos_token_ids, resolve_path

        path = resolve_path(args.target)
        hf["tok"] = AutoTokenizer.from_pretrained(path)
        hf["model"] = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
        hf["turn"] = lambda t: user_turn(hf["tok"], t)
        hf["eos"] = set(eos_token_ids(path, hf["tok"]))  # the engine's stop ids
    torch.set_num_threads(args.num_threads)
    r = run_hf(hf["model"], hf["tok"], [hf["turn"](t) for t in texts], args.max_new_tokens, hf["eos"], batch,
               per_batch=True)
    r.pop("ids")
    return {**r, "errors": 0}


def endpoint_mode(args, sizes: list[int]) -> int:
    """The OpenAI endpoint (``python -m pearl_ray serve`` in its own process, its own private Ray) under N
    concurrent clients for each N, per method; vLLM's OpenAI server under the same load if ``--vllm-python``
    names a Python with vLLM installed (its own venv; never a dependency of this project)."""
    import subprocess

    import pandas as pd
    from transformers import AutoTokenizer

    from pearl_ray.modeling.resolve import resolve_path

    data = json.loads(HELDOUT.read_text())["families"]
    texts = [t for pair in zip(data["chat"], data["code"]) for t in pair]
    rows = []
    hf: dict = {}  # the transformers reference, loaded on first use
    def ours(kernels: str) -> list[str]:
        return [sys.executable, "-m", "pearl_ray", "serve", "--draft", args.draft, "--target", args.target,
                "--dtype", args.dtype, "--cpu-kernels", kernels, "--host", "127.0.0.1", "--max-num-seqs",
                str(max(sizes)), "--max-queued-requests", str(4 * max(sizes)), "--num-threads", "1"]

    servers = [("pearl_ray", ours(args.cpu_kernels))]
    if args.also_eager and args.cpu_kernels != "eager":
        servers.append(("pearl_ray-eager", ours("eager")))
    if args.vllm_python:
        target_dir = resolve_path(args.target)
        servers.append(("vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", target_dir,
                                 "--host", "127.0.0.1", "--dtype", args.dtype, "--max-num-seqs", str(max(sizes))]))
    for name, cmd in servers:
        port = _free_port()
        # vLLM's CPU build binds its OpenMP threads to the cores named here and reserves its KV cache up front:
        # its default reservation did not fit beside the other servers on a 24 GiB machine (the engine core
        # died at start-up); 2 GiB holds 16 sequences of this target many times over.
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
                   VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        log_path = Path(args.out) / f"{name}-server.log"  # why a server did not come up
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")
        # its own session: vLLM's server runs its engine in child processes, which a signal to the server
        # alone can leave behind (e.g. when this job is stopped), still holding the cores
        proc = subprocess.Popen(cmd + ["--port", str(port)], env=env, cwd=ROOT, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            if not wait_http(base + ("/health" if name.startswith("pearl_ray") else "/v1/models"), 900, proc):
                print(f"{name}: the server did not come up (its log: {log_path})", file=sys.stderr)
                continue
            import requests

            model = requests.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
            methods = {"pearl_ray": ["ar", "pearl"], "pearl_ray-eager": ["ar"]}.get(name, ["vllm"])
            if name == "pearl_ray" and args.hf_row:
                methods.append("generate")
            client_load(base + "/v1", model, texts[:2], 2, 8,
                        {"method": "pearl"} if name.startswith("pearl_ray") else None)  # warm-up
            for rep in range(args.repeats):  # repeats go round every size, so slow spells spread over all cells
                for i, n in enumerate(sizes):
                    prompts = [texts[i % len(texts)] for i in range(max(n, args.min_prompts))]
                    k = (i + rep) % len(methods)
                    for method in methods[k:] + methods[:k]:
                        if method == "generate":  # in this process while the server idles: the same cores
                            r = hf_reference(args, hf, prompts, n)
                            rows.append({"server": "hf", "method": method, "clients": n, "rep": rep, **r})
                        else:
                            extra = {"method": method} if name.startswith("pearl_ray") else None
                            r = client_load(base + "/v1", model, prompts, n, args.max_new_tokens, extra)
                            rows.append({"server": name, "method": method, "clients": n, "rep": rep, **r})
                        pd.DataFrame(rows).to_csv(Path(args.out) / "endpoint-runs.csv", index=False)  # kept if stopped
                        print(f"{rows[-1]['server']:9s} {method:8s} clients {n:2d} rep {rep}: {r['tok_s']:7.1f} "
                              f"tok/s  p50 {r['p50_s']:6.2f} s  p95 {r['p95_s']:6.2f} s  errors {r['errors']}",
                              flush=True)
        finally:
            stop_server(proc)
            log_file.close()
    return write_endpoint(args, pd.DataFrame(rows), sizes)


def write_endpoint(args, raw, sizes: list[int]) -> int:
    """``endpoint-runs.csv`` (every pass), then ``endpoint.csv``/``.md``/``.png`` (the summary)."""
    if raw.empty:
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw.to_csv(out / "endpoint-runs.csv", index=False)
    df = summarize_endpoint(raw, min(sizes))
    df.to_csv(out / "endpoint.csv", index=False)
    table = df.to_markdown(index=False, floatfmt=".3g")
    title = (f"OpenAI endpoint, {Path(args.target).name} + {Path(args.draft).name} in {args.dtype}, held-out "
             f"chat/code prompts, greedy, <= {args.max_new_tokens} tokens, {os.cpu_count()}-CPU machine")
    (out / "endpoint.md").write_text(f"{title}\n\n{table}\n")
    plot_endpoint(df, out / "endpoint.png", title)
    print(table)
    return 0


def summarize_endpoint(raw, one_client: int):
    """One row per (server, method, clients): the median over repeats of tok/s and latency, and the
    median over repeats of the ratios taken within one repeat (pearl / ar, ar / hf generate on the same
    prompts in the same pass), which cancel the machine's slow spells better than ratios of medians."""
    keys = ["server", "method", "clients"]
    df = raw.groupby(keys, sort=False).agg(
        repeats=("tok_s", "size"), tokens=("tokens", "median"), tok_s=("tok_s", "median"),
        tok_s_min=("tok_s", "min"), tok_s_max=("tok_s", "max"), p50_s=("p50_s", "median"),
        p95_s=("p95_s", "median"), errors=("errors", "sum")).reset_index()
    by = {(r.server, r.method, r.clients, r.rep): r.tok_s for r in raw.itertuples()}
    passes = sorted(raw.rep.unique())

    def paired(r, ref):
        mine, theirs = (r.server, r.method, r.clients), (*ref, r.clients)
        ratios = [by[(*mine, p)] / by[(*theirs, p)] for p in passes if (*mine, p) in by and (*theirs, p) in by]
        return statistics.median(ratios) if ratios else None

    df["vs_ar"] = [paired(r, (r.server, "ar")) if r.server.startswith("pearl_ray") else None for r in df.itertuples()]
    df["vs_hf"] = [paired(r, ("hf", "generate")) for r in df.itertuples()]
    one = {(r.server, r.method): r for r in df.itertuples() if r.clients == one_client}
    df["vs_one_client"] = [r.tok_s / one[(r.server, r.method)].tok_s for r in df.itertuples()]
    df["p50_vs_one_client"] = [r.p50_s / one[(r.server, r.method)].p50_s for r in df.itertuples()]
    return df


def plot_endpoint(df, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for (server, method), g in df.groupby(["server", "method"]):
        a.plot(g.clients, g.tok_s, marker="o", label=f"{server} {method}")
        b.plot(g.clients, g.p50_s, marker="o", label=f"{server} {method}")
    for ax, label in ((a, "aggregate completion tokens / s"), (b, "p50 latency per request (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    import textwrap

    ax.set_title("Throughput against batch size", fontsize=11)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=7, y=0.995)
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
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both models, the transformers reference and vLLM's server (bf16 is ~1.5x faster per "
                         "forward on CPUs with AVX512-BF16; its greedy tokens differ from fp32's)")
    ap.add_argument("--cpu-kernels", default="onednn", choices=["onednn", "eager"],
                    help="the engine's CPU linear layers (the transformers reference always runs torch's default)")
    ap.add_argument("--also-eager", action="store_true",
                    help="endpoint mode: a second pearl_ray server with --cpu-kernels eager (row server "
                         "'pearl_ray-eager'), to show what the kernels bring on their own")
    ap.add_argument("--families", default="chat,code")
    ap.add_argument("--batch1-extras", default="ar-1thread",
                    help="extra methods at batch 1 only (comma-separated; empty for none)")
    ap.add_argument("--ray-methods", default="ar,pearl",
                    help="methods also run on a Ray engine at every batch size (rows 'METHOD-ray'; empty: none)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_throughput" / time.strftime("%Y%m%d-%H%M%S")))
    ap.add_argument("--endpoint", action="store_true",
                    help="endpoint mode: N concurrent openai clients against `python -m pearl_ray serve` (and vLLM)")
    ap.add_argument("--no-hf-row", dest="hf_row", action="store_false",
                    help="endpoint mode: skip the transformers generate reference row (batch N beside N clients)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="endpoint mode: passes over every cell; the table gives medians and paired ratios")
    ap.add_argument("--from-runs", default="",
                    help="endpoint mode: write the tables and plot of ENDPOINT-RUNS.CSV (an earlier run's passes)")
    ap.add_argument("--vllm-python", default="",
                    help="endpoint mode: a Python with vllm-cpu installed (its own venv) to serve the same target")
    args = ap.parse_args(argv)
    if args.from_runs:  # the tables of an endpoint run from its endpoint-runs.csv (e.g. one that was stopped)
        import pandas as pd

        raw = pd.read_csv(args.from_runs)
        return write_endpoint(args, raw, sorted(raw.clients.unique().tolist()))
    if args.endpoint:
        return endpoint_mode(args, [int(x) for x in args.batch_sizes.split(",")])

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
                         dtype=args.dtype, num_threads=args.num_threads, cpu_kernels=args.cpu_kernels)
    print(f"engine ready in {time.perf_counter() - t_load:.1f} s; policy: "
          f"{(engine.measured or {}).get('measure_s', '-')} s of cost measurement", flush=True)
    prompts_all = heldout_prompts(engine.tokenizer, tuple(args.families.split(",")))
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    hf_model = None
    if "hf" in methods:
        hf_model = AutoModelForCausalLM.from_pretrained(engine.config.target, dtype=getattr(torch, args.dtype)).eval()
    # warm-up (not reported)
    engine.generate(prompts_all[:2], SamplingParams(max_new_tokens=8), method="pearl" if engine.has_draft else "ar")
    extras = [m for m in args.batch1_extras.split(",") if m]
    ray_methods = [f"{m}-ray" for m in args.ray_methods.split(",") if m]
    ray_engine = None
    if ray_methods:
        t_ray = time.perf_counter()
        ray_engine = PearlEngine(draft=args.draft, target=args.target, gamma=args.gamma or None, backend="ray",
                                 dtype=args.dtype, max_num_seqs=max(sizes), max_queued=max(sizes),
                                 cpu_kernels=args.cpu_kernels)
        ray_engine.generate(prompts_all[:1], SamplingParams(max_new_tokens=8))  # warm-up
        print(f"ray engine ready in {time.perf_counter() - t_ray:.1f} s, auto gamma {ray_engine.gamma}", flush=True)
    rows = []
    for bi, batch in enumerate(sizes):
        n = max(batch, args.min_prompts)
        prompts = [prompts_all[i % len(prompts_all)] for i in range(n)]
        cells = methods + ray_methods
        order = cells[bi % len(cells):] + cells[: bi % len(cells)]
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
            elif method.endswith("-ray"):
                r = run_ray(ray_engine, prompts, params, method[: -len("-ray")], batch)
            else:
                r = run_engine(engine, prompts, params, method, batch)
            ids[method] = r.pop("ids")
            rows.append({"batch": batch, "method": method, "prompts": n, **r})
            print(f"B={batch:2d} {method:5s} {r['tok_s']:7.1f} tok/s  p50 {r['p50_s']:6.2f} s  "
                  f"tokens {r['tokens']}  window {r['mean_window']:.2f}", flush=True)
        same = [ids[m] == ids["ar"] for m in ids if m != "hf" and "ar" in ids]
        for row in rows[-len(order):]:
            row["identical_to_ar"] = all(same) if row["method"] != "hf" else (ids["hf"] == ids.get("ar"))
    df = pd.DataFrame(rows)
    base = {m: df[(df.method == m) & (df.batch == sizes[0])].tok_s.iloc[0] for m in df.method.unique()}
    df["vs_own_batch1"] = [r.tok_s / base[r.method] for r in df.itertuples()]
    hf_by = {r.batch: r.tok_s for r in df.itertuples() if r.method == "hf"}
    ar_by = {(r.method, r.batch): r.tok_s for r in df.itertuples() if r.method in ("ar", "ar-ray")}

    def same_backend_ar(r):  # target-only decoding on the same backend, same batch size
        key = ("ar-ray" if r.method.endswith("-ray") else "ar", r.batch)
        return r.tok_s / ar_by[key] if key in ar_by else None

    df["vs_hf"] = [r.tok_s / hf_by[r.batch] if r.batch in hf_by else None for r in df.itertuples()]
    df["vs_ar"] = [same_backend_ar(r) for r in df.itertuples()]
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
             f"{args.num_threads} threads, {args.dtype}, {os.cpu_count()}-CPU machine")
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
