"""Validated, frozen configuration, and the one place where defaults live. No I/O, no Ray.

- ``SamplingParams``: what a caller asks of one generation (length, temperature, filters, seed, stops).
- ``EngineConfig``: how an engine is built (models, backend, gamma, placement, transport, timeouts).
  Plain data: it pickles, prints and saves as JSON next to a job's results (``engine.config``).
- ``Request``: one generation, built and validated once by the engine and passed whole to the side that
  runs the decoding loop (this process for ``backend="local"``, the target leader on Ray).

``gamma`` is the draft window (elsewhere: gpt-fast ``speculate_k``, vLLM ``num_speculative_tokens``, HF
``num_assistant_tokens``, TRT-LLM ``max_draft_len``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from .core.request import Request  # noqa: F401 - re-exported: the engine builds requests from here
from .core.rounds import RoundOptions
from .errors import InvalidParameterError

Method = Literal["pearl", "sd", "ar"]
"""How a request decodes: PEARL, vanilla speculative decoding, or the target alone."""
Transport = Literal["gloo", "actor"]
"""How the target leader reaches the draft on Ray: a private gloo link (default) or plain actor calls."""
METHODS: tuple[str, ...] = get_args(Method)
TRANSPORTS: tuple[str, ...] = get_args(Transport)
BACKENDS = ("local", "ray")
TENSOR_LANES = ("auto", "gloo", "nccl")
"""What carries the draft's probability rows on the gloo link: "auto" = NCCL when draft and leader sit on
different GPUs, else gloo (everything else always goes over gloo)."""
PLACEMENTS = ("STRICT_PACK", "STRICT_SPREAD", "PACK", "SPREAD")
SCHEDULES = ("auto", "turn", "once")
"""How draft and target share one device in a drafting round (``EngineConfig.schedule``)."""
CPU_KERNELS = ("onednn", "eager")
"""How CPU linear layers run (``modeling.kernels``)."""
DEFAULT_GAMMA = 4
MAX_GAMMA = 16
POLICY_MAX_GAMMA = 8
"""The largest window the adaptive speculation policy tries on the local backend (on Ray: the measured auto gamma)."""
DEFAULT_MAX_NUM_SEQS = 8
DEFAULT_MAX_PREFILL_TOKENS = 256
"""Prompt tokens per round by default (``EngineConfig.max_prefill_tokens_per_round``): on a 2-core CPU a
256-token chunk of the default target costs a few decoding rounds, so the running streams' gaps stay
short while a long prompt joins (docs/bench/prefill-2026-12-07.md)."""
SEED_LIMIT = 2**63
MAX_LOGPROBS = 20
"""Most alternatives per token ``SamplingParams.logprobs`` may ask for (the endpoint allows 5, as OpenAI)."""
"""Seeds lie in [0, 2**63): they travel as int64 and seed torch generators."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_gamma(gamma, allow_auto: bool = False) -> None:
    if gamma is None and allow_auto:
        return
    if not _is_int(gamma) or not 1 <= gamma <= MAX_GAMMA:
        auto = " (or None for auto)" if allow_auto else ""
        raise InvalidParameterError(f"gamma must be an integer in [1, {MAX_GAMMA}]{auto}, got {gamma!r}")


