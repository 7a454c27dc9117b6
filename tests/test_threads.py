"""``platform.on_fresh_thread`` / ``adopt_thread_count``: one-off model work runs on a thread that ends
with it (so a worker's only long-lived OpenMP pool is its loop thread's), with the caller's thread count."""

import threading

import pytest
import torch

from pearl_ray.platform import adopt_thread_count, borrowed_threads, on_fresh_thread, torch_threads, usable_cpus


def test_runs_on_a_new_thread_that_ends_and_returns_the_result():
    seen = {}

    def work(a, b):
        seen["thread"] = threading.current_thread()
        return a + b

    assert on_fresh_thread(work, 2, 3) == 5
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()


def test_reraises_the_error_of_the_call():
    def boom():
        raise ValueError("no such model: /missing")

    with pytest.raises(ValueError, match="no such model"):
        on_fresh_thread(boom)


def test_a_call_past_its_timeout_raises():
    gate = threading.Event()
    try:
        with pytest.raises(TimeoutError, match="did not finish in 0 s"):
            on_fresh_thread(gate.wait, 30, timeout_s=0.2)
    finally:
        gate.set()


def test_the_callers_thread_count_is_carried_over():
    before = torch.get_num_threads()
    try:
        with torch_threads(1):
            assert on_fresh_thread(torch.get_num_threads) == 1
        adopt_thread_count(2)
        assert torch.get_num_threads() == 2
        assert on_fresh_thread(torch.get_num_threads) == 2
        # the thread's own setting (OpenMP's count is per thread) follows the process count
        assert on_fresh_thread(lambda: (adopt_thread_count(), torch.get_num_threads())[1]) == 2
    finally:
        torch.set_num_threads(before)


def test_borrowed_threads_never_exceed_the_cpus():
    # one thread per side on 2 cores: the target takes both when the draft idles
    assert borrowed_threads(2, own=1, cpus=2) == 2
    # two threads per side on 2 cores: 4 would oversubscribe the cores, and 2 is what the target has
    assert borrowed_threads(4, own=2, cpus=2) is None
    assert borrowed_threads(4, own=1, cpus=3) == 3
    assert borrowed_threads(8, own=4, cpus=16) == 8
    assert borrowed_threads(None, own=1, cpus=2) is None and borrowed_threads(0, own=1, cpus=2) is None
    assert 1 <= usable_cpus() <= (__import__("os").cpu_count() or 1)
    assert borrowed_threads(10_000, own=0) == usable_cpus()
