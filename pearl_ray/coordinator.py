"""The coordinator actor: owns the worker actors and each request's PEARL state, runs the rounds.

It creates the draft worker and the target-group leader in a placement group (one bundle each), measures
the cost ratio to pick gamma, drives ``loop.run_pearl`` over the chosen channel (or, with channel
"collective", links the target leader to the draft and lets the leader run the loop), streams committed tokens,
and handles faults: a draft that dies or times out is replaced after the request (which finishes on the
target alone, still lossless); a target that dies raises ``TargetUnavailable`` and is replaced for later
requests.
"""

from __future__ import annotations

import logging

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .actors import DraftWorker, TargetWorker, stream_call
from .channels import CHANNEL_NAMES, CHANNELS
from .errors import TargetUnavailable
from .loop import run_pearl
from .pearl import RoundOptions

log = logging.getLogger(__name__)


def choose_gamma(t_draft: float, t_target: float, lo: int = 1, hi: int = 16) -> int:
    """The paper's rule: gamma = round(t_target / t_draft), clamped to [lo, hi].

    ``t_target`` is one target forward, ``t_draft`` one single-token draft forward, both measured on the
    actual placement. Gamma draft steps then last about one target pass, so neither side waits. (On CPU a
    k-token target forward costs more than a 1-token one; the benchmark's gamma sweep around this value
    shows how much that and the acceptance rate move the optimum.)

    Example:
        >>> choose_gamma(0.01, 0.052)
        5
    """
    return int(min(hi, max(lo, round(t_target / max(t_draft, 1e-9)))))


