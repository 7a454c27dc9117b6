"""The adaptive speculation policy: each round's draft window for the whole batch, 0 meaning plain decoding.

Inputs: forward costs measured at start-up (``measure_costs``: the target over n padded tokens for a few n,
a draft step over b rows) and each request's running acceptance. For every window g in 0..max_gamma it
predicts the batch's committed tokens per second and takes the best:

- round costs: a draft phase of ``g`` batched steps, ``D(g) = g * draft(b)`` (b = rows that draft), and a
  target forward over every row padded to ``g + 1`` tokens, ``T(g) = target(B * (g + 1))``; the sides run
  one after the other (``parallel=False``, the local backend: ``D + T``) or at once (Ray: ``max(D, T)``).
  With g = 0 the round is one target forward over B rows, ``target(B)``.
- tokens per request, with acceptance a per candidate (assumed independent across positions):
  - target-only: 1 per ``target(B)`` (or per round when others draft);
  - vanilla SD: ``E(g + 1) = (1 - a^(g+1)) / (1 - a)`` per ``D + T``;
  - PEARL: a two-state chain. PRE rounds commit 1 and move to POST with probability a; POST rounds verify
    g candidates, commit ``E(g)`` and stay in POST with probability a^g. Tokens per second are the
    stationary mix's tokens over its time (PRE costs ``D ⊕ target(B)`` alone, POST ``D ⊕ target(B * g)``;
    in a batch rows are in mixed phases and every forward is padded to the widest, so PRE rounds cost as
    POST ones).
- a request's acceptance is its own accepted / verified counts, shrunk towards the pair's running mean
  (``prior_weight`` pseudo-candidates), so a new request starts from what the pair has shown so far.

Schedules. Where one process holds both models (``split`` costs given), each round also picks how the sides
share the device: ``"turn"``, the draft's window then the target's verification of it in the same round, each
with every core (PEARL requests then run vanilla SD rounds: in turn, PEARL's pre-verify rounds would cost a
window for one token);
or ``"once"``, PEARL with the sides at the same time, each on its share (the ``split`` costs, measured apart).
``"plain"`` is a round with no drafting. Without ``split`` the schedule is fixed by ``parallel``: "once" for
a pair in two workers, "turn" for one process that cannot split. Each schedule keeps its own online scales.

A window is taken only when its predicted rate beats plain decoding's by ``margin`` (5%), and with the
acceptance taken ``confidence`` standard errors below its estimate (a request's estimate rests on its own
verified candidates plus the prior's ``prior_weight``): the model's errors then cost speculation, not plain
decoding. Without the lower bound a request that started with a lucky run drafted on a guess; on
hand-written prompts (acceptance about 0.4 on the default pair) those rounds were most of what PEARL lost
to target-only decoding at batch 1. Plain decoding never learns acceptance, so while the policy keeps
choosing 0 it still tries its best positive window every ``probe_every`` rounds, if that window could win
at an optimistic acceptance (``probe_optimism`` standard errors above the estimate): a probe costs a wide
forward and the draft's catch-up over every skipped token, so where no plausible acceptance pays for
drafting (a big batch, whose padded forwards cost nearly as much per token as plain ones), or where what
the batch's requests have left to decode could not repay the probe (``_probe_pays``), it is skipped.
Each probe, run or skipped, that leaves the choice at 0 doubles that period, up to ``probe_backoff`` times
``probe_every``, and a chosen window resets it. Measured round times are compared with the prediction:
their ratio rescales the costs online, and when it stays off by more than ``drift`` for ``drift_rounds``
rounds (a busy machine) the costs are measured again (``remeasure``; the k-th time after ``drift_rounds`` x 2^k
off rounds: a measurement stalls the batch for seconds, and one that cannot fix the drift must not repeat
every few seconds). Rounds without drafting keep their own
scale when ``target_alone`` is given (on CPU they borrow the draft's threads, and their speed says little
about a drafting round's: with one scale for both, fast plain rounds made drafting look cheap).

A round that carries prompt tokens (chunks of joining requests) pays their forwards on both sides whatever its
window: ``decide``'s ``prompt_tokens`` adds that fixed cost to every option's round (``prompt_s``).

Pure arithmetic over injected numbers: no models, no Ray (``measure_costs`` takes any ``BatchedLM``).
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardCosts:
    """Seconds per forward against the padded tokens it carries: piecewise linear between measured points,
    linear past the last two. The points were measured on ``context`` cached positions per row; a forward
    on a longer context also pays ``per_context`` seconds per new token per extra position (attention reads
    every cached position of its row, and the slot cache pads each row to the longest)."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    context: int = 0
    per_context: float = 0.0

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.seconds) or list(self.tokens) != sorted(set(self.tokens)):
            raise ValueError(f"cost points must be increasing token counts with one time each: {self}")

    def __call__(self, n: float, context: int | None = None) -> float:
        """A forward over ``n`` padded tokens on ``context`` cached positions per row (None: the measured one)."""
        base = self._base(n)
        if context is None or not self.per_context or context <= self.context:
            return base  # below the measured context the slope says little (fixed costs dominate): no discount
        return base + self.per_context * max(n, 1) * (context - self.context)

    def _base(self, n: float) -> float:
        xs, ys = self.tokens, self.seconds
        if len(xs) == 1:
            return ys[0] * max(n, 1) / xs[0] if n > xs[0] else ys[0]
        if n <= xs[0]:
            return ys[0]
        i = min(bisect.bisect_left(xs, n), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(ys[0], y0 + (y1 - y0) * (n - x0) / (x1 - x0))

    def scaled(self, factor: float) -> "ForwardCosts":
        return ForwardCosts(self.tokens, tuple(s * factor for s in self.seconds), self.context,
                            self.per_context * factor)

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "seconds": [round(s, 6) for s in self.seconds],
                "context": self.context, "per_context": self.per_context}


