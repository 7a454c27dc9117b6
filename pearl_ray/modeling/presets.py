"""Named draft/target pairs for GPU clusters: the pairs of the PEARL paper, ready to name with ``--preset`` or
``PearlEngine(preset=...)``.

A preset only describes a pair (hub ids, placement, dtype, a gamma hint, what it needs); it downloads nothing.
``resolve_preset_models`` finds the weights on this machine, without network access, in

1. ``$PEARL_RAY_MODEL_DIR/<org>/<name>`` or ``$PEARL_RAY_MODEL_DIR/<name>`` (several roots may be given,
   separated by ``os.pathsep``), a directory holding a ``config.json``;
2. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
   read with ``huggingface_hub.try_to_load_from_cache``, which only looks at the filesystem,

and names every missing model, where it looked and how to fetch it otherwise.

The embedded CPU pair (``default-draft`` / ``default-target``) is not in ``PRESETS``: it is built from a
package, not found in a cache, and it is named ``default`` (``EMBEDDED_PRESET``) by the CLI.
``preset_names()`` lists it first, with the GPU presets after it.

Gamma hints. PEARL's window should be about the cost ratio c = t_target / t_draft of one decoding step
(the draft then fills its window while the target verifies the previous one). The official PEARL scripts
use gamma 5 for 7B/70B pairs and 3 for CodeLlama 7B/34B; the hints below follow that, scaled by the ratio
of the per-GPU weight bytes each side reads per token (decoding is bound by memory bandwidth), tempered by
the fixed per-layer overheads that keep a small model's step from being proportionally fast. With
``gamma=None`` the Ray backend measures c itself; the hint is where to start when it does not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameterError, ModelNotFoundError

MODEL_DIR_ENV = "PEARL_RAY_MODEL_DIR"
EMBEDDED_PRESET = "default"
"""The CLI's name for the embedded CPU pair (``default-draft`` / ``default-target``); not in ``PRESETS``."""
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4}
GATED_ORGS = ("meta-llama",)
"""Hub organisations whose models need an accepted licence and a token (``HF_TOKEN``) to download."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True, kw_only=True)
class PairPreset:
    """A draft/target pair for a GPU node. ``target_num_gpus`` is per tensor-parallel rank of the target."""

    name: str
    draft: str
    target: str
    tensor_parallel_size: int
    gamma: int
    """Draft window hint: about the pair's cost ratio (see the module doc)."""
    draft_params_b: float
    target_params_b: float
    """Parameter counts in billions, for the memory estimate."""
    target_num_heads: int
    target_num_kv_heads: int
    """Attention heads of the target: the tensor-parallel size must divide both."""
    target_num_layers: int
    target_head_dim: int
    draft_num_layers: int
    draft_num_kv_heads: int
    draft_head_dim: int
    """The rest of the attention's shape (each model's config.json): the KV cache's bytes per position."""
    description: str
    notes: str = ""
    dtype: str = "bfloat16"
    device: str = "cuda"
    draft_num_gpus: float = 1.0
    target_num_gpus: float = 1.0

    @property
    def gpus_needed(self) -> float:
        """GPUs the pair takes: the draft's plus one share per target rank."""
        return self.draft_num_gpus + self.tensor_parallel_size * self.target_num_gpus

    @property
    def model_ids(self) -> tuple[str, str]:
        return self.draft, self.target

    @property
    def weights_gib_per_gpu(self) -> dict[str, float]:
        """Approximate weight memory per GPU in GiB (params x bytes per param, the target's split over its
        ranks). The KV cache, activations and the CUDA context come on top of this."""
        per = BYTES_PER_PARAM.get(self.dtype, 2) * 1e9 / 2**30
        return {"draft": round(self.draft_params_b * per, 1),
                "target": round(self.target_params_b * per / self.tensor_parallel_size, 1)}

    @property
    def shares_gpu(self) -> bool:
        """Draft and target fit on one GPU together (fractional shares), so their memory adds up there."""
        return self.tensor_parallel_size == 1 and self.draft_num_gpus + self.target_num_gpus <= 1.0

    @property
    def peak_weights_gib_per_gpu(self) -> float:
        """Weight memory of the fullest GPU (both models when they share one)."""
        w = self.weights_gib_per_gpu
        return round(w["draft"] + w["target"], 1) if self.shares_gpu else max(w.values())

    def batch_plan(self, gpu_memory_gib: float | None = None):
        """``max_num_seqs`` and ``kv_budget_tokens`` from the memory the weights leave on each GPU
        (``gpu_batching.plan_batching``; an H100 80 GB unless ``gpu_memory_gib`` is given)."""
        from .gpu_batching import H100_GIB, ModelShape, plan_batching

        draft = ModelShape(self.draft_params_b, self.draft_num_layers, self.draft_num_kv_heads, self.draft_head_dim)
        target = ModelShape(self.target_params_b, self.target_num_layers, self.target_num_kv_heads,
                            self.target_head_dim)
        return plan_batching(draft, target, tensor_parallel_size=self.tensor_parallel_size,
                             value_bytes=BYTES_PER_PARAM.get(self.dtype, 2), shares_gpu=self.shares_gpu,
                             gpu_memory_gib=gpu_memory_gib or H100_GIB)

    def summary(self) -> str:
        """One line for listings: name, pair, GPUs, memory, description."""
        w, n = self.weights_gib_per_gpu, self.gpus_needed
        return (f"{self.name}: {self.draft} -> {self.target} (TP {self.tensor_parallel_size}), "
                f"{n:g} GPU{'' if n == 1 else 's'}, ~{w['draft']:g}/{w['target']:g} GiB weights per draft/target GPU, "
                f"gamma {self.gamma}. {self.description}")


