"""The coordinator actor: lifecycle only. It creates and places the draft worker and the target leader,
measures their forwards (auto gamma, the speculation policy), connects the draft to the leader over the
chosen transport, says where requests run (``route``: the caller then streams each request's tokens from the
leader itself, with no relay here), and restarts what failed.

Routing is not a per-request call: a caller keeps the answer (``RayBackend``) and holds a ``watch`` call
that returns as soon as the placement changes (``epoch``: a draft or target replaced, a restarted draft
ready, the draft's link ended) or after ``ROUTE_TTL_S``; it asks again only then, or after a failure it
reported itself. Only a degraded answer (the draft loading or given up) is asked for per request.

What is restarted, and when:

- a draft that failed during a request (the leader finished it on the target alone) is replaced after it
  (``draft_failed``); while the new draft loads, requests run on the target alone; a draft that cannot start
  ``MAX_DRAFT_STARTS`` times in a row is given up, and requests that need it raise ``DraftUnavailable``;
- a target leader that died, timed out or failed a round fails every request in its batch with
  ``TargetUnavailable`` and is replaced before the next one (``target_failed``). With a tensor-parallel target
  (``tp_size`` > 1) the whole group is one unit: a thread here watches the followers' ``follow`` calls, so a
  rank that dies takes the group down at once (its callers' streams fail then, not after a timeout), and the
  group is rebuilt (new rendezvous) for later requests.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import MAX_GAMMA
from ..errors import DraftUnavailable, TargetUnavailable
from .link import choose_lane, free_port, open_draft_link
from .workers import DraftWorker, TargetLeader, TargetShard

log = logging.getLogger(__name__)
MAX_DRAFT_STARTS = 3
LINK_IDLE_S = 1800.0
ROUTE_TTL_S = LINK_IDLE_S / 4
"""How long a caller may keep a route without hearing from ``watch``. The link's idle clock is reset by
rounds, ``link_used`` only by routes: a route at most this old keeps ``_connect``'s rule (a link idle for
``LINK_IDLE_S / 2`` is replaced before it ends) true of the link's real idle time."""


def choose_gamma(t_draft: float, t_target: float, lo: int = 1, hi: int = MAX_GAMMA) -> int:
    """The paper's rule: gamma = round(t_target / t_draft), clamped to [lo, hi]: gamma draft steps then last
    about one target pass, so neither side waits.

    Example:
        >>> choose_gamma(0.01, 0.052)
        5
    """
    return int(min(hi, max(lo, round(t_target / max(t_draft, 1e-9)))))