def check_method(method) -> None:
    if method not in METHODS:
        raise InvalidParameterError(f"method must be one of {METHODS}, got {method!r}")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    """Upper bound on generated tokens; with ``ignore_eos`` the output has exactly this many."""
    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before softmax."""
    top_p: float = 1.0
    """Nucleus filter in (0, 1]; 1 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    seed: int = 0
    """Seeds the request's generators (coins, draft sampling): an int in [0, 2**63)."""
    stop: tuple[str, ...] | None = None
    """Stop strings: generation ends at the first committed token whose text completes one; the text is cut before it."""
    ignore_eos: bool = False
    """Fixed-length protocol (the paper's): do not stop at EOS."""
    logprobs: int | None = None
    """Return each generated token's log-probability under the target and the ``logprobs`` most likely
    alternatives (0..``MAX_LOGPROBS``): the target's raw distribution (log-softmax of its logits, before
    temperature, top-k and top-p), as vLLM reports them. None: not computed (no cost)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            if not isinstance(self.stop, (list, tuple)):
                raise InvalidParameterError(f"stop must be a string or a list of strings, got {self.stop!r}")
            object.__setattr__(self, "stop", tuple(self.stop))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidParameterError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidParameterError(f"{name} must be a number, got {value!r}")
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise InvalidParameterError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidParameterError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidParameterError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise InvalidParameterError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.stop is not None and any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise InvalidParameterError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameterError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidParameterError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, got "
                                        f"{self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def coerce(cls, params) -> "SamplingParams":
        """``None`` -> defaults; a dict -> ``SamplingParams(**dict)`` (unknown keys are an error)."""
        if params is None:
            return cls()
        if isinstance(params, cls):
            return params
        if isinstance(params, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(params) - known)
            if unknown:
                raise InvalidParameterError(f"unknown sampling parameters {unknown}; known: {sorted(known)}")
            return cls(**params)
        raise InvalidParameterError(f"params must be SamplingParams or a dict, got {type(params).__name__}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides how an engine is built. ``engine.config`` holds the resolved copy (model
    paths instead of names, the chosen gamma) and ``to_dict()`` is what jobs save beside their results."""

    draft: str | None = None
    target: str | None = None
    method: str = "pearl"
    """Default method of the engine's requests: "pearl", "sd" (vanilla speculative decoding) or "ar"."""
    gamma: int | None = DEFAULT_GAMMA
    """Draft window; None = auto: the adaptive speculation policy (``core.policy``: each round's window from
    measured forward costs and running acceptance), up to ``POLICY_MAX_GAMMA`` locally and up to the
    measured cost ratio on Ray (a tensor-parallel target keeps that ratio as a fixed window).
    ``PearlEngine``'s default is None."""
    adaptive: bool = False
    """Set when the engine resolves ``gamma=None``: requests follow the policy, and ``gamma`` holds its
    largest window. Requests with an explicit ``gamma=`` keep a fixed window."""
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    """Requests one pair decodes at once: locally a call's prompts (further ones join as slots free up); on
    Ray the calls in flight, which the target leader's continuous loop batches (``runtime.leader_loop``)."""
    kv_budget_tokens: int | None = None
    """KV-cache positions one pair may hold for the requests it decodes at once (vLLM's counterpart is its
    memory fraction); None: no limit beyond ``max_num_seqs``. The slot cache is a rectangle (one row per
    request, as long as the longest), so admitting a request needs (running + 1) x the longest reservation
    <= the budget, a request reserving prompt + max_new_tokens + its window + 1. One that does not fit now
    waits; one that could never fit is refused up front (``CacheBudgetError``, with the numbers). Bytes per
    position: 2 x layers x kv_heads x head_dim x dtype size (the target's; the draft's is far smaller)."""
    max_prefill_tokens_per_round: int | None = DEFAULT_MAX_PREFILL_TOKENS
    """Prompt tokens one round of the batched loop feeds, over every request that is joining (vLLM's
    counterpart is its chunked-prefill token budget). A longer prompt is fed in chunks over several rounds,
    to the target and the draft alike, while the running requests' rows decode in every one of those
    rounds; requests join in arrival order, and a prompt that fits what a round has left goes in whole.
    Greedy output is the same as with the whole prompt in one forward. None: each request's first round
    feeds its whole prompt at once (every running request waits for it)."""
    pre_verify: bool = True
    post_verify: bool = True
    draft_greedy: bool = False
    """When sampling, draft by argmax (q one-hot, ids only on the wire). Still lossless."""
    schedule: str = "auto"
    """Where one process holds both models (the local backend): how the sides share the device in a drafting
    round. "turn": the draft's window, then the target's verification, each with the whole device (adaptive
    PEARL requests then run vanilla SD rounds); "once": PEARL with the sides at the same time (on CPU two
    threads with the cores split between them, on CUDA two streams); "auto": with the adaptive policy, its
    choice each round between those two and plain decoding (from their measured costs), else "once" for a
    fixed-window PEARL request. "once" and "auto" need a device that can be split: CUDA, or at least 2 CPU
    threads (``num_threads``); otherwise every round is in turn."""
    backend: str = "local"
    device: str = "cpu"
    dtype: str = "float32"
    cpu_kernels: str = "onednn"
    """On CPU, how linear layers run: ``"onednn"`` through oneDNN with weights packed at load time (2-3x
    faster per decode step here; ``modeling.kernels``), ``"eager"`` torch's default GEMM. Tensor-parallel
    targets keep DeepSpeed's layers."""
    compile: bool = False
    """Local backend: run both models' decoding forwards through ``torch.compile(fullgraph=True)``, rows and
    widths padded to buckets (``modeling.batched``), as CUDA graphs on CUDA (``mode="reduce-overhead"``).
    Each bucket compiles on its first use. Off by default: on CPU it does not pay."""
    num_threads: int | None = None
    """torch threads per model (local) or per worker (Ray; None = the worker's CPU count, at least 1)."""
    prefill_threads: int | None = None
    """Ray on CPU: torch threads the target leader uses for a prompt pass (a forward of at least
    ``PREFILL_MIN_TOKENS`` tokens). While the target reads the prompt the draft has little to do (its own
    prompt pass is several times shorter), so by default (None) the target borrows the draft's threads for
    it: the pair's cores, no more. 0 = never borrow. Ignored on GPUs and for tensor-parallel targets."""
    max_queued: int = 64
    """Requests that may wait behind the running one; past it a call raises ``QueueFullError``."""
    queue_timeout_s: float = 600.0
    # Ray backend
    colocate: bool | None = None
    """Ray: one worker, the target leader, holds both models in one placement bundle with the pair's
    resources (their CPUs, or one GPU); no draft actor and no link. Its rounds then pick a schedule as the
    local backend's (``schedule``). With a tensor-parallel target (explicit ``colocate=True`` only) the draft
    sits beside rank 0, in its bundle, and rounds keep fixed windows. None (default): colocated when
    both sides would share one device anyway, i.e. a CPU pair (no GPUs asked for) with one target rank and
    a packed placement; False keeps two actors joined by the link (separate GPUs or nodes)."""
    transport: str = "gloo"
    placement: str = "STRICT_PACK"
    draft_num_cpus: float = 1.0
    target_num_cpus: float = 1.0
    draft_num_gpus: float = 0.0
    target_num_gpus: float = 0.0
    round_timeout_s: float = 30.0
    result_interval_s: float = 1.0
    """Ray: for a request whose caller wants its result rather than each round's tokens (``generate``
    without ``on_tokens``, a non-streamed HTTP request, ``stream(result_only=True)``), the target leader
    sends its tokens at most once per this many seconds after the first. Each message costs CPU on the
    leader's cores (at batch 8 on a 2-core machine one per round per request cost ~5% of the throughput).
    0: every round, as for streams."""
    start_timeout_s: float = 600.0
    """Loading the models in the workers."""
    placement_timeout_s: float = 60.0
    """Waiting for the cluster to grant the draft's and the target's resources."""
    measure_context: int = 128
    ray_address: str | None = None
    """Where to join Ray when it is not running in this process; None: $RAY_ADDRESS or a private local one."""
    tensor_parallel_size: int = 1
    """Target ranks (one GPU each with ``target_num_gpus=1``): a DeepSpeed AutoTP group led by rank 0."""
    load_sharded: bool = True
    """TP > 1: build the target on the meta device and load only each rank's slice of the checkpoint."""
    kernel_inject: bool = False
    """TP > 1 on CUDA: DeepSpeed's fused inference kernels instead of plain AutoTP."""
    tensor_lane: str = "auto"
    preset: str | None = None
    """The pair preset this config came from (``modeling.presets``), for the record."""

    def __post_init__(self) -> None:
        check_method(self.method)
        check_gamma(self.gamma, allow_auto=True)
        if self.backend not in BACKENDS:
            raise InvalidParameterError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.transport not in TRANSPORTS:
            raise InvalidParameterError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.schedule not in SCHEDULES:
            raise InvalidParameterError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.cpu_kernels not in CPU_KERNELS:
            raise InvalidParameterError(f"cpu_kernels must be one of {CPU_KERNELS}, got {self.cpu_kernels!r}")
        if self.tensor_lane not in TENSOR_LANES:
            raise InvalidParameterError(f"tensor_lane must be one of {TENSOR_LANES}, got {self.tensor_lane!r}")
        if not _is_int(self.tensor_parallel_size) or self.tensor_parallel_size < 1:
            raise InvalidParameterError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.colocate is None:
            object.__setattr__(self, "colocate", self.shares_one_device())
        if self.colocate and self.placement in ("STRICT_SPREAD", "SPREAD"):
            raise InvalidParameterError("colocate=True holds both models in one worker (with a tensor-parallel target: "
                                        "its rank 0): it needs a packed placement")
        if self.tensor_parallel_size > 1 and self.backend != "ray":
            raise InvalidParameterError("tensor_parallel_size > 1 needs backend='ray' (one actor per target rank)")
        if self.placement not in PLACEMENTS:
            raise InvalidParameterError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            raise InvalidParameterError(f"num_threads must be an integer >= 1, got {self.num_threads!r}")
        if self.prefill_threads is not None and (not _is_int(self.prefill_threads) or self.prefill_threads < 0):
            raise InvalidParameterError(f"prefill_threads must be an integer >= 0, got {self.prefill_threads!r}")
        if not _is_int(self.max_num_seqs) or self.max_num_seqs < 1:
            raise InvalidParameterError(f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        if self.kv_budget_tokens is not None and (not _is_int(self.kv_budget_tokens) or self.kv_budget_tokens < 1):
            raise InvalidParameterError(f"kv_budget_tokens must be an integer >= 1 or None, got {self.kv_budget_tokens!r}")
        if self.max_prefill_tokens_per_round is not None and (not _is_int(self.max_prefill_tokens_per_round)
                                                              or self.max_prefill_tokens_per_round < 1):
            raise InvalidParameterError(f"max_prefill_tokens_per_round must be an integer >= 1, or None for whole "
                                        f"prompts, got {self.max_prefill_tokens_per_round!r}")
        if not _is_int(self.max_queued) or self.max_queued < 0:
            raise InvalidParameterError(f"max_queued must be an integer >= 0, got {self.max_queued!r}")
        if not (isinstance(self.result_interval_s, (int, float)) and self.result_interval_s >= 0):
            raise InvalidParameterError(f"result_interval_s must be >= 0, got {self.result_interval_s!r}")
        for name in ("round_timeout_s", "start_timeout_s", "placement_timeout_s", "queue_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("draft_num_cpus", "target_num_cpus", "draft_num_gpus", "target_num_gpus"):
            if not getattr(self, name) >= 0:
                raise InvalidParameterError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def shares_one_device(self) -> bool:
        """Whether a Ray pair's two sides would share one device: CPU sides (no GPU asked for), one target rank,
        packed on one node. Such a pair is colocated unless ``colocate=False``."""
        return (self.backend == "ray" and self.device == "cpu" and self.tensor_parallel_size == 1
                and self.placement in ("STRICT_PACK", "PACK") and not self.draft_num_gpus and not self.target_num_gpus)

    def round_options(self, method: str, gamma: int, greedy: bool, adaptive: bool = False) -> RoundOptions:
        """The loop's options for one request: vanilla SD is the loop with both PEARL ablations off, and
        target-only decoding is the loop without the draft. ``adaptive``: the policy picks each round's
        window, at most ``gamma``."""
        if method == "ar":
            return RoundOptions(gamma, greedy, self.draft_greedy, pre_verify=True, post_verify=False, use_draft=False)
        if method == "sd":
            return RoundOptions(gamma, greedy, self.draft_greedy, pre_verify=False, post_verify=False,
                                adaptive=adaptive)
        return RoundOptions(gamma, greedy, self.draft_greedy, self.pre_verify, self.post_verify, adaptive=adaptive)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def bundle(cpu: float, gpu: float) -> dict:
    """A placement bundle for one side. Ray refuses empty bundles, so a side that asks for nothing reserves
    one byte of ``memory`` (not a sliver of CPU, which would keep a 2-CPU node from holding a 1+1 CPU pair)."""
    return {k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v} or {"memory": 1.0}


def context_room(max_context: int, prompt_len: int, window: int) -> int:
    """New tokens that fit a context of ``max_context`` after a ``prompt_len``-token prompt: the draft window
    (``window``, 0 for target-only) and one position for the next token need room too. The one rule every
    entry point checks lengths with (engine, endpoint, GSM8K job)."""
    return max_context - prompt_len - window - 1


def request_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th prompt of a call with ``SamplingParams.seed == seed``."""
    return (seed * 1_000_003 + index) % SEED_LIMIT
