"""Nothing listens off loopback, and a second Ray on the machine still starts.

A default ``python -m pearl_ray serve`` (its own private Ray) answers a request that drafts (so the gloo link
and its store exist); then every listening socket of its whole process tree must be bound to 127.0.0.1, and
none may hold Ray's fixed default ports. While it serves, a ``ray start --head`` with Ray's defaults and a
dashboard comes up and runs a submitted job (it failed with "No available agent to submit job" while the
private Ray held the agent's port 52365).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from ray_utils import free_port, stop_process, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
RAY_FIXED_PORTS = {52365, 44217, 44227}  # the dashboard agent, the autoscaler's and the dashboard's metrics


def listening(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, command line) of every listening TCP socket of ``pid`` and its descendants."""
    root = psutil.Process(pid)
    out = []
    for proc in [root] + root.children(recursive=True):
        try:
            conns, cmd = proc.net_connections(kind="inet"), " ".join(proc.cmdline())[:120]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port, cmd) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_serve_listens_on_loopback_only_and_a_second_ray_starts_beside_it(tiny_pair):
    port, tmp = free_port(), tempfile.mkdtemp(prefix="lb", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(HF_HUB_OFFLINE="1", RAY_TMPDIR=tmp)  # what a user has: nothing set for Ray
    serve = subprocess.Popen([sys.executable, "-m", "pearl_ray", "serve", "--draft", tiny_pair["draft"], "--target",
                              tiny_pair["target"], "--port", str(port), "--gamma", "2", "--num-threads", "1",
                              "--no-colocate"],  # two actors: the draft link's sockets exist too
                             cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True).start()
    head = None
    try:
        assert wait_for(lambda: any("serving" in ln for ln in lines) or serve.poll() is not None, 300, 0.5)
        assert serve.poll() is None, "".join(lines[-40:])
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                          json={"prompt": "w1 w2", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["pearl"]["drafted_tokens"] > 0, r.text
        socks = listening(serve.pid)
        leader = [s for s in socks if "TargetLeader" in s[2]]
        assert len(leader) >= 2, socks  # the link's store and its gloo pair, besides the worker's own server
        assert any("ServeReplica" in s[2] for s in socks), socks
        wide = [s for s in socks if s[0] not in LOOPBACK]
        assert not wide, f"listening off loopback: {wide}"
        assert not RAY_FIXED_PORTS & {s[1] for s in socks}, socks

        # a second Ray with every default port but the GCS's and the dashboard's, and a job through it
        dash = free_port()
        head_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        head = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
                                 f"--port={free_port()}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                                 f"--temp-dir={tempfile.mkdtemp(prefix='lh', dir='/tmp')}",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"],
                                env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = None

        def dashboard_up() -> bool:
            nonlocal client
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        assert wait_for(dashboard_up, 120, 1.0)
        job = None
        deadline = time.monotonic() + 120
        while job is None and time.monotonic() < deadline:  # the agent may need a moment after the dashboard
            try:
                job = client.submit_job(entrypoint=f"{sys.executable} -c \"print('second ray ok')\"")
            except Exception as exc:  # noqa: BLE001 - "No available agent" while it starts; a bound port never
                last = exc
                time.sleep(2)
        assert job is not None, f"no job could be submitted: {last}"
        assert wait_for(lambda: client.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED), 120, 1.0)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED and "second ray ok" in client.get_job_logs(job)
    finally:
        if head is not None:
            stop_process(head, 60)
        if serve.poll() is None:
            serve.send_signal(2)  # SIGINT: it deletes its app and stops the Ray it started
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                serve.kill()
        shutil.rmtree(tmp, ignore_errors=True)
