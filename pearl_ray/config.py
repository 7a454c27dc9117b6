"""Validated, frozen configuration: sampling parameters and engine options. No I/O.

``gamma`` is the draft window (synonyms elsewhere: gpt-fast ``speculate_k``, vLLM ``num_speculative_tokens``,
HF ``num_assistant_tokens``, TRT-LLM ``max_draft_len``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import InvalidParameterError

Method = Literal["pearl", "sd", "ar"]
METHODS = ("pearl", "sd", "ar")


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
    """Seeds the per-request generators (coins, draft sampling); request i uses (seed, i)."""
    stop: tuple[str, ...] | None = None
    """Stop strings: generation ends at the first committed token whose text completes one; the text is cut before it."""
    ignore_eos: bool = False
    """Fixed-length protocol (the paper's): do not stop at EOS."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidParameterError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0):
            raise InvalidParameterError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidParameterError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameterError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.stop is not None and any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise InvalidParameterError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineOptions:
    method: str = "pearl"
    """"pearl" (parallel draft/verify), "sd" (vanilla speculative decoding) or "ar" (target only)."""
    gamma: int | None = 4
    """Draft window; None = auto (measured cost ratio, Ray backend) or 4 (local backend)."""
    pre_verify: bool = True
    """PEARL ablation switch: check the first draft token in the round that drafts it."""
    post_verify: bool = True
    """PEARL ablation switch: keep drafting while the target verifies the pending window."""
    draft_greedy: bool = False
    """When sampling, draft by argmax (q one-hot, ids only on the wire). Still lossless."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidParameterError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.gamma is not None and (not isinstance(self.gamma, int) or isinstance(self.gamma, bool)
                                       or self.gamma < 1):
            raise InvalidParameterError(f"gamma must be an integer >= 1 (or None for auto), got {self.gamma!r}")
