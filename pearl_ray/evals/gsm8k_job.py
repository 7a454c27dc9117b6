"""The GSM8K evaluation job (``jobs/eval_gsm8k.py``): target-only (AR), vanilla SD and PEARL on the same
prompts and the same draft/target pairs, on Ray, with resume, tables and plots.

Flow: 1. parse and check the options; 2. check the data file, the output folder and the models (tokenizers
and configs only) and build every prompt, so bad input fails before any model loads; 3. join the running
Ray (``ray job submit``, ``RAY_ADDRESS``) or start a private local one; 4. ``--num-pairs`` engines, each in
its own placement group, take (question, methods still missing) items from a shared queue
(``dispatch.PairPool``); a pair runs a question's methods back to back, in an order rotated per question;
5. every (question, method) becomes one line of ``results.jsonl`` as soon as it is done (``records``);
6. ``summary.csv``, ``summary.md`` and PNG plots from the records (``gsm8k_report``), and ``config.json``
(settings, each pair's resolved engine config and measured forward times, versions, git commit, hardware,
command line, per session).

Exit codes: 0 done; 1 some items could not be run (they stay missing; rerun to resume); 2 bad input;
3 a losslessness failure (greedy outputs differ between methods); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import MAX_GAMMA, METHODS, SEED_LIMIT, add_options, check_flags, fit_context, option_fields
from ..errors import InvalidParameterError, PromptError
from .dispatch import PairPool, WorkItem
from .gsm8k import DATA_DIR, STOP_STRINGS, answer_text, build_prompt, chat_prompt, gold_answer, score
from ..modeling.presets import EMBEDDED_PRESET, apply_preset, preset_names
from .records import ResultsFile

log = logging.getLogger("eval_gsm8k")
PROMPT_FORMATS = ("fewshot", "chat")
PROTOCOLS = ("paper", "eos")
RESUME_KEYS = ("data_sha256", "draft", "target", "prompt_format", "num_shots", "protocol", "max_new_tokens",
               "temperature", "seed", "gamma")
"""Settings that must match to add records to an existing ``--out`` (the rest may change between sessions)."""
REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_OPTIONS = ("preset", "draft", "target", "gamma", "num_threads", "max_num_seqs", "placement", "transport",
                  "colocate", "schedule", "draft_num_cpus", "target_num_cpus", "draft_num_gpus", "target_num_gpus",
                  "tensor_parallel_size", "device", "dtype", "cpu_kernels", "ray_address")
"""The engine options the job takes: flags, defaults and checks from their declaration (``config.EngineConfig``),
except the job's own defaults (``JOB_DEFAULTS``). ``--gamma 0`` stays 0 in the settings (auto, recorded as 0)."""
JOB_DEFAULTS = {"draft": "default-draft", "target": "default-target", "gamma": 0, "max_num_seqs": 1}


class UsageError(Exception):
    """Bad input, reported before any model loads (exit code 2)."""


JobSettings = dataclasses.make_dataclass("JobSettings", [
    ("methods", tuple), ("data", str), ("data_sha256", str), ("limit", "int | None"), ("offset", int),
    ("shuffle", bool), ("seed", int), ("prompt_format", str), ("num_shots", int), ("protocol", str),
    ("max_new_tokens", int), ("temperature", float), ("num_pairs", int), ("max_attempts", int), ("out", str),
    *option_fields(ENGINE_OPTIONS, JOB_DEFAULTS)], frozen=True)
JobSettings.__doc__ = """The job's checked settings (``config.json``'s "settings"): its own, then the engine options."""
JobSettings.__module__ = __name__


