"""CPU linear layers through oneDNN with weights packed once at load time.

A plain ``nn.Linear`` on CPU calls a general GEMM that starts from the weight's plain layout on every call;
oneDNN can instead keep each weight in the blocked layout its kernels read. For decoding, where each forward
multiplies a few rows by every weight matrix, the difference dominates the step: on the 2-core
AMD EPYC these numbers come from (torch 2.13, 2 threads, fp32), a ``[8, 576] x [576, 1536]`` product took
153 us through ``F.linear`` and 51 us through oneDNN with the weight packed ahead for it, and the 49152-row LM
head 12.4 ms against 2.6 ms; prompt-sized inputs (800 rows) gained 2.3x. The packed path is the one
PyTorch's own compiler emits for frozen CPU models (``torch.ops.mkldnn._reorder_linear_weight`` once,
``torch.ops.mkldnn._linear_pointwise`` per call); here it is applied without compiling anything.

The results are the same products summed in another order: they differ from ``F.linear`` in the last bits
(max abs difference ~1e-4 on fp32 logits), as any change of kernel or batch shape does. Greedy decoding
is lossless with respect to the model as this engine computes it: target-only decoding, vanilla SD and
PEARL all use the same kernels. ``EngineConfig.cpu_kernels = "eager"`` keeps torch's default.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACK_DTYPES = (torch.float32, torch.bfloat16)


def bf16_packing_supported() -> bool:
    """Whether oneDNN can pack bf16 weights on this CPU: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and
    refuses with a RuntimeError elsewhere (an AVX2-only CPU, e.g. AMD Zen 3 or most laptops before 2022)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def packing_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """Inference-only stand-in for an ``nn.Linear`` on CPU: the weight is held in oneDNN's blocked layout
    (chosen for ``batch_hint`` rows; any row count works). Accepts inputs of any leading shape."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 8):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint), persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # an opaque call in a compiled graph (see ``packed_linear``)
            return torch.ops.pearl_ray.packed_linear(x, self.packed, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def pack_linears(model: nn.Module, batch_hint: int = 8) -> int:
    """Replace every plain ``nn.Linear`` of a CPU model in fp32/bf16 by a ``PackedLinear`` (inference only: no
    gradients flow through it); returns how many.
    Nothing changes (0) on other devices or dtypes, or where this torch build lacks the oneDNN ops; bf16
    linears stay as they are on a CPU that oneDNN cannot pack bf16 for (``bf16_packing_supported``). A tied
    LM head gets its own packed copy (the embedding table stays as it is, for lookups)."""
    if not packing_available():
        log.info("oneDNN packed linears are not available in this torch build: keeping torch's default")
        return 0
    dtypes = PACK_DTYPES if bf16_packing_supported() else (torch.float32,)
    swaps, kept_bf16 = [], 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                if child.weight.dtype in dtypes:
                    swaps.append((parent, name, child))
                elif child.weight.dtype == torch.bfloat16:
                    kept_bf16 += 1
    if kept_bf16:
        log.info("oneDNN cannot pack bf16 weights on this CPU (it needs AVX-512 or AVX-NE-CONVERT): %d bf16 "
                 "linears keep torch's default kernels", kept_bf16)
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, batch_hint))
    return len(swaps)


@torch.library.custom_op("pearl_ray::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``PackedLinear``'s product as one opaque operator, for compiled graphs (``torch.compile``): inductor's
    own lowering of the oneDNN op accepts only weights it packed itself while freezing a graph, so a graph
    over already-packed weights calls the kernel as it is. Eager forwards call the oneDNN op directly (a
    custom operator costs a little more to dispatch)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x, packed, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))
