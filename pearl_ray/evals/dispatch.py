"""Hand work items to several draft/target pairs at once, dynamically, losing and repeating nothing.

``PairPool`` runs one thread per pair. A thread builds its pair (``start(index)``), then takes the next
item from a shared queue until none is left: a pair that finishes early simply takes more. An item is a
key (a question) and the methods still to run on it; ``run(engine, index, item)`` yields one record per
method, and each record is handed to ``sink`` (the results file) as soon as it exists, so an item that
fails half-way is retried with only its missing methods. A failure that ``is_pair_failure`` recognises
(a dead target or coordinator, ...) puts the item back for any pair (at most ``max_attempts`` tries per
item) and retires the pair after ``max_pair_failures`` failures in a row. Any other exception is a bug or
a bad request: it stops the pool and is re-raised by ``run_all``. An interrupt of ``run_all`` (Ctrl-C,
SystemExit) stops every pair (``stop(engine)``, which must be idempotent) before it propagates, so no
thread goes on using a runtime that is being shut down. Knows nothing about GSM8K or Ray.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    key: int
    methods: list[str]
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class PoolReport:
    records: int = 0
    failed: list[WorkItem] = field(default_factory=list)
    """Items given up after ``max_attempts`` tries or left when no pair was alive; they are not recorded."""
    pairs_started: int = 0
    pairs_retired: list[int] = field(default_factory=list)
    start_errors: dict[int, str] = field(default_factory=dict)


class PairPool:
    def __init__(self, num_pairs: int, start: Callable[[int], object],
                 run: Callable[[object, int, WorkItem], Iterator[tuple[str, dict]]],
                 sink: Callable[[dict], None], is_pair_failure: Callable[[BaseException], bool],
                 stop: Callable[[object], None] = lambda engine: None, max_attempts: int = 3,
                 max_pair_failures: int = 2, slots_per_pair: int = 1):
        """``slots_per_pair``: items one pair runs at once (threads sharing its engine, whose loop batches
        them)."""
        if num_pairs < 1 or max_attempts < 1 or max_pair_failures < 1 or slots_per_pair < 1:
            raise ValueError("num_pairs, max_attempts, max_pair_failures and slots_per_pair must be >= 1")
        self.slots_per_pair = slots_per_pair
        self.num_pairs, self.start, self.run, self.sink, self.stop = num_pairs, start, run, sink, stop
        self.is_pair_failure = is_pair_failure
        self.max_attempts, self.max_pair_failures = max_attempts, max_pair_failures
        self._queue: queue.Queue[WorkItem] = queue.Queue()
        self._cv = threading.Condition()
        self._open = 0  # items queued or running
        self._alive = 0  # pairs starting or working
        self._fatal: BaseException | None = None
        self._engines: dict[int, object] = {}  # the pairs that are up
        self.report = PoolReport()

    # -- item bookkeeping ----------------------------------------------------------------------------------
    def _finish(self, item: WorkItem | None = None, failed: bool = False) -> None:
        with self._cv:
            if failed and item is not None:
                self.report.failed.append(item)
            self._open -= 1
            self._cv.notify_all()

    def _next(self) -> WorkItem | None:
        """The next item, or None when all are done (or the pool is stopping)."""
        while True:
            with self._cv:
                if self._open == 0 or self._fatal is not None:
                    return None
            try:
                return self._queue.get(timeout=0.2)
            except queue.Empty:
                continue  # items are running elsewhere and may come back

    # -- one pair ------------------------------------------------------------------------------------------
    def _pair(self, index: int) -> None:
        engine = None
        try:
            try:
                engine = self.start(index)
            except BaseException as exc:  # noqa: BLE001 - recorded; the other pairs go on
                if not self.is_pair_failure(exc):
                    raise
                log.warning("pair %d did not start: %s", index, exc)
                self.report.start_errors[index] = f"{type(exc).__name__}: {exc}"
                return
            with self._cv:
                self.report.pairs_started += 1
                self._engines[index] = engine
            state = {"failures": 0, "error": None}
            extra = [threading.Thread(target=self._slot, args=(engine, index, state), daemon=True,
                                      name=f"pair-{index}-slot-{k}") for k in range(1, self.slots_per_pair)]
            for t in extra:
                t.start()
            self._slot(engine, index, state)
            for t in extra:
                t.join()
            if state["error"] is not None:
                raise state["error"]
            if state["failures"] >= self.max_pair_failures:
                log.warning("pair %d retired after %d failures in a row", index, state["failures"])
                self.report.pairs_retired.append(index)
        except BaseException as exc:  # noqa: BLE001 - handed to run_all
            with self._cv:
                self._fatal = self._fatal or exc
                self._cv.notify_all()
        finally:
            with self._cv:
                self._engines.pop(index, None)
            if engine is not None:
                try:
                    self.stop(engine)
                except Exception as exc:  # noqa: BLE001 - shutting down anyway
                    log.debug("pair %d shutdown: %s", index, exc)
            with self._cv:
                self._alive -= 1
                self._cv.notify_all()

    def _slot(self, engine, index: int, state: dict) -> None:
        """One of a pair's slots: take items until none is left, the pair failed too often in a row, or a
        bug (any error ``is_pair_failure`` does not recognise, kept in ``state`` for the pair to raise)."""
        while state["failures"] < self.max_pair_failures and state["error"] is None and (item := self._next()):
            try:
                for method, record in self.run(engine, index, item):
                    self.sink(record)
                    item.methods.remove(method)
                    with self._cv:
                        self.report.records += 1
                state["failures"] = 0
                self._finish()
            except BaseException as exc:  # noqa: BLE001 - sorted below
                if not self.is_pair_failure(exc):
                    self._finish()
                    state["error"] = state["error"] or exc
                    return
                state["failures"] += 1
                item.attempts += 1
                item.errors.append(f"pair {index}: {type(exc).__name__}: {exc}")
                log.warning("pair %d failed on item %s (try %d of %d): %s", index, item.key, item.attempts,
                            self.max_attempts, exc)
                if item.attempts < self.max_attempts:
                    self._queue.put(item)  # another pair (or this one) takes it again
                else:
                    self._finish(item, failed=True)

    # -- the pool ------------------------------------------------------------------------------------------
    def run_all(self, items: list[WorkItem]) -> PoolReport:
        """Run every item on the pairs; return when all are recorded or given up. Re-raises a fatal error."""
        for item in items:
            self._queue.put(item)
        self._open, self._alive = len(items), self.num_pairs
        threads = [threading.Thread(target=self._pair, args=(i,), name=f"pair-{i}", daemon=True)
                   for i in range(self.num_pairs)]
        for t in threads:
            t.start()
        try:
            with self._cv:
                while self._alive > 0 and self._open > 0 and self._fatal is None:
                    self._cv.wait(1.0)
        except BaseException as exc:  # Ctrl-C: hand out nothing more and stop the pairs, then go
            self._cancel(exc, threads)
            raise
        if self._fatal is None and self._open > 0:  # every pair is gone: what is left fails
            while not self._queue.empty():
                item = self._queue.get()
                item.errors.append("no pair left to run it")
                self.report.failed.append(item)
        for t in threads:
            t.join()
        if self._fatal is not None:
            raise self._fatal
        return self.report

    def _cancel(self, exc: BaseException, threads: list[threading.Thread], timeout_s: float = 30.0) -> None:
        """Stop handing out items, stop every running pair (its call fails and is not retried) and give the
        threads a moment to finish."""
        with self._cv:
            self._fatal = self._fatal or exc
            engines = list(self._engines.items())
        for index, engine in engines:
            try:
                self.stop(engine)
            except Exception as err:  # noqa: BLE001 - interrupted anyway
                log.debug("pair %d stop: %s", index, err)
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
