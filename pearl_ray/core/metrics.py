"""Generation statistics (project definitions, docs/pearl-algorithm.md §9). Pure: standard library only.

Per request:
- ``new_tokens``: committed output tokens after the stop rule (never pending ones).
- ``acceptance_rate`` = accepted draft tokens / draft tokens verified against p.
- ``draft_utilisation`` = accepted draft tokens / all drafted tokens (exposes discarded windows).
- ``tokens_per_target_forward`` = new_tokens / target forward calls (prefill counted; AR = 1.0).
- ``mal`` (mean accepted length): a *run* is a maximal streak of consecutively accepted draft tokens, ended
  by a rejection or by the end of the request; mal = accepted draft tokens / runs. Recovered and bonus
  tokens are not counted; the final run counts if non-empty. ``mal_official`` drops the final run, as the
  official PEARL code does (its streak is recorded only when a rejection ends it).
- ``tokens_per_s`` = new_tokens / wall_s, with ``wall_s`` from the generate call to its return.
- ``accepted_by_position[j]`` / ``verified_by_position[j]``: the same counts split by the draft token's
  index j in the window that drafted it.
Aggregate over requests by summing numerators and denominators (``GenerationStats.merge``), never by
averaging ratios.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .messages import DraftChunk, TargetOutput


@dataclass
class RoundTiming:
    """One round's timeline (seconds). Idle = the round's span minus that side's busy time."""

    round_id: int
    mode: str
    draft_busy_s: float = 0.0
    target_busy_s: float = 0.0
    round_s: float = 0.0  # wall time of the whole round as the decoding loop saw it
    decide_s: float = 0.0  # coordinator/decider time (pearl_step and bookkeeping)
    overlap_s: float = 0.0  # time both sides were busy at once (from their own timestamps)
    bytes_moved: int = 0
    num_candidates: int = 0
    num_accepted: int = 0
    # Wall-clock (time.time()) stamps: when the decoding loop began the round and when each side began its
    # work (0.0 if it did none). Same-node runs can split the overhead into dispatch and return latency.
    started_at: float = 0.0
    draft_started_at: float = 0.0
    target_started_at: float = 0.0
    batch_size: int = 1  # requests in the round (the batched loop; 1 for a request decoded alone)
    window: int = 0  # draft window asked of the draft this round (the policy's choice; 0: none)
    schedule: str = ""  # how the sides shared the device: "plain", "turn" (one after the other), "once" (PEARL)

    @property
    def draft_idle_s(self) -> float:
        return max(0.0, self.round_s - self.draft_busy_s)

    @property
    def target_idle_s(self) -> float:
        return max(0.0, self.round_s - self.target_busy_s)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(draft_idle_s=self.draft_idle_s, target_idle_s=self.target_idle_s)
        return d


def overlap_s(chunk: "DraftChunk | None", target_out: "TargetOutput | None") -> float:
    """Time both sides were busy at once in a round, from their own start timestamps and busy durations."""
    if chunk is None or target_out is None or not chunk.busy_s or not target_out.busy_s:
        return 0.0
    start = max(chunk.started_at, target_out.started_at)
    end = min(chunk.started_at + chunk.busy_s, target_out.started_at + target_out.busy_s)
    return max(0.0, end - start)