@ray.remote(num_cpus=0, max_concurrency=256)
class Coordinator:
    def __init__(self, spec: dict):
        """``spec``: factories, actor options and bundle index per side, the placement group, transport,
        round/start timeouts and threads per worker (built by ``RayBackend``)."""
        self.spec = spec
        self.restarts = {"draft": 0, "target": 0}
        self.draft_starts_failed, self.draft_error = 0, None
        self.draft, self.draft_starting = None, None
        self.shards, self.follow_refs = [], []
        self.target, self.target_starting = self._make_target(), None
        if spec["draft"] is not None:
            self.draft = self._make("draft")
        self.linked = None  # (draft, target, gloo serve-loop ref or None for the actor transport)
        self.link_used = 0.0
        self.lifecycle = threading.RLock()  # routing, creating and replacing: one at a time
        self.closing = False
        self.lost_ranks: list = []  # (leader handle, why): groups taken down because a rank left
        self.epoch = 0  # bumped whenever a route handed out may no longer hold (``watch``)
        self.changes = threading.Condition()
        self.routes = 0  # ``route`` calls answered (callers keep the answer: one per placement, not per request)
        threading.Thread(target=self._watch_workers, name="pearl-worker-watch", daemon=True).start()

    def _make(self, side: str, cls=None, bundle: int | None = None, factory=None):
        s = self.spec[side]
        cls = cls or (DraftWorker if side == "draft" else TargetLeader)
        strategy = PlacementGroupSchedulingStrategy(s.get("pg", self.spec["pg"]), placement_group_bundle_index=(
            s["bundle"] if bundle is None else bundle))
        extra = (s.get("prefill_threads") or 0, s.get("draft_factory"), s.get("schedule", "auto")) if cls is TargetLeader else ()
        # the leader holds one thread per request in flight (its stream), besides the loop's own
        concurrency = 16 + self.spec.get("max_num_seqs", 8) + self.spec.get("max_queued", 64) if cls is TargetLeader else 4
        # a colocated TP leader holds the draft's share too; the other ranks keep the target's own
        shard = cls is not TargetLeader and side == "target"
        num_cpus = s.get("shard_num_cpus", s["num_cpus"]) if shard else s["num_cpus"]
        threads = s.get("shard_threads", s["threads"]) if shard else s["threads"]
        return cls.options(scheduling_strategy=strategy, max_concurrency=concurrency, num_cpus=num_cpus,
                           num_gpus=s["num_gpus"]).remote(factory or s["factory"], threads, *extra)

    def _make_target(self):
        """The target group: the leader alone, or rank 0 plus ``TargetShard`` followers that rendezvous on this
        node (the coordinator sits in rank 0's bundle) at a free port; each follower starts ``follow``."""
        s = self.spec["target"]
        ranks = s.get("ranks") or [s["bundle"]]
        if len(ranks) == 1:
            self.shards, self.follow_refs = [], []
            return self._make("target")
        host = ray.util.get_node_ip_address()
        port = free_port(host)  # the TP group's rendezvous
        log.info("tensor-parallel target: %d ranks, rendezvous %s:%d", len(ranks), host, port)
        handles = []
        for rank, bundle in enumerate(ranks):
            factory = dataclasses.replace(s["factory"], rank=rank, world_size=len(ranks), master_addr=host,
                                          master_port=port, with_tokenizer=rank == 0)
            handles.append(self._make("target", TargetLeader if rank == 0 else TargetShard, bundle, factory))
        self.shards = handles[1:]
        self.follow_refs = [h.follow.remote() for h in self.shards]
        return handles[0]

    def ready(self) -> dict:
        """Each worker's info once its model has loaded; a side that failed to load raises its typed error."""
        out = {"draft": None}
        for side, handle, error in (("target", self.target, TargetUnavailable), ("draft", self.draft, DraftUnavailable)):
            if handle is not None:
                try:
                    out[side] = ray.get(handle.info.remote(), timeout=self.spec["start_timeout_s"])
                except Exception as exc:  # noqa: BLE001
                    raise error(f"the {side} worker did not come up: {str(exc)[:500]}") from None
        if self.shards:
            try:
                out["target"]["ranks"] = [out["target"]] + ray.get([h.info.remote() for h in self.shards],
                                                                   timeout=self.spec["start_timeout_s"])
            except Exception as exc:  # noqa: BLE001
                raise TargetUnavailable(f"a tensor-parallel rank did not come up: {str(exc)[:500]}") from None
        return out

    def measure(self, context_len: int = 128, reps: int = 30, warmup: int = 5, k: int = 8) -> dict:
        """Time one-token draft forwards and 1- and k-token target forwards on the actual placement."""
        t1 = ray.get(self.target.time_forward.remote(context_len, 1, reps, warmup), timeout=600)
        tk = ray.get(self.target.time_forward.remote(context_len, k, max(5, reps // 3), 2), timeout=600)
        if self.spec.get("colocated"):  # the leader holds the draft
            td = ray.get(self.target.time_forward.remote(context_len, 1, reps, warmup, "draft"), timeout=600)
        else:
            td = ray.get(self.draft.time_forward.remote(context_len, 1, reps, warmup), timeout=600)
        return {"t_draft_s": td, "t_target_s": t1, f"t_target_{k}_s": tk, "cost_ratio": t1 / td,
                "auto_gamma": choose_gamma(td, t1), "context_len": context_len}

    def prepare_policy(self, max_gamma: int, context_len: int = 128) -> dict | None:
        """Have the target leader measure the pair for the adaptive speculation policy."""
        with self.lifecycle:
            if not self._draft_ready() and not self.spec.get("colocated"):
                return None
            return ray.get(self.target.prepare_policy.remote(self.draft, self.spec.get("max_num_seqs", 8), max_gamma,
                                                             context_len), timeout=self.spec["start_timeout_s"])

    def status(self) -> dict:
        return {"draft_ready": bool(self.spec.get("colocated")) or self._draft_ready(), "draft_error": self.draft_error,
                "restarts": dict(self.restarts), "routes": self.routes, "epoch": self.epoch,
                "handles": {"draft": self.draft, "target": self.target, "target_ranks": [self.target] + self.shards}}

    # -- pushed changes ----------------------------------------------------------------------------------
    def _changed(self) -> None:
        """A route handed out may be stale now: wake every ``watch``."""
        with self.changes:
            self.epoch += 1
            self.changes.notify_all()

    def watch(self, epoch: int, timeout_s: float = ROUTE_TTL_S) -> int:
        """Returns the current epoch once it differs from ``epoch`` (or on shutdown), at the latest after
        ``timeout_s``. A caller holds one such call per route it keeps and drops the route when it returns."""
        with self.changes:
            self.changes.wait_for(lambda: self.epoch != epoch or self.closing, timeout=max(0.0, timeout_s))
            return self.epoch

    # -- draft lifecycle ---------------------------------------------------------------------------------
    def _draft_ready(self) -> bool:
        """False while a restarted draft is loading or when it was given up."""
        if self.draft is None:
            return False
        if self.draft_starting is not None:
            done, _ = ray.wait([self.draft_starting], timeout=0)
            if not done:
                return False
            try:
                ray.get(self.draft_starting)
                self.draft_starts_failed, self.draft_starting = 0, None
                self._changed()  # callers routed target-only meanwhile may use the draft now
            except Exception as exc:  # noqa: BLE001 - the draft failed to come up: try again, a bounded number of times
                self.draft_starts_failed += 1
                self._replace_draft(f"start failed: {str(exc)[:300]}")
                return False
        return True

    def _replace_draft(self, reason: str) -> None:
        log.warning("replacing the draft worker: %s", reason)
        self.draft_error = reason
        _kill(self.draft)
        self.linked, self.draft, self.draft_starting = None, None, None
        self._changed()
        if self.draft_starts_failed >= MAX_DRAFT_STARTS:
            return  # given up: requests that need the draft raise DraftUnavailable
        self.draft = self._make("draft")
        self.draft_starting = self.draft.ping.remote()
        self.restarts["draft"] += 1

    def _connect(self) -> bool:
        """Make sure the leader reaches the current draft over the transport; False if it cannot now."""
        if self.spec.get("colocated"):
            return True  # the leader holds the draft
        if not self._draft_ready():
            return False
        if (self.linked is not None and self.linked[:2] == (self.draft, self.target)
                and time.monotonic() - self.link_used < LINK_IDLE_S / 2):  # an idle link ends at LINK_IDLE_S
            loop = self.linked[2]
            if loop is None or (not ray.wait([loop], timeout=0)[0]
                                and ray.get(self.target.link_ok.remote(), timeout=self.spec["round_timeout_s"])):
                return True
        timeout = max(30.0, self.spec["round_timeout_s"])
        try:
            if self.spec["transport"] == "gloo":
                lane, why = choose_lane(self.spec.get("tensor_lane", "auto"),
                                        *ray.get([self.draft.info.remote(), self.target.info.remote()], timeout=timeout))
                log.info("draft link: probability rows on %s (%s)", lane or "the gloo link", why)
                loop = open_draft_link(self.target, self.draft, self.spec["round_timeout_s"], LINK_IDLE_S, timeout,
                                       lane)
            else:
                loop = None
            # the batched rounds reach the draft over the link (gloo) or by one actor call per round (actor)
            ray.get(self.target.attach_draft.remote(self.draft, loop is not None, self.spec["round_timeout_s"]),
                    timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - this request runs on the target alone; later ones get a new draft
            self._replace_draft(f"could not connect it to the target leader: {str(exc)[:300]}")
            return False
        self.linked = (self.draft, self.target, loop)
        return True

    # -- requests: the coordinator places them; their tokens go from the leader to the caller directly -----
    def route(self, request) -> dict:
        """Where ``request`` runs: makes sure the target group is up and, for a method that drafts, that the
        leader reaches a ready draft (else the request goes target-only, or ``DraftUnavailable`` once the
        draft was given up). Returns ``{"target", "draft", "request", "epoch"}``: the caller then streams the
        tokens from ``target.submit`` itself (``RayBackend.stream``), may route later requests the same way
        until ``watch(epoch)`` returns, and reports a failure with ``target_failed`` / ``draft_failed``."""
        with self.lifecycle:
            self.routes += 1
            if self.target_starting is not None:
                try:
                    ray.get(self.target_starting, timeout=self.spec["start_timeout_s"])
                    self.target_starting = None
                except Exception as exc:  # noqa: BLE001
                    self._restart_target()
                    raise TargetUnavailable(f"the restarted target did not come up: {str(exc)[:300]}") from None
            try:
                connected = request.uses_draft and self._connect()
            except RayActorError:  # the leader died while idle (asked whether its link is up): restart it
                log.warning("the target leader died while idle; restarting it")
                self._restart_target()
                raise TargetUnavailable("the target worker had died; it is being restarted, retry shortly") from None
            if request.uses_draft and not connected:
                if self.draft is None and self.spec["draft"] is not None:
                    raise DraftUnavailable(f"the draft could not be started {MAX_DRAFT_STARTS} times in a row "
                                           f"({self.draft_error}); method 'ar' still works")
                request = request.target_only()
            self.link_used = time.monotonic()
            return {"target": self.target, "draft": self.draft if request.uses_draft else None, "request": request,
                    "epoch": self.epoch}

    def draft_failed(self, draft, failures: int) -> bool:
        """A request finished on the target alone because ``draft`` failed; one failure reaches every request
        of the batch: the first report replaces the draft, the others find it replaced. True if replaced."""
        with self.lifecycle:
            if draft is None or self.draft != draft:
                return False
            self._replace_draft(f"it failed during a request: {failures} failure(s)")
            return True

    def target_failed(self, target) -> str:
        """A caller's stream from ``target`` broke (dead, timed out, or its batched round failed). Every
        request of the batch reports it; the first rebuilds the group. Returns what is known of the cause
        (a tensor-parallel rank that left the group), or ""."""
        if self.shards and not self._lost(target):
            self._check_ranks(timeout=2.0)  # a dead rank's follow call ends within moments
        with self.lifecycle:
            if self.target == target:
                self._restart_target()
        return self._lost(target)

    def _lost(self, target) -> str:
        return next((why for handle, why in self.lost_ranks if handle == target), "")

    def _check_ranks(self, timeout: float) -> None:
        """A follower whose ``follow`` call ended (it died, or failed) takes the group down at once: the
        leader is killed, so every caller's stream from it fails now rather than after a timeout."""
        refs, target = list(self.follow_refs), self.target
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready or self.closing:
            return
        try:
            why = ray.get(ready[0], timeout=5)
        except Exception as exc:  # noqa: BLE001
            why = f"{exc.__class__.__name__}: {str(exc)[:200]}"
        with self.lifecycle:
            if self.target != target or self.closing:
                return
            reason = f"a tensor-parallel rank of the target failed: rank {1 + refs.index(ready[0])} left the group ({why})"
            log.warning("%s; rebuilding the group", reason)
            self.lost_ranks = (self.lost_ranks + [(target, reason)])[-8:]
            self._restart_target()

    def _watch_workers(self) -> None:
        """Push, not poll: a tensor-parallel rank that left, a restarted draft that came up (or failed to), and
        a draft link whose loop ended (idle, stopped, broken) each change the placement at once, so callers
        holding a route hear of it from ``watch`` before their next request."""
        while not self.closing:
            if self.follow_refs:
                self._check_ranks(timeout=0.5)
            else:
                time.sleep(0.5)
            try:
                self._check_draft()
            except Exception as exc:  # noqa: BLE001 - keep watching; the next route looks again
                log.debug("draft watch: %s", exc)

    def _check_draft(self) -> None:
        starting = self.draft_starting
        loop = self.linked[2] if self.linked is not None else None
        refs = [r for r in (starting, loop) if r is not None]
        if not refs or not ray.wait(refs, num_returns=1, timeout=0)[0]:
            return
        with self.lifecycle:
            if self.closing:
                return
            if starting is not None and self.draft_starting is starting:
                self._draft_ready()  # settles the start: ready (epoch bumped) or replaced again
            if (loop is not None and self.linked is not None and self.linked[2] is loop
                    and ray.wait([loop], timeout=0)[0]):
                log.info("the draft link's loop ended; the next route opens a new one")
                self.linked = None
                self._changed()

    def _restart_target(self) -> None:
        for handle in [self.target] + self.shards:
            _kill(handle)
        self.linked = None
        self.target = self._make_target()
        self.target_starting = self.target.ping.remote()
        self.restarts["target"] += 1
        self._changed()

    def shutdown(self) -> None:
        self.closing = True
        self._changed()  # release every ``watch``
        if self.shards:  # release the followers from ``follow`` (OP_STOP) before the actors go
            try:
                ray.get(self.target.stop_group.remote(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - a dead rank: the kill below ends the rest
                log.debug("stop_group: %s", exc)
        if self.linked is not None and self.linked[2] is not None:
            try:
                ray.get(self.target.close_link.remote(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - the target may be gone already
                log.debug("close_link: %s", exc)
        for handle in [self.draft, self.target] + self.shards:
            _kill(handle)


def _kill(handle) -> None:
    if handle is not None:
        try:
            ray.kill(handle)
        except Exception:  # noqa: BLE001 - already dead
            pass
