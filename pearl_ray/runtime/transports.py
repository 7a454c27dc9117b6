"""The target leader's round channels: the target side runs in the leader's own process, the draft sits
in another actor, reached by a transport that carries only the draft's messages.

This is the spec's placement of the decider (section 4): ``core.loop.iter_request`` runs in the target
leader, so p rows never leave it and the target's next forward starts right after the decision. Each
round the leader sends the draft request, runs the target forward, then takes the draft chunk.

One fault rule for every transport: any draft failure (timeout, dead actor, broken link, failed round)
turns the round into a fallback round, and the rest of the request runs on the target alone (still
lossless); the coordinator replaces the draft afterwards. Target failures propagate to the caller.

- ``GlooDraftChannel`` (transport "gloo", the default): a private gloo link (``runtime.link``); a helper
  I/O thread waits for the chunk and posts the next receive off the target's critical path.
- ``ActorDraftChannel`` (transport "actor"): plain Ray actor calls to the draft; the simple reference.
- ``LeaderChannel`` itself: no draft (target-only requests, or the draft is down).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

from ..core.loop import draft_start, start_target
from ..core.messages import DraftChunk, DraftRequest
from . import wire
from .link import GlooLink

log = logging.getLogger(__name__)


class DraftFailed(RuntimeError):
    """The draft did not deliver (any cause); the request goes on without it."""


class LeaderChannel:
    """Target in-process, no draft. Subclasses add a draft behind ``_start_draft``/``_send``/``_receive``."""

    def __init__(self, target_side, round_timeout_s: float, lock=None):
        self.target = target_side
        self.round_timeout_s = round_timeout_s
        self.lock = lock or contextlib.nullcontext()
        self.draft_ok = False
        self.draft_error: str | None = None
        self.round_bytes = 0  # what crossed the transport this round (p rows never do: they stay here)

    # -- hooks for a draft transport ---------------------------------------------------------------------
    def _start_draft(self, start) -> None: ...

    def _send(self, req: DraftRequest) -> None: ...

    def _receive(self, req: DraftRequest) -> DraftChunk: ...

    def _draft_forwards(self) -> int:
        return 0

    def _on_fail(self) -> None: ...

    # -- the RoundChannel protocol -----------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        self.draft_ok = False
        self.draft_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
        log.warning("draft failed (%s); finishing the request on the target alone", self.draft_error)
        self._on_fail()

    def start(self, request) -> None:
        with self.lock:
            start_target(self.target, request)
        self.draft_ok = self.draft_ok and request.uses_draft
        if self.draft_ok:
            try:
                self._start_draft(draft_start(request))
            except Exception as exc:  # noqa: BLE001 - any draft failure is a fallback, by design
                self._fail(exc)

    def run_round(self, draft_req: DraftRequest, target_req):
        self.round_bytes = 0
        if self.draft_ok:  # also when the draft idles this round: the request carries its mirror's update
            try:
                self._send(draft_req)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)
        with self.lock:
            target_out = self.target.verify(target_req)
        chunk = None
        if self.draft_ok:
            try:
                chunk = self._receive(draft_req)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)
        if chunk is None:
            chunk = DraftChunk(draft_req.round_id, draft_req.start_pos, [])
        return chunk, target_out

    def forward_counts(self) -> tuple[int, int]:
        self.close()
        d = 0
        if self.draft_ok:
            try:
                d = self._draft_forwards()
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)
        return d, self.target.mirror.forwards

    def close(self) -> None:
        """End per-request helpers (the transport itself stays up for the next request)."""


class ActorDraftChannel(LeaderChannel):
    """The draft reached by plain Ray actor calls (``DraftWorker.start/draft/forwards``), bounded waits."""

    def __init__(self, target_side, draft_handle, round_timeout_s: float, lock=None):
        super().__init__(target_side, round_timeout_s, lock)
        self.draft = draft_handle
        self.draft_ok = draft_handle is not None
        self._ref = None

    def _get(self, ref):
        import ray

        return ray.get(ref, timeout=self.round_timeout_s)

    def _start_draft(self, start):
        self._get(self.draft.start.remote(start))

    def _send(self, req):
        self._ref = self.draft.draft.remote(req)

    def _receive(self, req):
        chunk, self._ref = self._get(self._ref), None
        self.round_bytes = chunk.num_bytes()
        return chunk

    def _draft_forwards(self) -> int:
        return int(self._get(self.draft.forwards.remote()))


class GlooDraftChannel(LeaderChannel):
    """The draft across a gloo link (the leader is rank 0, the draft's ``serve_link`` loop rank 1)."""

    def __init__(self, target_side, link: GlooLink | None, round_timeout_s: float, lock=None):
        super().__init__(target_side, round_timeout_s, lock)
        self.link = link
        self.draft_ok = link is not None and link.pg is not None
        self._io = None
        self._caller_waiting = False

    def _on_fail(self) -> None:
        if self.link is not None:
            self.link.close()  # a gloo pair that timed out is unusable: the coordinator builds a new link

    def _ask(self, tensors):
        """Send one message to the draft and wait for the reply frame (bounded)."""
        work, frame = self.link.recv_frame(1)
        self.link.send(tensors, 1, self.round_timeout_s)
        self.link.wait(work, self.round_timeout_s, "draft reply")
        if int(frame[0]) not in (wire.OP_ACK, wire.OP_REPLY):
            raise DraftFailed(f"the draft failed (op {int(frame[0])})")
        return frame

    def _start_draft(self, start):
        self._ask(wire.encode_start(start))

    def _io_loop(self) -> None:
        """The I/O thread: for each round sent, wait for the draft's chunk, hand it over, then post the
        receive for the next round while the caller decides and runs the next target forward."""
        link = self.link
        while True:
            item = self._inbox.get()
            if item is None:
                return
            round_id, sends, deadline = item
            try:
                for w in sends:
                    link.wait(w, deadline - time.monotonic(), "send to the draft")
                work, frame = link.recv_frame(1)
                link.wait(work, deadline - time.monotonic(), f"draft chunk of round {round_id}")
                if int(frame[0]) != wire.OP_REPLY:
                    raise DraftFailed(f"the draft failed round {int(frame[1])}")
                got = wire.decode_reply(
                    frame, lambda shape, dtype: link.recv_tensor(1, shape, dtype, deadline - time.monotonic()))
                # Posting the next receive holds the GIL for 0.1-0.3 ms: while the target is still computing
                # (the usual case) do it before handing the chunk over; if the caller waits, hand over first.
                late = self._caller_waiting
                if not late:
                    link.prepost(1)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's thread, which closes the link
                self._outbox.put(exc)
                return
            got_bytes = 8 * wire.FRAME + (0 if got.draft_probs is None else 4 * got.draft_probs.numel())
            self._outbox.put((got, got_bytes))
            if late:
                try:
                    link.prepost(1)
                except Exception as exc:  # noqa: BLE001 - the link was closed meanwhile; next use reports it
                    log.debug("prepost: %s", exc)

    def _send(self, req):
        self._caller_waiting = False
        if self._io is None:
            self.link.prepost(1)
            self._inbox, self._outbox = queue.Queue(), queue.Queue()
            self._io = threading.Thread(target=self._io_loop, name="pearl-draft-link", daemon=True)
            self._io.start()
        tensors = wire.encode_request(req)
        sends = self.link.post_send(tensors, 1)
        self._inbox.put((req.round_id, sends, time.monotonic() + self.round_timeout_s))
        self._keep = tensors  # the tensors must outlive their sends
        self.round_bytes = sum(t.numel() * t.element_size() for t in tensors)

    def _receive(self, req):
        self._caller_waiting = True
        try:
            got = self._outbox.get(timeout=self.round_timeout_s + 1.0)
        except queue.Empty:
            got = DraftFailed(f"no draft chunk for round {req.round_id} within {self.round_timeout_s} s")
        if isinstance(got, Exception):
            raise got
        chunk, got_bytes = got
        self.round_bytes += got_bytes
        return chunk

    def _draft_forwards(self) -> int:
        return int(self._ask([wire.count_frame()])[1])

    def close(self) -> None:
        """Stop the I/O thread (its next receive stays posted for the next request on this link)."""
        if self._io is not None:
            self._inbox.put(None)
            self._io.join(timeout=self.round_timeout_s + 2.0)
            self._io = None



class RemoteDraftPhase:
    """``core.batch.DraftPhase`` over a ``DraftWorker`` actor: slot starts and releases ride with the next
    round's call (``DraftWorker.batch_round``), which ``submit`` sends without waiting, so the draft works
    on its round while the caller runs the target's forward; ``collect`` waits at most ``timeout_s``. Any
    failure (timeout, dead actor, an error in the round) raises: the loop turns the requests target-only."""

    def __init__(self, draft_handle, timeout_s: float):
        self.draft, self.timeout_s = draft_handle, timeout_s
        self._starts: dict = {}
        self._releases: list = []
        self._ref = None

    def start(self, slot, start) -> None:
        self._starts[slot] = start

    def release(self, slot) -> None:
        if self._starts.pop(slot, None) is None:
            self._releases.append(slot)

    def submit(self, reqs) -> None:
        self._ref = self.draft.batch_round.remote(self._starts, self._releases, reqs)
        self._starts, self._releases = {}, []

    def collect(self) -> dict:
        import ray

        ref, self._ref = self._ref, None
        if ref is None:
            return {}
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure is the draft's; the caller falls back
            raise DraftFailed(f"the draft's batched round failed: {exc.__class__.__name__}: {str(exc)[:200]}") from None

    def forwards(self, slot) -> int:
        return 0


class GlooDraftPhase(RemoteDraftPhase):
    """``core.batch.DraftPhase`` over the leader's gloo link (transport "gloo"): each round is one batched
    message each way (``wire.encode_batch`` / ``encode_batch_reply``), answered by the draft's
    ``serve_link`` loop with ``DraftWorker.batch_round``. ``submit`` posts the reply's receive and the send
    without waiting; ``collect`` waits at most ``timeout_s``. Any failure raises ``DraftFailed`` and closes
    the link (a gloo pair that timed out cannot be used again): the loop turns the requests target-only and
    the coordinator replaces the draft, with a new link. The phase owns the link: only the leader's loop
    thread touches it, and ``close`` (at a round boundary, when a new phase replaces it) stops the draft's
    loop and frees it."""

    def __init__(self, link: GlooLink, timeout_s: float):
        super().__init__(None, timeout_s)
        self.link = link
        self._pending = None  # (sends, reply work, reply frame, tensors kept alive, deadline)

    def _broken(self, what: str, exc: Exception) -> DraftFailed:
        self.link.close()
        return DraftFailed(f"the draft link failed ({what}): {exc.__class__.__name__}: {str(exc)[:200]}")

    def submit(self, reqs) -> None:
        tensors = wire.encode_batch(self._starts, self._releases, reqs)
        self._starts, self._releases = {}, []
        try:
            work, frame = self.link.recv_frame(1)  # posted before the send, so the reply never waits for it
            sends = self.link.post_send(tensors, 1)
        except Exception as exc:  # noqa: BLE001 - LinkError, or a link closed earlier
            raise self._broken("send", exc) from None
        self._pending = (sends, work, frame, tensors, time.monotonic() + self.timeout_s)

    def collect(self) -> dict:
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        sends, work, frame, _, deadline = pending
        link = self.link
        try:
            for w in sends:
                link.wait(w, deadline - time.monotonic(), "send to the draft")
            link.wait(work, deadline - time.monotonic(), "the draft's batched round")
            if int(frame[0]) != wire.OP_BATCH_REPLY:
                raise DraftFailed(f"the draft failed its batched round (op {int(frame[0])})")
            return wire.decode_batch_reply(
                frame, lambda shape, dtype: link.recv_tensor(1, shape, dtype, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - any failure is the draft's; the caller falls back
            raise self._broken("reply", exc) from None

    def close(self) -> None:
        """Stop the draft's end of the link (a stop frame, bounded) and free this end."""
        if self.link.pg is not None:
            try:
                self.link.send([wire.stop_frame()], 1, 5.0)
            except Exception as exc:  # noqa: BLE001 - already broken: nothing to stop
                log.debug("stop frame: %s", exc)
        self.link.close()