@dataclass
class GenerationStats:
    method: str = "pearl"
    gamma: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    rounds: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    drafted_tokens: int = 0
    verified_tokens: int = 0
    accepted_tokens: int = 0
    recovered_tokens: int = 0
    bonus_tokens: int = 0
    fallback_rounds: int = 0  # rounds finished without the draft (failure or timeout)
    draft_failures: int = 0
    runs: int = 0
    runs_official: int = 0
    accepted_in_official_runs: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    verified_by_position: list[int] = field(default_factory=list)
    draft_busy_s: float = 0.0
    target_busy_s: float = 0.0
    decide_s: float = 0.0
    overlap_s: float = 0.0
    bytes_moved: int = 0
    plain_rounds: int = 0  # rounds without the draft (the policy chose plain decoding, or method "ar")
    turn_rounds: int = 0  # rounds with the draft's window, then the target's forward
    once_rounds: int = 0  # rounds with both sides at the same time (PEARL's schedule)
    finish_reason: str = ""
    round_timings: list[RoundTiming] = field(default_factory=list)
    _current_run: int = 0

    # -- observation -------------------------------------------------------------------------------------
    def observe_verification(self, accepted_flags: list[bool], positions: list[int]) -> None:
        """Record verified candidates in order (True = accepted). A False ends the current run."""
        for ok, pos in zip(accepted_flags, positions):
            while len(self.verified_by_position) <= pos:
                self.verified_by_position.append(0)
                self.accepted_by_position.append(0)
            self.verified_by_position[pos] += 1
            self.verified_tokens += 1
            if ok:
                self.accepted_by_position[pos] += 1
                self.accepted_tokens += 1
                self._current_run += 1
            else:
                self.runs += 1
                self.runs_official += 1
                self.accepted_in_official_runs += self._current_run
                self._current_run = 0

    def observe_round(self, num_drafted: int, num_candidates: int, num_accepted: int, recovered: bool,
                      bonus: bool, positions: list[int], timing: RoundTiming | None = None) -> None:
        self.rounds += 1
        self.drafted_tokens += num_drafted
        flags = [True] * num_accepted + ([False] if num_accepted < num_candidates else [])
        self.observe_verification(flags, positions[: len(flags)])
        self.recovered_tokens += int(recovered)
        self.bonus_tokens += int(bonus)
        if timing is not None:
            if timing.schedule:
                name = f"{timing.schedule}_rounds"
                setattr(self, name, getattr(self, name) + 1)
            self.round_timings.append(timing)
            self.draft_busy_s += timing.draft_busy_s
            self.target_busy_s += timing.target_busy_s
            self.decide_s += timing.decide_s
            self.overlap_s += timing.overlap_s
            self.bytes_moved += timing.bytes_moved

    def finish(self, new_tokens: int, wall_s: float, finish_reason: str) -> None:
        if self._current_run > 0:
            self.runs += 1
            self._current_run = 0
        self.new_tokens, self.wall_s, self.finish_reason = new_tokens, wall_s, finish_reason

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.verified_tokens if self.verified_tokens else 0.0

    @property
    def draft_utilisation(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_len(self) -> float:
        return self.accepted_tokens / self.runs if self.runs else 0.0

    @property
    def mal_official(self) -> float:
        return self.accepted_in_official_runs / self.runs_official if self.runs_official else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / v if v else 0.0 for a, v in zip(self.accepted_by_position, self.verified_by_position)]

    def as_dict(self, with_rounds: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "round_timings"}
        d.update(acceptance_rate=self.acceptance_rate, draft_utilisation=self.draft_utilisation,
                 mean_accepted_len=self.mean_accepted_len, mal=self.mean_accepted_len,
                 mal_official=self.mal_official, tokens_per_target_forward=self.tokens_per_target_forward,
                 tokens_per_s=self.tokens_per_s, acceptance_by_position=self.acceptance_by_position)
        if with_rounds:
            d["round_timings"] = [t.as_dict() for t in self.round_timings]
        return d

    @staticmethod
    def merge(items: list["GenerationStats"]) -> "GenerationStats":
        """Sum numerators and denominators over requests."""
        out = GenerationStats(method=items[0].method if items else "", gamma=items[0].gamma if items else 0)
        summed = ["new_tokens", "wall_s", "rounds", "target_forwards", "draft_forwards", "drafted_tokens",
                  "verified_tokens", "accepted_tokens", "recovered_tokens", "bonus_tokens", "fallback_rounds",
                  "draft_failures", "runs", "runs_official", "accepted_in_official_runs", "draft_busy_s",
                  "target_busy_s", "decide_s", "overlap_s", "bytes_moved", "plain_rounds", "turn_rounds",
                  "once_rounds"]
        for s in items:
            for name in summed:
                setattr(out, name, getattr(out, name) + getattr(s, name))
            for j, (a, v) in enumerate(zip(s.accepted_by_position, s.verified_by_position)):
                while len(out.verified_by_position) <= j:
                    out.verified_by_position.append(0)
                    out.accepted_by_position.append(0)
                out.accepted_by_position[j] += a
                out.verified_by_position[j] += v
        return out


def greedy_sd_acceptance(matches: list[bool], gamma: int) -> tuple[int, int]:
    """(accepted, verified) draft tokens of greedy vanilla SD with window ``gamma``, from ``matches[i]`` = whether
    the draft's argmax given the target's first i output tokens equals the target's token i. Each window from
    position i accepts the leading run k of matches (at most gamma, and no further than the output's end):
    k tokens verified if the whole window is accepted, else k + 1 (the miss); the next window starts at i + k + 1
    (the target's own token fills the miss, or is the bonus token). Same definitions as ``acceptance_rate``."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    i = accepted = verified = 0
    n = len(matches)
    while i < n:
        window = min(gamma, n - i)
        k = 0
        while k < window and matches[i + k]:
            k += 1
        accepted += k
        verified += k + (1 if k < window else 0)
        i += k + 1
    return accepted, verified
