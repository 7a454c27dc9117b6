"""Prometheus metrics of the OpenAI endpoint, through ``ray.util.metrics`` (Ray's metrics agent exports
them, prefixed ``ray_``, on the node's metrics export port; the dashboard shows them too).

Named after vLLM's (``vllm:spec_decode_num_draft_tokens`` etc.), with ``pearl_`` instead of ``vllm:``
(Ray refuses ``:`` in names). Two sinks: the ingress sees HTTP outcomes and latencies
(``IngressMetrics``), the model replica sees tokens, drafts and its queue (``ServerMetrics``).
Definitions: ``num_draft_tokens`` = draft tokens verified by the target, so
``num_accepted_tokens / num_draft_tokens`` is the acceptance rate over all requests (``core/metrics.py``).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0]
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5]
RATE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
LENGTH_BUCKETS = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
WINDOW_BUCKETS = [0.5, 1, 2, 3, 4, 5, 6, 8, 12, 16]  # Ray wants positive bounds: window 0 falls in the first


class IngressMetrics:
    """Per HTTP request: status, time to first token, time per output token, end-to-end latency."""

    def __init__(self, model: str):
        tags = ("model", "route")
        self.requests = Counter("pearl_requests", "HTTP requests answered, by status code", tags + ("status",))
        self.ttft = Histogram("pearl_time_to_first_token_seconds", "Time from arrival to the first streamed token",
                              LATENCY_BUCKETS, tags)
        self.tpot = Histogram("pearl_time_per_output_token_seconds", "Mean time between output tokens of a request",
                              TOKEN_LATENCY_BUCKETS, tags)
        self.e2e = Histogram("pearl_e2e_request_latency_seconds", "Time from arrival to the last byte of a request",
                             LATENCY_BUCKETS, tags)
        self.model = model

    def answered(self, route: str, status: int) -> None:
        self.requests.inc(1, {"model": self.model, "route": route, "status": str(status)})

    def timings(self, route: str, ttft_s: float | None, tpot_s: float | None, e2e_s: float) -> None:
        tags = {"model": self.model, "route": route}
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags)
        if tpot_s is not None:
            self.tpot.observe(tpot_s, tags)
        self.e2e.observe(e2e_s, tags)


class ServerMetrics:
    """Per generation in a model replica: tokens, speculative decoding counts and rates, queue, faults."""

    def __init__(self, model: str):
        m = ("model", "method")
        self.prompt_tokens = Counter("pearl_prompt_tokens", "Prompt tokens processed", m)
        self.generation_tokens = Counter("pearl_generation_tokens", "Tokens generated", m)
        self.draft_tokens = Counter("pearl_spec_decode_num_draft_tokens", "Draft tokens verified by the target", m)
        self.accepted_tokens = Counter("pearl_spec_decode_num_accepted_tokens", "Draft tokens accepted", m)
        self.drafted_tokens = Counter("pearl_spec_decode_num_drafted_tokens",
                                      "Draft tokens proposed (including windows discarded unverified)", m)
        self.acceptance = Histogram("pearl_spec_decode_acceptance_rate", "Per-request acceptance rate",
                                    RATE_BUCKETS, m)
        self.mean_accepted_len = Histogram("pearl_spec_decode_mean_accepted_length",
                                           "Per-request mean accepted length (accepted tokens per run)",
                                           LENGTH_BUCKETS, m)
        self.finished = Counter("pearl_request_success", "Generations finished, by finish reason",
                                m + ("finished_reason",))
        self.failed = Counter("pearl_request_failure", "Generations that failed, by error", ("model", "error"))
        self.draft_failures = Counter("pearl_draft_failures", "Draft failures inside requests (finished on the target)",
                                      ("model",))
        self.restarts = Counter("pearl_worker_restarts", "Draft and target workers restarted", ("model", "side"))
        self.running = Gauge("pearl_num_requests_running", "Requests decoding in the replica's batch", ("model",))
        self.waiting = Gauge("pearl_num_requests_waiting", "Requests waiting for a slot in the replica's batch",
                             ("model",))
        self.batch_size = Histogram("pearl_batch_size_per_round", "Requests decoded together, per round",
                                    BATCH_BUCKETS, ("model",))
        self.window = Histogram("pearl_spec_decode_window_per_round",
                                "Draft window asked for per round (the speculation policy's choice; 0: none)",
                                WINDOW_BUCKETS, m)
        self.rounds = Counter("pearl_rounds", "Decoding rounds by schedule: plain (the target alone), turn (the "
                              "draft's window then the target's forward), once (both at the same time, PEARL)",
                              m + ("schedule",))
        self.model = model

    def queue(self, ongoing: int, max_num_seqs: int = 1) -> None:
        tags = {"model": self.model}
        self.running.set(min(max_num_seqs, ongoing), tags)
        self.waiting.set(max(0, ongoing - max_num_seqs), tags)

    def finish(self, method: str, prompt_tokens: int, stats) -> None:
        tags = {"model": self.model, "method": method}
        self.prompt_tokens.inc(prompt_tokens, tags)
        if stats.new_tokens:
            self.generation_tokens.inc(stats.new_tokens, tags)
        if stats.verified_tokens:
            self.draft_tokens.inc(stats.verified_tokens, tags)
            self.acceptance.observe(stats.acceptance_rate, tags)
        if stats.accepted_tokens:
            self.accepted_tokens.inc(stats.accepted_tokens, tags)
        if stats.drafted_tokens:
            self.drafted_tokens.inc(stats.drafted_tokens, tags)
        if stats.runs:
            self.mean_accepted_len.observe(stats.mean_accepted_len, tags)
        if stats.draft_failures:
            self.draft_failures.inc(stats.draft_failures, {"model": self.model})
        self.finished.inc(1, {**tags, "finished_reason": stats.finish_reason or "unknown"})
        for t in stats.round_timings:
            self.batch_size.observe(t.batch_size, {"model": self.model})
            self.window.observe(t.window, tags)
        for schedule in ("plain", "turn", "once"):
            n = getattr(stats, f"{schedule}_rounds")
            if n:
                self.rounds.inc(n, {**tags, "schedule": schedule})

    def fail(self, error: str) -> None:
        self.failed.inc(1, {"model": self.model, "error": error})

    def restarted(self, side: str, n: int) -> None:
        if n > 0:
            self.restarts.inc(n, {"model": self.model, "side": side})
