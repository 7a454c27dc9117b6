"""GPU batching: ``max_num_seqs`` and ``kv_budget_tokens`` from the memory the weights leave, for every preset
and every shipped GPU Serve config (pure arithmetic; docs/notes/gpu-batching.md shows the same numbers)."""

from pathlib import Path

import pytest
import yaml

from pearl_ray.modeling.gpu_batching import GIB, ModelShape, plan_batching
from pearl_ray.modeling.presets import PRESETS, get_preset
from pearl_ray.serve import ServeConfig

REPO = Path(__file__).resolve().parents[1]
LLAMA_1B, LLAMA_8B = ModelShape(1.24, 16, 8, 64), ModelShape(8.03, 32, 8, 128)


def test_the_8b_70b_pair_by_hand():
    plan = get_preset("llama-3.1-8b-70b").batch_plan()
    usable = 79.6 * 0.9 - 4.0  # per H100: the share the pair may use, less the context/activations reserve
    draft_free, target_free = usable - 8.03e9 * 2 / GIB, usable - 70.6e9 * 2 / 4 / GIB
    draft_per, target_per = 2 * 32 * 8 * 128 * 2, 2 * 80 * (8 // 4) * 128 * 2  # K+V x layers x heads x dim x bf16
    assert plan.kv_bytes_per_token == {"draft": draft_per, "target": target_per} == {"draft": 131072, "target": 81920}
    positions = min(int(draft_free * GIB // draft_per), int(target_free * GIB // target_per))
    assert plan.kv_budget_tokens == positions // 1024 * 1024 == 431104
    assert plan.max_num_seqs == min(64, plan.kv_budget_tokens // 4096) == 64


def test_a_shared_gpu_divides_by_both_models_and_big_caches_lower_the_batch():
    shared = plan_batching(LLAMA_1B, LLAMA_8B, shares_gpu=True)
    apart = plan_batching(LLAMA_1B, LLAMA_8B)
    assert shared.kv_bytes_per_token == {"shared": 32768 + 131072}
    assert shared.kv_budget_tokens < apart.kv_budget_tokens
    code = get_preset("codellama-7b-34b").batch_plan()  # the 7B draft has 32 KV heads: 512 KiB per position
    assert code.kv_bytes_per_token["draft"] == 524288 and code.max_num_seqs == code.kv_budget_tokens // 4096 == 27
    small = plan_batching(LLAMA_1B, LLAMA_8B, gpu_memory_gib=24.0, shares_gpu=True)
    assert 1 <= small.max_num_seqs < shared.max_num_seqs
    with pytest.raises(ValueError, match="no memory"):
        plan_batching(LLAMA_8B, ModelShape(70.6, 80, 8, 128))  # a 70B on one GPU


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fills_the_serve_config_and_explicit_values_win(name):
    plan = get_preset(name).batch_plan()
    assert 1 <= plan.max_num_seqs <= 64 and plan.max_num_seqs * 4096 <= plan.kv_budget_tokens
    config = ServeConfig(preset=name)
    assert (config.max_num_seqs, config.kv_budget_tokens) == (plan.max_num_seqs, plan.kv_budget_tokens)
    assert config.max_ongoing_requests == plan.max_num_seqs + 4
    mine = ServeConfig(preset=name, max_num_seqs=3, kv_budget_tokens=5000)
    assert (mine.max_num_seqs, mine.kv_budget_tokens, mine.max_ongoing_requests) == (3, 5000, 7)


def _serve_args(path: str) -> dict:
    doc = yaml.safe_load((REPO / path).read_text())
    if doc.get("kind") == "RayService":
        doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = doc["applications"]
    return app["args"]


@pytest.mark.parametrize("path, plan", [
    ("clusters/serve/pearl-8b-70b.yaml", lambda: get_preset("llama-3.1-8b-70b").batch_plan()),
    ("clusters/kuberay/rayservice.yaml", lambda: get_preset("llama-3.1-8b-70b").batch_plan()),
    ("clusters/serve/rayservice.yaml", lambda: plan_batching(LLAMA_1B, LLAMA_8B)),  # its comment names the pair
])
def test_gpu_serve_configs_batch_as_their_memory_allows(path, plan):
    args, plan = _serve_args(path), plan()
    assert (args["max_num_seqs"], args["kv_budget_tokens"]) == (plan.max_num_seqs, plan.kv_budget_tokens), path
    assert args["max_ongoing_requests"] >= args["max_num_seqs"]  # the replica lets its pair fill the batch
    assert args["autoscaling_config"]["target_ongoing_requests"] <= args["max_num_seqs"]
    config = ServeConfig.model_validate(args)
    assert config.max_num_seqs == plan.max_num_seqs
