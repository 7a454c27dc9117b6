"""An OpenAI-compatible PEARL endpoint on Ray Serve.

``build_app(config)`` -> ``OpenAIIngress`` (FastAPI: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``) -> ``PearlServer`` (one ``PearlEngine``, i.e. one draft/target pair, per
replica, in the replica's placement group). Start it with ``python -m pearl_ray serve``, with
``serve run clusters/serve/pearl.yaml``, or compose ``build_app`` from Python. See README.md.
"""

from .app import build_app, deploy, make_app, run_blocking
from .config import ServeConfig
from .ingress import OpenAIIngress
from .server import PearlServer

__all__ = ["build_app", "make_app", "deploy", "run_blocking", "ServeConfig", "OpenAIIngress", "PearlServer"]
