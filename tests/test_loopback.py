"""`python -m pearl_ray serve` as a user runs it, and nothing listens off loopback; a second Ray still starts.

A default ``python -m pearl_ray serve`` (its own private Ray, the default model names: a tiny pair here, see
``tiny_default_pair``) answers the ``openai`` client and a request that drafts (so the gloo link and its store
exist); then every listening socket of its whole process tree must be bound to 127.0.0.1, and none may hold
Ray's fixed default ports. While it serves, a ``ray start --head`` with Ray's defaults and a dashboard comes up
and runs a submitted job (it failed with "No available agent to submit job" while the private Ray held the
agent's port 52365). Then its target worker is killed (the server recovers and says so on the console), and
Ctrl-C ends it cleanly.
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


def processes(pid: int) -> list[tuple[psutil.Process, str]]:
    """``pid`` and its descendants, each with its command line (Ray names its workers ``ray::ActorClass``)."""
    root = psutil.Process(pid)
    out = []
    for proc in [root] + root.children(recursive=True):
        try:
            out.append((proc, " ".join(proc.cmdline())))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def listening(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, command line) of every listening TCP socket of ``pid`` and its descendants."""
    out = []
    for proc, cmd in processes(pid):
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port, cmd[:120]) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_serve_as_a_user_runs_it_listens_on_loopback_only_and_a_second_ray_starts_beside_it(tiny_default_pair,
                                                                                            ray_default_ports):
    import openai

    port, tmp = free_port(), tempfile.mkdtemp(prefix="lb", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(HF_HUB_OFFLINE="1", RAY_TMPDIR=tmp, **tiny_default_pair)  # what a user has: nothing set for Ray
    serve = subprocess.Popen([sys.executable, "-m", "pearl_ray", "serve", "--port", str(port), "--gamma", "2",
                              "--num-threads", "1", "--no-colocate"],  # two actors: the draft link's sockets exist too
                             cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True).start()
    head, rc = None, None
    try:
        assert wait_for(lambda: any("serving" in ln for ln in lines) or serve.poll() is not None, 300, 0.5)
        assert serve.poll() is None, "".join(lines[-40:])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="default-target", max_tokens=24, temperature=0,
                                             messages=[{"role": "user", "content": "What is 2 + 3?"}])
        assert out.choices[0].message.role == "assistant" and out.choices[0].message.content.strip()
        assert all(w.startswith("w") for w in out.choices[0].message.content.split())  # the tiny pair's words
        assert 0 < out.usage.completion_tokens <= 24 and out.usage.prompt_tokens > 5
        pearl = out.model_extra["pearl"]
        assert pearl["method"] == "pearl" and pearl["gamma"] == 2 and pearl["verified_tokens"] > 0, pearl
        # the console: one access line per request
        access = f"/v1/chat/completions 200 prompt_tokens={out.usage.prompt_tokens} " \
                 f"completion_tokens={out.usage.completion_tokens} latency_s="
        assert wait_for(lambda: any(access in ln for ln in lines), 30, 0.5), "".join(lines[-40:])
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

        jobs = None

        def dashboard_up() -> bool:
            nonlocal jobs
            try:
                jobs = JobSubmissionClient(f"http://127.0.0.1:{dash}")
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        assert wait_for(dashboard_up, 120, 1.0)
        job = None
        deadline = time.monotonic() + 120
        while job is None and time.monotonic() < deadline:  # the agent may need a moment after the dashboard
            try:
                job = jobs.submit_job(entrypoint=f"{sys.executable} -c \"print('second ray ok')\"")
            except Exception as exc:  # noqa: BLE001 - "No available agent" while it starts; a bound port never
                last = exc
                time.sleep(2)
        assert job is not None, f"no job could be submitted: {last}"
        assert wait_for(lambda: jobs.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED), 120, 1.0)
        assert jobs.get_job_status(job) == JobStatus.SUCCEEDED and "second ray ok" in jobs.get_job_logs(job)
        stop_process(head, 60)
        head = None

        # its target worker dies: the next requests are served again, and the console says what happened
        leaders = [proc for proc, cmd in processes(serve.pid) if "TargetLeader" in cmd]
        assert len(leaders) == 1, leaders
        leaders[0].kill()

        def recovered() -> bool:
            try:
                client.completions.create(model="default-target", prompt="Q: 2 + 3?\nA:", max_tokens=2)
                return True
            except openai.APIStatusError:
                return False

        assert wait_for(recovered, 180, 1.0), "".join(lines[-40:])
        assert wait_for(lambda: any("WARNING" in ln and "target worker" in ln and "restarted" in ln
                                    for ln in lines), 60, 0.5), "".join(lines[-40:])
        assert not any("Connecting to existing Serve app" in ln for ln in lines), "".join(lines)
        serve.send_signal(2)  # SIGINT (Ctrl-C): it deletes its app and stops the Serve and the Ray it started
        rc = serve.wait(120)
    finally:
        if head is not None:
            stop_process(head, 60)
        if serve.poll() is None:
            serve.send_signal(2)
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                serve.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    assert rc == 0, "".join(lines[-40:])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