@dataclass(frozen=True)
class CostModel:
    target: ForwardCosts
    draft: ForwardCosts | None = None
    parallel: bool = False
    """True when the draft and the target run at the same time (Ray), False one after the other (local)."""
    target_alone: ForwardCosts | None = None
    """The target's one-token forwards when no request drafts (on CPU it then borrows the draft's threads);
    None: the same as ``target``."""
    split: "CostModel | None" = None
    """One process that can also run the sides at once: their costs then, each on its share of the device
    (``parallel=True``). ``target``/``draft`` are then the whole-device costs of the sides in turn."""

    def to_dict(self) -> dict:
        return {"target": self.target.to_dict(), "draft": self.draft.to_dict() if self.draft else None,
                "parallel": self.parallel,
                "target_alone": self.target_alone.to_dict() if self.target_alone else None,
                "split": self.split.to_dict() if self.split else None}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        """The inverse of ``to_dict`` (e.g. the ``costs`` of a policy's ``describe()``)."""
        def fc(x):
            return ForwardCosts(tuple(x["tokens"]), tuple(x["seconds"]), int(x.get("context", 0)),
                                float(x.get("per_context", 0.0))) if x else None
        return cls(fc(d["target"]), fc(d.get("draft")), bool(d.get("parallel")), fc(d.get("target_alone")),
                   cls.from_dict(d["split"]) if d.get("split") else None)

    def schedules(self) -> tuple[str, ...]:
        """The drafting schedules these costs describe."""
        if self.split is not None:
            return ("turn", "once")
        return ("once",) if self.parallel else ("turn",)

    def of(self, schedule: str) -> "CostModel":
        """The costs that a round of ``schedule`` pays."""
        return self.split if schedule == "once" and self.split is not None else self


@dataclass(frozen=True)
class SeqView:
    """What the policy reads of one request in the batch."""

    method: str  # "pearl" | "sd" | "ar"
    accepted: int = 0
    verified: int = 0
    adaptive: bool = True  # False: the request keeps its own fixed window (it still counts in the costs)
    fixed_gamma: int = 0
    behind: int = 0  # tokens the draft lacks before its first step (it last drafted this many tokens ago)
    remaining: int | None = None  # new tokens the request may still produce (None: unknown, unbounded)
    context: int | None = None  # positions the request holds (prompt and output so far; None: unknown)


