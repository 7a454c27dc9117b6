"""jobs/gpu_check.py: the same checks on CPU (the report's shape, ok), the no-CUDA exit, the comparison logic.

The check runs on the names ``default-draft`` / ``default-target``; here they lead to a tiny pair
(``tiny_default_pair``), since what is checked is the script, not the embedded pair (test_default_pair.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "jobs" / "gpu_check.py"
SMALL = ["--device", "cpu", "--dtypes", "float32", "--max-new-tokens", "16", "--prompts", "1", "--num-threads", "1"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_report(report: dict, backends: list[str], new_tokens: int = 16) -> None:
    assert report["ok"] is True and report["complete"] is True
    assert report["mismatches"] == [] and report["problems"] == [] and report["errors"] == []
    assert report["device"] and report["torch"] and report["device_kind"] == "cpu"
    assert [p["name"] for p in report["prompts"]] == ["chat-0"]
    rows = {(r["backend"], r["dtype"], r["method"]): r for r in report["results"]}
    assert set(rows) == {(b, "float32", m) for b in backends for m in ("ar", "sd", "pearl")}
    ref = rows[(backends[0], "float32", "ar")]["tokens"]
    for (backend, _, method), r in rows.items():
        assert r["tokens"] == ref and len(r["tokens"][0]) == new_tokens == r["new_tokens"]
        assert r["tok_s"] > 0 and r["speedup_vs_ar"] > 0
        if method == "ar":
            assert r["acceptance"] is None and r["drafted_tokens"] == 0
        else:
            assert 0.0 <= r["acceptance"] <= 1.0 and r["drafted_tokens"] > 0


def test_cpu_local_check_writes_a_passing_report(gpu_check, tmp_path, capsys, monkeypatch, tiny_default_pair):
    """Every local schedule gives the target's tokens; each run counts its rounds per schedule and their cost:
    forced in turn, PEARL never runs at once; forced at once, every drafting PEARL round does."""
    for name, value in tiny_default_pair.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "report.json"
    backends = ["local", "local-turn", "local-once"]
    args = [*SMALL[:-1], "2", "--backends", ",".join(backends), "--timeout-s", "300", "--out", str(out)]
    rc = gpu_check.main(args)  # two threads: the sides can run at once
    assert rc == 0
    report = json.loads(out.read_text())
    check_report(report, backends)
    rows = {(r["backend"], r["method"]): r for r in report["results"]}
    assert "once" not in rows[("local-turn", "pearl")]["rounds"] and rows[("local-turn", "pearl")]["rounds"]["turn"]
    assert "turn" not in rows[("local-once", "pearl")]["rounds"] and rows[("local-once", "pearl")]["rounds"]["once"]
    assert all(ms > 0 for r in rows.values() for ms in r["round_ms"].values())
    printed = capsys.readouterr().out
    assert "OK: report in" in printed and "once" in printed


@pytest.mark.slow
@pytest.mark.ray
def test_cpu_ray_check_in_a_subprocess(tmp_path, tiny_default_pair):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own private Ray
    env.update(tiny_default_pair)
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--backends", "ray,ray-colocated", "--timeout-s", "240",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], report.get("problems"))
    check_report(report, ["ray", "ray-colocated"])
    assert report["ray"]


def test_cuda_without_cuda_exits_2(gpu_check, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report.json"
    rc = gpu_check.main(["--device", "cuda", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "sees no CUDA device" in err and "--device cpu" in err and "Traceback" not in err
    assert not out.exists()


def test_bad_options_exit_2(gpu_check, capsys):
    for argv in (["--dtypes", "float8"], ["--backends", "vllm"], ["--prompts", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def _run(tokens_by_method: dict, drafted: int = 10) -> dict:
    methods = {}
    for method, tokens in tokens_by_method.items():
        methods[method] = {"tokens": tokens, "tok_s": 1.0, "new_tokens": sum(map(len, tokens)), "acceptance": None,
                           "drafted_tokens": 0 if method == "ar" else drafted, "draft_failures": 0,
                           "fallback_rounds": 0}
    return {"methods": methods}


def test_compare_finds_mismatches_and_dtype_agreement(gpu_check):
    prompts = [{"name": "chat-0"}, {"name": "code-0"}]
    same = [[1, 2, 3], [4, 5, 6]]
    runs = {"local": {"float32": _run({"ar": same, "sd": same, "pearl": [[1, 2, 3], [4, 9, 6]]}),
                      "bfloat16": _run({"ar": [[1, 2, 7], [4, 5, 6]], "sd": [[1, 2, 7], [4, 5, 6]],
                                        "pearl": [[1, 2, 7], [4, 5, 6]]})},
            "ray": {"float32": _run({"ar": same, "sd": same, "pearl": same}, drafted=0)}}
    mismatches, agreement = gpu_check.compare(runs, prompts, ["float32", "bfloat16"], ["local", "ray"])
    assert mismatches == [{"dtype": "float32", "backend": "local", "method": "pearl", "prompt": "code-0",
                           "prompt_index": 1, "reference": "local/ar", "first_diff": 1, "got": [9, 6],
                           "expected": [5, 6]}]
    a = agreement["local"]["float32_vs_bfloat16"]
    assert a["identical_prompts"] == 1 and a["common_prefix_tokens"] == [2, 3]
    assert a["agreement"] == pytest.approx(5 / 6, abs=1e-3)
    problems = gpu_check.draft_problems(runs)
    assert {(p["backend"], p["method"]) for p in problems} == {("ray", "sd"), ("ray", "pearl")}
    assert gpu_check.first_diff([1, 2], [1, 2, 3]) == 2 and gpu_check.first_diff([1], [1]) is None


def test_ulp_and_tie_classification(gpu_check, monkeypatch, tiny_default_pair):
    assert gpu_check.ulp("bfloat16", 2.5) == 2.0 ** -6 and gpu_check.ulp("bfloat16", 20.25) == 2.0 ** -3
    assert gpu_check.ulp("float32", 1.0) == 2.0 ** -23
    from pearl_ray.modeling.resolve import load_tokenizer, resolve_path

    for name, value in tiny_default_pair.items():
        monkeypatch.setenv(name, value)
    tokenizer = load_tokenizer(resolve_path("default-target"))
    prompts = [{"name": "code-0", "text": "def add(a, b):\n"}]
    runs = {"local": {"float32": {"methods": {"ar": {"tokens": [[]]}}}}}
    same = {"dtype": "float32", "prompt_index": 0, "reference": "local/ar", "first_diff": 0, "expected": [5],
            "got": [5]}
    other = {**same, "got": [6]}
    prefix = {**same, "got": []}
    args = gpu_check.parse_args(["--device", "cpu"])
    gpu_check.classify_mismatches([same, other, prefix], runs, prompts, tokenizer, args)
    assert same["margin"] == 0 and same["near_tie"] is True
    assert other["near_tie"] == (other["margin_ulps"] <= args.tie_ulps) and other["margin_ulps"] > 0
    assert prefix["near_tie"] is False and prefix["margin"] is None
