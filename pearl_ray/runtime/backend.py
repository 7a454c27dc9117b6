"""``RayBackend``: the draft and the target run at the same time in Ray actors.

Built from a resolved ``EngineConfig`` and ``PairInfo`` (never from the engine). It joins the Ray cluster
this process belongs to (``connect_ray``), reserves the pair's resources (its own placement group, or one
handed in, e.g. a Serve replica's), starts the ``Coordinator``, measures the cost ratio for automatic
gamma and the speculation policy, and streams each request's tokens from the target leader. The coordinator
is not on the request path: its route is kept until the coordinator pushes a change (``Coordinator.watch``)
or a request fails on it. A coordinator that dies is rebuilt for the next request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group as ray_placement_group
from ray.util.placement_group import remove_placement_group

from ..config import EngineConfig, Request
from ..errors import (CoordinatorUnavailable, InvalidParameterError, PearlError, ResourcesUnavailable, TargetUnavailable,
                      pearl_cause)
from .coordinator import ROUTE_TTL_S, Coordinator
from .link import free_port
from .workers import HFModelFactory, ObjectFactory

log = logging.getLogger(__name__)


def connect_ray(address: str | None = None, log_to_driver: bool = False, **init_kwargs) -> str:
    """Join the Ray this process belongs to; start a private local one only when there is none.

    In order: Ray already initialised here (a Serve replica, a job's driver that called ``ray.init``) ->
    use it; ``address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``; ``"auto"`` finds the cluster that
    ``ray start`` runs on this machine) -> join it; otherwise start a private local instance with every
    port on 127.0.0.1 and no dashboard. Returns which of "running", "joined" or "started" happened.
    """
    if ray.is_initialized():
        return "running"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, **init_kwargs)
        return "joined"
    private_local_ray()
    with free_fixed_ports():
        ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver, **init_kwargs)
    return "started"


def private_local_ray() -> None:
    """Make the Ray about to start bind loopback only. Ray decides where its services listen from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read once when ``ray`` is imported (``ray_constants``), so the
    environment alone is too late in a process that imported Ray already; both are set here (the variable
    for the workers it starts). Token auth stays off for this single-user, loopback-only instance."""
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@contextlib.contextmanager
def free_fixed_ports():
    """While a private Ray starts, give the services that Ray otherwise binds to fixed ports a free port each:
    the dashboard agent (52365), the autoscaler's metrics (44217) and the dashboard's metrics (44227). With
    the fixed ones taken, a ``ray start --head`` on the same machine comes up without its job agent ("No
    available agent to submit job"). ``ray.init`` has no argument for these: the agent's port is a default of
    ``RayParams`` (set here for this call only), the metrics ports are read by Ray's subprocesses from the
    environment."""
    import ray._private.parameter as parameter

    for name in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
        os.environ[name] = str(free_port())
    original = parameter.RayParams.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", 0)  # 0: the agent binds a free port and reports it
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def wait_for_placement(pg, bundles: list[dict], strategy: str, timeout_s: float, remove: bool = True) -> None:
    """Wait for ``pg``; say what it waits for after a few seconds, and fail past ``timeout_s`` naming the
    bundles and what the cluster has free."""
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            ray.get(pg.ready(), timeout=min(5.0, max(0.01, deadline - time.monotonic())))
            return
        except GetTimeoutError:
            pass
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU", "memory") or "GPU" in k}
        if time.monotonic() >= deadline:
            if remove:
                remove_placement_group(pg)
            raise ResourcesUnavailable(
                f"could not reserve the draft and target bundles {bundles} ({strategy}) within {timeout_s:.0f} s: "
                f"the cluster has {free} free. Free those resources (e.g. shut down another engine), lower "
                f"draft_num_cpus/target_num_cpus, or raise placement_timeout_s.")
        if not warned:
            log.warning("waiting for Ray to grant bundles %s (%s); free now: %s; giving up after %.0f s",
                        bundles, strategy, free, timeout_s)
            warned = True


@dataclass(frozen=True)
class _Route:
    """A route kept by ``RayBackend._route``: valid while ``watch`` (the coordinator's ``watch(epoch)``
    call) has not returned."""

    coord: object
    target: object  # the target leader's handle
    draft: object  # the draft worker's handle (None: colocated, or routed for a request that does not draft)
    drafts: bool  # routed for a drafting request, which got the draft
    epoch: int
    watch: object  # ObjectRef


class RayBackend:
    """``bundle_indices`` (with a handed-in ``placement_group``): the draft's bundle, then one bundle per
    target rank (``tensor_parallel_size`` of them)."""

    def __init__(self, config: EngineConfig, pair=None, draft_model=None, target_model=None, tokenizer=None,
                 placement_group=None, bundle_indices: tuple[int, ...] | None = None, ray_init: dict | None = None):
        self.config = config
        c = config
        tp = c.tensor_parallel_size
        connect_ray(c.ray_address, **(ray_init or {}))
        if target_model is not None:
            if tp > 1:
                raise InvalidParameterError("a tensor-parallel target is loaded from a model path, not handed in "
                                            "as an object")
            target_factory = ObjectFactory(target_model, tokenizer)
            vocab = target_model.vocab_size
        elif tp > 1:
            from ..modeling.tp import TPModelFactory

            target_factory = TPModelFactory(pair.target_path, 0, tp, "", 0, c.device, c.dtype, with_tokenizer=True,
                                            load_sharded=c.load_sharded, kernel_inject=c.kernel_inject)
            vocab = pair.vocab_size
        else:
            target_factory = HFModelFactory(pair.target_path, c.device, c.dtype, with_tokenizer=True,
                                            cpu_kernels=c.cpu_kernels)
            vocab = pair.vocab_size
        draft_factory = None
        if draft_model is not None:
            draft_factory = ObjectFactory(draft_model)
        elif pair is not None and pair.draft_path is not None:
            draft_factory = HFModelFactory(pair.draft_path, c.device, c.dtype, target_vocab_size=vocab,
                                           cpu_kernels=c.cpu_kernels)
        draft_res, target_res = (c.draft_num_cpus, c.draft_num_gpus), (c.target_num_cpus, c.target_num_gpus)
        colocated = c.colocate and draft_factory is not None
        self.owns_pg = placement_group is None
        self.pgs = []
        if not self.owns_pg:  # each side takes what its bundle holds
            specs = placement_group.bundle_specs
            bundle_indices = tuple(bundle_indices or range(1 + tp))
            if len(bundle_indices) != 1 + tp or max(bundle_indices) >= len(specs):
                raise InvalidParameterError(f"bundle_indices {bundle_indices} do not name the draft's bundle and "
                                            f"{tp} target bundle(s) among the placement group's {len(specs)}")
            wait_for_placement(placement_group, specs, "handed in", c.placement_timeout_s, remove=False)
            res = [(specs[i].get("CPU", 0.0), specs[i].get("GPU", 0.0)) for i in bundle_indices]
            draft_res, target_res = res[0], res[1]
            draft_at = (placement_group, bundle_indices[0])
            target_at = (placement_group, list(bundle_indices[1:]))
        else:
            from ..config import bundle

            if colocated:  # one bundle: the pair's CPUs, or the GPU both sides share (TP: rank 0's, then the others)
                pair_res = (draft_res[0] + target_res[0], max(draft_res[1], target_res[1]))
                bundles = [bundle(*pair_res)] + [bundle(*target_res)] * (tp - 1)
                pg = ray_placement_group(bundles, strategy=c.placement)
                self.pgs.append(pg)
                wait_for_placement(pg, bundles, c.placement, c.placement_timeout_s)
                draft_at, target_at = (pg, 0), (pg, list(range(tp)))
            elif tp == 1 or c.placement == "STRICT_PACK":
                bundles = [bundle(*draft_res)] + [bundle(*target_res)] * tp
                pg = ray_placement_group(bundles, strategy=c.placement)
                self.pgs.append(pg)
                wait_for_placement(pg, bundles, c.placement, c.placement_timeout_s)
                draft_at, target_at = (pg, 0), (pg, list(range(1, 1 + tp)))
            else:
                # The TP ranks always share a node (their all-reduces run every forward); the draft goes in its
                # own reservation, made second so that it cannot take a GPU the group needs.
                bundles = [bundle(*target_res)] * tp
                tpg = ray_placement_group(bundles, strategy="STRICT_PACK")
                self.pgs.append(tpg)
                wait_for_placement(tpg, bundles, "STRICT_PACK", c.placement_timeout_s)
                dpg = ray_placement_group([bundle(*draft_res)], strategy="PACK")
                try:
                    wait_for_placement(dpg, [bundle(*draft_res)], "PACK", c.placement_timeout_s)
                except BaseException:
                    remove_placement_group(tpg)  # not the group's alone: give its GPUs back too
                    self.pgs = []
                    raise
                self.pgs.append(dpg)
                draft_at, target_at = (dpg, 0), (tpg, list(range(tp)))
        self.pg = target_at[0]
        self.spec = {"pg": self.pg, "transport": c.transport, "round_timeout_s": c.round_timeout_s,
                     "max_num_seqs": c.max_num_seqs, "max_queued": c.max_queued,
                     "start_timeout_s": c.start_timeout_s, "tensor_lane": c.tensor_lane}
        for side, factory, (cpu, gpu), (pg, at) in (("draft", draft_factory, draft_res, draft_at),
                                                     ("target", target_factory, target_res, target_at)):
            threads = c.num_threads or max(1, int(cpu))
            ranks = at if isinstance(at, list) else [at]
            self.spec[side] = None if factory is None else {
                "factory": factory, "pg": pg, "bundle": ranks[0], "ranks": ranks, "num_cpus": cpu, "num_gpus": gpu,
                "threads": threads}
        if colocated:
            # the leader holds the draft too: the pair's threads (the bundle's CPUs), no draft actor, no link
            pair_cpus = draft_res[0] + target_res[0]
            target = self.spec["target"]
            target.update(shard_threads=target["threads"], shard_num_cpus=target["num_cpus"])  # TP ranks 1..
            self.spec["target"].update(draft_factory=draft_factory, schedule=c.schedule,
                                       threads=c.num_threads or max(1, int(pair_cpus)),
                                       num_cpus=pair_cpus if self.owns_pg else target_res[0])
            self.spec["draft"] = None
            self.spec["colocated"] = True
        target, draft = self.spec["target"], self.spec["draft"]
        if c.prefill_threads is not None and not colocated:
            target["prefill_threads"] = c.prefill_threads
        elif c.device == "cpu" and draft is not None and tp == 1:
            target["prefill_threads"] = target["threads"] + draft["threads"]
        self.coordinator = None
        self.kept: _Route | None = None  # where requests run, while it holds (``_route``)
        self.lock = threading.Lock()  # guards ``coordinator`` and ``kept`` against requests that fail at once
        self.starting = threading.Lock()  # one coordinator start at a time
        try:
            self.info = self._start_coordinator()
        except BaseException:
            self.shutdown()
            raise
        self.max_context = self.info["target"]["max_context"]
        self.vocab_size = self.info["target"]["vocab_size"]
        self.measured = None
        if c.gamma is None and draft_factory is not None:  # (colocated: the leader times its own draft)
            self.measured = ray.get(self.coordinator.measure.remote(c.measure_context), timeout=c.start_timeout_s)
            m = self.measured
            log.info("auto gamma = %d: target %.1f ms, draft %.1f ms per one-token forward (ratio %.1f)",
                     m["auto_gamma"], 1e3 * m["t_target_s"], 1e3 * m["t_draft_s"], m["cost_ratio"])
            if c.adaptive:
                m["policy"] = ray.get(self.coordinator.prepare_policy.remote(m["auto_gamma"], c.measure_context),
                                      timeout=c.start_timeout_s)

    def _start_coordinator(self) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        target_bundle = self.spec["target"]["bundle"]
        coord = Coordinator.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=target_bundle)).remote(self.spec)
        with self.lock:
            self.coordinator = coord
        try:
            return ray.get(coord.ready.remote(), timeout=self.config.start_timeout_s + 10)
        except RayTaskError as exc:
            if pearl_cause(exc) is not None:
                raise pearl_cause(exc) from None
            raise
        except (RayActorError, GetTimeoutError) as exc:
            raise self._coordinator_failed(coord, exc, "failed to start") from None

    def _coordinator(self):
        """The running coordinator; a request that finds none (the last one died) starts the next. One at a time:
        concurrent requests wait for the same new coordinator instead of each starting one."""
        with self.starting:
            coord = self.coordinator
            if coord is None:
                if self.pg is None:
                    raise PearlError("this backend was shut down")
                self._start_coordinator()
                coord = self.coordinator
            return coord

    def _coordinator_failed(self, coord, exc: Exception, what: str = "died or stopped answering"
                            ) -> CoordinatorUnavailable:
        """Forget a dead or stuck coordinator (its workers go with it); the next request builds a new one.
        Requests in flight may all report the same one: only the first forgets it (a newer one stays)."""
        with self.lock:
            if self.coordinator is coord:
                self.coordinator = None
            if self.kept is not None and self.kept.coord is coord:
                self.kept = None
        try:
            ray.kill(coord)
        except Exception:  # noqa: BLE001 - already gone
            pass
        return CoordinatorUnavailable(f"the coordinator {what} ({exc.__class__.__name__}); "
                                      f"this request failed, the next one starts new workers")

    def _lifecycle(self, coord, method: str, *args, timeout_s: float):
        """A bounded call to ``coord`` (the coordinator that routed the request); a dead or stuck one becomes
        ``CoordinatorUnavailable``."""
        if coord is None:
            raise CoordinatorUnavailable("the coordinator is gone; this request failed, the next one starts new "
                                         "workers")
        try:
            return ray.get(getattr(coord, method).remote(*args), timeout=timeout_s)
        except RayTaskError as exc:
            if pearl_cause(exc) is not None:
                raise pearl_cause(exc) from None
            raise self._coordinator_failed(coord, exc) from None
        except (RayActorError, GetTimeoutError) as exc:
            raise self._coordinator_failed(coord, exc) from None

    def _route(self, coord, request: Request) -> dict:
        """Where ``request`` runs (``Coordinator.route``'s answer). The answer is kept and reused, with no call
        to the coordinator, until the coordinator's ``watch`` for it returns (the placement changed, or the
        route's ``ROUTE_TTL_S`` is up) or a request reports a failure on it (``_forget``). Only complete answers
        are kept: a drafting request sent target-only (the draft loading, or given up) asks again next time."""
        kept = self.kept
        if kept is not None and kept.coord is coord and (kept.drafts or not request.uses_draft):
            if not ray.wait([kept.watch], timeout=0)[0]:  # local: has the watch call returned?
                return {"target": kept.target, "draft": kept.draft if request.uses_draft else None,
                        "request": request}
            self._forget(lambda k: k is kept)
        route = self._lifecycle(coord, "route", request, timeout_s=2 * self.config.start_timeout_s + 60)
        if route["request"].uses_draft == request.uses_draft:
            self._keep(coord, route, drafts=request.uses_draft)
        return route

    def _keep(self, coord, route: dict, drafts: bool) -> None:
        with self.lock:
            kept = self.kept
            if (kept is not None and kept.coord is coord and kept.epoch == route["epoch"]
                    and (kept.drafts or not drafts)):
                return  # as good, and watched already (requests routed at the same time)
            if self.coordinator is not coord:
                return  # forgotten meanwhile
            watch = coord.watch.remote(route["epoch"], ROUTE_TTL_S)
            self.kept = _Route(coord, route["target"], route["draft"], drafts, route["epoch"], watch)

    def _forget(self, which) -> None:
        """Drop the kept route if ``which(route)``: a failure was reported on it."""
        with self.lock:
            if self.kept is not None and which(self.kept):
                self.kept = None

    def stream(self, request: Request, hold_s: float = 0.0):
        """Yields ``list[int]`` per round of newly committed tokens (``hold_s`` > 0: after the first, at most
        one list per ``hold_s``, gathered in the leader); returns (ids, stats).

        The coordinator says where requests run (``_route``: asked once, then kept until it changes); the
        tokens then come straight from the target leader's stream (``TargetLeader.submit``: the request joins
        the leader's continuous loop), one Ray hop. A request's own failure (``RequestFailed``: its rows, its
        decision) ends it alone; a failure of the worker is reported to the coordinator, which replaces what
        failed for the next requests."""
        if self.pg is None:
            raise PearlError("this backend was shut down")
        coord = self._coordinator()
        c = self.config
        item_timeout = c.round_timeout_s * 4 + 60
        route = self._route(coord, request)
        target, request = route["target"], route["request"]
        gen = target.submit.options(num_returns="streaming").remote(request, c.round_timeout_s, c.max_num_seqs,
                                                                     c.kv_budget_tokens, hold_s,
                                                                     c.max_prefill_tokens_per_round)
        ended = False
        try:
            while True:
                # every wait is bounded, the wait for the stream's next item included (a plain ``for ref in
                # gen`` blocks in ``next`` for as long as a hung leader stays silent)
                ready, _ = ray.wait([gen], num_returns=1, timeout=item_timeout)
                if not ready:
                    raise GetTimeoutError(f"no token from the target within {item_timeout:.0f} s")
                try:
                    ref = next(gen)
                except StopIteration:
                    ended = True
                    break
                item = ray.get(ref, timeout=item_timeout)
                if isinstance(item, dict):
                    ended = True
                    if request.uses_draft and item["stats"].draft_failures:
                        # before the result goes out, so that the caller's next request finds a new draft
                        self._forget(lambda k: k.drafts)
                        self._lifecycle(coord, "draft_failed", route["draft"], item["stats"].draft_failures,
                                        timeout_s=c.start_timeout_s + 30)
                    return item["token_ids"], item["stats"]
                yield item
        except RayTaskError as exc:
            cause = pearl_cause(exc)
            if cause is not None and not isinstance(cause, TargetUnavailable):
                raise cause from None
            raise self._target_failed(coord, target, cause or exc) from None
        except (RayActorError, GetTimeoutError) as exc:
            raise self._target_failed(coord, target, exc) from None
        finally:
            if not ended:
                # The caller left mid-stream (or the stream failed): the leader drops the request and frees its
                # slot. Not recursive: the leader's own calls (to the draft) are the batch's, not this request's.
                try:
                    ray.cancel(gen, recursive=False)
                except Exception as exc:  # noqa: BLE001 - the leader may be gone
                    log.debug("cancel: %s", exc)
        raise TargetUnavailable("the target's token stream ended without a result")

    def _target_failed(self, coord, target, exc: BaseException) -> TargetUnavailable:
        """Tell the coordinator (it rebuilds the group once for the whole batch) and say what failed. A dead
        coordinator (its workers died with it) makes this ``CoordinatorUnavailable``."""
        self._forget(lambda k: k.target == target)
        why = self._lifecycle(coord, "target_failed", target, timeout_s=self.config.start_timeout_s + 30)
        if isinstance(exc, TargetUnavailable):
            return TargetUnavailable(f"{exc}{'; ' + why if why else ''}")
        return TargetUnavailable(why or f"the target leader died or timed out: {exc.__class__.__name__}: "
                                        f"{str(exc)[:200]}")

    def status(self) -> dict:
        coord = self.coordinator
        if coord is None:
            return {"draft_ready": False, "restarts": {}, "handles": {}}
        return ray.get(coord.status.remote(), timeout=30)

    def shutdown(self) -> None:
        with self.lock:
            coord, self.coordinator = self.coordinator, None
        if coord is not None:
            try:
                ray.get(coord.shutdown.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001 - the coordinator may already be gone
                log.debug("coordinator shutdown: %s", exc)
            try:
                ray.kill(coord)
            except Exception:  # noqa: BLE001
                pass
        self.pg = None
        pgs, self.pgs = getattr(self, "pgs", []), []
        for pg in pgs:
            try:
                remove_placement_group(pg)
            except Exception as exc:  # noqa: BLE001 - Ray may be shutting down
                log.debug("remove_placement_group: %s", exc)