def expected_run(a: float, n: int) -> float:
    """Expected tokens committed from ``n`` candidates when the first rejection (or the end) stops the run
    and the stopping row gives one more token: 1 + a + ... + a^(n-1)."""
    if n <= 0:
        return 0.0
    if a >= 1.0:
        return float(n)
    return (1.0 - a ** n) / (1.0 - a)


def batch_context(seqs: Sequence[SeqView]) -> int | None:
    """The context a batch's forwards attend over: its longest row's (None where no row says)."""
    known = [s.context for s in seqs if s.context is not None]
    return max(known) if known else None


SCHEDULES = ("plain", "turn", "once")
"""How a round uses the device: no drafting; the draft's window then the target's forward, each with the
whole device; the sides at the same time (PEARL)."""


class SpeculationPolicy:
    def __init__(self, costs: CostModel, max_gamma: int = 8, prior: float = 0.5, prior_weight: float = 8.0,
                 probe_every: int = 16, drift: float = 1.5, drift_rounds: int = 400,
                 remeasure: Callable[[], CostModel] | None = None, margin: float = 1.05, probe_backoff: int = 4,
                 confidence: float = 1.0, probe_optimism: float = 2.0, schedule: str | None = None):
        """``schedule``: force every drafting round to "turn" or "once" (it must be one the costs describe);
        None: the best of them each round."""
        if costs.draft is None:
            max_gamma = 0
        self.margin = margin
        self.confidence, self.probe_optimism = confidence, probe_optimism
        self.costs, self.max_gamma = costs, max_gamma
        self.prior, self.prior_weight = prior, prior_weight
        self.probe_every, self.drift, self.drift_rounds = probe_every, drift, drift_rounds
        self.remeasure_fn = remeasure
        if schedule is not None and schedule not in costs.schedules():
            raise ValueError(f"schedule {schedule!r} is not one these costs describe: {costs.schedules()}")
        self.forced = schedule
        self.scale_alone = 1.0
        self.scales = {sch: [1.0, 1.0] for sch in ("turn", "once")}  # [target, draft] per drafting schedule
        self.schedule = "plain"  # the last round's
        self._pair_acc, self._pair_ver = 0.0, 0.0
        self._zero_streak = 0
        self.probe_backoff = max(1, probe_backoff)
        self._probe_gap = probe_every
        self._probing = False
        self._off_rounds = 0
        self.remeasures = 0
        self.probes = self.skipped_probes = 0
        self.last_choice: dict = {}

    # -- estimates ---------------------------------------------------------------------------------------
    @property
    def pair_acceptance(self) -> float:
        if self._pair_ver <= 0:
            return self.prior
        return (self._pair_acc + self.prior_weight * self.prior) / (self._pair_ver + self.prior_weight)

    def acceptance(self, seq: SeqView, z: float = 0.0) -> float:
        """The request's acceptance estimate, moved ``z`` standard errors up (z > 0) or down (z < 0)."""
        n = seq.verified + self.prior_weight
        a = (seq.accepted + self.prior_weight * self.pair_acceptance) / n
        if z:
            a += z * math.sqrt(a * (1.0 - a) / (n + 1.0))
        return min(max(a, 0.01), 0.98)

    @property
    def plain_costs(self) -> ForwardCosts | None:
        """The target's forwards in rounds without drafting, where they differ from a drafting round's: on the
        draft's threads too (``target_alone``), or with the whole device when drafting rounds may run at once
        (``split``); None: the drafting rounds' own."""
        if self.costs.target_alone is not None:
            return self.costs.target_alone
        return self.costs.target if self.costs.split is not None else None

    @property
    def scale_target(self) -> float:
        return self.scales[self._sched(None)][0]

    @property
    def scale_draft(self) -> float:
        return self.scales[self._sched(None)][1]

    def _sched(self, schedule: str | None) -> str:
        """A drafting schedule: the one given, else the one these costs run when they offer one only."""
        if schedule in ("turn", "once"):
            return schedule
        return self.forced or self.costs.schedules()[-1]

    def target_s(self, tokens: float, schedule: str | None = None, context: int | None = None) -> float:
        sch = self._sched(schedule)
        return self.scales[sch][0] * self.costs.of(sch).target(tokens, context)

    def draft_s(self, rows: int, steps: int, schedule: str | None = None, context: int | None = None) -> float:
        sch = self._sched(schedule)
        draft = self.costs.of(sch).draft
        if steps <= 0 or rows <= 0 or draft is None:
            return 0.0
        return steps * self.scales[sch][1] * draft(rows, context)

    def _join(self, d: float, t: float, schedule: str | None = None) -> float:
        return max(d, t) if self.costs.of(self._sched(schedule)).parallel else d + t

    def prompt_s(self, tokens: int, schedule: str | None = None, context: int | None = None) -> float:
        """What ``tokens`` prompt tokens riding in a round add to it, whatever its window: a forward of their
        own on the target and one on the draft (which caches every prompt of the requests it holds)."""
        if tokens <= 0:
            return 0.0
        sch = self._sched(schedule)
        draft = self.costs.of(sch).draft
        d = self.scales[sch][1] * draft(tokens, context) if draft is not None else 0.0
        return self.target_s(tokens, sch, context) + d

    def rate(self, seqs: Sequence[SeqView], g: int, z: float = 0.0, schedule: str | None = None,
             prompt: int = 0) -> float:
        """Predicted committed tokens per second of the batch if every adaptive request drafts ``g`` under
        ``schedule`` (None: the costs' own), with each acceptance moved ``z`` standard errors (``acceptance``).
        In turn, an adaptive PEARL request runs vanilla SD rounds, a window per round. ``prompt``: prompt
        tokens that ride in the round (chunks of joining requests), a fixed cost that every window pays
        alike, so more tokens per round amortise it."""
        if not seqs:
            return 0.0
        sch = self._sched(schedule)
        b = len(seqs)
        ctx = batch_context(seqs)
        extra = self.prompt_s(prompt, sch, ctx)
        windows = [self._window(s, g) for s in seqs]
        width = max(windows)
        drafting = sum(1 for w in windows if w > 0)
        d = self.draft_s(drafting, width, sch, ctx)
        alone = self.plain_costs
        t_plain = (self.scale_alone * alone(b, ctx) if (alone is not None and width == 0)
                   else self.target_s(b, sch, ctx)) + extra
        total = 0.0
        for s, w in zip(seqs, windows):
            if w == 0:
                total += 1.0 / (t_plain if width == 0 else
                                self._join(d, self.target_s(b * (width + 1), sch, ctx), sch) + extra)
                continue
            a = self.acceptance(s, z)
            if s.method == "sd" or (sch == "turn" and s.adaptive):
                total += expected_run(a, w + 1) / (d + self.target_s(b * (w + 1), sch, ctx) + extra)
            elif w == 1:  # PEARL with a one-token window never has a window pending: one token per round
                total += 1.0 / (self._join(d, self.target_s(b, sch, ctx), sch) + extra)
            else:
                # alone, a PRE round's forward is one token; in a batch the rows are in mixed phases and every
                # forward is padded to the widest row, so each round pays for the POST width
                c_post = self._join(d, self.target_s(b * w, sch, ctx), sch) + extra
                c_pre = self._join(d, self.target_s(b, sch, ctx), sch) + extra if b == 1 else c_post
                stay = a ** w
                post_per_pre = a / max(1.0 - stay, 1e-9)
                tokens = 1.0 + post_per_pre * expected_run(a, w)
                total += tokens / (c_pre + post_per_pre * c_post)
        return total

    def _window(self, s: SeqView, g: int) -> int:
        if s.method == "ar":
            return 0
        return g if s.adaptive else s.fixed_gamma

    # -- the choice --------------------------------------------------------------------------------------
    def choose(self, seqs: Sequence[SeqView]) -> int:
        """The window for the next round (0: plain decoding); ``schedule`` says how the sides run it."""
        return self.decide(seqs)[1]

    def decide(self, seqs: Sequence[SeqView], prompt_tokens: int = 0) -> tuple[str, int]:
        """(schedule, window) for the next round: "plain" with 0, or "turn"/"once" with a window > 0.
        ``prompt_tokens``: prompt tokens that ride in the round (``rate``'s ``prompt``)."""
        window = self._choose(seqs, prompt_tokens)
        if window == 0:
            self.schedule = "plain"
        elif self.forced or len(self.costs.schedules()) == 1:
            self.schedule = self._sched(None)
        else:
            rates = {sch: self.rate(seqs, window, -self.confidence, sch, prompt_tokens)
                     for sch in self.costs.schedules()}
            self.schedule = max(rates, key=lambda sch: (rates[sch], sch == "turn"))
        self.last_choice["schedule"] = self.schedule
        return self.schedule, window

    def _best_rate(self, seqs: Sequence[SeqView], g: int, z: float, prompt: int = 0) -> float:
        """The rate of window ``g`` under the schedule that gives it most (the forced one, if any)."""
        if g == 0 or self.forced:
            return self.rate(seqs, g, z, prompt=prompt)
        return max(self.rate(seqs, g, z, sch, prompt) for sch in self.costs.schedules())

    def _choose(self, seqs: Sequence[SeqView], prompt: int = 0) -> int:
        if not any(s.method != "ar" and s.adaptive for s in seqs) or self.max_gamma == 0:
            self.last_choice = {"window": 0}
            return 0
        rates = {g: self._best_rate(seqs, g, -self.confidence, prompt) for g in range(self.max_gamma + 1)}
        best = max(rates, key=lambda g: (rates[g], -g))
        if best > 0 and rates[best] < self.margin * rates[0]:
            best = 0  # drafting must win clearly: the model's errors should cost speculation, not plain decoding
        choice = best
        self._probing = False
        hopeful = None
        if best == 0:
            self._zero_streak += 1
            if self.probe_every and self._zero_streak >= self._probe_gap:
                hopes = {g: self._best_rate(seqs, g, self.probe_optimism, prompt) for g in range(1, self.max_gamma + 1)}
                hopeful = max(hopes, key=lambda g: (hopes[g], -g))
                if hopes[hopeful] >= self.margin * rates[0] and self._probe_pays(seqs, hopeful, hopes[hopeful],
                                                                                 rates[0]):
                    choice = hopeful
                    self._probing = True  # its draft steps first catch up on every token since the last window
                    self.probes += 1
                else:  # not even an optimistic acceptance pays for drafting here: save the probe's cost
                    self.skipped_probes += 1
                self._zero_streak = 0
                self._probe_gap = min(2 * self._probe_gap, self.probe_backoff * self.probe_every)
        else:
            self._zero_streak = 0
            self._probe_gap = self.probe_every
        self.last_choice = {"window": choice, "best": best, "probe": self._probing,
                            "probe_skipped": hopeful is not None and not self._probing,
                            "rates": {g: round(r, 2) for g, r in rates.items()}}
        return choice

    def _probe_pays(self, seqs: Sequence[SeqView], g: int, hope: float, plain: float) -> bool:
        """Whether a probe of window ``g`` could repay its cost before the batch's requests end: if drafting
        ran at the optimistic rate ``hope``, the rest of their tokens (``remaining``) would take
        ``1 - plain / hope`` less time than plain decoding; the probe costs the draft's catch-up over every
        token it skipped (``behind``, as one forward) plus the wide round's excess over a plain one. A batch
        near its end, or with long stretches to catch up on, skips the probe."""
        if any(s.remaining is None for s in seqs if s.method != "ar") or plain <= 0 or hope <= plain:
            return True
        left = sum(s.remaining for s in seqs if s.method != "ar")
        saved = (1.0 - plain / hope) * left / plain
        behind = sum(s.behind for s in seqs if s.method != "ar")
        ctx = batch_context(seqs)
        catch_up = self.draft_s(behind, 1, "turn", ctx) if behind and self.costs.draft else 0.0
        rows = len(seqs)
        wide = self.target_s(rows * (g + 1), None, ctx) - rows / plain
        return saved > catch_up + max(0.0, wide)

    # -- feedback ----------------------------------------------------------------------------------------
    def finished(self, accepted: int, verified: int) -> None:
        """A request left: fold its acceptance into the pair's running mean (recent requests weigh more)."""
        decay = 0.9
        self._pair_acc = decay * self._pair_acc + accepted
        self._pair_ver = decay * self._pair_ver + verified

    def observe(self, rows: int, width: int, target_s: float, draft_rows: int = 0, draft_steps: int = 0,
                draft_s: float = 0.0, schedule: str | None = None, context: int | None = None) -> None:
        """A round's measured times against the prediction at the batch's ``context`` (its longest row): rescale
        (the scales of the round's ``schedule``; None: the last one chosen), and re-measure on a sustained
        drift."""
        if width > self.max_gamma + 1:  # a prompt pass rode in this forward: not a decoding round's cost
            return
        sch = self._sched(schedule if schedule is not None else self.schedule)
        costs, scales = self.costs.of(sch), self.scales[sch]
        seen, off = False, False
        if rows and width and target_s > 0:
            # a round with no drafting ran on the draft's threads too: its own costs, its own scale
            alone = draft_rows == 0 and self.plain_costs is not None
            predicted = (self.plain_costs if alone else costs.target)(rows * width, context)
            ratio = min(2.0, max(0.5, target_s / predicted))  # one outlier moves it little
            if alone:
                self.scale_alone = 0.8 * self.scale_alone + 0.2 * ratio
                scale = self.scale_alone
            else:
                scales[0] = 0.8 * scales[0] + 0.2 * ratio
                scale = scales[0]
            seen, off = True, not (1 / self.drift <= scale <= self.drift)
        if (draft_rows and draft_steps and draft_s > 0 and costs.draft is not None
                and not self._probing):  # a probe's steps also catch up on skipped tokens: not a step's cost
            ratio = min(2.0, max(0.5, draft_s / (draft_steps * costs.draft(draft_rows, context))))
            scales[1] = 0.8 * scales[1] + 0.2 * ratio
            seen, off = True, off or not (1 / self.drift <= scales[1] <= self.drift)
        if not seen:
            return
        self._off_rounds = self._off_rounds + 1 if off else 0
        # each re-measurement stalls every request for seconds, and one that leaves the drift in place (costs
        # measured on short contexts, served on long ones) would repeat every ``drift_rounds``: the wait
        # for the next doubles each time
        if self._off_rounds >= self.drift_rounds * 2 ** self.remeasures and self.remeasure_fn is not None:
            self.costs = self.remeasure_fn()
            self.scale_alone = 1.0
            self.scales = {k: [1.0, 1.0] for k in self.scales}
            self._off_rounds = 0
            self.remeasures += 1

    def describe(self) -> dict:
        return {"max_gamma": self.max_gamma, "pair_acceptance": round(self.pair_acceptance, 3),
                "confidence": self.confidence, "probe_optimism": self.probe_optimism,
                "probes": self.probes, "skipped_probes": self.skipped_probes,
                "scale_target": round(self.scale_target, 3), "scale_draft": round(self.scale_draft, 3),
                "scale_alone": round(self.scale_alone, 3), "schedules": list(self.costs.schedules()),
                "forced_schedule": self.forced,
                "scales": {k: [round(x, 3) for x in v] for k, v in self.scales.items()},
                "remeasures": self.remeasures, "costs": self.costs.to_dict()}


