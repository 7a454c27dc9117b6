"""``PearlEngine``: the public entry point. Loads (or is handed) a draft/target pair and generates with
PEARL, vanilla SD or target-only decoding, behind one API whatever the backend.

One request path: ``stream``/``astream``/``generate`` build a ``config.Request`` (validated once: prompt,
sampling parameters, method, gamma, lengths), wait their turn in the engine's bounded queue (in arrival
order: locally one call at a time, whose prompts the batched loop decodes together; on Ray up to
``max_num_seqs`` calls, which the target leader's loop batches), and hand the requests whole to the
backend, which yields the committed tokens round by round. The engine turns those into ``StreamChunk``
deltas (ids and text).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from .config import (DEFAULT_GAMMA, POLICY_MAX_GAMMA, EngineConfig, Request, SamplingParams, check_gamma,
                     check_method, fit_context, request_seed)
from .core.logprobs import TokenLogprob
from .core.metrics import GenerationStats
from .modeling.chat import check_text
from .core.stopping import cut_at_stop
from .core.batch import budget_message, reservation
from .errors import CacheBudgetError, EngineClosedError, InvalidParameterError, PromptError, QueueFullError

log = logging.getLogger(__name__)
RAY_ONLY = ("transport", "placement", "draft_num_cpus", "target_num_cpus", "draft_num_gpus", "target_num_gpus",
            "round_timeout_s", "start_timeout_s", "placement_timeout_s", "measure_context", "ray_address",
            "load_sharded", "kernel_inject", "tensor_lane", "colocate")


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only, after the stop rule
    text: str | None
    finish_reason: str  # one of core.stopping.FINISH_REASONS
    stats: GenerationStats = field(repr=False, default_factory=GenerationStats)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)
    """One per generated id where ``SamplingParams.logprobs`` asked for them (``core.logprobs``)."""


@dataclass
class StreamChunk:
    """One step of a stream: the newly committed ids and their new text. The last chunk of a stream has
    ``finish_reason`` and ``stats`` set (and possibly no new ids); the others have them None."""

    token_ids: list[int]
    text: str | None
    finish_reason: str | None = None
    stats: GenerationStats | None = field(default=None, repr=False)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)
    """One per id in ``token_ids`` where the request asked for log-probabilities, else None."""


class TextDeltas:
    """New text per step in O(new tokens): each step decodes only a short window of ids (from the last
    position where the text was settled), as streaming detokenizers do, never the whole output. Text that
    could still change is held back: an incomplete UTF-8 character, and the tail a stop string may be forming
    in. The caller reconciles with one full decode at the end (``PearlEngine._text``)."""

    def __init__(self, tokenizer, stops=None):
        self.tokenizer, self.stops = tokenizer, tuple(stops or ())
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to text already in self.text
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids) -> str:
        self.ids.extend(new_ids)
        if self.stopped:
            return ""
        before = self._decode(self.ids[self.prefix: self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        ready = len(self.text) - self.hold
        if self.stops:
            start = max(0, self.sent - self.hold)
            cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped, ready = True, cut
        if ready <= self.sent:
            return ""
        out, self.sent = self.text[self.sent: ready], ready
        return out


class _Admission:
    """At most ``capacity`` calls run on one pair at once (1 locally, where a call's prompts form the batch;
    ``max_num_seqs`` on Ray, where the leader's loop batches the calls); more wait in arrival order, at most
    ``max_queued`` of them."""

    def __init__(self, max_queued: int, timeout_s: float, capacity: int = 1):
        self.max_queued, self.timeout_s, self.capacity = max_queued, timeout_s, capacity
        self.cv = threading.Condition()
        self.waiting: collections.deque = collections.deque()
        self.running = 0

    @property
    def busy(self) -> bool:
        return self.running >= self.capacity

    def enter(self) -> None:
        me = object()
        with self.cv:
            if self.busy and len(self.waiting) >= self.max_queued:
                raise QueueFullError(f"{len(self.waiting)} requests are already waiting for this engine's pair "
                                     f"(max_queued={self.max_queued}); try again later")
            self.waiting.append(me)
            ok = self.cv.wait_for(lambda: not self.busy and self.waiting[0] is me, timeout=self.timeout_s)
            self.waiting.remove(me)
            if not ok:
                self.cv.notify_all()
                raise QueueFullError(f"the pair stayed busy for queue_timeout_s={self.timeout_s:.0f} s")
            self.running += 1
            self.cv.notify_all()  # the next in line may fit too

    def leave(self) -> None:
        with self.cv:
            self.running -= 1
            self.cv.notify_all()

    @property
    def depth(self) -> int:
        return len(self.waiting) + self.running


def apply_preset(name: str, draft, target, method, gamma, backend, options: dict):
    """Fill the engine's arguments from a pair preset (``presets.apply_preset``: what the caller set away from
    ``EngineConfig``'s defaults wins)."""
    from .config import OPTIONS
    from .modeling.presets import apply_preset as preset_rule

    defaults = {name_: f.default for name_, f in OPTIONS.items()}
    given = {"draft": draft, "target": target, "method": method, "gamma": gamma, "backend": backend, **options}
    merged = preset_rule(name, given, defaults)
    rest = {k: v for k, v in merged.items() if k not in ("draft", "target", "method", "gamma", "backend")}
    return merged["draft"], merged["target"], merged["method"], merged["gamma"], merged["backend"], rest


class PearlEngine:
    """Generate with a draft/target pair.

    Args:
        draft, target: local model dirs, preset names (``default-draft`` / ``default-target``) or hub ids.
            ``draft`` may be None when only ``method="ar"`` is used.
        method: default method: "pearl" | "sd" | "ar" (per call: ``method=``).
        gamma: draft window in [1, 16], fixed; None (default): the adaptive speculation policy picks each
            round's window (0 = plain decoding) from measured costs and running acceptance, up to
            ``POLICY_MAX_GAMMA`` locally and up to the measured cost ratio on Ray (a tensor-parallel target
            keeps that ratio as a fixed window).
        backend: "local" or "ray". device: "cpu" | "cuda" | "cuda:N". dtype: "float32" | "bfloat16" | "float16".
        pre_verify, post_verify: PEARL ablation switches. draft_greedy: argmax draft when sampling.
        num_threads: torch threads (local: this process; Ray: each worker).
        max_queued: calls that may wait behind the running ones before ``QueueFullError``.
        draft_model, target_model, tokenizer, eos_token_ids: inject ready ``core.sides.CausalLM`` objects
            instead of loading (tests, custom runners).
        placement_group, bundle_indices: Ray only: run the draft and the target in these bundles of a
            placement group you reserved (e.g. a Serve replica's) instead of reserving one: the draft's
            bundle, then one per target rank (default: 0, 1, ..., tensor_parallel_size).
        tensor_parallel_size: target ranks (Ray only): a DeepSpeed AutoTP group, one actor per rank.
        preset: a pair preset (``pearl_ray.modeling.presets``, e.g. "llama-3.1-8b-70b"): models, TP size,
            dtype, device, gamma and GPUs; options given explicitly win over the preset's.
        ray_init: extra ``ray.init`` arguments when the engine starts a private local Ray.
        **options: the other ``EngineConfig`` fields (transport, placement, resources, timeouts, ...).

    Use as a context manager, or call ``shutdown()``; an engine that is garbage-collected or alive at
    interpreter exit releases its actors and placement group too.
    """

    def __init__(self, draft: str | None = None, target: str | None = None, method: str = "pearl",
                 gamma: int | None = None, backend: str = "local", *, draft_model=None, target_model=None,
                 tokenizer=None, eos_token_ids=None, placement_group=None, bundle_indices: tuple[int, ...] | None = None,
                 ray_init: dict | None = None, **options):
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise InvalidParameterError(f"unknown engine options {unknown}; known: {sorted(fields)}")
        if options.get("preset"):
            draft, target, method, gamma, backend, options = apply_preset(
                options["preset"], draft, target, method, gamma, backend, options)
        # gamma None: the adaptive policy. Locally its largest window is POLICY_MAX_GAMMA; on Ray the measured
        # auto gamma (set below), and the target leader's policy picks each round's window up to it.
        adaptive = gamma is None
        config = EngineConfig(draft=draft, target=target, method=method, backend=backend, **options,
                              gamma=POLICY_MAX_GAMMA if adaptive and backend == "local" else gamma, adaptive=adaptive)
        if backend == "local":
            ray_set = sorted(k for k in RAY_ONLY if k in options)
            if ray_set or placement_group is not None:
                raise InvalidParameterError(f"options {ray_set or ['placement_group']} apply to backend='ray' only")
        self._closed = True
        pair = None
        if target_model is None:
            from .modeling.resolve import inspect_pair

            if target is None:
                raise InvalidParameterError("target is required (a model path, preset name or hub id)")
            if draft_model is not None:
                raise InvalidParameterError("inject both draft_model and target_model, or neither")
            pair = inspect_pair(target, draft)
            tokenizer = pair.tokenizer
            eos_token_ids = pair.eos_token_ids if eos_token_ids is None else eos_token_ids
            config = dataclasses.replace(config, draft=pair.draft_path, target=pair.target_path)
        self.has_draft = draft_model is not None or (pair is not None and pair.draft_path is not None)
        if method != "ar" and not self.has_draft:
            raise InvalidParameterError(f"method {method!r} needs a draft model")
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids or ())
        if backend == "ray":
            from .runtime.backend import RayBackend

            self._backend = RayBackend(config, pair, draft_model, target_model, tokenizer, placement_group,
                                       bundle_indices, ray_init)
        else:
            from .backends import LocalBackend

            self._backend = LocalBackend(config, pair, draft_model, target_model, tokenizer)
        self.measured = self._backend.measured
        if config.gamma is None:
            config = dataclasses.replace(config, gamma=self.measured["auto_gamma"] if self.measured else DEFAULT_GAMMA)
        self.config: EngineConfig = config
        """The resolved configuration (model paths, chosen gamma); ``config.to_dict()`` for saving."""
        self.max_context, self.vocab_size = self._backend.max_context, self._backend.vocab_size
        self._queue = _Admission(config.max_queued, config.queue_timeout_s,
                                 config.max_num_seqs if backend == "ray" else 1)
        self._closed = False
        self._finalizer = weakref.finalize(self, self._backend.shutdown)

    # -- read-only views ---------------------------------------------------------------------------------
    @property
    def gamma(self) -> int:
        return self.config.gamma

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def backend(self):
        """The backend object (``LocalBackend`` or ``RayBackend``)."""
        return self._backend

    @property
    def queue_depth(self) -> int:
        """Requests running or waiting on this engine."""
        return self._queue.depth

    # -- requests ----------------------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        """Text (tokenised with special tokens) or a list of token ids -> checked token ids."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("prompt is empty")
            check_text(prompt)
            if self.tokenizer is None:
                raise PromptError("text prompts need a tokenizer; pass token-id lists instead")
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        elif isinstance(prompt, (list, tuple)):
            if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
                raise PromptError("a token-id prompt must be a list of ints")
            ids = list(prompt)
            bad = [t for t in ids if t < 0 or t >= self.vocab_size]
            if bad:
                raise PromptError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        elif isinstance(prompt, (bytes, bytearray)):
            raise PromptError("a prompt must be str or token ids, not bytes: decode it (UTF-8) first")
        else:
            raise PromptError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise PromptError("prompt is empty")
        return ids

    def make_request(self, prompt, params=None, method: str | None = None, gamma: int | None = None,
                     index: int = 0) -> Request:
        """Build and validate one request (``index``: its place in a call, which picks its seed)."""
        params = SamplingParams.coerce(params)
        method = method or self.config.method
        check_method(method)
        if method != "ar" and not self.has_draft:
            raise InvalidParameterError(f"method {method!r} needs a draft model; this engine has none")
        adaptive = gamma is None and self.config.adaptive
        if gamma is None:
            gamma = self.config.gamma
        check_gamma(gamma)
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError("stop strings need a tokenizer")
        ids = self.encode(prompt)
        window = gamma if method != "ar" else 0
        fit_context(self.max_context, len(ids), window, params.max_new_tokens)  # lengths up front, never clamped
        rounds = self.config.round_options(method, gamma, params.greedy, adaptive)
        request = Request(tuple(ids), params, method, rounds, request_seed(params.seed, index), self.eos_token_ids)
        budget = self.config.kv_budget_tokens
        if budget is not None and reservation(request) > budget:
            raise CacheBudgetError(budget_message(request, budget))  # refused before it waits for nothing
        return request

    def _text(self, ids: list[int], request: Request) -> str | None:
        """A finished request's text: one full decode, cut before its first stop string."""
        if self.tokenizer is None:
            return None
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), request.params.stop)

    @contextlib.contextmanager
    def _turn(self):
        """Wait for this pair's turn in the bounded queue; the engine must be open before and after the wait."""
        if self._closed:
            raise EngineClosedError("this engine was shut down")
        self._queue.enter()
        try:
            if self._closed:
                raise EngineClosedError("this engine was shut down")
            yield
        finally:
            self._queue.leave()

    def _run(self, request: Request, result_only: bool = False) -> Iterator[StreamChunk]:
        hold = self.config.result_interval_s if result_only else 0.0
        with self._turn():
            gen = self._backend.stream(request, hold)
            ids: list[int] = []
            deltas = TextDeltas(self.tokenizer, request.params.stop) if self.tokenizer is not None else None
            sent = ""
            try:
                while True:
                    try:
                        delta = next(gen)
                    except StopIteration as done:
                        ids, stats = done.value
                        break
                    new = deltas.push(delta) if deltas is not None else None
                    if new is not None:
                        sent += new
                    yield StreamChunk(list(delta), new, logprobs=getattr(delta, "logprobs", None))
            finally:
                gen.close()
            final = self._text(ids, request)  # one full decode per request: the reference text
            rest = None if final is None else (final[len(sent):] if final.startswith(sent) else "")
            yield StreamChunk([], rest, stats.finish_reason, stats)

    def stream(self, prompt, params=None, *, method: str | None = None, gamma: int | None = None,
               result_only: bool = False) -> Iterator[StreamChunk]:
        """Stream one prompt: yields ``StreamChunk`` deltas as tokens are committed. The request is checked
        now; it waits for its turn (or raises ``QueueFullError``) when iteration starts. ``result_only``: the
        caller wants the result, not each round's tokens (the first chunk still comes at once, then on Ray at
        most one per ``config.result_interval_s``)."""
        return self._run(self.make_request(prompt, params, method, gamma), result_only)

    async def astream(self, prompt, params=None, *, method: str | None = None, gamma: int | None = None,
                      result_only: bool = False) -> AsyncIterator[StreamChunk]:
        """``stream`` for asyncio: the request runs on a worker thread; leaving the loop early cancels it."""
        chunks = self.stream(prompt, params, method=method, gamma=gamma, result_only=result_only)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        end = object()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the event loop is gone
                cancelled.set()

        def pump() -> None:
            try:
                for chunk in chunks:
                    put(chunk)
                    if cancelled.is_set():
                        break
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's task
                put(exc)
            finally:
                chunks.close()
                put(end)

        threading.Thread(target=pump, name="pearl-astream", daemon=True).start()
        try:
            while True:
                item = await inbox.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def generate(self, prompts, params=None, on_tokens=None, method: str | None = None,
                 gamma: int | None = None) -> list[GenerationOutput]:
        """Generate for each prompt (text or token ids); ``on_tokens(i, ids)`` sees the committed tokens as
        they come. Every prompt is checked before any is generated. The local backend decodes the prompts
        as one batch (``max_num_seqs`` at once, the rest joining as slots free up); Ray sends ``max_num_seqs`` at once
        (``on_tokens`` is then called from several threads) and the target leader's loop batches them."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int) and not isinstance(prompts[0], bool)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise PromptError("no prompts given")
        requests = [self.make_request(p, params, method, gamma, index=i) for i, p in enumerate(prompts)]
        batch = getattr(self._backend, "generate_batch", None)
        if batch is not None:
            return self._generate_batch(batch, requests, on_tokens)
        def one(i: int, request: Request) -> GenerationOutput:
            ids: list[int] = []
            logprobs = [] if request.params.logprobs is not None else None
            for chunk in self._run(request, result_only=on_tokens is None):  # nobody watches the rounds
                if on_tokens is not None and chunk.token_ids:
                    on_tokens(i, chunk.token_ids)
                ids.extend(chunk.token_ids)
                if logprobs is not None and chunk.logprobs:
                    logprobs.extend(chunk.logprobs)
            stats = chunk.stats  # the last chunk's
            return GenerationOutput(list(request.prompt_ids), ids, self._text(ids, request), stats.finish_reason,
                                    stats, logprobs)

        if len(requests) == 1:
            return [one(0, requests[0])]
        # Ray: the prompts go to the pair at once (up to max_num_seqs in flight), where the leader's continuous
        # loop batches them; results come back in prompt order, the first failure raised after all ended
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(requests), self.config.max_num_seqs),
                                thread_name_prefix="pearl-generate") as pool:
            futures = [pool.submit(one, i, r) for i, r in enumerate(requests)]
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def _generate_batch(self, batch, requests: list[Request], on_tokens) -> list[GenerationOutput]:
        """All of a call's requests through the backend's batched loop (``max_num_seqs`` at once), holding
        the pair for the whole call."""
        def seen(i: int, event) -> None:
            if on_tokens is not None and event.token_ids:
                on_tokens(i, list(event.token_ids))

        with self._turn():
            results = batch(requests, seen)
        return [GenerationOutput(list(r.prompt_ids), list(ids), self._text(ids, r), stats.finish_reason, stats,
                                 getattr(ids, "logprobs", None)) for r, (ids, stats) in zip(requests, results)]

    def shutdown(self) -> None:
        """Release the workers and the placement group; later calls raise ``EngineClosedError``."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "PearlEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
