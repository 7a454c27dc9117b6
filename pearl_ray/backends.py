"""Backends behind one small protocol. ``PearlEngine`` builds a ``config.Request`` and hands it to one:

- ``LocalBackend``: both models in this process, the loop runs the two sides one after the other (same
  tokens as Ray, no speed-up): tests, laptops, debugging.
- ``runtime.backend.RayBackend``: the draft and the target leader in Ray actors, running at once.

Each is built from the resolved ``EngineConfig`` (plus ``modeling.resolve.PairInfo`` or injected models)
and never sees the engine.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

import torch

from .config import EngineConfig, Request
from .core.loop import LocalChannel, iter_request
from .core.metrics import GenerationStats
from .core.stopping import StopRule


class Backend(Protocol):
    max_context: int
    vocab_size: int
    measured: dict | None
    """Measured forward times and the automatic gamma (Ray with ``gamma=None``), else None."""

    def stream(self, request: Request) -> Generator[list[int], None, tuple[list[int], GenerationStats]]:
        """Yields each round's newly committed token ids; returns (all output ids, stats)."""
        ...

    def shutdown(self) -> None: ...


def decoder(tokenizer):
    """Token ids -> text with special tokens kept (what stop strings are matched against), or None."""
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


class LocalBackend:
    def __init__(self, config: EngineConfig, pair=None, draft_model=None, target_model=None, tokenizer=None):
        from .modeling.hf import load_model

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if target_model is None:
            loaded = load_model(pair.target_path, config.device, config.dtype)
            target_model, tokenizer = loaded.runner, loaded.tokenizer
        if draft_model is None and pair is not None and pair.draft_path is not None:
            draft_model = load_model(pair.draft_path, config.device, config.dtype,
                                     target_vocab_size=target_model.vocab_size).runner
        self.draft_model, self.target_model = draft_model, target_model
        self.decode = decoder(tokenizer)
        self.max_context, self.vocab_size = target_model.max_context, target_model.vocab_size
        self.measured = None

    def stream(self, request: Request):
        channel = LocalChannel(self.draft_model, self.target_model)
        return (yield from iter_request(channel, request, StopRule.for_request(request, self.decode)))

    def shutdown(self) -> None:
        self.draft_model = self.target_model = None
