"""GPU pair presets: names, placement arithmetic, and finding the weights on disk without network."""

import time

import pytest

from pearl_ray.errors import InvalidParameterError, ModelNotFoundError
from pearl_ray.modeling import presets
from pearl_ray.modeling.presets import (PRESETS, engine_overrides, get_preset, locate_model, preset_names,
                                        resolve_preset_models)

PAPER_PAIRS = ("llama-3.1-8b-70b", "llama-3.2-1b-3.1-70b", "qwen2.5-7b-72b", "codellama-7b-34b")


@pytest.fixture
def empty_env(tmp_path, monkeypatch):
    """No model dir, and an empty hub cache: nothing is found."""
    monkeypatch.delenv(presets.MODEL_DIR_ENV, raising=False)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path


def fake_model(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def fake_cached(hub, model_id, sha="0123456789abcdef0123456789abcdef01234567", with_ref=True):
    repo = hub / ("models--" + model_id.replace("/", "--"))
    snap = fake_model(repo / "snapshots" / sha)
    if with_ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
    return snap


def test_paper_pairs_are_there_and_resolve_by_name():
    for name in PAPER_PAIRS:
        assert name in PRESETS
    for name, preset in PRESETS.items():
        p = get_preset(name)
        assert p is preset and p.name == name
        assert p.dtype == "bfloat16" and p.device == "cuda"
        assert "/" in p.draft and "/" in p.target and p.draft != p.target
        assert 1 <= p.gamma <= 16 and p.description
    assert preset_names()[0] == "default" and set(preset_names()[1:]) == set(PRESETS)
    assert "default" not in PRESETS


def test_placement_fits_a_node_and_tp_divides_heads():
    for p in PRESETS.values():
        assert p.gpus_needed == p.draft_num_gpus + p.tensor_parallel_size * p.target_num_gpus
        assert 0 < p.gpus_needed <= 8
        assert p.target_num_heads % p.tensor_parallel_size == 0
        assert p.target_num_kv_heads % p.tensor_parallel_size == 0
        w = p.weights_gib_per_gpu
        assert 0 < w["draft"] < 80 and 0 < w["target"] < 80  # fits an 80 GiB GPU before the KV cache
        assert p.peak_weights_gib_per_gpu < 80
    assert get_preset("llama-3.1-8b-70b").gpus_needed == 5
    assert get_preset("codellama-7b-34b").gpus_needed == 3
    small = get_preset("llama-3.2-1b-3.1-8b")
    assert small.gpus_needed == 1 and small.shares_gpu
    # 70.6e9 params * 2 bytes / 4 ranks ~ 32.9 GiB
    assert get_preset("llama-3.1-8b-70b").weights_gib_per_gpu["target"] == pytest.approx(32.9, abs=0.5)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(InvalidParameterError) as exc:
        get_preset("llama-9000")
    for name in PRESETS:
        assert name in str(exc.value)
    with pytest.raises(InvalidParameterError, match="default-draft"):
        get_preset("default")


def test_missing_models_fail_fast_naming_each(empty_env):
    preset = get_preset("llama-3.1-8b-70b")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_preset_models(preset)
    assert time.perf_counter() - t0 < 1.0
    msg = str(exc.value)
    for mid in preset.model_ids:
        assert mid in msg
        assert f"hf download {mid}" in msg
    assert "HF_TOKEN" in msg and str(empty_env / "hf_home" / "hub") in msg
    with pytest.raises(ModelNotFoundError):
        engine_overrides(preset)


def test_only_the_missing_model_is_named(empty_env, monkeypatch):
    root = empty_env / "models"
    fake_model(root / "Qwen" / "Qwen2.5-7B-Instruct")
    monkeypatch.setenv(presets.MODEL_DIR_ENV, str(root))
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_preset_models(get_preset("qwen2.5-7b-72b"))
    msg = str(exc.value)
    assert "Qwen/Qwen2.5-72B-Instruct" in msg and "Qwen/Qwen2.5-7B-Instruct\n" not in msg
    assert "HF_TOKEN" not in msg  # Qwen is not gated


def test_model_dir_layouts(empty_env, monkeypatch):
    root = empty_env / "models"
    draft = fake_model(root / "meta-llama" / "Llama-3.1-8B-Instruct")  # <org>/<name>
    target = fake_model(root / "Llama-3.1-70B-Instruct")  # <name>
    (root / "meta-llama" / "Llama-3.2-1B-Instruct").mkdir(parents=True)  # no config.json: not a model
    monkeypatch.setenv(presets.MODEL_DIR_ENV, str(root))
    preset = get_preset("llama-3.1-8b-70b")
    assert resolve_preset_models(preset) == (str(draft), str(target))
    assert locate_model("meta-llama/Llama-3.2-1B-Instruct") is None
    over = engine_overrides(preset)
    assert over == {"draft": str(draft), "target": str(target), "tensor_parallel_size": 4, "dtype": "bfloat16",
                    "device": "cuda", "gamma": preset.gamma, "draft_num_gpus": 1.0, "target_num_gpus": 1.0,
                    "backend": "ray", "max_num_seqs": 64, "kv_budget_tokens": 431104}


def test_hub_cache_layout_is_found(empty_env, monkeypatch):
    hub = empty_env / "hf_home" / "hub"
    draft = fake_cached(hub, "codellama/CodeLlama-7b-Instruct-hf")
    target = fake_cached(hub, "codellama/CodeLlama-34b-Instruct-hf", sha="f" * 40, with_ref=False)  # pinned rev
    assert resolve_preset_models(get_preset("codellama-7b-34b")) == (str(draft), str(target))
    # HF_HUB_CACHE wins over HF_HOME, read when called (not when huggingface_hub was imported)
    other = empty_env / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert locate_model("codellama/CodeLlama-7b-Instruct-hf") is None
    moved = fake_cached(other, "codellama/CodeLlama-7b-Instruct-hf")
    assert locate_model("codellama/CodeLlama-7b-Instruct-hf") == str(moved)


def test_model_dir_comes_before_the_hub_cache(empty_env, monkeypatch):
    mid = "Qwen/Qwen2.5-7B-Instruct"
    fake_cached(empty_env / "hf_home" / "hub", mid)
    mine = fake_model(empty_env / "models" / "Qwen" / "Qwen2.5-7B-Instruct")
    monkeypatch.setenv(presets.MODEL_DIR_ENV, str(empty_env / "models"))
    assert locate_model(mid) == str(mine)


def test_bad_ids_are_not_found(empty_env):
    for bad in ("", "no-slash", "../etc/passwd", None, 3):
        assert locate_model(bad) is None


def test_the_engine_job_and_serve_config_take_a_preset(empty_env, monkeypatch):
    """Where a preset lands: the engine's arguments (explicit ones win), the job's settings, the Serve config
    (its bundles: replica, draft, one per target rank), and hub ids resolving to the local copies."""
    from pearl_ray.engine import apply_preset
    from pearl_ray.evals.gsm8k_job import UsageError, parse_settings
    from pearl_ray.modeling.resolve import resolve_path
    from pearl_ray.serve import ServeConfig

    root = empty_env / "models"
    draft = fake_model(root / "meta-llama" / "Llama-3.1-8B-Instruct")
    target = fake_model(root / "meta-llama" / "Llama-3.1-70B-Instruct")
    monkeypatch.setenv(presets.MODEL_DIR_ENV, str(root))
    d, t, method, gamma, backend, rest = apply_preset("llama-3.1-8b-70b", None, None, "pearl", 4, "local",
                                                      {"preset": "llama-3.1-8b-70b", "dtype": "float16"})
    assert (d, t, gamma, backend) == (str(draft), str(target), 5, "ray")
    assert rest["tensor_parallel_size"] == 4 and rest["device"] == "cuda" and rest["dtype"] == "float16"
    assert apply_preset("default", None, None, "pearl", 4, "local", {})[:2] == ("default-draft", "default-target")
    assert resolve_path("meta-llama/Llama-3.1-70B-Instruct") == str(target)

    s = parse_settings(["--preset", "llama-3.1-8b-70b", "--limit", "1", "--out", str(empty_env / "o"),
                        "--tensor-parallel-size", "8"])
    assert (s.draft, s.target, s.tensor_parallel_size, s.dtype, s.gamma) == (str(draft), str(target), 8, "bfloat16", 5)
    with pytest.raises(UsageError, match="Qwen/Qwen2.5-72B-Instruct"):
        parse_settings(["--preset", "qwen2.5-7b-72b", "--out", str(empty_env / "o2")])

    c = ServeConfig(preset="llama-3.1-8b-70b")
    assert (c.draft, c.target, c.tensor_parallel_size, c.gamma) == (
        "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct", 4, 5)
    assert c.bundles()[1:] == [{"CPU": 1.0, "GPU": 1.0}] * 5 and c.served_name == "Llama-3.1-70B-Instruct"
    assert ServeConfig(preset="llama-3.1-8b-70b", tensor_parallel_size=8).bundles().count({"CPU": 1.0, "GPU": 1.0}) == 9
    with pytest.raises(Exception, match="unknown preset"):
        ServeConfig(preset="nope")
