"""What a long prompt does to the streams already running: whole prompt passes against chunked ones.

``--clients`` streaming chat clients (4) keep asking for replies; once they are streaming, one more client
sends a ~``--long-tokens``-token prompt (3000: GSM8K problems with worked answers to summarise). Each
configuration of ``--budgets`` (``max_prefill_tokens_per_round``; 0 = the whole prompt in one forward) runs
the same workload in turn, in one process, so the rows of the table are comparable.

The pair runs in the target leader's continuous loop (``runtime.leader_loop.LeaderLoop``) in this process,
as a colocated Ray leader runs it (both models in one worker, the local engine's schedule and policy), and
each client is a thread reading its ``RequestStream``, as ``TargetLeader.submit`` does for an endpoint
request (minus the Ray hop).

Reported per configuration:
- the chat streams' gaps between deliveries (a delivery is what one round committed for a stream; PEARL
  commits several tokens at once): p50, p99 and the longest, over the long request's wait for its first
  token and over the whole run;
- the tokens the chat streams received during that wait (every running stream should keep getting some);
- the long request's time to first token.

Usage: ``python jobs/bench_prefill.py`` (the embedded pair; 2-5 minutes on 2 cores); ``--endpoint`` also runs
it against ``python -m pearl_ray serve`` on 127.0.0.1 with ``openai`` clients. ``--out DIR``
also writes ``prefill.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def long_prompt(engine, tokens: int) -> tuple[list[int], str]:
    """A summarising request over GSM8K problems with their answers, about ``tokens`` tokens once wrapped:
    its ids, and the user message's text."""
    from pearl_ray.modeling.chat import user_turn

    items = [json.loads(line) for line in (REPO / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()[:200]]
    head = "Below are word problems with worked answers. Summarise the methods they use, in five bullet points.\n\n"
    body, ids = "", []
    for it in items:
        body += f"Problem: {it['question']}\nAnswer: {it['answer']}\n\n"
        ids = engine.encode(user_turn(engine.tokenizer, head + body))
        if len(ids) >= tokens:
            break
    return ids, head + body


def chat_texts() -> list[str]:
    return json.loads((REPO / "data" / "heldout" / "prompts.json").read_text())["families"]["chat"]


def chat_prompts(engine) -> list[list[int]]:
    from pearl_ray.modeling.chat import user_turn

    return [engine.encode(user_turn(engine.tokenizer, p)) for p in chat_texts()]


def make_leader(engine):
    """The engine's pair in a target leader's loop in this process (the colocated leader's set-up)."""
    import torch

    from pearl_ray.runtime.leader_loop import LeaderLoop

    b = engine.backend
    leader = LeaderLoop(b.target_lm, b.decode, engine.config.max_num_seqs, policy=b.policy,
                        threads=torch.get_num_threads())
    leader.set_draft(b.loop.draft)
    leader.loop.set_concurrent(b.concurrent, b.loop.split_threads)
    leader.loop.schedule = b.loop.schedule
    return leader


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


def start_chat_clients(chat_client, first_seen: list, args) -> tuple[list[threading.Thread], float]:
    """One thread per chat client; returns once every client has seen tokens and ``args.lead_s`` more have
    passed (the streams are in steady state when the long prompt arrives), with the threads and start time."""
    threads = [threading.Thread(target=chat_client, args=(i,), daemon=True) for i in range(args.clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for ev in first_seen:
        if not ev.wait(args.timeout_s):
            raise TimeoutError("a chat client got no tokens")
    time.sleep(args.lead_s)
    return threads, t_start


def run_once(engine, leader, budget: int | None, chats: list[list[int]], long_ids: list[int], args) -> dict:
    from pearl_ray import SamplingParams

    leader.loop.max_prefill_tokens = budget  # the loop is idle between runs
    stop = threading.Event()
    streams: list[list[tuple[float, int]]] = []  # per chat request: (arrival time, tokens) per delivery
    lock = threading.Lock()
    first_seen = [threading.Event() for _ in range(args.clients)]
    chat_params = SamplingParams(max_new_tokens=args.stream_tokens, ignore_eos=True)

    def chat_client(i: int) -> None:
        k = 0
        while not stop.is_set():
            req = engine.make_request(chats[(i + k * args.clients) % len(chats)], chat_params, index=i)
            k += 1
            stream = leader.open(req)
            arrivals: list[tuple[float, int]] = []
            with lock:
                streams.append(arrivals)
            while True:
                item = stream.next_item(args.timeout_s)
                if isinstance(item, dict):
                    break
                arrivals.append((time.perf_counter(), len(item)))
                if len(arrivals) >= 2:
                    first_seen[i].set()
                if stop.is_set():
                    leader.cancel(stream)
                    break

    threads, t_start = start_chat_clients(chat_client, first_seen, args)
    long_req = engine.make_request(long_ids, SamplingParams(max_new_tokens=args.long_new_tokens, ignore_eos=True))
    t_long = time.perf_counter()
    stream = leader.open(long_req)
    first = stream.next_item(args.timeout_s)
    t_first = time.perf_counter()
    while not isinstance(first, dict):
        first = stream.next_item(args.timeout_s)
    t_long_done = time.perf_counter()
    time.sleep(args.tail_s)
    stop.set()
    for t in threads:
        t.join(args.timeout_s)
    t_end = time.perf_counter()
    return summarise(streams, budget, len(long_ids), t_start, t_long, t_first, t_long_done, t_end)


def summarise(streams, budget, n_long, t_start, t_long, t_first, t_long_done, t_end) -> dict:
    """The gaps of the chat streams (``streams``: per chat request, (arrival time, tokens) per delivery)."""
    wait_gaps, all_gaps, wait_tokens, rows_in_wait = [], [], 0, 0
    for arrivals in streams:
        for (a, _), (b, n) in zip(arrivals, arrivals[1:]):
            all_gaps.append(b - a)
            if b > t_long and a < t_first:  # the gap overlaps the long request's wait
                wait_gaps.append(b - a)
        got = sum(n for when, n in arrivals if t_long <= when <= t_first)
        wait_tokens += got
        rows_in_wait += 1 if any(t_long <= when <= t_first for when, _ in arrivals) else 0
    return {"max_prefill_tokens_per_round": budget, "long_prompt_tokens": n_long,
            "long_ttft_s": round(t_first - t_long, 3), "long_total_s": round(t_long_done - t_long, 3),
            "gap_wait_p50_ms": round(1e3 * quantile(wait_gaps, 0.5), 1),
            "gap_wait_p99_ms": round(1e3 * quantile(wait_gaps, 0.99), 1),
            "gap_wait_max_ms": round(1e3 * max(wait_gaps, default=float("nan")), 1),
            "gap_all_p50_ms": round(1e3 * quantile(all_gaps, 0.5), 1),
            "gap_all_p99_ms": round(1e3 * quantile(all_gaps, 0.99), 1),
            "gaps_in_wait": len(wait_gaps), "gaps_all": len(all_gaps),
            "chat_tokens_during_wait": wait_tokens,
            "chat_tok_s_during_wait": round(wait_tokens / max(t_first - t_long, 1e-9), 2),
            "run_s": round(t_end - t_start, 1)}


def run_endpoint(budget: int | None, chats: list[str], long_text: str, n_long: int, args) -> dict:
    """The same workload against ``python -m pearl_ray serve`` on 127.0.0.1 (started here, stopped after),
    through the ``openai`` client. A delivery is one streamed chunk with text (its token count is unknown:
    counted as 1)."""
    import signal
    import socket
    import subprocess

    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "pearl_ray", "serve", "--port", str(port), "--max-num-seqs", str(args.clients + 1),
           "--max-prefill-tokens-per-round", str(budget or 0), "--app-name", f"prefill{budget or 0}"]
    if args.gamma:
        cmd += ["--gamma", str(args.gamma)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray, stopped with the server
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + args.timeout_s
        while not any("serving" in ln for ln in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + "".join(lines[-30:]))
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=args.timeout_s)

        def ask(text: str, max_tokens: int):
            stream = client.chat.completions.create(model="default-target", stream=True, max_tokens=max_tokens,
                                                    temperature=0, messages=[{"role": "user", "content": text}])
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield time.perf_counter()

        for _ in ask(chats[0], 8):  # warm-up
            pass
        stop = threading.Event()
        streams: list[list[tuple[float, int]]] = []
        lock = threading.Lock()
        first_seen = [threading.Event() for _ in range(args.clients)]

        def chat_client(i: int) -> None:
            k = 0
            while not stop.is_set():
                arrivals: list[tuple[float, int]] = []
                with lock:
                    streams.append(arrivals)
                for when in ask(chats[(i + k * args.clients) % len(chats)], args.stream_tokens):
                    arrivals.append((when, 1))
                    if len(arrivals) >= 2:
                        first_seen[i].set()
                    if stop.is_set():
                        break
                k += 1

        threads, t_start = start_chat_clients(chat_client, first_seen, args)
        t_long = time.perf_counter()
        got = list(ask(long_text, args.long_new_tokens))
        t_first, t_long_done = got[0], time.perf_counter()
        time.sleep(args.tail_s)
        stop.set()
        for t in threads:
            t.join(args.timeout_s)
        row = summarise(streams, budget, n_long, t_start, t_long, t_first, t_long_done, time.perf_counter())
        row["endpoint"] = True
        return row
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the server stops the Serve app and the Ray it started
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def warm_up(engine, leader, chats, long_ids) -> None:
    """One short chat and a 300-token prompt through the loop (allocations, oneDNN's first calls)."""
    from pearl_ray import SamplingParams

    for ids in (chats[0], long_ids[:300]):
        stream = leader.open(engine.make_request(ids, SamplingParams(max_new_tokens=8, ignore_eos=True)))
        while not isinstance(stream.next_item(600), dict):
            pass


def table(rows: list[dict]) -> str:
    head = ("| max_prefill_tokens_per_round | long TTFT s | chat gap p50 / p99 / max ms, during the long wait | "
            "chat gap p50 / p99 ms, whole run | chat tokens during the wait (tok/s) |")
    lines = [head, "|" + "---|" * 5]
    for r in rows:
        name = r["max_prefill_tokens_per_round"] or "off (whole prompt)"
        lines.append(f"| {name} | {r['long_ttft_s']} | {r['gap_wait_p50_ms']} / {r['gap_wait_p99_ms']} / "
                     f"{r['gap_wait_max_ms']} | {r['gap_all_p50_ms']} / {r['gap_all_p99_ms']} | "
                     f"{r['chat_tokens_during_wait']} ({r['chat_tok_s_during_wait']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--method", default="pearl", choices=["pearl", "sd", "ar"])
    ap.add_argument("--gamma", type=int, default=0, help="fixed draft window; 0 = the adaptive policy (default)")
    ap.add_argument("--budgets", default="0,256", help="max_prefill_tokens_per_round values to compare (0 = off)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=3000)
    ap.add_argument("--long-new-tokens", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=64, help="max_tokens of each chat request")
    ap.add_argument("--lead-s", type=float, default=2.0, help="chat streaming before the long prompt is sent")
    ap.add_argument("--tail-s", type=float, default=2.0, help="chat streaming after the long request ends")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--num-threads", type=int)
    ap.add_argument("--endpoint", action="store_true",
                    help="also run the workload against `python -m pearl_ray serve` on 127.0.0.1 (openai clients)")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process rows")
    ap.add_argument("--out", help="a folder for prefill.json")
    args = ap.parse_args(argv)

    from pearl_ray import PearlEngine

    budgets = [int(b) or None for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    engine = PearlEngine(draft=args.draft, target=args.target, method=args.method, gamma=args.gamma or None,
                         max_num_seqs=args.clients + 1, num_threads=args.num_threads)
    print(f"[bench_prefill] engine ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    chats, (long_ids, long_text) = chat_prompts(engine), long_prompt(engine, args.long_tokens)
    rows = []
    if not args.no_local:
        leader = make_leader(engine)
        warm_up(engine, leader, chats, long_ids)
        for budget in budgets:
            rows.append(run_once(engine, leader, budget, chats, long_ids, args))
            print(f"[bench_prefill] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        print(table(rows), flush=True)
    if args.endpoint:
        engine.shutdown()  # its cores go to the server's workers
        served = []
        for budget in budgets:
            served.append(run_endpoint(budget, chat_texts(), long_text, len(long_ids), args))
            print(f"[bench_prefill] endpoint {json.dumps(served[-1])}", file=sys.stderr, flush=True)
        print("\nThe endpoint (Ray Serve on 127.0.0.1, openai clients; tokens counted as streamed chunks):")
        print(table(served), flush=True)
        rows += served
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prefill.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                      "config": engine.config.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the leader's loop thread and the draft's thread never end on their own; tearing the interpreter down
    # around them aborts in torch's thread pools, so leave at once (everything is written)
    os._exit(code)
