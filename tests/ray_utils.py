"""Shared Ray fixtures helpers: a private local instance bound to 127.0.0.1, shut down by the test."""

import os
import tempfile

import ray


def start_local_ray(num_cpus: int = 2, num_gpus: int = 2) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tmp)


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