@ray.remote(num_cpus=0)
class Coordinator:
    def __init__(self, draft_factory, target_factory, placement_group, draft_options: dict, target_options: dict,
                 channel: str = "actor", round_timeout_s: float = 30.0, num_threads: int = 1,
                 start_timeout_s: float = 600.0):
        if channel not in CHANNEL_NAMES:
            raise ValueError(f"channel must be one of {CHANNEL_NAMES}, got {channel!r}")
        self.draft_factory, self.target_factory = draft_factory, target_factory
        self.pg = placement_group
        self.draft_options, self.target_options = draft_options, target_options
        self.channel_name, self.round_timeout_s, self.num_threads = channel, round_timeout_s, num_threads
        self.draft = self._make("draft") if draft_factory is not None else None
        self.target = self._make("target")
        self.channel = None
        self._draft_starting = None  # ping ref of a restarted draft that may still be loading
        self._target_starting = None  # same for a restarted target: requests wait for it (bounded)
        self.start_timeout_s = start_timeout_s
        self.max_gamma = 16
        self.restarts = {"draft": 0, "target": 0}
        # channel "collective": the target leader runs the loop over a gloo link to the draft
        self.link_loop = None  # the draft's serve_link call (done = the link is gone)
        self.link_pair = None  # (draft, target) handles the link joins
        self.link_used = 0.0
        self.idle_timeout_s = 1800.0

    def _make(self, side: str):
        cls, opts, factory, bundle = ((DraftWorker, self.draft_options, self.draft_factory, 0) if side == "draft"
                                      else (TargetWorker, self.target_options, self.target_factory, 1))
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)
        return cls.options(scheduling_strategy=strategy, max_concurrency=4, **opts).remote(factory, self.num_threads)

    def draft_ready(self) -> bool:
        """False while a restarted draft is still loading (requests meanwhile run on the target alone)."""
        if self._draft_starting is None:
            return self.draft is not None
        ready, _ = ray.wait([self._draft_starting], timeout=0)
        if ready:
            self._draft_starting = None
        return not self._draft_starting

    def _channel(self):
        if not self.draft_ready():
            if self.channel is not None:
                self.channel.close()
            self.channel = None
            return CHANNELS["actor"](None, self.target, self.round_timeout_s)
        if self.channel is None or not self.channel.usable():
            if self.channel is not None:
                self.channel.close()
            self.channel = CHANNELS[self.channel_name](self.draft, self.target, self.round_timeout_s) \
                if self.draft is not None else CHANNELS["actor"](None, self.target, self.round_timeout_s)
        return self.channel

    def ready(self, timeout_s: float = 300.0) -> dict:
        refs = [self.target.info.remote()] + ([self.draft.info.remote()] if self.draft is not None else [])
        infos = ray.get(refs, timeout=timeout_s)
        return {"target": infos[0], "draft": infos[1] if len(infos) > 1 else None}

    def measure(self, context_len: int = 128, reps: int = 30, warmup: int = 5, k: int = 8) -> dict:
        """Time one-token draft forwards and 1- and k-token target forwards on the actual placement."""
        t1 = ray.get(self.target.time_forward.remote(context_len, 1, reps, warmup), timeout=600)
        tk = ray.get(self.target.time_forward.remote(context_len, k, max(5, reps // 3), 2), timeout=600)
        td = ray.get(self.draft.time_forward.remote(context_len, 1, reps, warmup), timeout=600)
        return {"t_draft_s": td, "t_target_s": t1, f"t_target_{k}_s": tk, "cost_ratio": t1 / td,
                "auto_gamma": choose_gamma(td, t1, hi=self.max_gamma)}

    def handles(self) -> dict:
        return {"draft": self.draft, "target": self.target}

    def _after_request(self) -> None:
        ch = self.channel
        if ch is not None and self.draft is not None and not ch.draft_ok:
            ch.close()
            self.channel = None
            self._replace_draft(ch.draft_error)

    def _restart_target(self) -> None:
        try:
            ray.kill(self.target)
        except Exception:
            pass
        if self.channel is not None:
            self.channel.close()
        self.channel = None
        self.link_loop = None
        self.target = self._make("target")
        self._target_starting = self.target.ping.remote()
        self.restarts["target"] += 1

    def _wait_for_target(self) -> None:
        if self._target_starting is None:
            return
        try:
            ray.get(self._target_starting, timeout=self.start_timeout_s)
        except Exception as exc:
            raise TargetUnavailable(f"the restarted target did not come up within {self.start_timeout_s:.0f} s: "
                                    f"{exc.__class__.__name__}") from exc
        self._target_starting = None

    def _link(self) -> bool:
        """Make sure the target leader holds a live gloo link to the current draft; False if it cannot."""
        import time
        import uuid

        if not self.draft_ready():
            return False
        fresh = (self.link_loop is not None and self.link_pair == (self.draft, self.target)
                 and time.monotonic() - self.link_used < self.idle_timeout_s / 2
                 and not ray.wait([self.link_loop], timeout=0)[0])
        if fresh and ray.get(self.target.link_ok.remote(), timeout=self.round_timeout_s):
            return True
        connect_timeout = max(30.0, self.round_timeout_s)
        try:
            name = f"pearl-{uuid.uuid4().hex[:12]}"
            host, port = ray.get(self.target.open_link.remote(name, self.idle_timeout_s, connect_timeout),
                                 timeout=connect_timeout)
            self.link_loop = self.draft.serve_link.remote(host, port, name, self.round_timeout_s,
                                                          self.idle_timeout_s, connect_timeout)
            ray.get(self.target.connect_link.remote(), timeout=connect_timeout + 5)
        except Exception as exc:  # this request runs on the target alone; later ones get a new draft
            log.warning("could not link the target leader to the draft: %s", str(exc)[:300])
            self._replace_draft("no link")
            return False
        self.link_pair = (self.draft, self.target)
        return True

    def _run_on_leader(self, prompt_ids, opts, stop, seed, temperature, top_k, top_p, method, on_tokens):
        import time
        from dataclasses import replace

        linked = opts.use_draft and self._link()
        if opts.use_draft and not linked:
            opts = replace(opts, use_draft=False, pre_verify=True)
        self.link_used = time.monotonic()
        gen = self.target.generate.options(num_returns="streaming").remote(
            prompt_ids, opts, stop, seed, temperature, top_k, top_p, method, self.round_timeout_s, linked,
            on_tokens is not None)
        try:
            for ref in gen:
                item = ray.get(ref, timeout=self.round_timeout_s * 4 + 60)
                if item.get("done"):
                    break
                if on_tokens is not None:
                    on_tokens(item["token_ids"])
            else:
                raise TargetUnavailable("the target leader's token stream ended without a result")
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            raise TargetUnavailable(f"target leader failed: {exc.__class__.__name__}") from exc
        except ray.exceptions.RayTaskError as exc:
            raise TargetUnavailable(f"target leader failed: {str(exc)[:300]}") from exc
        self.link_used = time.monotonic()
        stats = item["stats"]
        if linked and stats.draft_failures:  # the link broke: replace the draft (a new link comes with it)
            self._replace_draft(stats.draft_failures)
        return item["token_ids"], stats

    def _replace_draft(self, reason) -> None:
        log.warning("restarting the draft worker after a failure: %s", reason)
        try:
            ray.kill(self.draft)
        except Exception:  # already dead
            pass
        self.link_loop = None
        self.draft = self._make("draft")
        self._draft_starting = self.draft.ping.remote()
        self.restarts["draft"] += 1

    def _run(self, prompt_ids, opts: RoundOptions, stop, seed, temperature, top_k, top_p, method, on_tokens):
        self._wait_for_target()
        if self.channel_name == "collective":
            try:
                return self._run_on_leader(prompt_ids, opts, stop, seed, temperature, top_k, top_p, method,
                                           on_tokens)
            except TargetUnavailable:
                self._restart_target()
                raise
        channel = self._channel()
        if channel.draft is None and opts.use_draft:  # draft restarting: this request runs on the target alone
            from dataclasses import replace

            opts = replace(opts, use_draft=False, pre_verify=True)
        try:
            ids, stats = run_pearl(channel, prompt_ids, opts, stop, seed, temperature, top_k, top_p, on_tokens,
                                   method=method)
        except TargetUnavailable:
            self._restart_target()
            raise
        finally:
            self._after_request()
        return ids, stats

    def generate(self, prompt_ids, opts, stop, seed, temperature, top_k, top_p, method):
        return self._run(prompt_ids, opts, stop, seed, temperature, top_k, top_p, method, None)

    def generate_stream(self, prompt_ids, opts, stop, seed, temperature, top_k, top_p, method):
        """Yields {"token_ids": [...]} per round with new committed tokens, then {"done": True, ...}."""
        yield from stream_call(lambda on_tokens: self._run(prompt_ids, opts, stop, seed, temperature, top_k, top_p,
                                                           method, on_tokens),
                               item_timeout_s=self.round_timeout_s * 4 + 60)

    def shutdown(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.link_loop is not None:
            try:
                ray.get(self.target.close_link.remote(), timeout=10)
            except Exception as exc:  # the target may be gone already
                log.debug("close_link: %s", exc)
        for h in (self.draft, self.target):
            if h is not None:
                try:
                    ray.kill(h)
                except Exception:
                    pass