_LLAMA3_TOKENIZER = "Llama 3.1 and 3.2 share one tokenizer (128256 ids)."

PRESETS: dict[str, PairPreset] = {p.name: p for p in (
    PairPreset(
        name="llama-3.1-8b-70b",
        draft="meta-llama/Llama-3.1-8B-Instruct", target="meta-llama/Llama-3.1-70B-Instruct",
        tensor_parallel_size=4,
        # The paper's 7B/70B pairs use gamma 5; Llama-3.1-8B reads ~15 GiB per token against ~33 GiB per rank
        # for the 70B at TP 4 plus its all-reduces, so the step ratio stays around 5.
        gamma=5,
        draft_params_b=8.03, target_params_b=70.6, target_num_heads=64, target_num_kv_heads=8,
        target_num_layers=80, target_head_dim=128, draft_num_layers=32, draft_num_kv_heads=8, draft_head_dim=128,
        description="The paper's Llama 3.1 pair: 8B draft on one GPU, 70B target over four (5 GPUs).",
        notes=_LLAMA3_TOKENIZER),
    PairPreset(
        name="llama-3.2-1b-3.1-70b",
        draft="meta-llama/Llama-3.2-1B-Instruct", target="meta-llama/Llama-3.1-70B-Instruct",
        tensor_parallel_size=4,
        # Per token the 1B reads ~2.3 GiB against ~33 GiB per 70B rank (a bytes ratio near 14), but its 16
        # layers still pay fixed per-kernel costs, so its step is not 14x shorter: a ratio near 8.
        gamma=8,
        draft_params_b=1.24, target_params_b=70.6, target_num_heads=64, target_num_kv_heads=8,
        target_num_layers=80, target_head_dim=128, draft_num_layers=16, draft_num_kv_heads=8, draft_head_dim=64,
        description="A fast 1B draft for the Llama-3.1-70B target at TP 4 (5 GPUs); lower acceptance than 8B.",
        notes=_LLAMA3_TOKENIZER),
    PairPreset(
        name="qwen2.5-7b-72b",
        draft="Qwen/Qwen2.5-7B-Instruct", target="Qwen/Qwen2.5-72B-Instruct",
        tensor_parallel_size=4,
        # Same size ratio as the paper's 7B/70B pairs: gamma 5.
        gamma=5,
        draft_params_b=7.62, target_params_b=72.7, target_num_heads=64, target_num_kv_heads=8,
        target_num_layers=80, target_head_dim=128, draft_num_layers=28, draft_num_kv_heads=4, draft_head_dim=128,
        description="Qwen2.5 7B draft on one GPU, 72B target over four (5 GPUs).",
        notes="Qwen2.5 7B and 72B share one tokenizer; both configs have vocab_size 152064."),
    PairPreset(
        name="codellama-7b-34b",
        draft="codellama/CodeLlama-7b-Instruct-hf", target="codellama/CodeLlama-34b-Instruct-hf",
        tensor_parallel_size=2,
        # The paper runs CodeLlama 7B/34B with gamma 3: 34B over two GPUs reads ~31 GiB per rank per token
        # against ~12.6 GiB for the 7B, a step ratio near 3.
        gamma=3,
        draft_params_b=6.74, target_params_b=33.7, target_num_heads=64, target_num_kv_heads=8,
        target_num_layers=48, target_head_dim=128, draft_num_layers=32, draft_num_kv_heads=32, draft_head_dim=128,
        description="The paper's code pair: CodeLlama 7B draft on one GPU, 34B target over two (3 GPUs).",
        notes="One SentencePiece tokenizer family; the 7B was trained for infilling and may carry extra "
              "infilling ids past the 34B's 32000 (not checked here), so the pair check decides at load."),
    PairPreset(
        name="llama-3.2-1b-3.1-8b",
        draft="meta-llama/Llama-3.2-1B-Instruct", target="meta-llama/Llama-3.1-8B-Instruct",
        tensor_parallel_size=1,
        # One GPU for both: the 8B step costs a few 1B steps (32 vs 16 layers, 15 vs 2.3 GiB), a ratio near 3.
        gamma=3,
        draft_params_b=1.24, target_params_b=8.03, target_num_heads=32, target_num_kv_heads=8,
        target_num_layers=32, target_head_dim=128, draft_num_layers=16, draft_num_kv_heads=8, draft_head_dim=64,
        draft_num_gpus=0.5, target_num_gpus=0.5,
        description="A small pair for one GPU (>= 24 GiB): 1B draft and 8B target share it, half each.",
        notes=_LLAMA3_TOKENIZER),
)}