@dataclass(frozen=True)
class Question:
    qid: int  # the line's index in the data file
    prompt: str
    gold: str | None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval_gsm8k.py", description="GSM8K: AR vs vanilla SD vs PEARL on Ray, "
                                 "same prompts and pairs; writes results.jsonl, summary.csv/.md, plots, config.json.")
    a = ap.add_argument
    a("--methods", default="ar,sd,pearl", help="comma-separated, from ar, sd, pearl (default: %(default)s)")
    a("--data", default=str(DATA_DIR / "test.jsonl"), help="GSM8K JSON lines (default: the repo's test split)")
    a("--limit", type=int, default=None, help="number of questions (default: all)")
    a("--offset", type=int, default=0, help="skip this many questions first")
    a("--shuffle", action="store_true", help="shuffle the questions (with --seed) before --offset/--limit")
    a("--seed", type=int, default=0, help="shuffle seed; sampled runs seed question i with seed + i")
    a("--prompt-format", default="fewshot", choices=PROMPT_FORMATS,
      help="fewshot: 8-shot CoT (Q:/A:); chat: zero-shot in the tokenizer's chat template")
    a("--num-shots", type=int, default=8, help="exemplars of the fewshot prompt (default: %(default)s)")
    a("--protocol", default="paper", choices=PROTOCOLS,
      help="paper: exactly --max-new-tokens tokens (EOS ignored); eos: stop at EOS or the next 'Q:'")
    a("--max-new-tokens", type=int, default=256)
    a("--temperature", type=float, default=0.0, help="0 = greedy (outputs must match across methods)")
    a("--num-pairs", type=int, default=1, help="draft/target pairs working in parallel (default: %(default)s)")
    a("--max-attempts", type=int, default=3, help="tries per question when pairs fail (default: %(default)s)")
    a("--out", default=None, help="output folder; an existing one is resumed (default: results/gsm8k/<time>/)")
    add_options(ap, ENGINE_OPTIONS, defaults=JOB_DEFAULTS, helps={
        "preset": "a GPU pair preset (pearl_ray.modeling.presets): sets the models, --tensor-parallel-size, --dtype, "
                  "--device, --gamma and the GPUs per side, unless given explicitly",
        "draft": "draft model: path, preset or hub id (default: %(default)s)",
        "target": "target model (default: %(default)s)",
        "gamma": f"draft window in [1, {MAX_GAMMA}]; 0 = auto (measured per pair)",
        "max_num_seqs": "questions each pair decodes at once (its target leader batches them; 1: per-request speed "
                        "alone, default: %(default)s)",
        "num_threads": "torch threads per worker (default: its CPU count)"},
        choices={"preset": [n for n in preset_names() if n != EMBEDDED_PRESET],
                 "dtype": ("float32", "bfloat16", "float16")})
    return ap


