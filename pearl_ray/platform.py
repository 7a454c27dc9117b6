"""Threads on the host: torch's intra-op thread count and the OpenMP pools behind it. Imports torch and the
standard library only, so every layer (the core loop, the model runners, the Ray workers) may use it.

torch's thread count is per thread: OpenMP and MKL read it in the thread that runs a parallel region, and a
thread that never set it runs with ``OMP_NUM_THREADS`` whatever ``torch.get_num_threads()`` says elsewhere.
GNU OpenMP also keeps a pool of worker threads for every thread that ever ran a parallel region, for as long
as that thread lives; once the pools' threads outnumber the CPUs, idle workers sleep on a futex instead of
spinning, and every small op pays a wake-up. Hence the helpers below: set the count in each long-lived
thread that runs forwards (``adopt_thread_count``), run one-off work on a thread that takes its pool with it
(``on_fresh_thread``), change the count for a block (``torch_threads``), and never ask for more threads than
the process has CPUs (``borrowed_threads``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

import torch


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the body with ``n`` torch threads (None: leave the count alone)."""
    before = torch.get_num_threads()
    if not n or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def borrowed_threads(wanted: int | None, own: int, cpus: int | None = None) -> int | None:
    """Threads for the target's forwards when the draft idles (prompt passes, rounds without drafting): the
    ``wanted`` count (its own threads plus the draft's) but never more than the CPUs this process may use
    (more threads than CPUs make the forwards slower, not faster); None when that is no more than ``own``,
    i.e. nothing to borrow."""
    if not wanted:
        return None
    n = min(int(wanted), cpus or usable_cpus())
    return n if n > own else None


def adopt_thread_count(n: int | None = None) -> None:
    """Make this thread's torch intra-op settings ``n`` threads (None: the process's count). A thread that
    never set them runs with ``OMP_NUM_THREADS`` (which Ray sets to the actor's ``num_cpus``). Call it first
    in a long-lived thread that runs model forwards."""
    torch.set_num_threads(int(n or torch.get_num_threads()))


def on_fresh_thread(fn: Callable, *args, timeout_s: float | None = None, name: str = "pearl-compute",
                    threads: int | None = None):
    """Run ``fn(*args)`` on a new thread that ends with it; return its result or raise its error
    (``TimeoutError`` past ``timeout_s``; the thread is left to finish).

    For one-off work (loading, measuring) in a process whose forwards run on one long-lived thread (the
    target leader's loop, the draft's link loop): the OpenMP pool this work creates goes with its thread, so
    the long-lived thread stays the only one with a pool and its workers keep spinning between ops (see the
    module docstring). The caller's thread count is carried over (or ``threads``)."""
    threads = threads or torch.get_num_threads()
    box: dict = {}

    def body() -> None:
        try:
            adopt_thread_count(threads)
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', 'the call')} did not finish in {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
