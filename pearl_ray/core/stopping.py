"""The stop rule, applied to committed tokens only (docs/pearl-algorithm.md §7.4), identical for all three methods.

- EOS-stop: cut right after the first committed EOS id (unless ``ignore_eos``).
- Stop strings: cut at the first token whose text completes a stop string; the text ends before it.
- Length: cut to exactly ``max_new_tokens``.
Pending (unverified) tokens never reach this module, so stopping leaves the output an exact target sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InvalidParameterError


FINISH_REASONS = ("eos", "stop", "length")
"""Why a request ended (``StopDecision.reason``, ``GenerationOutput.finish_reason``)."""


@dataclass
class StopDecision:
    finished: bool
    keep: int  # number of output tokens to keep
    reason: str = ""  # one of FINISH_REASONS, or "" while running


class StopRule:
    def __init__(self, max_new_tokens: int, eos_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 stop: Sequence[str] | None = None, decode: Callable[[list[int]], str] | None = None):
        self.max_new_tokens = max_new_tokens
        self.eos = frozenset(eos_token_ids) if not ignore_eos else frozenset()
        self.stop = tuple(stop or ())
        if self.stop and decode is None:
            raise InvalidParameterError("stop strings need a tokenizer to decode the output")
        self.decode = decode

    @classmethod
    def for_request(cls, request, decode: Callable[[list[int]], str] | None) -> "StopRule":
        """The rule of a ``config.Request``; ``decode`` (token ids -> text) is needed only for stop strings."""
        p = request.params
        return cls(p.max_new_tokens, request.eos_token_ids, p.ignore_eos, p.stop, decode)

    def check(self, output_ids: list[int], num_new: int) -> StopDecision:
        """Look at the last ``num_new`` tokens of ``output_ids`` (the ones committed this round)."""
        start = len(output_ids) - num_new
        for k in range(max(start, 0), len(output_ids)):
            if k >= self.max_new_tokens:
                return StopDecision(True, self.max_new_tokens, "length")
            if output_ids[k] in self.eos:
                return StopDecision(True, k + 1, "eos")
            if self.stop and self._stop_at(output_ids[: k + 1]):
                return StopDecision(True, k + 1, "stop")
        if len(output_ids) >= self.max_new_tokens:
            return StopDecision(True, self.max_new_tokens, "length")
        return StopDecision(False, len(output_ids))

    def _stop_at(self, ids: list[int]) -> bool:
        # A stop string completed by the last token lies within the last len(stop) + 2 tokens (every token
        # decodes to at least one character), so decoding that tail suffices: O(1) per token, not O(n).
        window = max(len(s) for s in self.stop) + 2
        text = self.decode(ids[-window:])
        return any(s in text for s in self.stop)

    def cut_text(self, text: str) -> str:
        return cut_at_stop(text, self.stop)


def cut_at_stop(text: str, stops: Sequence[str] | None) -> str:
    """Remove the first stop string and everything after it."""
    cut = len(text)
    for s in stops or ():
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]
