"""A private gloo link between the coordinator (rank 0) and the worker loops, for ``CollectiveChannel``.

Why torch.distributed's ``ProcessGroupGloo`` built directly on a ``TCPStore``, and not
``ray.util.collective`` or ``init_process_group``: those set up the process-wide default group, and a
DeepSpeed tensor-parallel target initialises that same default group in its actors (the notes' gotcha).
A standalone group touches no global state, so it can sit beside DeepSpeed's world, and it binds to the
address we give it (the node's Ray address; 127.0.0.1 in tests) instead of whatever the hostname resolves to.

Gloo facts this relies on (checked with torch 2.13 on CPU): point-to-point send/recv over TCP,
about 0.25 ms for a 1 KiB round trip to two peers; a dead peer fails a pending ``wait`` at once
("connection closed by peer"); a ``wait`` that times out closes the pair for good. So a timeout or error
breaks the link: the channel falls back to actor calls and a fresh link is built for the next request.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import wire

log = logging.getLogger(__name__)


class LinkError(RuntimeError):
    """The link timed out or a peer went away; it cannot be used again."""


class GlooLink:
    """One rank's end of a small gloo group. Rank 0 creates the store (``port=0`` picks a free port)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, name: str,
                 timeout_s: float = 3600.0, connect_timeout_s: float = 60.0):
        self.rank, self.world_size, self.name = rank, world_size, name
        self.store = dist.TCPStore(host, port, world_size, rank == 0,
                                   timeout=datetime.timedelta(seconds=connect_timeout_s), wait_for_workers=False)
        self.host, self.port = host, self.store.port
        self.timeout_s = timeout_s  # the group's default; every wait below passes its own
        self.pg = None
        self._posted: dict[int, tuple] = {}

    def connect(self) -> None:
        """Join the group (blocks until every rank has joined, bounded by the store's timeout)."""
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
        opts._timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(self.name, self.store), self.rank, self.world_size, opts)
        except RuntimeError as exc:
            raise LinkError(f"gloo link {self.name}: rank {self.rank} could not connect: {exc}") from exc

    @staticmethod
    def _wait(work, timeout_s: float, what: str) -> None:
        try:
            work.wait(datetime.timedelta(seconds=max(timeout_s, 1e-3)))
        except RuntimeError as exc:
            raise LinkError(f"{what}: {str(exc)[:200]}") from exc

    def post_send(self, tensors: list[torch.Tensor], dst: int) -> list:
        """Post the sends without waiting; returns their works (the tensors must outlive them)."""
        try:
            return [self.pg.send([t], dst, 0) for t in tensors]
        except (RuntimeError, AttributeError) as exc:  # a closed pair, or this end already closed
            raise LinkError(f"send: {str(exc)[:200]}") from exc

    def send(self, tensors: list[torch.Tensor], dst: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for w in self.post_send(tensors, dst):
            self._wait(w, deadline - time.monotonic(), f"send to rank {dst}")

    def recv_frame(self, src: int):
        """Post a receive for the next frame from ``src``; returns (work, frame buffer). A receive posted
        ahead with ``prepost`` is handed out first (messages from one peer arrive in order)."""
        posted = self._posted.pop(src, None)
        if posted is not None:
            return posted
        frame = torch.empty(wire.FRAME, dtype=torch.int64)
        try:
            return self.pg.recv([frame], src, 0), frame
        except (RuntimeError, AttributeError) as exc:
            raise LinkError(f"recv: {str(exc)[:200]}") from exc

    def prepost(self, src: int) -> None:
        """Post the receive for ``src``'s next frame now, off the critical path (posting one costs
        0.1-0.3 ms of CPU here), so that it is ready before the request that triggers the reply is sent."""
        if src not in self._posted:
            self._posted[src] = self.recv_frame(src)

    def recv_tensor(self, src: int, shape, dtype, timeout_s: float) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype)
        try:
            work = self.pg.recv([buf], src, 0)
        except (RuntimeError, AttributeError) as exc:
            raise LinkError(f"recv: {str(exc)[:200]}") from exc
        self._wait(work, timeout_s, f"recv from rank {src}")
        return buf

    def close(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception as exc:  # already broken: nothing more to free
                log.debug("gloo abort: %s", exc)
        self.store = None


def draft_frame_handler(worker) -> Callable:
    """The draft's answers to the leader's frames, for ``serve_rounds``. ``worker`` has
    ``start(prompt_ids, temperature, top_k, top_p, draft_greedy, seed)``, ``draft(DraftRequest)`` and
    ``forwards()``, as ``actors.DraftWorker`` does."""

    def on_frame(frame, recv):
        op = int(frame[0])
        if op == wire.OP_DRAFT:
            return wire.encode_reply(worker.draft(wire.decode_request(frame, recv)))
        if op == wire.OP_START:
            worker.start(*wire.decode_start(frame, recv))
            return [wire.ack_frame()]
        if op == wire.OP_COUNT:
            return [wire.ack_frame(worker.forwards())]
        raise ValueError(f"unexpected op {op}")

    return on_frame


def serve_rounds(link: GlooLink, on_frame: Callable, reply_timeout_s: float, idle_timeout_s: float) -> str:
    """A worker's persistent loop: receive a frame from rank 0, answer it with ``on_frame(frame, recv)``
    (the tensors to send back); until a stop frame, a broken link, or ``idle_timeout_s`` without a frame.
    Returns why it ended. (Polling instead of blocking was tried: on 2 cores it made the hop slower.)"""
    try:
        link.connect()
        while True:
            work, frame = link.recv_frame(0)
            link._wait(work, idle_timeout_s, "waiting for the next round")
            if int(frame[0]) == wire.OP_STOP:
                return "stopped"
            try:
                reply = on_frame(frame, lambda shape, dtype: link.recv_tensor(0, shape, dtype, reply_timeout_s))
            except LinkError:
                raise
            except Exception as exc:  # the request failed here: tell rank 0, keep serving
                log.warning("request (op %d) failed in the worker: %s", int(frame[0]), exc)
                reply = [wire.error_frame(int(frame[1]))]
            link.send(reply, 0, reply_timeout_s)
    except LinkError as exc:
        return f"link closed: {exc}"
    finally:
        link.close()


class DraftLinkChannel:
    """The round channel of the *target leader*: the target side runs in-process, the draft sits across a
    gloo link (the leader is rank 0, the draft worker's ``serve_link`` loop rank 1).

    This is the spec's placement of the decider (section 4): ``loop.run_pearl`` runs in the target leader,
    so p rows never leave it, and the target's next forward starts right after the decision, without a
    network hop; the only per-round exchange is the draft request out (sent before the target's forward)
    and the draft chunk back (waited for after it). Any link failure (timeout, dead draft, failed round)
    turns the round into a fallback round and the rest of the request runs on the target alone.
    """

    def __init__(self, target_side, link: GlooLink | None, round_timeout_s: float, lock=None):
        import contextlib

        self.target = target_side
        self.link = link
        self.round_timeout_s = round_timeout_s
        self.lock = lock or contextlib.nullcontext()
        self.draft_ok = link is not None and link.pg is not None
        self.draft_error: str | None = None
        self._io = None
        self.round_bytes = 0
        self._caller_waiting = False

    def _fail(self, exc: Exception) -> None:
        self.draft_ok = False
        self.draft_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
        log.warning("draft link failed (%s); finishing the request on the target alone", self.draft_error)
        if self.link is not None:
            self.link.close()

    def _ask(self, tensors: list[torch.Tensor]):
        """Send one message to the draft and wait for the reply frame (bounded)."""
        work, frame = self.link.recv_frame(1)
        self.link.send(tensors, 1, self.round_timeout_s)
        self.link._wait(work, self.round_timeout_s, "draft reply")
        if int(frame[0]) not in (wire.OP_ACK, wire.OP_REPLY):
            raise LinkError(f"the draft failed (op {int(frame[0])})")
        return frame

    def start(self, prompt_ids, temperature, top_k, top_p, draft_greedy, draft_seed) -> None:
        with self.lock:
            self.target.start(prompt_ids, temperature, top_k, top_p)
        if self.draft_ok:
            try:
                self._ask(wire.encode_start(prompt_ids, temperature, top_k, top_p, draft_greedy, draft_seed))
            except LinkError as exc:
                self._fail(exc)

    def _io_loop(self) -> None:
        """The I/O thread: for each round sent, wait for the draft's chunk, hand it over, then post the
        receive for the next round while the caller decides and runs the next target forward."""
        from .messages import DraftChunk

        link = self.link
        while True:
            item = self._inbox.get()
            if item is None:
                return
            round_id, sends, deadline = item
            try:
                for w in sends:
                    link._wait(w, deadline - time.monotonic(), "send to the draft")
                work, frame = link.recv_frame(1)
                link._wait(work, deadline - time.monotonic(), f"draft chunk of round {round_id}")
                if int(frame[0]) != wire.OP_REPLY:
                    raise LinkError(f"the draft failed round {int(frame[1])}")
                got = wire.decode_reply(
                    frame, lambda shape, dtype: link.recv_tensor(1, shape, dtype, deadline - time.monotonic()),
                    DraftChunk)
                # Post the next round's receive now. Posting holds the GIL for 0.1-0.3 ms: while the target
                # is still computing (the usual case) do it before handing the chunk over, so it cannot
                # stall the caller's next send; if the caller is already waiting, hand over first.
                late = self._caller_waiting
                if not late:
                    link.prepost(1)
            except Exception as exc:  # handed to the caller's thread, which closes the link
                self._outbox.put(exc)
                return
            got_bytes = 8 * wire.FRAME + (0 if got.draft_probs is None else 4 * got.draft_probs.numel())
            self._outbox.put((got, got_bytes))
            if late:
                try:
                    link.prepost(1)
                except Exception as exc:  # the link was closed meanwhile; the next use reports it
                    log.debug("prepost: %s", exc)

    def run_round(self, draft_req, target_req):
        from .messages import DraftChunk

        chunk = None
        self.round_bytes = 0  # what crossed the link this round (p rows never do: they stay here)
        self._caller_waiting = False
        if self.draft_ok:
            # This thread sends the draft's request and runs the target's forward; a helper thread waits
            # for the chunk and posts the next receive (off the target's critical path).
            if self._io is None:
                import queue
                import threading

                self.link.prepost(1)
                self._inbox, self._outbox = queue.Queue(), queue.Queue()
                self._io = threading.Thread(target=self._io_loop, name="pearl-draft-link", daemon=True)
                self._io.start()
            try:
                tensors = wire.encode_request(draft_req)
                sends = self.link.post_send(tensors, 1)
                self._inbox.put((draft_req.round_id, sends, time.monotonic() + self.round_timeout_s))
                self._keep = tensors  # the tensors must outlive their sends
                self.round_bytes += sum(t.numel() * t.element_size() for t in tensors)
            except (LinkError, RuntimeError, AttributeError) as exc:
                self._fail(exc)
        with self.lock:
            target_out = self.target.verify(target_req)
        if self.draft_ok:
            import queue

            self._caller_waiting = True
            try:
                got = self._outbox.get(timeout=self.round_timeout_s + 1.0)
            except queue.Empty:
                got = LinkError(f"no draft chunk for round {draft_req.round_id} within {self.round_timeout_s} s")
            if isinstance(got, Exception):
                self._fail(got)
            else:
                chunk, got_bytes = got
                self.round_bytes += got_bytes
        if chunk is None:
            chunk = DraftChunk(draft_req.round_id, draft_req.start_pos, [])
        return chunk, target_out

    def close(self) -> None:
        """Stop the I/O thread (the link itself stays open for the next request)."""
        if self._io is not None:
            self._inbox.put(None)
            self._io.join(timeout=self.round_timeout_s + 2.0)
            self._io = None

    def forward_counts(self) -> tuple[int, int]:
        self.close()  # the I/O thread must be done (and its next receive posted) before this thread asks
        d = 0
        if self.draft_ok:
            try:
                d = int(self._ask([wire.count_frame()])[1])
            except LinkError as exc:
                self._fail(exc)
        return d, self.target.mirror.forwards
