"""``ServeConfig``: everything that shapes the Serve application, in one validated, plain-data model.

It is what ``build_app`` takes, what a ``serve run``/``serve deploy`` config file (and so a KubeRay
``RayService``) passes as the application's ``args``, and what the CLI builds from its flags. Unknown keys
are refused, so a typo fails at deploy time instead of being dropped. The engine's options in it are
``serve_field``s: their defaults and checks come from their one declaration (``config.EngineConfig``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import CPU_KERNELS, OPTIONS, PLACEMENTS, SCHEDULES, Method, Transport

API_KEY_ENV = "PEARL_RAY_API_KEY"
_UNSET = object()


def serve_field(name: str, default=_UNSET):
    """A ``ServeConfig`` field for engine option ``name``: its declared default (or ``default``, where the
    endpoint's differs), bounds and help (``config.option``). Choices are the field's ``Literal`` type."""
    declared = OPTIONS[name]
    bounds = {k: v for k, v in declared.metadata["checks"].items() if k in ("ge", "gt", "le")}
    return Field(declared.default if default is _UNSET else default, description=declared.metadata["help"] or None,
                 **bounds)


def env_api_keys(name: str = API_KEY_ENV, environ=None) -> list[str]:
    """The keys in environment variable ``name``: one, or several separated by commas (blanks dropped)."""
    import os

    value = (os.environ if environ is None else environ).get(name, "")
    return [k.strip() for k in value.split(",") if k.strip()]


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- the pair (one per model replica) ------------------------------------------------------------------
    preset: str | None = serve_field("preset")
    """A GPU pair preset (``pearl_ray.modeling.presets``): fills draft, target, tensor_parallel_size, dtype,
    device, gamma and the GPUs per side where this config does not set them. Its models are found on the
    replica's node ($PEARL_RAY_MODEL_DIR or the Hugging Face cache)."""
    tensor_parallel_size: int = serve_field("tensor_parallel_size")
    """Target ranks per replica, one bundle (GPU) each: a DeepSpeed AutoTP group."""
    draft: str | None = "default-draft"
    """Draft model dir, preset or hub id; None serves target-only ("ar")."""
    target: str = "default-target"
    model_name: str | None = None
    """The id clients pass as ``model`` (default: the target's name); any other id is answered 404."""
    method: Method = serve_field("method")
    """Default method; a request may pick another with the ``method`` extension field."""
    gamma: int | None = serve_field("gamma", None)
    """Draft window; None measures the pair at start-up and picks it (auto gamma)."""
    transport: Transport = serve_field("transport")
    colocate: bool | None = serve_field("colocate")
    """Both models in the target leader's worker (its bundle; the draft's bundle's CPUs become its threads):
    no draft actor and no link; rounds pick plain decoding, SD in turn or PEARL at once (``schedule``).
    None (default): colocated for a CPU pair with one target rank (``EngineConfig.colocate``)."""
    schedule: Literal[SCHEDULES] = serve_field("schedule")
    """With ``colocate``: how the sides share the device in drafting rounds (``EngineConfig.schedule``)."""
    num_threads: int | None = serve_field("num_threads")
    device: str = serve_field("device")
    dtype: str = serve_field("dtype")
    cpu_kernels: Literal[CPU_KERNELS] = serve_field("cpu_kernels")
    """On CPU: linear layers through oneDNN with packed weights, or torch's default (``EngineConfig``)."""
    engine_options: dict = Field(default_factory=dict)
    """Further ``PearlEngine`` options (``round_timeout_s``, ``pre_verify``, ``draft_greedy``, ...)."""
    # -- resources: placement_group_bundles = [replica, draft, target] -------------------------------------
    replica_num_cpus: float = Field(0.0, ge=0)
    draft_num_cpus: float = serve_field("draft_num_cpus")
    target_num_cpus: float = serve_field("target_num_cpus")
    draft_num_gpus: float = serve_field("draft_num_gpus")
    target_num_gpus: float = serve_field("target_num_gpus")
    placement_strategy: Literal[PLACEMENTS] = serve_field("placement")
    # -- scaling and backpressure ------------------------------------------------------------------------
    num_replicas: int = Field(1, ge=1)
    autoscaling_config: dict | None = None
    """Serve's autoscaling config for the model replicas (then ``num_replicas`` is not used)."""
    max_num_seqs: int = serve_field("max_num_seqs")
    """Requests a replica's pair decodes at once (its target leader's continuous loop)."""
    kv_budget_tokens: int | None = serve_field("kv_budget_tokens")
    """KV-cache positions the replica's pair may hold for the requests it decodes at once (the engine's
    ``kv_budget_tokens``); a request that cannot fit waits, one that never could gets a 400. None: no limit."""
    max_prefill_tokens_per_round: int | None = serve_field("max_prefill_tokens_per_round")
    """Prompt tokens one round of the replica's pair feeds (the engine's ``max_prefill_tokens_per_round``):
    a longer prompt goes in chunks while the running streams keep getting tokens. None: whole prompts."""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Requests a model replica holds at once; default ``max_num_seqs`` + 4 (what its pair batches, plus a
    small queue for the next round)."""
    max_queued_requests: int = Field(8, ge=0)
    """Requests queued for a free replica slot (per ingress replica); past it: 503/429 at once."""
    backpressure_status: Literal[503, 429] = 503
    retry_after_s: float = Field(1.0, ge=0)
    ingress_num_replicas: int = Field(1, ge=1)
    ingress_max_ongoing_requests: int = Field(256, ge=1)
    # -- access ------------------------------------------------------------------------------------------
    api_keys: list[str] = Field(default_factory=list, repr=False)
    """Keys clients must send as ``Authorization: Bearer <key>`` on every ``/v1/*`` route (any one of them
    is enough); ``/health`` stays open. Empty, and ``api_key_env`` unset in the ingress's environment: no
    check."""
    api_key_env: str | None = API_KEY_ENV
    """An environment variable the ingress replica reads at start-up: one key, or several separated by
    commas, added to ``api_keys``. A Serve config file or a KubeRay secret sets it, so no key is written
    in the config itself."""
    # -- requests ------------------------------------------------------------------------------------------
    default_max_tokens: int = Field(256, ge=1)
    """``max_tokens`` when a request gives none (fewer if the context has less room)."""
    first_chunk_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for a request's first output (queueing included); then 504."""
    chunk_timeout_s: float = Field(300.0, gt=0)
    """Longest wait between two outputs of a request; then the request fails."""

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data):
        if isinstance(data, dict) and data.get("preset"):
            from ..modeling.presets import apply_preset

            # the models stay hub ids, found on the replica's node; an unknown name fails validation, listing
            # the known ones; what this config leaves out (or None) takes the preset's value
            return apply_preset(data["preset"], dict(data), {}, keys=cls.model_fields, resolve=False)
        return data

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.max_ongoing_requests is None:
            object.__setattr__(self, "max_ongoing_requests", self.max_num_seqs + 4)
        if any(not key.strip() or key != key.strip() for key in self.api_keys):
            raise ValueError("an API key must not be empty or begin or end with whitespace")
        if self.draft is None and self.method != "ar":
            raise ValueError(f"method {self.method!r} needs a draft; set draft or method='ar'")
        return self

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.target).name

    def effective_api_keys(self, environ=None) -> tuple[str, ...]:
        """``api_keys`` plus the keys in ``api_key_env`` (read from ``environ``, default ``os.environ``)."""
        from_env = env_api_keys(self.api_key_env, environ) if self.api_key_env else []
        return tuple(dict.fromkeys([*self.api_keys, *from_env]))

    def bundles(self) -> list[dict]:
        """Serve's ``placement_group_bundles``: the replica (bundle 0), then the draft and one per target rank.

        Empty sides follow ``config.bundle``'s rule."""
        from ..config import bundle

        return [bundle(self.replica_num_cpus, 0.0), bundle(self.draft_num_cpus, self.draft_num_gpus)] + [
            bundle(self.target_num_cpus, self.target_num_gpus)] * self.tensor_parallel_size
