"""The target leader's continuous loop: one thread runs ``core.batch.BatchLoop`` rounds over every request in
flight. Requests arrive at any time (``open``) and join at a round boundary; they leave when they finish, are
cancelled, or their caller goes away. Each has its own ``RequestStream`` back to the caller: the loop never
waits for a slow reader (its tokens accumulate in the stream, at most the request's ``max_new_tokens``).

The draft is reached through a draft phase: ``transports.GlooDraftPhase`` (one message each way per round on
the leader's gloo link) or ``transports.RemoteDraftPhase`` (one actor call per round); either carries every
drafting request's work, and the draft computes while this process runs the target's forward. Fault rules:
a draft failure turns every active request target-only (still lossless); an error that belongs to one
request (non-finite rows, its own decision or stop rule, its prompt pass) ends that request alone with
``RequestFailed`` inside ``BatchLoop.step`` and the batch goes on; only a failure of the target's forward
over the whole batch ends every request with ``TargetUnavailable`` (the worker is then replaced). No Ray
calls here except through the draft phase; the actor (``workers.TargetLeader``) owns this object.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from ..core.batch import BatchLoop, Event
from ..platform import adopt_thread_count
from ..core.logprobs import TokenIds
from ..errors import PearlError, RequestFailed, TargetUnavailable

log = logging.getLogger(__name__)


class RequestStream:
    """One request's results, filled by the loop thread and read by the caller's thread."""

    def __init__(self):
        self.cv = threading.Condition()
        self.pending: list[int] = []
        self.pending_logprobs: list | None = None  # with ``pending``, where the request asked for log-probabilities
        self.final: dict | None = None
        self.error: BaseException | None = None
        self.sent_at: float | None = None  # when the last tokens went out (None: nothing yet)

    @property
    def done(self) -> bool:
        return self.final is not None or self.error is not None

    def push(self, event: Event) -> None:
        with self.cv:
            self.pending.extend(event.token_ids)
            if event.logprobs is not None:
                self.pending_logprobs = (self.pending_logprobs or []) + list(event.logprobs)
            if event.finished:
                if event.error is not None:
                    self.error = event.error
                else:
                    self.final = {"token_ids": event.output_ids, "stats": event.stats}
            self.cv.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cv:
            if not self.done:
                self.error = error
            self.cv.notify_all()

    def next_item(self, timeout_s: float, hold_s: float = 0.0):
        """The tokens committed since the last call, or the final dict once they are all out; waits at most
        ``timeout_s`` (then ``TargetUnavailable``). ``hold_s`` > 0: after the first tokens, tokens go out at
        most once per ``hold_s`` (they gather meanwhile; the final dict ends the wait at once), so a caller
        that wants the result rather than each round's tokens costs a few messages, not one per round."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while not self.pending and not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TargetUnavailable(f"the target's loop produced nothing for this request in {timeout_s:.0f} s")
                self.cv.wait(left)
            if hold_s > 0 and self.sent_at is not None:
                until = min(deadline, self.sent_at + hold_s)
                while not self.done and time.monotonic() < until:
                    self.cv.wait(until - time.monotonic())
            if self.pending:
                ids, self.pending = TokenIds(self.pending, self.pending_logprobs), []
                self.pending_logprobs = None
                self.sent_at = time.monotonic()
                return ids
            if self.error is not None:
                raise self.error
            return self.final


class LeaderLoop:
    def __init__(self, target_lm, decode, max_num_seqs: int, lock=None, policy=None, alone_threads=None,
                 threads: int | None = None):
        self.threads = threads  # torch threads of the loop's forwards (None: this process's count)
        self.loop = BatchLoop(target_lm, None, policy, max_num_seqs, decode)
        self.loop.alone_threads = alone_threads
        self.lock = lock or threading.Lock()
        self.inbox: queue.Queue = queue.Queue()
        self.streams: dict[RequestStream, None] = {}
        self.rounds = 0
        self.thread = threading.Thread(target=self._run, name="pearl-leader-loop", daemon=True)
        self.thread.start()

    # -- called from the actor's request threads ------------------------------------------------------------
    def open(self, request) -> RequestStream:
        stream = RequestStream()
        self.inbox.put(("add", stream, request))
        return stream

    def cancel(self, stream: RequestStream) -> None:
        self.inbox.put(("cancel", stream, None))

    def set_draft(self, phase) -> None:
        """Use ``phase`` (a ``DraftPhase``, or None) for requests that join from the next round on."""
        self.inbox.put(("draft", None, phase))

    def status(self) -> dict:
        return {"running": len(self.loop.active), "waiting": len(self.loop.waiting), "rounds": self.rounds,
                "draft": None if self.loop.draft is None else type(self.loop.draft).__name__}

    # -- the loop thread --------------------------------------------------------------------------------------
    def _take(self, item) -> None:
        """Apply one message from the inbox; a message that raises costs its own request at most, never the
        loop thread (every stream would then wait out its timeout)."""
        try:
            self._apply(item)
        except Exception as exc:  # noqa: BLE001
            log.exception("the leader loop could not apply %r", item[0])
            if item[1] is not None:
                self.streams.pop(item[1], None)
                item[1].fail(RequestFailed(f"the leader could not take this request: {type(exc).__name__}: "
                                           f"{str(exc)[:300]}"))

    def _apply(self, item) -> None:
        kind, stream, arg = item
        if kind == "add":
            self.streams[stream] = None
            self.loop.add(arg, key=stream)
        elif kind == "cancel":
            if stream in self.streams:
                self.loop.cancel(stream)
                self.streams.pop(stream, None)
                stream.fail(PearlError("cancelled"))
        elif kind == "draft":
            old = self.loop.draft
            self.loop.set_draft(arg)
            if old is not None and old is not arg and hasattr(old, "close"):
                old.close()  # between rounds: nothing of it is in flight (a gloo phase stops its link)

    def _run(self) -> None:
        adopt_thread_count(self.threads)  # the long-lived thread that runs the target's forwards (``platform``)
        while True:
            try:
                self._take(self.inbox.get(timeout=None if self.loop.idle else 0.0))
            except queue.Empty:
                pass
            while True:  # everything that arrived meanwhile joins at this boundary
                try:
                    self._take(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if self.loop.idle:
                continue
            try:
                with self.lock:
                    events = self.loop.step()
                self.rounds += 1
            except Exception as exc:  # noqa: BLE001 - the target's forward failed for the whole batch
                # A request's own errors (its rows, its decision, its prompt pass) end it alone inside ``step``
                # (``RequestFailed``); what escapes is the forward over every row, after which the cache is
                # not to be trusted: every request ends, typed, and its callers report the worker as failed.
                log.exception("the batched round failed")
                events = self.loop.fail_all(TargetUnavailable(f"the target failed a batched round: "
                                                              f"{exc.__class__.__name__}: {str(exc)[:300]}"))
            for ev in events:
                ev.key.push(ev)
                if ev.finished:
                    self.streams.pop(ev.key, None)