def breakeven_acceptance(costs: CostModel, batch: int, speedup: float = 1.0, method: str = "pearl",
                         max_gamma: int = 8) -> tuple[float, int] | None:
    """The lowest acceptance per candidate at which drafting, by the policy's own model (``rate``: independent
    acceptances, these costs), commits more than ``speedup`` times plain decoding's tokens per second for
    ``batch`` requests of ``method`` that all draft, with the window that gets there; None where no acceptance
    up to 0.98 does. The question behind a speed goal: what draft would this machine need?"""
    pol = SpeculationPolicy(costs, max_gamma=max_gamma, confidence=0.0)
    big = 10 ** 9  # counts so large that neither the prior nor the lower bound moves the acceptance

    def best(a: float) -> tuple[float, int]:
        seqs = [SeqView(method, accepted=round(a * big), verified=big)] * batch
        plain = pol.rate(seqs, 0)
        return max((pol.rate(seqs, g) / plain, -g) for g in range(1, pol.max_gamma + 1))

    lo, hi = 0.01, 0.98
    if pol.max_gamma == 0 or best(hi)[0] <= speedup:
        return None
    if best(lo)[0] > speedup:  # drafting pays whatever the draft gets right
        return lo, -best(lo)[1]
    for _ in range(30):  # best() grows with the acceptance: bisect for the edge
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if best(mid)[0] > speedup else (mid, hi)
    return hi, -best(hi)[1]


