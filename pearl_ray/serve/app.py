"""Building and running the Serve application: ``build_app(config)`` (the ``import_path`` of a
``serve run``/``serve deploy`` config file), ``deploy`` (bounded wait until it runs) and ``run_blocking``
(the ``serve`` CLI command).
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from ray import serve
from ray.serve.config import BackpressureConfig

from .config import ServeConfig
from .ingress import OpenAIIngress
from .server import PearlServer

log = logging.getLogger(__name__)


def build_app(config: dict | ServeConfig | None = None):
    """The application: ``OpenAIIngress`` -> ``PearlServer`` (one draft/target pair per replica).

    ``config``: a ``ServeConfig`` or its dict (a config file's ``args``). Serve's builder contract: one
    parameter; ``make_app`` also takes models to inject.
    """
    return make_app(config)


def make_app(config: dict | ServeConfig | None = None, models: dict | None = None):
    """``build_app`` with optional ready models (``draft_model``, ``target_model``, ``tokenizer``,
    ``eos_token_ids``) that every replica uses instead of loading ``config.draft``/``config.target``."""
    if not isinstance(config, ServeConfig):
        config = ServeConfig.model_validate(config or {})
    c = config
    scaling = ({"autoscaling_config": c.autoscaling_config} if c.autoscaling_config is not None
               else {"num_replicas": c.num_replicas})
    server = PearlServer.options(
        max_ongoing_requests=c.max_ongoing_requests, max_queued_requests=c.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=c.backpressure_status, retry_after_s=c.retry_after_s),
        placement_group_bundles=c.bundles(), placement_group_strategy=c.placement_strategy,
        ray_actor_options={"num_cpus": c.replica_num_cpus}, **scaling,
    ).bind(c.model_dump(), models)
    return OpenAIIngress.options(
        num_replicas=c.ingress_num_replicas, max_ongoing_requests=c.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(server, c.model_dump())


def deploy(config: ServeConfig, name: str = "pearl", route_prefix: str = "/", timeout_s: float = 900.0,
           models: dict | None = None) -> None:
    """Deploy the application and wait until it runs; past ``timeout_s`` (e.g. resources that never come)
    delete it and raise ``TimeoutError`` with Serve's last status message."""
    serve.run_many([serve.RunTarget(make_app(config, models), name=name, route_prefix=route_prefix)],
                   wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        state = app.status.value if app is not None else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED" or time.monotonic() > deadline:
            message = app.message if app is not None else ""
            serve.delete(name)
            raise TimeoutError(f"application {name!r} did not start ({state} after "
                               f"{timeout_s - max(0.0, deadline - time.monotonic()):.0f} s): {message[-2000:]}")
        time.sleep(1.0)


def run_blocking(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "pearl",
                 route_prefix: str = "/", timeout_s: float = 900.0, metrics_export_port: int | None = None,
                 ready=print) -> None:
    """Start or join Ray, start Serve on ``host:port`` (or use the running one), deploy, check that the
    endpoint answers, and block until SIGINT/SIGTERM; then delete the application (and stop what this call
    started). ``metrics_export_port``: Prometheus port of a Ray started here."""
    import ray

    from ..runtime.backend import connect_ray

    if not config.effective_api_keys() and not _loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach port %d can use the model (and its "
                    "compute); pass --api-key KEY or set $%s", host, port, config.api_key_env or "PEARL_RAY_API_KEY")
    # the replicas' logs (access lines, worker restarts) come to this console
    how = connect_ray(log_to_driver=True, **({"_metrics_export_port": metrics_export_port} if metrics_export_port else {}))
    if how != "started" and metrics_export_port:
        log.warning("joined a running Ray: metrics go to its own export port, not %d", metrics_export_port)
    started_serve = not _serve_running()
    serve.start(http_options={"host": host, "port": port})
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    quiet = _OwnServeFilter()
    if started_serve:  # deploying finds the Serve started just above and says its options "will not be applied"
        logging.getLogger("ray.serve").addFilter(quiet)
    try:
        deploy(config, name, route_prefix, timeout_s)
        logging.getLogger("ray.serve").removeFilter(quiet)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{route_prefix.rstrip('/')}"
        if not _answers(url + "/health", 60.0):
            raise TimeoutError(f"nothing answers at {url}/health: " + (
                "the port may be taken" if started_serve else
                "Serve already ran in this cluster with other HTTP options (they are kept)"))
        ready(f"serving {config.served_name!r} at http://{host}:{port}{route_prefix.rstrip('/')}/v1 "
              f"(application {name!r}; Ctrl-C stops it)")
        while not stop.wait(1.0):
            pass
    finally:
        logging.getLogger("ray.serve").removeFilter(quiet)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(name)
            if started_serve:
                serve.shutdown()
        finally:
            if how == "started":
                ray.shutdown()


class _OwnServeFilter(logging.Filter):
    """Drops Serve's "Connecting to existing Serve app ... will not be applied" line: said of the Serve this
    process has just started with these very options, it is false."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Connecting to existing Serve app" not in record.getMessage()


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _answers(url: str, timeout_s: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except OSError:  # refused, reset, 503 while the proxy starts
            time.sleep(0.5)
    return False


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None
