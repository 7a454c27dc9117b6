"""``Request``: one generation, built and validated once by the engine (``PearlEngine.make_request``) and
passed whole to the side that runs the decoding loop. Plain data the core reads; it refers back to nothing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from .messages import DraftStart
from .rounds import RoundOptions


class Params(Protocol):
    """What the core reads of a request's sampling parameters; ``config.SamplingParams`` (validated, with
    the defaults) is the one the engine builds."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...] | None
    ignore_eos: bool
    logprobs: int | None


@dataclass(frozen=True)
class Request:
    """One generation: everything the loop needs, and nothing that refers back to the engine."""

    prompt_ids: tuple[int, ...]
    params: Params
    method: str
    rounds: RoundOptions
    seed: int
    """The request's own seed, derived from ``params.seed`` and its index in the call, in [0, 2**63)."""
    eos_token_ids: tuple[int, ...] = ()

    @property
    def uses_draft(self) -> bool:
        return self.rounds.use_draft

    def target_only(self) -> "Request":
        """The same request run on the target alone (the draft is down): still lossless."""
        return dataclasses.replace(self, rounds=dataclasses.replace(self.rounds, use_draft=False, pre_verify=True))


def draft_start(request: Request) -> DraftStart:
    """The ``DraftStart`` of a request (the draft seeds its sampling generator from ``request.seed``)."""
    p = request.params
    return DraftStart(list(request.prompt_ids), p.temperature, p.top_k, p.top_p, request.rounds.draft_greedy,
                      request.seed)
