"""Command line: ``python -m pearl_ray generate --draft D --target T --method pearl --prompt "..." --json`` and
``python -m pearl_ray serve --draft D --target T --port P`` (the OpenAI-compatible endpoint on Ray Serve).

The engine's options are not declared here: their flags, defaults, choices, help and checks come from their
one declaration in ``config.EngineConfig`` (``config.add_options``, ``config.check_flags``)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from .config import OPTIONS, SamplingParams, add_options, check_flags, options_from_args
from .errors import InvalidParameterError, PearlError, PromptError
from .modeling.presets import preset_names

GENERATE_OPTIONS = ("tensor_parallel_size", "draft", "target", "method", "gamma", "backend", "transport", "num_threads",
                    "schedule", "colocate", "device", "dtype", "cpu_kernels", "max_prefill_tokens_per_round",
                    "pre_verify", "post_verify")
"""The engine options ``generate`` takes as flags (``--no-pre-verify``: the PEARL ablation)."""
SERVE_OPTIONS = ("tensor_parallel_size", "draft", "target", "method", "gamma", "transport", "num_threads", "schedule",
                 "colocate", "device", "dtype", "cpu_kernels", "max_num_seqs", "kv_budget_tokens",
                 "max_prefill_tokens_per_round", "draft_num_cpus", "target_num_cpus", "draft_num_gpus",
                 "target_num_gpus")
"""The engine options ``serve`` takes; a flag not given leaves the option to ``ServeConfig`` (and a preset)."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="python -m pearl_ray", description="PEARL speculative decoding")
    ap.add_argument("--version", action="version", version=f"pearl_ray {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Without --draft/--target/--preset it uses the embedded default pair.")
    add_options(g, ("preset",), choices={"preset": preset_names()},
                helps={"preset": "a named pair: 'default' = the embedded CPU pair; the others are GPU pairs "
                                 "(pearl_ray.modeling.presets: models, TP size, dtype, gamma, GPUs)"})
    # gamma 0 = auto; transport and colocate, Ray's, only where given (the local backend refuses Ray's options)
    add_options(g, GENERATE_OPTIONS, defaults={"gamma": 0, "transport": None})
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sampling = SamplingParams()  # the request options: defaults (and, in check_generate_args, checks) are its own
    for name, kind in (("max_new_tokens", int), ("temperature", float), ("top_p", float), ("top_k", int),
                       ("seed", int)):
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(sampling, name))
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="fixed-length output (the paper's protocol)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    add_serve_parser(sub)
    return ap


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve an OpenAI-compatible endpoint on Ray Serve (blocks until Ctrl-C)",
                       description="Starts or joins Ray, deploys the endpoint and blocks until interrupted; then "
                                   "deletes the deployment. Without --draft/--target it serves the default pair.")
    add_options(s, ("preset",), choices={"preset": [n for n in preset_names() if n != "default"]},
                helps={"preset": "a GPU pair preset: models, TP size, dtype, device, gamma, GPUs (unless given)"})
    # not given (None): ServeConfig's default, or the preset's; gamma 0 = auto, measured at start-up
    add_options(s, SERVE_OPTIONS, defaults={**{n: None for n in SERVE_OPTIONS}, "gamma": 0},
                helps={"tensor_parallel_size": "target ranks per replica (default 1)",
                       "max_num_seqs": "requests a replica's pair decodes at once (default 8)",
                       "kv_budget_tokens": "KV-cache positions a replica's pair may hold at once (default: no limit)",
                       "gamma": "draft window (0 = auto, measured at start-up)"})
    s.add_argument("--model-name", help="the model id clients send (default: the target's name)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="a key clients must send as 'Authorization: Bearer KEY' on /v1/* (repeatable; "
                        "also read from $PEARL_RAY_API_KEY, comma-separated); /health stays open")
    s.add_argument("--num-replicas", type=int, help="model replicas, one draft/target pair each (default 1)")
    s.add_argument("--max-ongoing-requests", type=int,
                   help="requests one replica holds at once (default max-num-seqs + 4)")
    s.add_argument("--max-queued-requests", type=int, help="requests queued for a replica; past it 503 (default 8)")
    s.add_argument("--backpressure-status", type=int, choices=[503, 429])
    s.add_argument("--retry-after-s", type=float)
    s.add_argument("--replica-num-cpus", type=float)
    s.add_argument("--default-max-tokens", type=int)
    s.add_argument("--app-name", default="pearl")
    s.add_argument("--route-prefix", default="/")
    s.add_argument("--start-timeout-s", type=float, default=900.0, help="give up if not running by then")
    s.add_argument("--metrics-export-port", type=int,
                   help="Prometheus port of the Ray this command starts (a joined Ray keeps its own)")


def fail(exc: BaseException) -> int:
    """Report an input error as one ``error: ...`` line on stderr (no traceback); exit status 2."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"error: {message or type(exc).__name__}", file=sys.stderr)
    return 2


def check_not_empty(args, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            raise InvalidParameterError(f"--{name.replace('_', '-')} is empty")


def check_generate_args(args) -> SamplingParams:
    """Everything ``generate`` can check before a model loads; returns the request's sampling parameters.
    The engine options' checks are their declarations' and the sampling ranges ``SamplingParams``' own (one
    rule for the API, the endpoint and the CLI)."""
    for i, prompt in enumerate(args.prompt, 1):
        if not prompt.strip():
            which = f" (prompt {i} of {len(args.prompt)})" if len(args.prompt) > 1 else ""
            raise PromptError(f"--prompt is empty{which}: give the text to continue")
    check_not_empty(args, ("draft", "target", "device", "dtype"))
    check_flags(args, GENERATE_OPTIONS)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def describe_validation_error(exc) -> str:
    """A pydantic ``ValidationError`` as one line: ``field: message; field: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or str(exc)


SERVE_FLOATS = ("retry_after_s", "replica_num_cpus", "draft_num_cpus", "target_num_cpus", "draft_num_gpus",
                "target_num_gpus", "start_timeout_s")


def check_serve_args(args) -> None:
    """What ``serve`` checks itself before Ray starts: its own flags, finite numbers, and the options whose flag
    writes None as a value (``--gamma 0``); ``ServeConfig`` checks the rest."""
    for name in ("port", "metrics_export_port"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 65535:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be in 1..65535, got {value}")
    check_flags(args, [n for n in SERVE_OPTIONS if OPTIONS[n].metadata["flag_none"] is not None])
    for name in SERVE_FLOATS:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not args.start_timeout_s > 0:
        raise InvalidParameterError(f"--start-timeout-s must be > 0, got {args.start_timeout_s}")
    check_not_empty(args, ("draft", "target", "model_name", "device", "dtype", "app_name", "host"))
    prefix = args.route_prefix
    if not prefix.startswith("/") or (prefix != "/" and prefix.endswith("/")) or "{" in prefix or "}" in prefix:
        raise InvalidParameterError(f"--route-prefix must start with '/', not end with '/' (unless it is '/') "
                                    f"and hold no wildcards, got {prefix!r}")


def serve_config(args):
    """The checked ``ServeConfig`` for ``serve``'s options; InvalidParameterError (one line) if any is bad."""
    from pydantic import ValidationError

    from .serve import ServeConfig
    from .serve.config import env_api_keys

    check_serve_args(args)
    fields = {k: v for k, v in vars(args).items() if k in ServeConfig.model_fields and v is not None}
    # the engine's options that were given, stand-ins mapped (gamma 0: None, the preset's or auto;
    # max_prefill_tokens_per_round 0: None, whole prompts)
    fields.update(options_from_args(args, SERVE_OPTIONS, keep_unset=False))
    # the keys from this shell's environment travel in the config: a joined cluster's ingress has another one
    fields["api_keys"] = [*(args.api_keys or []), *env_api_keys()]
    try:
        return ServeConfig(**fields)
    except ValidationError as exc:
        raise InvalidParameterError(describe_validation_error(exc)) from None


def serve_main(args) -> int:
    from .serve import run_blocking

    try:
        config = serve_config(args)
    except PearlError as exc:
        return fail(exc)
    try:
        run_blocking(config, args.host, args.port, args.app_name, args.route_prefix, args.start_timeout_s,
                     args.metrics_export_port, ready=lambda msg: print(msg, flush=True))
    except (PearlError, TimeoutError) as exc:
        return fail(exc)
    return 0


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as one user turn in the tokenizer's chat template, ready for the assistant's reply."""
    from .modeling.chat import has_chat_template, user_turn

    if not has_chat_template(tokenizer):
        raise PromptError("--chat needs a tokenizer with a chat template; this model's tokenizer has none")
    return user_turn(tokenizer, text)


def parse_args(argv: list[str] | None = None):
    """Parse; an unknown flag is reported with its subcommand's usage (not the top level's)."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:
        sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def describe_gamma(engine, outs) -> str:
    """What auto mode chose: the policy's windows, the measured fixed window, or the explicit one."""
    if engine.config.adaptive and engine.has_draft:
        windows = [t.window for o in outs for t in o.stats.round_timings]
        mean = sum(windows) / len(windows) if windows else 0.0
        return f"gamma: adaptive policy (windows 0-{engine.gamma}, mean {mean:.2f} per round)"
    if engine.measured and "auto_gamma" in engine.measured:
        return f"gamma: auto -> {engine.gamma} (measured cost ratio {engine.measured['cost_ratio']:.1f})"
    return f"gamma: {engine.gamma}"


def describe_acceptance(method: str, stats) -> str:
    """The acceptance rate, or why there is none: a drafting method that drafted nothing (the adaptive policy
    chose plain decoding in every round) would otherwise read as a draft that is always rejected."""
    if method == "ar" or stats.drafted_tokens:
        return f"acceptance {stats.acceptance_rate:.2f}"
    if stats.fallback_rounds or stats.draft_failures:
        return f"never drafted (the draft was unavailable in {stats.fallback_rounds} of {stats.rounds} rounds)"
    return f"never drafted (the policy chose plain decoding in {stats.rounds} rounds)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .modeling.hf import quiet_loading

    quiet_loading()
    if args.command == "serve":
        return serve_main(args)
    from . import PearlEngine

    try:
        params = check_generate_args(args)  # before any model loads
    except PearlError as exc:
        return fail(exc)

    # the options given (a flag left at None was not: the engine's default, or the preset's, applies), with
    # their stand-ins mapped: --gamma 0 is None (auto), --max-prefill-tokens-per-round 0 None (whole prompts)
    options = options_from_args(args, GENERATE_OPTIONS, keep_unset=False)
    if args.preset:
        options["preset"] = args.preset
    elif options.get("target") is None and options.get("draft") is None:
        options.update(draft="default-draft", target="default-target")  # the embedded pair, as `serve` does
    try:
        with PearlEngine(**options) as engine:
            prompts = [chat_prompt(engine.tokenizer, p) for p in args.prompt] if args.chat else args.prompt
            outs = engine.generate(prompts, params)
    except PearlError as exc:
        return fail(exc)
    if args.json:
        print(json.dumps({"method": args.method, "gamma": engine.gamma, "adaptive": engine.config.adaptive,
                          "gamma_choice": describe_gamma(engine, outs), "outputs": [
            {"prompt": p, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
             "stats": o.stats.as_dict()} for p, o in zip(args.prompt, outs)]}, indent=2))
    else:
        if args.method != "ar":
            print(describe_gamma(engine, outs))
        for p, o in zip(args.prompt, outs):
            s = o.stats
            print(f"--- {args.method} | {s.new_tokens} tokens in {s.wall_s:.2f} s ({s.tokens_per_s:.1f} tok/s), "
                  f"{describe_acceptance(args.method, s)}, tokens/target forward {s.tokens_per_target_forward:.2f}")
            print(o.text)
    return 0
