"""How the target leader's batched loop reaches a draft in another actor: the ``core.proposer.DraftPhase``
implementations of the Ray backend. The target runs in the leader's own process, so p rows never leave it
and the target's next forward starts right after the decision (the spec's placement of the decider,
section 4); each round the loop submits every drafting request's work, runs the target's forward, then
collects the draft's chunks.

- ``GlooDraftPhase`` (transport "gloo", the default): one message each way per round on a private gloo
  link (``runtime.link``), answered by the draft's ``serve_link`` loop.
- ``RemoteDraftPhase`` (transport "actor"): one Ray actor call per round (``DraftWorker.batch_round``).

One fault rule for both: any draft failure (timeout, dead actor, broken link, failed round) raises
``DraftFailed``; the loop turns the requests target-only (still lossless) and the coordinator replaces the
draft afterwards. Target failures are the loop's own.
"""

from __future__ import annotations

import logging
import time

from . import wire
from .link import GlooLink

log = logging.getLogger(__name__)


class DraftFailed(RuntimeError):
    """The draft did not deliver (any cause); the request goes on without it."""


class RemoteDraftPhase:
    """``core.proposer.DraftPhase`` over a ``DraftWorker`` actor: slot starts and releases ride with the next
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
    """``core.proposer.DraftPhase`` over the leader's gloo link (transport "gloo"): each round is one batched
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