def preset_names() -> list[str]:
    """Every name ``--preset`` accepts: the embedded CPU pair, then the GPU presets."""
    return [EMBEDDED_PRESET, *PRESETS]


def get_preset(name: str) -> PairPreset:
    """The preset called ``name``; ``InvalidParameterError`` listing the known names otherwise."""
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    known = ", ".join(PRESETS)
    if name == EMBEDDED_PRESET:
        raise InvalidParameterError(
            f"preset {EMBEDDED_PRESET!r} is the embedded CPU pair, not a GPU preset: use draft='default-draft', "
            f"target='default-target'. GPU presets: {known}")
    raise InvalidParameterError(f"unknown preset {name!r}; known presets: {known} "
                                f"(and {EMBEDDED_PRESET!r}, the embedded CPU pair)")


# -- finding the weights -------------------------------------------------------------------------------------
def model_dir_roots() -> list[Path]:
    """The roots in ``$PEARL_RAY_MODEL_DIR`` (``os.pathsep``-separated), as given."""
    raw = os.environ.get(MODEL_DIR_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it only once, at
    import): ``$HF_HUB_CACHE``, the legacy ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, or
    ``$XDG_CACHE_HOME/huggingface/hub`` (default ``~/.cache/huggingface/hub``)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                              "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _model_dir_candidates(model_id: str) -> list[Path]:
    org, _, repo = model_id.partition("/")
    out = []
    for root in model_dir_roots():
        out += [root / org / repo, root / repo]
    return out


def _cache_repo_dir(model_id: str) -> Path:
    return hub_cache_dir() / ("models--" + model_id.replace("/", "--"))


def _from_hub_cache(model_id: str) -> str | None:
    """The snapshot dir holding ``config.json`` for ``model_id`` in the hub cache, or None. Only the
    filesystem is read: ``refs/main``'s snapshot first, else the newest snapshot with a config."""
    cache = hub_cache_dir()
    if not (cache / ("models--" + model_id.replace("/", "--"))).is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json", cache_dir=str(cache))
    except Exception:  # noqa: BLE001 - a malformed id or cache: treat as absent, fall back below
        found = None
    if isinstance(found, str) and os.path.isfile(found):
        return str(Path(found).parent)
    # no refs/main (fetched at a pinned revision): any complete-looking snapshot will do, newest first
    snaps = _cache_repo_dir(model_id) / "snapshots"
    try:
        configs = [d / "config.json" for d in snaps.iterdir() if (d / "config.json").is_file()]
    except OSError:
        return None
    if not configs:
        return None
    return str(max(configs, key=lambda p: p.stat().st_mtime).parent)


def locate_model(model_id: str) -> str | None:
    """A local directory with ``model_id``'s weights (``org/name``), found without network: first
    ``$PEARL_RAY_MODEL_DIR/<org>/<name>`` or ``$PEARL_RAY_MODEL_DIR/<name>``, then the hub cache. A
    directory counts when it holds a ``config.json``. None when the model is on neither."""
    if not isinstance(model_id, str) or not _HUB_ID.fullmatch(model_id) or ".." in model_id.split("/"):
        return None
    for cand in _model_dir_candidates(model_id):
        if (cand / "config.json").is_file():
            return str(cand)
    return _from_hub_cache(model_id)


