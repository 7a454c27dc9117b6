"""``backend="ray"``: the draft and the target run at the same time in separate Ray actors.

``RayBackend`` is what ``PearlEngine`` holds when ``backend="ray"``: it starts (or joins) Ray, reserves a
placement group with one bundle for the draft and one for the target (``STRICT_PACK`` on one node by
default, ``STRICT_SPREAD`` to put them on different nodes), starts the ``Coordinator`` actor, measures the
cost ratio for automatic gamma, and forwards each request to the coordinator.
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group

from .actors import HFModelFactory, ObjectFactory
from .coordinator import Coordinator
from .errors import InvalidParameterError, PearlError, TargetUnavailable
from .models import check_same_tokenizer

log = logging.getLogger(__name__)
PLACEMENTS = ("STRICT_PACK", "STRICT_SPREAD", "PACK", "SPREAD")


def init_local_ray(num_cpus: int | None = None, num_gpus: int | None = None, **kwargs) -> None:
    """Start a private local Ray instance bound to 127.0.0.1 unless one is already running here."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             log_to_driver=False, **kwargs)


class RayBackend:
    def __init__(self, engine, draft=None, target=None, draft_model=None, target_model=None, tokenizer=None,
                 eos_token_ids=None, channel: str = "collective", placement: str = "STRICT_PACK",
                 draft_num_gpus: float = 0, target_num_gpus: float = 0, draft_num_cpus: float = 1,
                 target_num_cpus: float = 1, num_threads: int = 1, round_timeout_s: float = 30.0,
                 start_timeout_s: float = 600.0, measure_context: int = 128, ray_init: dict | None = None):
        if placement not in PLACEMENTS:
            raise InvalidParameterError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        from .channels import CHANNEL_NAMES

        if channel not in CHANNEL_NAMES:
            raise InvalidParameterError(f"channel must be one of {CHANNEL_NAMES}, got {channel!r}")
        if round_timeout_s <= 0 or start_timeout_s <= 0:
            raise InvalidParameterError("timeouts must be positive")
        init_local_ray(**(ray_init or {}))
        method = engine.method
        self.round_timeout_s = round_timeout_s
        # Tokenizer and limits are read here (cheap); weights load only inside the workers.
        if target_model is None:
            if target is None:
                raise InvalidParameterError("target is required (a model path, preset name or hub id)")
            from transformers import AutoConfig, AutoTokenizer

            from .models import _local_or_hub

            tpath = _local_or_hub(target)
            tokenizer = AutoTokenizer.from_pretrained(tpath)
            vocab = max(len(tokenizer), AutoConfig.from_pretrained(tpath).vocab_size)
            target_factory = HFModelFactory(tpath, engine.device, engine.dtype)
            if eos_token_ids is None:
                from transformers import GenerationConfig

                try:
                    eos = GenerationConfig.from_pretrained(tpath).eos_token_id
                except OSError:
                    eos = tokenizer.eos_token_id
                eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        else:
            target_factory = ObjectFactory(target_model)
            vocab = target_model.vocab_size
        draft_factory = None
        if draft_model is not None:
            draft_factory = ObjectFactory(draft_model)
        elif draft is not None:
            from transformers import AutoTokenizer

            from .models import _local_or_hub

            dpath = _local_or_hub(draft)
            if tokenizer is not None:
                check_same_tokenizer(AutoTokenizer.from_pretrained(dpath), tokenizer, draft, target or "target")
            draft_factory = HFModelFactory(dpath, engine.device, engine.dtype, target_vocab_size=vocab)
        elif method != "ar":
            raise InvalidParameterError(f"method {method!r} needs a draft model")
        self.tokenizer, self.eos_token_ids = tokenizer, tuple(eos_token_ids or ())
        # Placement: bundle 0 = draft, bundle 1 = target leader.
        bundles = [{"CPU": draft_num_cpus, "GPU": draft_num_gpus}, {"CPU": target_num_cpus, "GPU": target_num_gpus}]
        bundles = [{k: v for k, v in b.items() if v} or {"CPU": 0.001} for b in bundles]
        self.pg = placement_group(bundles, strategy=placement)
        try:
            ray.get(self.pg.ready(), timeout=start_timeout_s if placement == "STRICT_PACK" else min(60, start_timeout_s))
        except GetTimeoutError as exc:
            remove_placement_group(self.pg)
            raise PearlError(f"could not place draft and target with {placement} bundles {bundles}: "
                             f"not enough resources or nodes in the Ray cluster") from exc
        opts = lambda c, g: {"num_cpus": c, "num_gpus": g}  # noqa: E731
        self.coordinator = Coordinator.remote(draft_factory, target_factory, self.pg, opts(draft_num_cpus, draft_num_gpus),
                                              opts(target_num_cpus, target_num_gpus), channel, round_timeout_s,
                                              num_threads, start_timeout_s)
        try:
            self.info = ray.get(self.coordinator.ready.remote(start_timeout_s), timeout=start_timeout_s + 5)
        except (GetTimeoutError, RayActorError, ray.exceptions.RayTaskError) as exc:
            self.shutdown()
            raise PearlError(f"workers failed to start: {exc}") from exc
        self.max_context = self.info["target"]["max_context"]
        self.vocab_size = self.info["target"]["vocab_size"]
        self.measured = None
        self.gamma = engine.options.gamma
        if self.gamma is None:
            if draft_factory is None:
                self.gamma = 1
            else:
                self.measured = ray.get(self.coordinator.measure.remote(measure_context), timeout=start_timeout_s)
                self.gamma = self.measured["auto_gamma"]
                log.info("auto gamma = %d (measured %s)", self.gamma, self.measured)
        self.engine = engine

    def generate_one(self, prompt_ids, params, stop, seed, on_tokens, method):
        opts = self.engine.round_options(params, method)
        if method == "ar":
            from dataclasses import replace

            opts = replace(opts, use_draft=False, pre_verify=True)
        args = (prompt_ids, opts, stop, seed, params.temperature, params.top_k, params.top_p, method)
        deadline = self.round_timeout_s * (params.max_new_tokens + 2) + 60
        try:
            if on_tokens is None:
                return ray.get(self.coordinator.generate.remote(*args), timeout=deadline)
            t0 = time.monotonic()
            for ref in self.coordinator.generate_stream.options(num_returns="streaming").remote(*args):
                item = ray.get(ref, timeout=max(1.0, deadline - (time.monotonic() - t0)))
                if item.get("done"):
                    return item["token_ids"], item["stats"]
                on_tokens(item["token_ids"])
            raise PearlError("the token stream ended without a result")
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else None
            if isinstance(cause, PearlError):
                raise cause from None
            raise
        except (RayActorError, GetTimeoutError) as exc:
            raise TargetUnavailable(f"the coordinator failed or timed out: {exc.__class__.__name__}") from exc

    def draft_ready(self) -> bool:
        return ray.get(self.coordinator.draft_ready.remote(), timeout=30)

    def handles(self) -> dict:
        return ray.get(self.coordinator.handles.remote(), timeout=30)

    def shutdown(self) -> None:
        coord, self.coordinator = getattr(self, "coordinator", None), None
        if coord is not None:
            try:
                ray.get(coord.shutdown.remote(), timeout=30)
            except Exception as exc:  # the coordinator may already be gone
                log.debug("coordinator shutdown: %s", exc)
            ray.kill(coord)
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None:
            remove_placement_group(pg)
