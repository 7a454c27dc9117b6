"""Coordinator-driven round channels over Ray: how one PEARL round reaches both workers at once and comes back.

(The third channel, "collective", runs the loop in the target leader instead: see ``collective.py``.)
Both implement ``loop.RoundChannel`` and give identical tokens; they differ only in transport:
- ``ActorCallChannel``: two ``.remote()`` calls and one bounded wait (the simple reference path).
- ``CompiledGraphChannel``: a Ray compiled graph (``experimental_compile``) with the two worker methods as
  parallel branches; per-round inputs and outputs move through pre-allocated shared-memory channels
  (NCCL via ``with_tensor_transport`` when the workers sit on separate GPUs).

Faults: every wait is bounded by ``round_timeout_s``. A dead or late draft turns the round into a
fallback round (empty chunk) and ``draft_ok`` into False for the rest of the request; a dead or late target
raises ``TargetUnavailable``.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from .errors import TargetUnavailable
from .messages import DraftChunk, DraftRequest, TargetRequest

log = logging.getLogger(__name__)


class ActorCallChannel:
    def __init__(self, draft, target, round_timeout_s: float = 30.0):
        self.draft, self.target = draft, target
        self.round_timeout_s = round_timeout_s
        self.draft_ok = draft is not None
        self.draft_error: str | None = None
        self.broken = False

    def usable(self) -> bool:
        """Whether the coordinator may keep this channel for the next request."""
        return self.draft_ok and not self.broken

    def start(self, prompt_ids, temperature, top_k, top_p, draft_greedy, draft_seed) -> None:
        refs = [self.target.start.remote(prompt_ids, temperature, top_k, top_p)]
        if self.draft_ok:
            refs.append(self.draft.start.remote(prompt_ids, temperature, top_k, top_p, draft_greedy, draft_seed))
        self._get_target(refs[0], time.monotonic() + self.round_timeout_s)
        if self.draft_ok:
            self._get_draft(refs[1], time.monotonic() + self.round_timeout_s)

    def _get_target(self, ref, deadline):
        try:
            return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError as exc:
            raise TargetUnavailable(f"target did not answer within {self.round_timeout_s:.1f} s") from exc
        except RayActorError as exc:
            raise TargetUnavailable(f"target worker died: {exc.__class__.__name__}") from exc
        except RayTaskError as exc:
            raise TargetUnavailable(f"target worker failed: {exc}") from exc

    def _get_draft(self, ref, deadline):
        try:
            return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except (GetTimeoutError, RayError) as exc:
            self.draft_ok = False
            self.draft_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
            log.warning("draft failed (%s); finishing the request on the target alone", self.draft_error)
            return None

    def run_round(self, draft_req: DraftRequest, target_req: TargetRequest):
        deadline = time.monotonic() + self.round_timeout_s
        d_ref = self.draft.draft.remote(draft_req) if self.draft_ok else None
        t_ref = self.target.verify.remote(target_req)
        target_out = self._get_target(t_ref, deadline)
        chunk = self._get_draft(d_ref, deadline) if d_ref is not None else None
        if chunk is None:
            chunk = DraftChunk(draft_req.round_id, draft_req.start_pos, [])
        return chunk, target_out

    def forward_counts(self) -> tuple[int, int]:
        t = ray.get(self.target.forwards.remote(), timeout=self.round_timeout_s)
        d = 0
        if self.draft_ok:
            try:
                d = ray.get(self.draft.forwards.remote(), timeout=self.round_timeout_s)
            except (GetTimeoutError, RayError):
                d = 0
        return d, t

    def close(self) -> None:
        pass


class CompiledGraphChannel(ActorCallChannel):
    """Per-round exchange through a compiled graph; start/forward counts use plain actor calls."""

    def __init__(self, draft, target, round_timeout_s: float = 30.0, buffer_size_bytes: int = 8 << 20):
        super().__init__(draft, target, round_timeout_s)
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            d = draft.draft.bind(inp[0])
            t = target.verify.bind(inp[1])
            dag = MultiOutputNode([d, t])
        self.graph = dag.experimental_compile(_submit_timeout=round_timeout_s,
                                              _buffer_size_bytes=buffer_size_bytes)

    def run_round(self, draft_req, target_req):
        if not self.draft_ok or self.broken:
            return super().run_round(draft_req, target_req)
        try:
            refs = self.graph.execute(draft_req, target_req)
            chunk, target_out = ray.get(refs, timeout=self.round_timeout_s)
            return chunk, target_out
        except (GetTimeoutError, RayError) as exc:
            # The graph failed or a side is late. Redo this round on plain actor calls without the draft:
            # round requests are idempotent (the update rewrites the mirror, the cache is cropped), so a dead
            # or late target raises TargetUnavailable there, and otherwise the request finishes on the target
            # alone. The coordinator replaces the draft and tears the graph down after the request.
            self.broken = True
            self.draft_ok = False
            self.draft_error = f"compiled graph: {exc.__class__.__name__}: {str(exc)[:200]}"
            log.warning("%s; continuing on actor calls without the draft", self.draft_error)
            return super().run_round(draft_req, target_req)

    def close(self) -> None:
        graph, self.graph = getattr(self, "graph", None), None
        if graph is None:
            return

        def teardown():
            try:
                graph.teardown()
            except Exception as exc:  # teardown of a broken graph may raise; nothing more to free
                log.debug("compiled graph teardown: %s", exc)

        if self.broken:  # a broken graph may take a while to tear down: do not hold the caller
            import threading

            threading.Thread(target=teardown, daemon=True).start()
        else:
            teardown()


# Channels the coordinator drives (the decider runs in the coordinator) ...
CHANNELS = {"actor": ActorCallChannel, "compiled": CompiledGraphChannel}
# ... and "collective": the target leader runs the loop itself over a gloo link to the draft
# (``collective.DraftLinkChannel``); the coordinator only starts it and relays the token stream.
CHANNEL_NAMES = ("actor", "compiled", "collective")