def policy_widths(max_gamma: int) -> list[int]:
    """Target forward widths (tokens per row) measured for the policy: the windows it weighs most, and its largest."""
    return sorted({2, 3, 5, max_gamma + 1})


def _median_time(fn: Callable[[], None], reps: int, warmup: int) -> float:
    times = []
    for r in range(reps + warmup):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def measure_forward_costs(lm, max_rows: int, widths: Sequence[int], context: int = 128, reps: int = 3,
                          warmup: int = 1, token: int = 5, long_context: int | None = None) -> ForwardCosts:
    """Time ``lm`` (an empty ``BatchedLM``: it is cleared after) over ``rows x width`` new tokens on
    ``context`` cached positions per row: rows 1, 2, 4, ... up to ``max_rows`` at width 1, and each
    width at 1 and ``max_rows`` rows. Returns seconds against padded tokens, and what each extra cached
    position adds per token: the widest forward timed again on ``long_context`` positions per row (default
    4 x ``context``, within the model's context; 0: not measured)."""
    rows_list = sorted({min(max_rows, 2 ** i) for i in range(0, max(1, math.ceil(math.log2(max_rows))) + 1)},
                       reverse=True)
    context = max(1, min(context, lm.max_context - max(widths, default=1) - 2))
    vocab = max(1, int(getattr(lm, "vocab_size", 0) or 1))
    token = token % vocab
    ctx = [(token + i % 7) % vocab for i in range(context)]
    for slot in range(max_rows):
        lm.forward({slot: (list(ctx), 1)})
    points: dict[int, list[float]] = {}
    live = max_rows
    try:
        for rows in rows_list:  # every cached row takes part in a forward: release down to ``rows``
            for slot in range(rows, live):
                lm.release(slot)
            live = rows
            for width in sorted({1, *widths}):
                if width > 1 and rows not in (1, max_rows):
                    continue
                feeds = {s: ([token] * width, 1) for s in range(rows)}

                def run() -> None:
                    lm.forward(feeds)
                    for s in range(rows):
                        lm.crop(s, context)

                points.setdefault(rows * width, []).append(_median_time(run, reps, warmup))
    finally:
        for slot in range(live):
            lm.release(slot)
    xs = sorted(points)
    ys, best = [], 0.0
    for x in xs:  # a forward over more tokens never costs less (noise aside)
        best = max(best, statistics.mean(points[x]))
        ys.append(best)
    costs = ForwardCosts(tuple(xs), tuple(ys), context)
    width = max(widths, default=1)
    if long_context is None:
        long_context = 4 * context
    long_context = min(long_context, lm.max_context - width - 2)
    if long_context < 2 * context:  # too close to tell attention's share from noise
        return costs
    long_ctx = [(token + i % 7) % vocab for i in range(long_context)]
    feeds = {s: ([token] * width, 1) for s in range(max_rows)}
    try:
        for slot in range(max_rows):
            lm.forward({slot: (list(long_ctx), 1)})

        def run_long() -> None:
            lm.forward(feeds)
            for s in range(max_rows):
                lm.crop(s, long_context)

        t_long = _median_time(run_long, reps, warmup)
    finally:
        for slot in range(max_rows):
            lm.release(slot)
    n = max_rows * width
    per = max(0.0, (t_long - costs(n)) / (n * (long_context - context)))
    return ForwardCosts(costs.tokens, costs.seconds, context, per)
