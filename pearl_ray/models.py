"""Model runner for Hugging Face causal LMs: load, KV-cached forwards, rollback, tokenizer checks.

Owns everything that touches transformers. Implements the ``workers.CausalLM`` protocol. A draft with a
*reduced vocabulary* (a ``pearl_vocab.json`` beside its weights listing which target ids its outputs
stand for) is mapped back to the full target vocabulary here: its logits are scattered into a full row
with -inf elsewhere, so q is exactly zero outside its vocabulary and speculative sampling stays lossless.
Input ids outside that vocabulary are fed as the draft's extra "unknown" id.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidParameterError, ModelNotFoundError, TokenizerMismatchError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
VOCAB_MAP_FILE = "pearl_vocab.json"


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


class HFCausalLM:
    """A transformers causal LM with a ``DynamicCache``; implements ``workers.CausalLM``."""

    def __init__(self, model, vocab_size: int | None = None, draft_to_target: list[int] | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        cfg = model.config
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(vocab_size or cfg.vocab_size)
        self._out_ids = None
        self._in_map = None
        if draft_to_target is not None:
            ids = torch.tensor(draft_to_target, dtype=torch.long)
            self._out_ids = ids.to(self.device)
            in_map = torch.full((self.vocab_size,), len(draft_to_target), dtype=torch.long)
            in_map[ids] = torch.arange(len(draft_to_target))
            self._in_map = in_map
        self.cache = None
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @property
    def cache_len(self) -> int:
        return int(self.cache.get_seq_length())

    def forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long)
        if self._in_map is not None:
            ids = self._in_map[ids]
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), past_key_values=self.cache, use_cache=True,
                             logits_to_keep=num_logits)
        logits = out.logits[0, -num_logits:].float()
        if self._out_ids is not None:
            full = torch.full((num_logits, self.vocab_size), float("-inf"), device=logits.device)
            full[:, self._out_ids] = logits[:, : len(self._out_ids)]
            logits = full
        return logits.cpu()

    def crop(self, length: int) -> None:
        crop_to(self.cache, length)


@dataclass
class LoadedModel:
    runner: HFCausalLM
    tokenizer: object
    path: str
    eos_token_ids: tuple[int, ...]


def _local_or_hub(name: str) -> str:
    from .default_pair import resolve_preset

    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}")
    preset = resolve_preset(name)
    if preset is not None:
        return preset
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model path {str(path)!r} has no config.json (not a transformers model dir)")
        return str(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/", "~")):
        return name  # a hub id "org/name": works where the hub is reachable
    raise ModelNotFoundError(f"model path {str(path)!r} does not exist")


def load_model(name: str, device: str = "cpu", dtype: str = "float32", target_vocab_size: int | None = None,
               num_threads: int | None = None) -> LoadedModel:
    """Load an ``AutoModelForCausalLM`` + tokenizer from a local dir, a preset name or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if num_threads:
        torch.set_num_threads(num_threads)
    path = _local_or_hub(name)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
    except OSError as exc:  # hub id not reachable / not found
        raise ModelNotFoundError(f"could not load model {name!r}: {exc}") from exc
    draft_to_target = None
    vocab_file = Path(path) / VOCAB_MAP_FILE
    if vocab_file.exists():
        meta = json.loads(vocab_file.read_text())
        draft_to_target = meta["draft_to_target"]
        target_vocab_size = target_vocab_size or meta["target_vocab_size"]
    vocab = target_vocab_size or max(len(tokenizer), model.config.vocab_size)
    runner = HFCausalLM(model, vocab, draft_to_target)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return LoadedModel(runner, tokenizer, path, eos_ids)


def check_same_tokenizer(draft_tok, target_tok, draft_name: str = "draft", target_name: str = "target") -> None:
    """Refuse a pair whose tokenizers map text to different ids."""
    dv, tv = draft_tok.get_vocab(), target_tok.get_vocab()
    if dv != tv:
        only_d = len(set(dv.items()) - set(tv.items()))
        raise TokenizerMismatchError(
            f"draft {draft_name!r} and target {target_name!r} use different tokenizers "
            f"({len(dv)} vs {len(tv)} entries, {only_d} draft entries differ): draft token ids would mean "
            f"other tokens to the target. Use a draft trained with the target's tokenizer.")
