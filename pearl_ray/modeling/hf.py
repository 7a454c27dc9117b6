"""Model runner for Hugging Face causal LMs: load, KV-cached forwards, rollback, tokenizer checks.

Owns everything that touches transformers. Implements the ``core.sides.CausalLM`` protocol. A draft with a
*reduced vocabulary* (a ``pearl_vocab.json`` beside its weights listing which target ids its outputs
stand for) is mapped back to the full target vocabulary here: its logits are scattered into a full row
with -inf elsewhere, so q is exactly zero outside its vocabulary and speculative sampling stays lossless.
Input ids outside that vocabulary are fed as the draft's extra "unknown" id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import CPU_KERNELS
from ..platform import torch_threads
from ..errors import InvalidParameterError, ModelNotFoundError, TokenizerMismatchError
from .families import check_model, full_cache
from .kernels import pack_linears
from .resolve import eos_token_ids, resolve_path, vocab_map

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def crop_to(cache, length: int) -> None:
    """Keep the first ``length`` positions of a transformers ``DynamicCache``.

    transformers 5.x ``DynamicCache.crop`` takes a *negative* count of tokens to remove (a positive
    argument raises); 4.x took the absolute length to keep. This helper hides that difference.
    """
    current = cache.get_seq_length()
    if length < 0 or length > current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length == current:
        return
    if length == 0:
        cache.crop(-current)
        return
    cache.crop(-(current - length))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidParameterError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InvalidParameterError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def quiet_loading() -> None:
    """Keep transformers' and the hub's progress bars ("Loading weights ...") out of CLI and job output
    (also in the worker processes this one starts, through the environment)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


PREFILL_MIN_TOKENS = 32
"""A forward of at least this many tokens is a prompt pass (decoding rounds feed gamma + 1 at most)."""


_threads = torch_threads  # torch threads for a block (``modeling.batched`` imports it from here too)


class VocabMap:
    """A reduced-vocabulary draft's ids <-> the target's: inputs outside the draft's vocabulary become its
    extra "unknown" id; output logits are scattered into a full target row, -inf elsewhere (q is exactly 0
    there, so speculative sampling stays lossless)."""

    def __init__(self, vocab_size: int, draft_to_target: list[int], device: torch.device):
        ids = torch.tensor(draft_to_target, dtype=torch.long)
        if int(ids.max()) >= vocab_size:
            raise TokenizerMismatchError(f"this reduced-vocabulary draft maps to target ids up to {int(ids.max())}, "
                                         f"beyond a target vocabulary of {vocab_size}")
        self.vocab_size = vocab_size
        self.out_ids = ids.to(device)
        in_map = torch.full((vocab_size,), len(draft_to_target), dtype=torch.long)
        in_map[ids] = torch.arange(len(draft_to_target))
        self.in_map = in_map.to(device)

    def map_in(self, target_ids: torch.Tensor) -> torch.Tensor:
        return self.in_map[target_ids.to(self.in_map.device)]

    def map_out(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., draft outputs]`` -> ``[..., target vocab]`` (same dtype)."""
        full = torch.full((*logits.shape[:-1], self.vocab_size), float("-inf"), dtype=logits.dtype,
                          device=logits.device)
        full[..., self.out_ids] = logits[..., : len(self.out_ids)]
        return full

    @classmethod
    def from_dir(cls, path, device: str | torch.device = "cpu") -> "VocabMap | None":
        """The map of a reduced-vocabulary draft's folder (its ``pearl_vocab.json``), or None."""
        from .resolve import vocab_map

        meta = vocab_map(str(path))
        return None if meta is None else cls(meta["target_vocab_size"], meta["draft_to_target"], torch.device(device))


class ModelRunner:
    """What every runner over one transformers model knows: the model (in eval mode), its device, context,
    the vocabulary its logits cover and, for a reduced-vocabulary draft, the ``VocabMap``."""

    def __init__(self, model, vocab_size: int | None = None, draft_to_target: list[int] | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        cfg = model.config
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(vocab_size or cfg.vocab_size)
        self.vocab = VocabMap(self.vocab_size, draft_to_target, self.device) if draft_to_target is not None else None

    @property
    def draft_to_target(self) -> list[int] | None:
        return self.vocab.out_ids.tolist() if self.vocab is not None else None


class HFCausalLM(ModelRunner):
    """A transformers causal LM with a ``DynamicCache``; implements ``core.sides.CausalLM``."""

    def __init__(self, model, vocab_size: int | None = None, draft_to_target: list[int] | None = None):
        super().__init__(model, vocab_size, draft_to_target)
        self.cache = None
        self.prefill_threads: int | None = None  # torch threads for forwards of >= PREFILL_MIN_TOKENS tokens
        self.reset()

    def reset(self) -> None:
        # every layer keeps every position: a sliding layer's own cache could not be cropped back past its
        # window (transformers still applies the window through the masks it builds)
        self.cache = full_cache(self.model.config)

    @property
    def cache_len(self) -> int:
        return int(self.cache.get_seq_length())

    def forward(self, token_ids: list[int], num_logits: int, to_host: bool = True) -> torch.Tensor:
        """``to_host=False`` leaves the logits on the model's device (a tensor-parallel follower discards them)."""
        ids = torch.tensor([token_ids], dtype=torch.long)
        if self.vocab is not None:
            ids = self.vocab.map_in(ids)
        with torch.inference_mode(), _threads(self.prefill_threads if len(token_ids) >= PREFILL_MIN_TOKENS else None):
            out = self.model(input_ids=ids.to(self.device), past_key_values=self.cache, use_cache=True,
                             logits_to_keep=num_logits)
        logits = out.logits[0, -num_logits:].float()
        if self.vocab is not None:
            logits = self.vocab.map_out(logits)
        return logits.cpu() if to_host else logits

    def crop(self, length: int) -> None:
        crop_to(self.cache, length)


@dataclass
class LoadedModel:
    runner: HFCausalLM
    tokenizer: object
    path: str
    eos_token_ids: tuple[int, ...]


def load_model(name: str, device: str = "cpu", dtype: str = "float32", target_vocab_size: int | None = None,
               cpu_kernels: str = "onednn") -> LoadedModel:
    """Load an ``AutoModelForCausalLM`` + tokenizer from a local dir, a preset name or a hub id, for inference.
    ``cpu_kernels="onednn"``: on CPU its linear layers run through oneDNN with packed weights
    (``modeling.kernels``); ``"eager"``: torch's default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cpu_kernels not in CPU_KERNELS:
        raise InvalidParameterError(f"cpu_kernels must be one of {CPU_KERNELS}, got {cpu_kernels!r}")
    path = resolve_path(name)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
    except OSError as exc:  # hub id not reachable / not found
        raise ModelNotFoundError(f"could not load model {name!r}: {exc}") from exc
    model.requires_grad_(False)
    check_model(model)  # a family the runners cannot decode with: UnsupportedModelError, naming it and why
    if cpu_kernels == "onednn":
        pack_linears(model)
    vmap = vocab_map(path)
    draft_to_target = vmap["draft_to_target"] if vmap else None
    if vmap:
        target_vocab_size = target_vocab_size or vmap["target_vocab_size"]
    vocab = target_vocab_size or max(len(tokenizer), model.config.vocab_size)
    runner = HFCausalLM(model, vocab, draft_to_target)
    eos_ids = eos_token_ids(path, tokenizer)
    return LoadedModel(runner, tokenizer, path, eos_ids)
