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
import math
from dataclasses import dataclass
from typing import Literal, get_args, get_type_hints

from .core.request import Request  # noqa: F401 - re-exported: the engine builds requests from here
from .core.rounds import RoundOptions
from .errors import ContextLengthError, InvalidParameterError, PromptError

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


def option(default=None, help: str = "", *, ge=None, gt=None, le=None, choices=None, flag_none=None):
    """One option, declared once: its default, its check and its command-line help (``dataclasses.field``
    metadata, read by ``check_option``, ``add_options`` and ``serve.config.serve_field``).

    ``ge``, ``gt``, ``le``: bounds of a number; ``choices``: the values allowed; ``flag_none``: ``(value, meaning)``
    when a command line writes None as a value, e.g. ``(0, "auto")`` for ``--gamma 0``. An option with none of
    these is not checked (any value is taken as given). The field's docstring says what it does."""
    checks = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("choices", choices)) if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, "checks": checks, "flag_none": flag_none})


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides how an engine is built. ``engine.config`` holds the resolved copy (model
    paths instead of names, the chosen gamma) and ``to_dict()`` is what jobs save beside their results.

    Each field is the one declaration of its option (``option``): ``ServeConfig``, the command line and the
    GSM8K job take their options, defaults and checks from here."""

    draft: str | None = option(None, "draft model dir, preset name or hub id (default: default-draft)")
    target: str | None = option(None, "target model dir, preset name or hub id (default: default-target)")
    method: str = option("pearl", "default method of the requests", choices=METHODS)
    """Default method of the engine's requests: "pearl", "sd" (vanilla speculative decoding) or "ar"."""
    gamma: int | None = option(DEFAULT_GAMMA, "fixed draft window; 0 = auto (locally the adaptive policy, on ray "
                                              "the measured ratio)", ge=1, le=MAX_GAMMA, flag_none=(0, "auto"))
    """Draft window; None = auto: the adaptive speculation policy (``core.policy``: each round's window from
    measured forward costs and running acceptance), up to ``POLICY_MAX_GAMMA`` locally and up to the
    measured cost ratio on Ray (a tensor-parallel target keeps that ratio as a fixed window).
    ``PearlEngine``'s default is None."""
    adaptive: bool = option(False)
    """Set when the engine resolves ``gamma=None``: requests follow the policy, and ``gamma`` holds its
    largest window. Requests with an explicit ``gamma=`` keep a fixed window."""
    max_num_seqs: int = option(DEFAULT_MAX_NUM_SEQS, "requests one pair decodes at once", ge=1)
    """Requests one pair decodes at once: locally a call's prompts (further ones join as slots free up); on
    Ray the calls in flight, which the target leader's continuous loop batches (``runtime.leader_loop``)."""
    kv_budget_tokens: int | None = option(None, "KV-cache positions one pair may hold at once (default: no limit)",
                                          ge=1)
    """KV-cache positions one pair may hold for the requests it decodes at once (vLLM's counterpart is its
    memory fraction); None: no limit beyond ``max_num_seqs``. The slot cache is a rectangle (one row per
    request, as long as the longest), so admitting a request needs (running + 1) x the longest reservation
    <= the budget, a request reserving prompt + max_new_tokens + its window + 1. One that does not fit now
    waits; one that could never fit is refused up front (``CacheBudgetError``, with the numbers). Bytes per
    position: 2 x layers x kv_heads x head_dim x dtype size (the target's; the draft's is far smaller)."""
    max_prefill_tokens_per_round: int | None = option(
        DEFAULT_MAX_PREFILL_TOKENS, f"prompt tokens one decoding round feeds; a longer prompt goes in chunks over "
        f"several rounds while the running requests keep decoding (default {DEFAULT_MAX_PREFILL_TOKENS})",
        ge=1, flag_none=(0, "each prompt whole in one forward"))
    """Prompt tokens one round of the batched loop feeds, over every request that is joining (vLLM's
    counterpart is its chunked-prefill token budget). A longer prompt is fed in chunks over several rounds,
    to the target and the draft alike, while the running requests' rows decode in every one of those
    rounds; requests join in arrival order, and a prompt that fits what a round has left goes in whole.
    Greedy output is the same as with the whole prompt in one forward. None: each request's first round
    feeds its whole prompt at once (every running request waits for it)."""
    pre_verify: bool = option(True, "PEARL's pre-verify (--no-pre-verify: the ablation)")
    post_verify: bool = option(True, "PEARL's post-verify (--no-post-verify: the ablation)")
    draft_greedy: bool = option(False, "draft by argmax when sampling (still lossless)")
    """When sampling, draft by argmax (q one-hot, ids only on the wire). Still lossless."""
    schedule: str = option("auto", "one process holding both models (local, or a colocated ray pair): the sides in "
                                   "turn, at once (PEARL), or the policy's choice per round (auto, default)",
                           choices=SCHEDULES)
    """Where one process holds both models (the local backend): how the sides share the device in a drafting
    round. "turn": the draft's window, then the target's verification, each with the whole device (adaptive
    PEARL requests then run vanilla SD rounds); "once": PEARL with the sides at the same time (on CPU two
    threads with the cores split between them, on CUDA two streams); "auto": with the adaptive policy, its
    choice each round between those two and plain decoding (from their measured costs), else "once" for a
    fixed-window PEARL request. "once" and "auto" need a device that can be split: CUDA, or at least 2 CPU
    threads (``num_threads``); otherwise every round is in turn."""
    backend: str = option("local", "where the pair runs", choices=BACKENDS)
    device: str = option("cpu", "cpu | cuda | cuda:N")
    dtype: str = option("float32", "float32 | bfloat16 | float16")
    cpu_kernels: str = option("onednn", "CPU linear layers: oneDNN with packed weights (default) or torch's default "
                                        "GEMM", choices=CPU_KERNELS)
    """On CPU, how linear layers run: ``"onednn"`` through oneDNN with weights packed at load time (2-3x
    faster per decode step here; ``modeling.kernels``), ``"eager"`` torch's default GEMM. Tensor-parallel
    targets keep DeepSpeed's layers."""
    num_threads: int | None = option(None, "torch threads per model (local) or per worker (ray)", ge=1)
    """torch threads per model (local) or per worker (Ray; None = the worker's CPU count, at least 1)."""
    prefill_threads: int | None = option(None, "ray on CPU: torch threads of the target's prompt passes", ge=0)
    """Ray on CPU: torch threads the target leader uses for a prompt pass (a forward of at least
    ``PREFILL_MIN_TOKENS`` tokens). While the target reads the prompt the draft has little to do (its own
    prompt pass is several times shorter), so by default (None) the target borrows the draft's threads for
    it: the pair's cores, no more. 0 = never borrow. Ignored on GPUs and for tensor-parallel targets."""
    max_queued: int = option(64, "requests that may wait behind the running ones", ge=0)
    """Requests that may wait behind the running one; past it a call raises ``QueueFullError``."""
    queue_timeout_s: float = option(600.0, "longest wait for a turn in the queue", gt=0)
    # Ray backend
    colocate: bool | None = option(None, "ray backend: both models in the target leader's worker, one bundle, no "
                                         "draft actor or link (default: yes for a CPU pair with one target rank; "
                                         "--no-colocate keeps two actors)")
    """Ray: one worker, the target leader, holds both models in one placement bundle with the pair's
    resources (their CPUs, or one GPU); no draft actor and no link. Its rounds then pick a schedule as the
    local backend's (``schedule``). With a tensor-parallel target (explicit ``colocate=True`` only) the draft
    sits beside rank 0, in its bundle, and rounds keep fixed windows. None (default): colocated when
    both sides would share one device anyway, i.e. a CPU pair (no GPUs asked for) with one target rank and
    a packed placement; False keeps two actors joined by the link (separate GPUs or nodes)."""
    transport: str = option("gloo", "ray backend only: how the target leader reaches the draft (default gloo)",
                            choices=TRANSPORTS)
    placement: str = option("STRICT_PACK", "placement group strategy of the pair (STRICT_SPREAD: draft and target "
                                           "on different nodes)", choices=PLACEMENTS)
    draft_num_cpus: float = option(1.0, "CPUs of the draft's bundle", ge=0)
    target_num_cpus: float = option(1.0, "CPUs of each target rank's bundle", ge=0)
    draft_num_gpus: float = option(0.0, "GPUs of the draft's bundle", ge=0)
    target_num_gpus: float = option(0.0, "GPUs of each target rank's bundle", ge=0)
    round_timeout_s: float = option(30.0, "longest wait for one side's round", gt=0)
    result_interval_s: float = option(1.0, "ray: at most one message per this many seconds for a result-only "
                                           "request", ge=0)
    """Ray: for a request whose caller wants its result rather than each round's tokens (``generate``
    without ``on_tokens``, a non-streamed HTTP request, ``stream(result_only=True)``), the target leader
    sends its tokens at most once per this many seconds after the first. Each message costs CPU on the
    leader's cores (at batch 8 on a 2-core machine one per round per request cost ~5% of the throughput).
    0: every round, as for streams."""
    start_timeout_s: float = option(600.0, "longest wait for the models to load in the workers", gt=0)
    """Loading the models in the workers."""
    placement_timeout_s: float = option(60.0, "longest wait for the cluster to grant the pair's resources", gt=0)
    """Waiting for the cluster to grant the draft's and the target's resources."""
    measure_context: int = option(128)
    ray_address: str | None = option(None, "Ray to join: an address, or 'auto' for the cluster `ray start` runs on "
                                           "this machine (default: the Ray this process is in, else $RAY_ADDRESS, "
                                           "else a new private one on 127.0.0.1)")
    """Where to join Ray when it is not running in this process; None: $RAY_ADDRESS or a private local one."""
    tensor_parallel_size: int = option(1, "target ranks, one actor (GPU) each: a DeepSpeed AutoTP group (needs "
                                          "the ray backend)", ge=1)
    """Target ranks (one GPU each with ``target_num_gpus=1``): a DeepSpeed AutoTP group led by rank 0."""
    load_sharded: bool = option(True)
    """TP > 1: build the target on the meta device and load only each rank's slice of the checkpoint."""
    kernel_inject: bool = option(False)
    """TP > 1 on CUDA: DeepSpeed's fused inference kernels instead of plain AutoTP."""
    tensor_lane: str = option("auto", choices=TENSOR_LANES)
    preset: str | None = option(None, "a named pair (pearl_ray.modeling.presets: models, TP size, dtype, gamma, "
                                      "GPUs), unless those are given")
    """The pair preset this config came from (``modeling.presets``), for the record."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_option(f.name, getattr(self, f.name))
        if self.colocate is None:
            object.__setattr__(self, "colocate", self.shares_one_device())
        if self.colocate and self.placement in ("STRICT_SPREAD", "SPREAD"):
            raise InvalidParameterError("colocate=True holds both models in one worker (with a tensor-parallel target: "
                                        "its rank 0): it needs a packed placement")
        if self.tensor_parallel_size > 1 and self.backend != "ray":
            raise InvalidParameterError("tensor_parallel_size > 1 needs backend='ray' (one actor per target rank)")

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


# -- the options, as every entry point sees them ---------------------------------------------------------------
OPTIONS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(EngineConfig)}
OPTION_TYPES: dict[str, object] = get_type_hints(EngineConfig)


def option_kind(name: str) -> tuple[type, bool]:
    """(the value's type, whether None is allowed) of option ``name``, from its annotation."""
    hint = OPTION_TYPES[name]
    args = [a for a in get_args(hint) if a is not type(None)] or [hint]
    return args[0], type(None) in get_args(hint)


def describe_rule(name: str, none_ok: bool = True) -> str:
    """What option ``name`` may be, in words: "an integer in [1, 16]", "one of ('a', 'b')", ... (and "or None"
    where None is allowed, unless ``none_ok`` is False: a command line has no None)."""
    checks = OPTIONS[name].metadata["checks"]
    kind, optional = option_kind(name)
    if "choices" in checks:
        rule = f"one of {tuple(checks['choices'])}"
    else:
        rule = "an integer" if kind is int else "a number"
        if "ge" in checks and "le" in checks:
            rule += f" in [{checks['ge']}, {checks['le']}]"
        else:
            rule += "".join(f" {op} {checks[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if k in checks)
    return rule + (" or None" if optional and none_ok else "")


def check_option(name: str, value, label: str | None = None) -> None:
    """The one check of option ``name`` (its declaration's bounds or choices); ``label`` names it in the
    message (e.g. a command-line flag). An option declared without a check takes any value."""
    checks = OPTIONS[name].metadata["checks"]
    if not checks:
        return
    kind, optional = option_kind(name)
    if value is None:
        ok = optional
    elif "choices" in checks:
        ok = value in checks["choices"]
    else:
        ok = _is_int(value) if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)
        bounds = (("ge", lambda a, b: a >= b), ("gt", lambda a, b: a > b), ("le", lambda a, b: a <= b))
        ok = ok and all(test(value, checks[k]) for k, test in bounds if k in checks)
    if not ok:
        raise InvalidParameterError(f"{label or name} must be {describe_rule(name)}, got {value!r}")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_options(parser, names, defaults: dict | None = None, helps: dict | None = None,
                choices: dict | None = None) -> None:
    """Command-line flags for the options ``names`` (``--max-num-seqs`` for ``max_num_seqs``): type, choices
    and help from each declaration. ``defaults``: the entry point's own defaults where they differ from the
    declaration's (e.g. None: "not given, the config decides"); ``helps``, ``choices``: its own help texts and
    narrower choices. A bool option takes ``--x/--no-x``; a ``flag_none`` option takes its stand-in value
    (``options_from_args`` maps it to None)."""
    import argparse

    defaults, helps, choices = defaults or {}, helps or {}, choices or {}
    for name in names:
        field = OPTIONS[name]
        kind, _ = option_kind(name)
        default = defaults.get(name, field.default)
        help_ = helps.get(name, field.metadata["help"]) or None
        if kind is bool:
            parser.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        allowed = choices.get(name, field.metadata["checks"].get("choices"))
        parser.add_argument(flag_name(name), type=kind, default=default, choices=allowed, help=help_)


def check_flags(args, names) -> None:
    """``check_option`` for the flags ``names`` as given on a command line (a flag left at None was not given;
    a ``flag_none`` stand-in is fine); the message names the flag. Numbers must be finite."""
    for name in names:
        value = getattr(args, name, None)
        stand_in = OPTIONS[name].metadata["flag_none"]
        if value is None or isinstance(value, bool) or (stand_in is not None and value == stand_in[0]):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidParameterError(f"{flag_name(name)} must be a finite number, got {value}")
        try:
            check_option(name, value)
        except InvalidParameterError:
            alt = f" ({stand_in[0]} = {stand_in[1]})" if stand_in is not None else ""
            raise InvalidParameterError(f"{flag_name(name)} must be {describe_rule(name, none_ok=False)}{alt}, "
                                        f"got {value}") from None


def options_from_args(args, names, keep_unset: bool = True) -> dict:
    """The options ``names`` from parsed flags, a ``flag_none`` stand-in mapped to None. ``keep_unset=False``
    leaves out the flags left at None (not given: the config's default applies)."""
    out = {}
    for name in names:
        value = getattr(args, name)
        if value is None and not keep_unset:
            continue
        stand_in = OPTIONS[name].metadata["flag_none"]
        out[name] = None if stand_in is not None and value == stand_in[0] else value
    return out


def option_fields(names, defaults: dict | None = None) -> list[tuple]:
    """``dataclasses.make_dataclass`` fields for the options ``names`` (their declared types and defaults,
    ``defaults`` overriding): a settings record that carries engine options, as the GSM8K job's."""
    defaults = defaults or {}
    return [(n, OPTION_TYPES[n], dataclasses.field(default=defaults.get(n, OPTIONS[n].default))) for n in names]


def bundle(cpu: float, gpu: float) -> dict:
    """A placement bundle for one side. Ray refuses empty bundles, so a side that asks for nothing reserves
    one byte of ``memory`` (not a sliver of CPU, which would keep a 2-CPU node from holding a 1+1 CPU pair)."""
    return {k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v} or {"memory": 1.0}


def context_room(max_context: int, prompt_len: int, window: int) -> int:
    """New tokens that fit a context of ``max_context`` after a ``prompt_len``-token prompt: the draft window
    (``window``, 0 for target-only) and one position for the next token need room too."""
    return max_context - prompt_len - window - 1


def fit_context(max_context: int, prompt_len: int, window: int, max_new_tokens: int | None = None) -> int:
    """The one length rule, checked by every entry point (the engine, the endpoint, the GSM8K job): the prompt,
    the draft window (``window``, 0 for target-only), one position for the next token and ``max_new_tokens``
    new tokens must fit ``max_context``. Returns the room (``context_room``: new tokens that fit). Raises
    ``PromptError`` when the prompt alone leaves no room, else ``ContextLengthError`` naming the part to
    shorten ("prompt": the window leaves no room past it; "max_new_tokens"), with the numbers."""
    n, ctx = prompt_len, max_context
    if n + 1 >= ctx:
        raise PromptError(f"prompt has {n} tokens, too long for the model's context of {ctx}")
    room = context_room(ctx, n, window)
    if room < 1:
        raise ContextLengthError("prompt", f"gamma {window} is too large for a {n}-token prompt in a context of "
                                           f"{ctx}: the draft window needs room past the prompt")
    if max_new_tokens is not None and max_new_tokens > room:
        raise ContextLengthError("max_new_tokens", f"max_new_tokens {max_new_tokens} does not fit: prompt {n} tokens "
                                                   f"+ {max_new_tokens} new tokens + draft window {window} + 1 exceed "
                                                   f"the context of {ctx} tokens; at most {room} fit")
    return room


def request_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th prompt of a call with ``SamplingParams.seed == seed``."""
    return (seed * 1_000_003 + index) % SEED_LIMIT