def _where_looked(model_id: str) -> str:
    dirs = [str(c) for c in _model_dir_candidates(model_id)]
    places = dirs if dirs else [f"${MODEL_DIR_ENV} (unset)"]
    places.append(f"the hub cache {_cache_repo_dir(model_id)}")
    return "; ".join(places)


def _fetch_hint(model_id: str) -> str:
    gated = model_id.split("/", 1)[0] in GATED_ORGS
    token = "HF_TOKEN=<your token> " if gated else ""
    org, _, repo = model_id.partition("/")
    lines = [f"fetch it: {token}hf download {model_id}   (older huggingface_hub: "
             f"{token}huggingface-cli download {model_id})",
             f"or copy it to ${MODEL_DIR_ENV}/{org}/{repo} (e.g. hf download {model_id} --local-dir "
             f"${MODEL_DIR_ENV}/{org}/{repo})"]
    if gated:
        lines.insert(0, f"gated: accept its licence at https://huggingface.co/{model_id} and use a token "
                        f"that has access")
    return "\n      ".join(lines)


def resolve_preset_models(preset: PairPreset) -> tuple[str, str]:
    """``(draft_dir, target_dir)`` of ``preset`` on this machine. Reads only the local filesystem, so it
    returns at once; ``ModelNotFoundError`` names every missing model, where it looked and how to fetch it."""
    found = {mid: locate_model(mid) for mid in dict.fromkeys(preset.model_ids)}
    missing = [mid for mid, path in found.items() if path is None]
    if missing:
        parts = [f"preset {preset.name!r} needs {len(missing)} model(s) that are not on this machine:"]
        for mid in missing:
            parts.append(f"  - {mid}\n      looked in: {_where_looked(mid)}\n      {_fetch_hint(mid)}")
        raise ModelNotFoundError("\n".join(parts))
    return found[preset.draft], found[preset.target]


def fill_unset(given: dict, preset_values: dict, is_unset) -> dict:
    """Every option the caller left unset (``is_unset(key, value)``) takes the preset's value; what the caller
    set wins. ``apply_preset`` is the rule the entry points use."""
    return {**given, **{k: v for k, v in preset_values.items() if is_unset(k, given.get(k))}}


def preset_options(name: str, resolve: bool = True) -> dict:
    """The options pair preset ``name`` sets: its models, tensor-parallel size, dtype, device, gamma, GPUs per side,
    batching and the Ray backend (the embedded preset: its two model names only). ``resolve``: the models as
    local dirs (``ModelNotFoundError`` names what is missing); False: as hub ids, found later where the models
    load (a Serve replica's node)."""
    if name == EMBEDDED_PRESET:
        return {"draft": "default-draft", "target": "default-target"}
    preset = get_preset(name)
    draft, target = resolve_preset_models(preset) if resolve else (preset.draft, preset.target)
    return {"draft": draft, "target": target, "tensor_parallel_size": preset.tensor_parallel_size,
            "dtype": preset.dtype, "device": preset.device, "gamma": preset.gamma,
            "draft_num_gpus": preset.draft_num_gpus, "target_num_gpus": preset.target_num_gpus, "backend": "ray",
            **batching_overrides(preset)}


def apply_preset(name: str, given: dict, defaults: dict, keys=None, resolve: bool = True) -> dict:
    """The one preset rule of every entry point (the engine, ``ServeConfig``, the GSM8K job): each option the
    caller left unset, i.e. absent, None or the entry point's own default (``defaults``), takes the preset's
    value; what the caller set wins. ``keys``: the options the entry point has (``ServeConfig`` has no
    ``backend``); None: all."""
    values = {k: v for k, v in preset_options(name, resolve).items() if keys is None or k in keys}
    return fill_unset(given, values, lambda k, v: v is None or (k in defaults and v == defaults[k]))


def engine_overrides(preset: PairPreset) -> dict:
    """The ``EngineConfig`` fields a preset sets, with its models resolved to local dirs (raises
    ``ModelNotFoundError`` as ``resolve_preset_models`` does). Presets run on the Ray backend."""
    return preset_options(preset.name)


def batching_overrides(preset: PairPreset) -> dict:
    """``max_num_seqs`` and ``kv_budget_tokens`` derived from the GPU memory the weights leave (H100 80 GB)."""
    plan = preset.batch_plan()
    return {"max_num_seqs": plan.max_num_seqs, "kv_budget_tokens": plan.kv_budget_tokens}
