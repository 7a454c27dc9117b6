"""What a new user trips on (issue 21): a private Ray that must be loopback-only, wrong model names that must
fail at once, tiny temperatures, lone surrogates, the CLI's defaults, the report's usage line."""

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

import pearl_ray
from pearl_ray import ModelNotFoundError, PearlEngine, PromptError, SamplingParams
from pearl_ray.core.sampling import warp_probs
from pearl_ray.modeling.chat import chat_text
from pearl_ray.testing import TabularLM

REPO = Path(__file__).resolve().parent.parent
TINY_TEMPERATURES = (1e-39, 1e-8, 1e-3)

RAY_SCRIPT = r"""
import json, os, sys
import psutil
import ray  # imported before anything sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, as in a user's script
from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.testing import TabularLM

eng = PearlEngine(draft_model=TabularLM(6, seed=5), target_model=TabularLM(6, seed=0), gamma=2, backend="ray",
                  transport="actor")
outs = {t: eng.generate([[1, 2]], SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=t))[0].token_ids
        for t in (1e-39, 1e-8, 1e-3)}
greedy = eng.generate([[1, 2]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
me = psutil.Process()
pids = {p.pid for p in [me] + me.children(recursive=True)}
listening = sorted({(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                    for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids})
eng.shutdown()
ray.shutdown()
print("RESULT " + json.dumps({"outs": {str(k): v for k, v in outs.items()}, "greedy": greedy, "listening": listening}))
"""


@pytest.mark.ray
def test_the_private_ray_listens_on_loopback_only_and_tiny_temperatures_decode_on_it():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    res = subprocess.run([sys.executable, "-c", RAY_SCRIPT], capture_output=True, text=True, timeout=300, env=env,
                         cwd=REPO)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert res.returncode == 0 and line, res.stderr[-3000:]
    import json

    got = json.loads(line[7:])
    assert len(got["listening"]) >= 3, got["listening"]  # the GCS, the raylet and the agents were seen
    exposed = [s for s in got["listening"] if s[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"the private Ray listens off loopback: {exposed}"
    for t, ids in got["outs"].items():  # a point mass on the argmax: the greedy tokens (no ties in this table)
        assert ids == got["greedy"], t


def test_tiny_temperatures_are_the_argmax_point_mass():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 5.0, 1.0, float("-inf")]])
    for t in (*TINY_TEMPERATURES, 1e-300):
        p = warp_probs(logits, t, top_k=0, top_p=1.0)
        assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(2))
        assert p[0].tolist() == [0.0, 0.5, 0.5, 0.0] and p[1].tolist() == [0.0, 1.0, 0.0, 0.0]
        assert torch.isfinite(warp_probs(logits, t, top_k=2, top_p=0.5)).all()
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    for method in ("pearl", "sd", "ar"):
        eng = PearlEngine(draft_model=draft, target_model=target, method=method, gamma=2)
        greedy = eng.generate([[1, 2]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
        for t in TINY_TEMPERATURES:
            out = eng.generate([[1, 2]], SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=t))[0]
            assert out.token_ids == greedy, (method, t)


def test_wrong_model_names_fail_at_once_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path / 'models' / 'nope'}"):
        PearlEngine(target="models/nope", method="ar")  # reads like "org/name", but ./models is a folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1") as exc:
        PearlEngine(target="someorg/somemodel", method="ar")  # a hub id with no local copy, offline
    assert str(tmp_path / "someorg" / "somemodel") in str(exc.value)
    assert time.perf_counter() - t0 < 5.0


def test_a_lone_surrogate_is_a_prompt_error_everywhere(tmp_path):
    from transformers import AutoTokenizer

    from pearl_ray.testing import CHAT_TEMPLATE, make_word_tokenizer

    tok = AutoTokenizer.from_pretrained(str(make_word_tokenizer(tmp_path / "tok", ["hi", "there"], CHAT_TEMPLATE)))
    assert "hi there" in chat_text(tok, [{"role": "user", "content": "hi there"}])
    with pytest.raises(PromptError, match="message 0 is not valid Unicode"):
        chat_text(tok, [{"role": "user", "content": "hi \ud800 there"}])
    eng = PearlEngine(target_model=TabularLM(6), method="ar", tokenizer=tok)
    with pytest.raises(PromptError, match="Unicode"):
        eng.encode("x \udfff")


def _cli(*args, timeout=300, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "pearl_ray", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_version_agrees_with_pyproject_and_the_cli_prints_it():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pearl_ray.__version__ == meta["project"]["version"]
    res = _cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"pearl_ray {pearl_ray.__version__}"


def test_a_flag_typo_prints_generates_usage():
    res = _cli("generate", "--prompt", "hi", "--max-new-tokns", "3")
    assert res.returncode == 2 and "usage: python -m pearl_ray generate" in res.stderr
    assert "--max-new-tokns" in res.stderr


@pytest.mark.slow
def test_generate_without_models_uses_the_default_pair_and_says_what_gamma_did(tiny_default_pair):
    """No --draft or --target: the CLI decodes with PEARL on ``default-draft`` / ``default-target``. Here those
    names lead to a tiny pair (``tiny_default_pair``): its word vocabulary in the output shows they were the
    ones loaded. The embedded pair itself runs in test_default_pair.py."""
    res = _cli("generate", "--prompt", "Q: 2 + 3?\nA:", "--max-new-tokens", "8", "--ignore-eos",
               env=tiny_default_pair)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "gamma: adaptive policy" in res.stdout and "--- pearl | 8 tokens" in res.stdout
    text = res.stdout.split("--- pearl | 8 tokens", 1)[1].split("\n", 1)[1]
    assert re.fullmatch(r"\s*(w\d+\s*|<unk>\s*|</?s>\s*|<pad>\s*)+", text), res.stdout
    assert "Loading weights" not in res.stdout + res.stderr and "it/s]" not in res.stderr


def test_gsm8k_report_without_arguments_prints_its_usage(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pearl_ray.evals.gsm8k_report"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 2 and res.stderr.startswith("usage: python -m pearl_ray.evals.gsm8k_report OUT_DIR")
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "pearl_ray.evals.gsm8k_report", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert res.returncode == 1 and "results.jsonl" in res.stderr and "Traceback" not in res.stderr


def test_the_results_folder_is_ignored_and_holds_nothing_tracked():
    """The jobs and benchmarks write under results/ by default; git must neither show nor hold it."""
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/measure/x/measure.md"], cwd=REPO)
    assert ignored.returncode == 0
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked.strip() == ""
