"""Model families: what the runners need to know about a transformers causal LM's attention layers and its
logits, and a typed refusal, at load, of the families they cannot decode with.

Two kinds of attention layer are supported, named as transformers 5.x configs name them in ``layer_types``
(or imply through ``sliding_window`` when that list is absent):

- ``full_attention``: a query sees every earlier position of its sequence, and itself;
- ``sliding_attention``: a query at position ``q`` sees the positions ``k`` with ``q - window < k <= q``
  (the last ``window`` positions, itself included; transformers' ``sliding_window_overlay``).

A model may mix the two: Gemma-2 alternates them, Gemma-3 has five sliding layers to one full, Qwen2 slides
from ``max_window_layers`` up; Mistral v0.1 and Phi-3 slide in every layer. All sliding layers share
``config.sliding_window``.

Both runners keep *every* position of every layer (``full_cache``): a sliding layer's cache would drop the
positions behind its window, and rolling back a rejected draft token must be able to bring them back into
view. The windows are applied by the attention masks: the single-request runner lets transformers build them
(its positions are the sequence's), the slot cache builds them itself from each row's logical positions
(``modeling.batched``).

Refused, with ``UnsupportedModelError`` naming the family and the reason: recurrent or linear-attention layers
(their state cannot be rolled back by masking), chunked attention, layers that share another layer's cache,
bidirectional attention, and sliding windows under an attention implementation that does not take a
ready-made mask (the slot cache supports ``sdpa`` and ``eager``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError

FULL, SLIDING = "full_attention", "sliding_attention"
MASK_IMPLEMENTATIONS = ("sdpa", "eager")
"""Attention implementations that take the slot cache's 4D masks (boolean for sdpa, additive for eager)."""

_WHY = {
    "chunked_attention": "chunked attention layers (each query sees only its own chunk)",
    "indexed_attention": "sparse indexed attention layers (their indexer keeps a cache of its own)",
    "linear_attention": "linear-attention layers, whose recurrent state cannot be rolled back to drop "
                        "rejected draft tokens",
    "conv": "convolution layers, whose recurrent state cannot be rolled back to drop rejected draft tokens",
    "hybrid": "linear-attention layers, whose recurrent state cannot be rolled back to drop rejected draft tokens",
    "hybrid_sliding": "linear-attention layers, whose recurrent state cannot be rolled back to drop rejected "
                      "draft tokens",
    "dummy": "layers that reuse another layer's key/value cache (or keep none)",
}


@dataclass(frozen=True)
class AttentionLayout:
    """The attention layers of one model, as the runners see them."""

    family: str
    """``config.model_type`` (e.g. ``gemma3_text``)."""
    layer_types: tuple[str, ...]
    """``full_attention`` or ``sliding_attention`` per decoder layer."""
    window: int | None
    """Positions a sliding layer's query sees, itself included; None without sliding layers."""

    @property
    def sliding(self) -> bool:
        return self.window is not None

    @property
    def windows(self) -> dict[str, int | None]:
        """Layer type -> its window (None: full attention), for the types this model has."""
        return {kind: (self.window if kind == SLIDING else None) for kind in dict.fromkeys(self.layer_types)}


def family_name(config) -> str:
    return str(getattr(config, "model_type", None) or type(config).__name__)


def attention_layout(config) -> AttentionLayout:
    """The layout of a transformers config (a model's or ``AutoConfig``'s), or ``UnsupportedModelError``."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    family = family_name(config)
    text = config.get_text_config(decoder=True)
    if not getattr(text, "is_causal", True) or getattr(text, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"model family {family!r} is configured for bidirectional attention "
                                    f"(a token sees later ones), which left-to-right decoding cannot use")
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
    except Exception as exc:  # noqa: BLE001 - a config transformers itself cannot lay out
        raise UnsupportedModelError(f"model family {family!r}: cannot read its attention layers "
                                    f"({type(exc).__name__}: {exc})") from exc
    odd = [t for t in dict.fromkeys(types) if t not in (FULL, SLIDING)]
    if odd:
        why = "; ".join(_WHY.get(t, f"attention layers of type {t!r}") for t in odd)
        raise UnsupportedModelError(f"model family {family!r} is not supported: it has {why}. The engine runs "
                                    f"full-attention and sliding-window attention layers only")
    windows = {int(kw["sliding_window"]) for t, kw in zip(types, kwargs) if t == SLIDING}
    if len(windows) > 1:
        raise UnsupportedModelError(f"model family {family!r}: its sliding layers have different windows "
                                    f"{sorted(windows)}; the engine supports one window per model")
    window = windows.pop() if windows else None
    if window is not None and window < 1:
        raise UnsupportedModelError(f"model family {family!r}: sliding window {window} (must be >= 1)")
    return AttentionLayout(family, tuple(types), window)


def check_model(model) -> AttentionLayout:
    """``attention_layout`` of a loaded model, plus what only the loaded model tells: the attention
    implementation transformers picked, and the decoder / LM head split the slot cache calls separately."""
    layout = attention_layout(model.config)
    if model.get_decoder() is None or model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"model family {layout.family!r} ({type(model).__name__}) has no decoder / LM "
                                    f"head split (get_decoder, get_output_embeddings)")
    impl = getattr(model.config, "_attn_implementation", None)
    if layout.sliding and impl not in MASK_IMPLEMENTATIONS:
        raise UnsupportedModelError(f"model family {layout.family!r} has sliding-window layers, which the engine runs "
                                    f"through masks it builds itself: load it with attn_implementation 'sdpa' or "
                                    f"'eager', not {impl!r}")
    return layout


def logits_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a family's ``ForCausalLM.forward`` does to the LM head's output (None: nothing), for runners
    that call the decoder and the head themselves: Gemma's final soft-capping (``cap * tanh(x / cap)``),
    Cohere's ``logit_scale`` (multiplies) and Granite's ``logits_scaling`` (divides)."""
    text = config.get_text_config(decoder=True)
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    divide = getattr(text, "logits_scaling", None)
    if cap is None and scale is None and divide is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def full_cache(config):
    """A ``DynamicCache`` in which every layer keeps every position (``DynamicLayer``), sliding ones included."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() for _ in cache.layers]
    return cache
