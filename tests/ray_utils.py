"""Shared Ray fixtures helpers: a private local instance bound to 127.0.0.1, shut down by the test."""

import os
import tempfile

import ray


def start_local_ray(num_cpus: int = 2, num_gpus: int = 2) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pearl_ray.runtime.backend import free_fixed_ports

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    with free_fixed_ports():  # a user's Ray on this machine keeps its default ports
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=False, _temp_dir=tmp)


def private_ray():
    """The body of a fixture named ``shared_ray`` (module-scoped and autouse where a whole module runs on
    Ray): the suite's private local Ray (2 CPUs, 2 fake GPUs), shared by consecutive tests that request it.
    The first starts it; ``conftest.py`` runs such modules one after another and shuts it down before any
    test that does not request it (a start costs several seconds). A module that needs another Ray calls
    ``release_shared_ray`` first. A module that leaves actors or placement groups behind gets it shut down,
    so the next one starts a clean one."""
    if not ray.is_initialized():
        start_local_ray()
    yield
    if not wait_for(resources_all_free, timeout_s=30, interval_s=0.2):
        ray.shutdown()


def resources_all_free() -> bool:
    """Every CPU and GPU of the connected Ray is free (nothing this module made still holds them)."""
    total, free = ray.cluster_resources(), ray.available_resources()
    return all(free.get(k, 0.0) >= v for k, v in total.items() if k in ("CPU", "GPU"))


def release_shared_ray() -> None:
    """Before a module starts or joins another Ray: shut down the shared one if it is up."""
    if ray.is_initialized():
        ray.shutdown()


_DEFAULT_PORTS_LOCK = None


def default_ports_lock(timeout_s: float = 1800.0):
    """A lock (a context manager) held while Ray processes that bind Ray's fixed default ports run: the
    dashboard agent's 52365 and the metrics ports 44217 and 44227 (a ``ray start --head`` binds some of them,
    ``ray.cluster_utils.Cluster`` all three, test_loopback.py needs them free). One file lock for the machine:
    tests in other pytest-xdist workers, or another checkout's suite, wait instead of finding them taken.
    Reentrant within this process."""
    global _DEFAULT_PORTS_LOCK
    if _DEFAULT_PORTS_LOCK is None:
        from filelock import FileLock

        _DEFAULT_PORTS_LOCK = FileLock(os.path.join(tempfile.gettempdir(), "pearl-ray-tests-default-ports.lock"))
    return _DEFAULT_PORTS_LOCK.acquire(timeout=timeout_s)


def toy_pair():
    """(target, draft) tabular models that disagree often."""
    from pearl_ray.testing import TabularLM

    return TabularLM(6, seed=0), TabularLM(6, seed=5)


def wait_for(cond, timeout_s: float = 30.0, interval_s: float = 0.05) -> bool:
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval_s)
    return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc, timeout_s: float = 60.0) -> None:
    """End a process this test started (SIGTERM, then SIGKILL after ``timeout_s``)."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_threads(fn, n: int, timeout_s: float = 300.0):
    """``fn(i)`` for i in range(n), each in its own thread at once; returns ({i: result}, [(i, exception)])."""
    import threading

    out, errors = {}, []

    def run(i):
        try:
            out[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append((i, exc))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout_s)
    return out, errors
