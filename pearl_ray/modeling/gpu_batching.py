"""How many requests a GPU pair decodes at once: ``max_num_seqs`` and ``kv_budget_tokens`` from the GPU memory
left after the weights. Pure arithmetic, no torch; docs/notes/gpu-batching.md walks through it.

Per GPU:

    usable      = gpu_memory_gib x MEMORY_UTILIZATION - OVERHEAD_GIB - weights on that GPU
    kv per token = 2 (K and V) x layers x kv_heads on that GPU x head_dim x bytes per value

A target rank holds ``ceil(kv_heads / tensor_parallel_size)`` heads of every layer; the draft holds all of
its own. Draft and target both cache every position a request holds, so the pair's budget in positions is
the smallest ``usable / kv per token`` over its GPUs (a GPU the two share divides by the sum of their
per-token bytes). The slot cache is a rectangle (``modeling.slot_cache``: one row per running request, every
row with room for the longest; ``BatchedHFCausalLM.reserve`` allocates it once), so
``max_num_seqs`` is the budget divided by the row length planned for (``TOKENS_PER_SEQ``), at most
``MAX_NUM_SEQS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
H100_GIB = 79.6
"""An H100 80 GB as the driver reports it (81559 MiB)."""
MEMORY_UTILIZATION = 0.90
"""The share of a GPU's memory the pair may use (vLLM's ``gpu_memory_utilization`` default)."""
OVERHEAD_GIB = 4.0
"""Per GPU, besides weights and KV: the CUDA context, NCCL buffers, a round's activations and logits."""
TOKENS_PER_SEQ = 4096
"""Row length planned for: prompt + output + draft window of a typical chat or code request."""
MAX_NUM_SEQS = 64
"""Upper bound on requests per pair: past it a round's host-side work per request (plans, decisions, the
stop rule) grows with the batch while the draft's advantage shrinks."""
BUDGET_STEP = 1024
"""The budget is rounded down to a multiple of this (readable numbers in the configs)."""


@dataclass(frozen=True)
class ModelShape:
    """What a model's KV cache and weights cost: parameters (billions) and the attention's shape."""

    params_b: float
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, value_bytes: int, tensor_parallel_size: int = 1) -> int:
        """K and V of one position on one GPU (``tensor_parallel_size`` ranks share the KV heads)."""
        heads = math.ceil(self.num_kv_heads / tensor_parallel_size)
        return 2 * self.num_layers * heads * self.head_dim * value_bytes

    def weights_gib(self, value_bytes: int, tensor_parallel_size: int = 1) -> float:
        return self.params_b * 1e9 * value_bytes / tensor_parallel_size / GIB


@dataclass(frozen=True)
class BatchPlan:
    """The result, with every intermediate number (what the docs and the YAML comments quote)."""

    max_num_seqs: int
    kv_budget_tokens: int
    usable_gib: dict[str, float]
    kv_bytes_per_token: dict[str, int]
    positions: dict[str, int]

    def explain(self) -> str:
        parts = [f"{gpu}: {self.usable_gib[gpu]:.1f} GiB free / {self.kv_bytes_per_token[gpu]} B per position = "
                 f"{self.positions[gpu]} positions" for gpu in self.positions]
        return (f"{'; '.join(parts)} -> kv_budget_tokens {self.kv_budget_tokens}, max_num_seqs "
                f"{self.max_num_seqs} (at {TOKENS_PER_SEQ} positions per request, at most {MAX_NUM_SEQS})")


def plan_batching(draft: ModelShape, target: ModelShape, *, tensor_parallel_size: int = 1, value_bytes: int = 2,
                  shares_gpu: bool = False, gpu_memory_gib: float = H100_GIB,
                  tokens_per_seq: int = TOKENS_PER_SEQ, max_num_seqs: int = MAX_NUM_SEQS) -> BatchPlan:
    """``max_num_seqs`` and ``kv_budget_tokens`` for a pair: the draft on its own GPU and the target over
    ``tensor_parallel_size`` GPUs, or both on one GPU (``shares_gpu``).

    Example (the 8B/70B Llama pair on H100s, bf16, target at TP 4):
        >>> llama8 = ModelShape(8.03, 32, 8, 128); llama70 = ModelShape(70.6, 80, 8, 128)
        >>> p = plan_batching(llama8, llama70, tensor_parallel_size=4)
        >>> p.kv_bytes_per_token, p.max_num_seqs
        ({'draft': 131072, 'target': 81920}, 64)
    """
    budget = gpu_memory_gib * MEMORY_UTILIZATION - OVERHEAD_GIB
    if shares_gpu:
        if tensor_parallel_size != 1:
            raise ValueError("a pair that shares one GPU has no tensor parallelism")
        usable = {"shared": budget - draft.weights_gib(value_bytes) - target.weights_gib(value_bytes)}
        per_token = {"shared": draft.kv_bytes_per_token(value_bytes) + target.kv_bytes_per_token(value_bytes)}
    else:
        usable = {"draft": budget - draft.weights_gib(value_bytes),
                  "target": budget - target.weights_gib(value_bytes, tensor_parallel_size)}
        per_token = {"draft": draft.kv_bytes_per_token(value_bytes),
                     "target": target.kv_bytes_per_token(value_bytes, tensor_parallel_size)}
    if min(usable.values()) <= 0:
        raise ValueError(f"the weights leave no memory for the KV cache: {usable} GiB usable")
    positions = {gpu: int(usable[gpu] * GIB // per_token[gpu]) for gpu in usable}
    kv_budget = min(positions.values()) // BUDGET_STEP * BUDGET_STEP
    seqs = max(1, min(max_num_seqs, kv_budget // tokens_per_seq))
    return BatchPlan(seqs, kv_budget, {k: round(v, 2) for k, v in usable.items()}, per_token, positions)


if __name__ == "__main__":  # python -m pearl_ray.modeling.gpu_batching: every preset's numbers
    from .presets import PRESETS

    for preset in PRESETS.values():
        print(f"{preset.name}: {preset.batch_plan().explain()}")
