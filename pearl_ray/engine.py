"""``PearlEngine``: the public entry point. Loads (or is handed) a draft/target pair and generates with
PEARL, vanilla SD or target-only decoding, behind one API whatever the backend.

``backend="local"`` runs both sides in this process, one after the other (same tokens as the Ray backend,
no speed-up). ``backend="ray"`` runs them at once in Ray actors (``pearl_ray.ray_backend``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .baselines import generate_ar, generate_sd
from .config import EngineOptions, SamplingParams
from .errors import InvalidParameterError, PromptError
from .loop import LocalChannel, run_pearl
from .metrics import GenerationStats
from .models import check_same_tokenizer, load_model
from .pearl import RoundOptions
from .stopping import StopRule
from .workers import CausalLM

log = logging.getLogger(__name__)
BACKENDS = ("local", "ray")
DEFAULT_GAMMA = 4


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only, after the stop rule
    text: str | None
    finish_reason: str  # "eos" | "stop" | "length"
    stats: GenerationStats = field(repr=False, default_factory=GenerationStats)


class PearlEngine:
    """Generate with a draft/target pair.

    Args:
        draft, target: local model dirs, preset names (``default-draft`` / ``default-target``) or hub ids.
            ``draft`` may be None for ``method="ar"``.
        method: "pearl" | "sd" | "ar".
        gamma: draft window (>= 1); None picks it automatically on the Ray backend (measured cost ratio)
            and uses 4 locally.
        backend: "local" or "ray". device: "cpu" | "cuda" | "cuda:N". dtype: "float32" | "bfloat16" | "float16".
        pre_verify, post_verify: PEARL ablation switches. draft_greedy: argmax draft when sampling.
        draft_model, target_model, tokenizer, eos_token_ids: inject ready ``CausalLM`` objects instead of
            loading (tests, custom runners).
        backend_options: passed to the Ray backend (resources, channel, timeouts, placement).
    """

    def __init__(self, draft: str | None = None, target: str | None = None, method: str = "pearl",
                 gamma: int | None = DEFAULT_GAMMA, backend: str = "local", device: str = "cpu",
                 dtype: str = "float32", pre_verify: bool = True, post_verify: bool = True,
                 draft_greedy: bool = False, draft_model: CausalLM | None = None,
                 target_model: CausalLM | None = None, tokenizer=None, eos_token_ids=None,
                 num_threads: int | None = None, **backend_options):
        self.options = EngineOptions(method=method, gamma=gamma, pre_verify=pre_verify, post_verify=post_verify,
                                     draft_greedy=draft_greedy)
        if backend not in BACKENDS:
            raise InvalidParameterError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.method, self.backend = method, backend
        self.draft_name, self.target_name = draft, target
        self.device, self.dtype = device, dtype
        if backend == "ray":
            from .ray_backend import RayBackend

            self._ray = RayBackend(self, draft=draft, target=target, draft_model=draft_model,
                                   target_model=target_model, tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                                   **backend_options)
            self.tokenizer = self._ray.tokenizer
            self.eos_token_ids = self._ray.eos_token_ids
            self.max_context, self.vocab_size = self._ray.max_context, self._ray.vocab_size
            self.gamma = self._ray.gamma
            return
        if backend_options:
            raise InvalidParameterError(f"unknown options for the local backend: {sorted(backend_options)}")
        self._ray = None
        self.gamma = gamma or DEFAULT_GAMMA
        if target_model is None:
            if target is None:
                raise InvalidParameterError("target is required (a model path, preset name or hub id)")
            loaded = load_model(target, device, dtype, num_threads=num_threads)
            target_model, tokenizer = loaded.runner, loaded.tokenizer
            eos_token_ids = loaded.eos_token_ids if eos_token_ids is None else eos_token_ids
        if draft_model is None and method != "ar":
            if draft is None:
                raise InvalidParameterError(f"method {method!r} needs a draft model")
            loaded_d = load_model(draft, device, dtype, target_vocab_size=target_model.vocab_size)
            if tokenizer is not None:
                check_same_tokenizer(loaded_d.tokenizer, tokenizer, draft, target or "target")
            draft_model = loaded_d.runner
        self.draft_model, self.target_model = draft_model, target_model
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids or ())
        self.max_context = target_model.max_context
        self.vocab_size = target_model.vocab_size

    # -- input handling ---------------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("prompt is empty")
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
        else:
            raise PromptError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise PromptError("prompt is empty")
        room = self.max_context - len(ids) - (self.gamma or DEFAULT_GAMMA) - 1
        if room < 1:
            raise PromptError(f"prompt has {len(ids)} tokens, too long for the model's context of "
                              f"{self.max_context} (window {self.gamma} needs room to draft)")
        return ids

    def _stop_rule(self, params: SamplingParams, prompt_len: int) -> StopRule:
        room = self.max_context - prompt_len - (self.gamma or DEFAULT_GAMMA) - 1
        decode = None
        if self.tokenizer is not None:
            decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        elif params.stop:
            raise InvalidParameterError("stop strings need a tokenizer")
        return StopRule(min(params.max_new_tokens, room), self.eos_token_ids, params.ignore_eos, params.stop, decode)

    def round_options(self, params: SamplingParams, method: str = "pearl") -> RoundOptions:
        o = self.options
        if method == "sd":  # vanilla SD expressed on the PEARL loop: both ablations off
            return RoundOptions(self.gamma, params.greedy, o.draft_greedy, pre_verify=False, post_verify=False)
        return RoundOptions(self.gamma, params.greedy, o.draft_greedy, o.pre_verify, o.post_verify)

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | None = None, on_tokens=None,
                 method: str | None = None, gamma: int | None = None) -> list[GenerationOutput]:
        """Generate for each prompt (text or token ids). ``on_tokens(i, ids)`` streams committed tokens.

        ``method`` and ``gamma`` override the engine's settings for this call (the draft must be loaded for
        "pearl"/"sd").
        """
        params = params or SamplingParams()
        method = self._check_method(method)
        if gamma is not None:
            EngineOptions(gamma=gamma)  # validates
        saved, self.gamma = self.gamma, gamma or self.gamma
        try:
            return self._generate(prompts, params, on_tokens, method)
        finally:
            self.gamma = saved

    def _generate(self, prompts, params, on_tokens, method) -> list[GenerationOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise PromptError("no prompts given")
        encoded = [self.encode(p) for p in prompts]  # validate everything before generating anything
        return [self.generate_one(ids, params, request_index=i, method=method,
                                  on_tokens=None if on_tokens is None else (lambda t, i=i: on_tokens(i, t)))
                for i, ids in enumerate(encoded)]

    def _check_method(self, method: str | None) -> str:
        method = method or self.method
        EngineOptions(method=method)  # validates the name
        if method != "ar" and self._ray is None and self.draft_model is None:
            raise InvalidParameterError(f"method {method!r} needs a draft model; this engine has none")
        return method

    def generate_one(self, prompt_ids: list[int], params: SamplingParams, request_index: int = 0,
                     on_tokens=None, method: str | None = None) -> GenerationOutput:
        method = self._check_method(method)
        stop = self._stop_rule(params, len(prompt_ids))
        seed = params.seed * 1_000_003 + request_index
        if self._ray is not None:
            ids, stats = self._ray.generate_one(prompt_ids, params, stop, seed, on_tokens, method)
        elif method == "ar":
            ids, stats = generate_ar(self.target_model, prompt_ids, stop, seed, params.temperature, params.top_k,
                                     params.top_p, on_tokens)
        elif method == "sd":
            ids, stats = generate_sd(self.draft_model, self.target_model, prompt_ids, self.gamma, stop, seed,
                                     params.temperature, params.top_k, params.top_p, self.options.draft_greedy,
                                     on_tokens)
        else:
            channel = LocalChannel(self.draft_model, self.target_model)
            ids, stats = run_pearl(channel, prompt_ids, self.round_options(params, method), stop, seed, params.temperature,
                                   params.top_k, params.top_p, on_tokens)
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if stats.finish_reason == "stop":
                text = stop.cut_text(text)
        return GenerationOutput(list(prompt_ids), ids, text, stats.finish_reason, stats)

    def shutdown(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()