def apply_job_preset(args, parser) -> None:
    """Fill the options a preset sets, where the command line left them at their defaults (the one preset
    rule, ``presets.apply_preset``); its models must be on this machine (the error names what to download)."""
    from ..errors import PearlError

    given = vars(args)
    try:
        merged = apply_preset(args.preset, given, {k: parser.get_default(k) for k in given}, keys=given)
    except PearlError as exc:
        raise UsageError(f"--preset {args.preset}: {exc}") from None
    for key, value in merged.items():
        setattr(args, key, value)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_settings(argv: list[str]) -> JobSettings:
    """Options -> checked settings (no models touched). Raises ``UsageError``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        apply_job_preset(args, parser)
    methods = tuple(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {unknown or [args.methods]} in --methods; "
                         f"choose from {', '.join(METHODS)}")
    checks = [(args.limit is None or args.limit >= 1, f"--limit must be >= 1, got {args.limit}"),
              (args.offset >= 0, f"--offset must be >= 0, got {args.offset}"),
              (args.num_pairs >= 1, f"--num-pairs must be >= 1, got {args.num_pairs}"),
              (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
              (args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}"),
              (1 <= args.num_shots <= 8, f"--num-shots must lie in [1, 8], got {args.num_shots}"),
              (0 <= args.seed < SEED_LIMIT, f"--seed must lie in [0, 2**63), got {args.seed}"),
              (args.max_attempts >= 1, f"--max-attempts must be >= 1, got {args.max_attempts}")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:
        check_flags(args, ENGINE_OPTIONS)  # the engine's options: their declared checks
    except InvalidParameterError as exc:
        raise UsageError(str(exc)) from None
    data = Path(args.data).expanduser()
    if not data.is_file():
        raise UsageError(f"GSM8K data file {str(data)!r} not found (--data)")
    out = Path(args.out or Path("results") / "gsm8k" / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(JobSettings)}}
    values.update(methods=methods, data=str(data.resolve()), data_sha256=file_sha256(data), out=str(out))
    return JobSettings(**values)


def check_resume(settings: JobSettings) -> dict | None:
    """The previous config.json of ``--out`` (None if new); refuse to mix runs with different settings."""
    path = Path(settings.out) / "config.json"
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); use another --out") from None
    old = previous.get("settings", {})
    new = dataclasses.asdict(settings)
    diff = {k: (old.get(k), new[k]) for k in RESUME_KEYS if old.get(k) != new[k]}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"--out {settings.out} holds a run with other settings ({shown}); use another --out")
    return previous


def load_questions(settings: JobSettings, tokenizer, max_context: int) -> list[Question]:
    """The selected questions with their prompts; every prompt must leave room for the output."""
    rows = []
    with open(settings.data) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append((row["question"], row["answer"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"{settings.data}:{lineno} is not a GSM8K row "
                                     f"(JSON with question and answer)") from None
    order = list(range(len(rows)))
    if settings.shuffle:
        random.Random(settings.seed).shuffle(order)
    if settings.offset >= len(order):
        raise UsageError(f"--offset {settings.offset} is past the {len(order)} questions of {settings.data}")
    end = None if settings.limit is None else settings.offset + settings.limit
    questions = []
    room = settings.gamma or MAX_GAMMA  # auto gamma is not known yet: assume the largest window
    for qid in order[settings.offset:end]:
        question, answer = rows[qid]
        if settings.prompt_format == "chat":
            prompt = chat_prompt(question, tokenizer)
        else:
            prompt = build_prompt(question, num_shots=settings.num_shots)
        n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        try:  # the engine's length rule, before any model loads
            fit_context(max_context, n, room, settings.max_new_tokens)
        except (PromptError, InvalidParameterError) as exc:
            raise UsageError(f"question {qid} does not fit the target's context (--max-new-tokens, --gamma): "
                             f"{exc}") from None
        questions.append(Question(qid, prompt, gold_answer(answer)))
    return questions


def check_inputs(settings: JobSettings) -> tuple[list[Question], dict | None]:
    """Resume compatibility, the models (tokenizers and configs, no weights) and the prompts; returns the
    questions and the previous config.json of ``--out`` (None for a new run)."""
    from ..errors import ModelNotFoundError, TokenizerMismatchError
    from ..modeling.resolve import inspect_pair, resolve_path

    previous = check_resume(settings)
    needs_draft = any(m != "ar" for m in settings.methods)
    for option, name in (("--target", settings.target), ("--draft", settings.draft if needs_draft else None)):
        try:
            name is not None and resolve_path(name)
        except ModelNotFoundError as exc:
            raise UsageError(f"{option}: {exc}") from None
    try:
        pair = inspect_pair(settings.target, settings.draft if needs_draft else None)
    except (ModelNotFoundError, TokenizerMismatchError) as exc:
        raise UsageError(str(exc)) from None
    if settings.prompt_format == "chat" and not getattr(pair.tokenizer, "chat_template", None):
        raise UsageError(f"--prompt-format chat needs a chat template; the tokenizer of {settings.target!r} has none")
    return load_questions(settings, pair.tokenizer, pair.max_context), previous


# -- provenance --------------------------------------------------------------------------------------------
def provenance() -> dict:
    """Versions, git commit, hardware and the Ray cluster this job runs on."""
    import ray
    import torch
    import transformers

    from .. import __version__

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            return res.stdout.strip() if res.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    status = git("status", "--porcelain")
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    info = {"versions": {"python": platform.python_version(), "pearl_ray": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "ray": ray.__version__},
            "git": {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)},
            "hardware": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                         "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}}
    if ray.is_initialized():
        info["ray"] = {"gcs_address": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
                       "cluster_resources": ray.cluster_resources()}
    return info


class ConfigFile:
    """``config.json``: the settings and one entry per session (a run or a resume of the same ``--out``)."""

    def __init__(self, path: Path, settings: JobSettings, previous: dict | None, session: dict):
        self.path, self.lock = path, threading.Lock()
        self.doc = {"settings": dataclasses.asdict(settings), "sessions": (previous or {}).get("sessions", [])}
        self.doc["sessions"].append(session)
        self.session = session

    def update(self, **fields) -> None:
        with self.lock:
            self.session.update(fields)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
            os.replace(tmp, self.path)

    def add_pair(self, info: dict) -> None:
        with self.lock:
            self.session.setdefault("pairs", []).append(info)
        self.update()


# -- one question on one pair --------------------------------------------------------------------------------
def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def make_record(q: Question, method: str, out, engine, pair_id: str, settings: JobSettings, attempt: int) -> dict:
    """One results.jsonl line: scores, speed, acceptance, round counts, idle time and the round timeline."""
    s = out.stats
    eos = set(engine.eos_token_ids)
    ids = list(out.token_ids)
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))  # paper protocol: score up to EOS
    text = answer_text(engine.tokenizer.decode(ids[:cut], skip_special_tokens=True))
    timings = s.round_timings
    t0 = timings[0].started_at if timings else 0.0
    rel = lambda stamp: _round(stamp - t0) if stamp else None  # noqa: E731
    return {
        "qid": q.qid, "method": method, "pair": pair_id, "attempt": attempt, "prompt_format": settings.prompt_format,
        "protocol": settings.protocol, "temperature": settings.temperature, "gamma": s.gamma, "gold": q.gold,
        **score(text, q.gold),
        "new_tokens": s.new_tokens, "wall_s": _round(s.wall_s), "tokens_per_s": _round(s.tokens_per_s, 3),
        "acceptance_rate": _round(s.acceptance_rate, 4) if s.verified_tokens else None,
        "mean_accepted_len": _round(s.mean_accepted_len, 4) if s.runs else None,
        "tokens_per_target_forward": _round(s.tokens_per_target_forward, 4),
        "rounds": s.rounds, "plain_rounds": s.plain_rounds, "turn_rounds": s.turn_rounds, "once_rounds": s.once_rounds,
        "pre_rounds": sum(t.mode == "pre" for t in timings),
        "post_rounds": sum(t.mode == "post" for t in timings),
        "draft_busy_s": _round(s.draft_busy_s), "target_busy_s": _round(s.target_busy_s),
        "draft_idle_s": _round(sum(t.draft_idle_s for t in timings)),
        "target_idle_s": _round(sum(t.target_idle_s for t in timings)),
        "accepted_tokens": s.accepted_tokens, "verified_tokens": s.verified_tokens,
        "drafted_tokens": s.drafted_tokens, "runs": s.runs, "target_forwards": s.target_forwards,
        "draft_forwards": s.draft_forwards, "fallback_rounds": s.fallback_rounds,
        "draft_failures": s.draft_failures, "finish_reason": out.finish_reason,
        "accepted_by_position": s.accepted_by_position, "verified_by_position": s.verified_by_position,
        "text": text, "token_ids": ids,
        "round_timings": [{"mode": t.mode, "t": rel(t.started_at), "round_s": _round(t.round_s),
                           "draft_t": rel(t.draft_started_at), "draft_busy_s": _round(t.draft_busy_s),
                           "target_t": rel(t.target_started_at), "target_busy_s": _round(t.target_busy_s),
                           "num_candidates": t.num_candidates, "num_accepted": t.num_accepted,
                           "window": t.window, "schedule": t.schedule} for t in timings],
    }


class Progress:
    """tqdm bar over (question, method) items with each method's running tokens/s and the acceptance rate."""

    def __init__(self, total: int, methods: tuple[str, ...]):
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="gen", file=sys.stderr, dynamic_ncols=True, mininterval=0.5 if tty else 20,
                        desc="gsm8k")
        self.sums = {m: [0, 0.0] for m in methods}
        self.accepted = self.verified = 0

    def update(self, record: dict) -> None:
        tok_wall = self.sums[record["method"]]
        tok_wall[0] += record["new_tokens"]
        tok_wall[1] += record["wall_s"]
        self.accepted += record["accepted_tokens"] if record["method"] == "pearl" else 0
        self.verified += record["verified_tokens"] if record["method"] == "pearl" else 0
        speeds = " ".join(f"{m} {t / w:.1f}" for m, (t, w) in self.sums.items() if w > 0)
        acc = f" | pearl acc {self.accepted / self.verified:.2f}" if self.verified else ""
        self.bar.set_postfix_str(f"tok/s {speeds}{acc}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# -- the job -----------------------------------------------------------------------------------------------
def engine_options(settings: JobSettings) -> dict:
    """A pair's ``PearlEngine`` options: the settings' engine options (a preset's values are in them already),
    on Ray, with the draft only where a method drafts."""
    needs_draft = any(m != "ar" for m in settings.methods)
    options = {name: getattr(settings, name) for name in ENGINE_OPTIONS if name not in ("preset", "ray_address")}
    options.update(draft=settings.draft if needs_draft else None, method="pearl" if needs_draft else "ar",
                   gamma=settings.gamma or None, backend="ray")
    return options


def is_pair_failure(exc: BaseException) -> bool:
    """A failure of the pair (its workers, coordinator or resources), worth retrying elsewhere. Errors that
    are ``ValueError``s (bad parameters or prompts) are the request's and would fail on any pair."""
    from ray.exceptions import RayError

    from ..errors import PearlError

    return isinstance(exc, (PearlError, RayError)) and not isinstance(exc, ValueError)


def run_pairs(settings: JobSettings, questions: list[Question], results: ResultsFile, config: ConfigFile,
              session_id: str):
    """Run every missing (question, method) on ``--num-pairs`` pairs; the pool's report (None: nothing to do)."""
    from .. import PearlEngine, SamplingParams

    by_qid = {q.qid: q for q in questions}
    items = [WorkItem(q.qid, [m for m in settings.methods if (q.qid, m) not in results.done]) for q in questions]
    items = [it for it in items if it.methods]
    if not items:
        return None
    stop = list(STOP_STRINGS) if settings.protocol == "eos" else None

    def params(q: Question) -> SamplingParams:
        return SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                              seed=(settings.seed + q.qid) % SEED_LIMIT, stop=stop,
                              ignore_eos=settings.protocol == "paper")

    def start(index: int):
        engine = PearlEngine(**engine_options(settings))
        try:
            for m in settings.methods:  # warm-up, not recorded
                engine.generate([questions[0].prompt], SamplingParams(max_new_tokens=4, ignore_eos=True), method=m)
            info = engine.backend.info
            config.add_pair({"pair": f"{session_id}/{index}", "gamma": engine.gamma, "measured": engine.measured,
                             "draft_node": (info.get("draft") or info["target"]).get("node_id"),  # colocated: one
                             "colocated": bool(engine.config.colocate),
                             "target_node": info["target"]["node_id"], "engine": engine.config.to_dict()})
            log.info("pair %d ready: gamma %d, target on node %s, %s", index, engine.gamma,
                     info["target"]["node_id"][:12],
                     "colocated (both models in one worker)" if engine.config.colocate else "draft and target actors")
        except BaseException:
            engine.shutdown()
            raise
        return engine

    def run(engine, index: int, item: WorkItem):
        q = by_qid[item.key]
        k = q.qid % len(item.methods)  # rotate the order so no method always runs first
        for m in item.methods[k:] + item.methods[:k]:
            out = engine.generate([q.prompt], params(q), method=m)[0]
            yield m, make_record(q, m, out, engine, f"{session_id}/{index}", settings, item.attempts + 1)

    progress = Progress(sum(len(it.methods) for it in items), settings.methods)
    lock = threading.Lock()

    def sink(record: dict) -> None:
        with lock:
            results.append(record)
            progress.update(record)

    pool = PairPool(settings.num_pairs, start, run, sink, is_pair_failure, stop=lambda e: e.shutdown(),
                    max_attempts=settings.max_attempts, slots_per_pair=settings.max_num_seqs)
    try:
        return pool.run_all(items)
    finally:
        progress.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        settings = parse_settings(argv)
        questions, previous = check_inputs(settings)
    except UsageError as exc:
        print(f"eval_gsm8k: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help or malformed options
        return exc.code if isinstance(exc.code, int) else 2
    from ..modeling.hf import quiet_loading
    from ..runtime.backend import connect_ray

    quiet_loading()
    out = Path(settings.out)
    if "_ray_pkg_" in str(Path.cwd()) and out.is_relative_to(Path.cwd()):
        log.warning("running in a Ray job's temporary copy of the working dir: results go to %s; pass an "
                    "absolute --out to keep them somewhere stable", out)
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out / "results.jsonl", ("qid", "method"))
    session_id = time.strftime("%Y%m%d-%H%M%S")
    config = ConfigFile(out / "config.json", settings, previous, {
        "session": session_id, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": argv,
        "command": shlex.join(["python", "jobs/eval_gsm8k.py", *argv]), "records_before": len(results.records)})
    log.info("%d questions x %d methods -> %s (%d already recorded)", len(questions), len(settings.methods), out,
             len(results.records))
    how = connect_ray(settings.ray_address)
    code = 0
    t_run = time.perf_counter()
    try:
        config.update(ray_connection=how, **provenance())
        pool_report = run_pairs(settings, questions, results, config, session_id)
        if pool_report is not None:
            config.update(records_written=pool_report.records, pairs_started=pool_report.pairs_started,
                          pair_start_errors=pool_report.start_errors, pairs_retired=pool_report.pairs_retired,
                          failed_items=[{"qid": it.key, "methods": it.methods, "errors": it.errors}
                                        for it in pool_report.failed])
            if pool_report.failed:
                code = 1
                for index, error in pool_report.start_errors.items():
                    print(f"eval_gsm8k: pair {index} did not start: {error}", file=sys.stderr)
                print(f"eval_gsm8k: {len(pool_report.failed)} question(s) could not be run "
                      f"({[it.key for it in pool_report.failed][:20]}); errors in config.json. Rerun the same "
                      f"command to retry them.", file=sys.stderr)
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM through Ray's handler
        print(f"\neval_gsm8k: interrupted; {len(results.records)} records are kept in {out / 'results.jsonl'}; "
              f"rerun the same command to resume", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else exc.code
    finally:
        config.update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if how == "started":
            import ray

            ray.shutdown()
    if not results.records:
        print("eval_gsm8k: no results were recorded", file=sys.stderr)
        return 1
    session = [r for r in results.records if str(r.get("pair", "")).startswith(session_id)]
    throughput = (sum(r["new_tokens"] for r in session), time.perf_counter() - t_run)
    config.update(aggregate_tokens=throughput[0], aggregate_wall_s=round(throughput[1], 3))
    return 3 if report(settings, results.records, config, throughput) else code


def report(settings: JobSettings, records: list[dict], config: ConfigFile,
           throughput: tuple[int, float] | None = None) -> list[int]:
    """Write and print the summary, draw the plots; returns the questions that failed losslessness."""
    from . import gsm8k_report

    out = Path(settings.out)
    df = gsm8k_report.to_frame(records)
    header = (f"## GSM8K: {settings.draft} -> {settings.target}, {settings.prompt_format}, protocol "
              f"{settings.protocol}, max_new_tokens {settings.max_new_tokens}, temperature {settings.temperature}, "
              f"{df['qid'].nunique()} questions, timed on {df['pair'].nunique()} pair(s)\n")
    if throughput and throughput[0] and throughput[1] > 0:
        header += (f"\naggregate throughput of this session: {throughput[0] / throughput[1]:.1f} tokens/s "
                   f"({throughput[0]} new tokens in {throughput[1]:.1f} s, every method, {settings.num_pairs} pair(s) "
                   f"x {settings.max_num_seqs} question(s) at once); per-request tokens/s in the table\n")
    _, bad, text = gsm8k_report.write_summary(df, out, header)
    plots = gsm8k_report.make_plots(df, out, f"{Path(settings.draft).name} -> {Path(settings.target).name}")
    config.update(lossless_failures=bad)
    print("\n" + text)
    print(f"results: {out / 'results.jsonl'}\nsummary: {out / 'summary.md'}, {out / 'summary.csv'}")
    print("plots:   " + ", ".join(str(p) for p in plots))
    if bad:
        print(f"\n!!! LOSSLESSNESS FAILURE: greedy outputs differ between methods on question(s) {bad[:20]} !!!",
              file=sys.stderr)
    return bad
