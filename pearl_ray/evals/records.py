"""An append-only JSON-lines results file that survives interruption, for evaluation jobs.

Contract: every record is one whole line, written with a single ``write`` under a lock and flushed to disk
(``fsync``) before ``append`` returns, so a killed job loses at most the record being written. Reading
tolerates a torn last line (no newline): ``ResultsFile`` cuts it off before appending, so the file stays
valid JSON lines. Knows nothing about what the records mean beyond the key fields it is told to index.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def read_records(path: str | Path) -> list[dict]:
    """All complete records of a JSON-lines file (a torn last line is skipped); [] if it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                log.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted run", path, len(line))
                break
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno} is not valid JSON ({exc}); fix or remove that line") from None
    return records


class ResultsFile:
    """Append records to ``path``; ``done`` holds the keys (tuples of ``key_fields``) already recorded."""

    def __init__(self, path: str | Path, key_fields: Iterable[str]):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self._lock = threading.Lock()
        self._repair()
        self.records = read_records(self.path)
        self.done = {self.key(r) for r in self.records}

    def key(self, record: dict) -> tuple:
        return tuple(record[k] for k in self.key_fields)

    def _repair(self) -> None:
        """Cut a torn last line (an interrupted write) so the next record starts on a line of its own."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())

    def append(self, record: dict) -> None:
        """Write one record as one line, durably. Raises ``KeyError`` if its key was already recorded."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        key = self.key(record)
        with self._lock:
            if key in self.done:
                raise KeyError(f"{dict(zip(self.key_fields, key))} is already recorded in {self.path}")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:  # one write in practice; loop in case the OS writes part of it
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self.done.add(key)
            self.records.append(record)
