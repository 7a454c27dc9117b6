"""Bad input gets a clear, typed error, never a hang or a deep torch traceback."""

import json
import os
import subprocess
import sys

import pytest

from pearl_ray import (InvalidParameterError, ModelNotFoundError, PearlEngine, PromptError, SamplingParams,
                       TokenizerMismatchError)
from pearl_ray.testing import TabularLM, make_word_tokenizer, save_tiny_llama


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gamma=0), "gamma"), (dict(gamma=-2), "gamma"), (dict(method="beam"), "method"),
    (dict(backend="mpi"), "backend"), (dict(prefill_threads=-1), "prefill_threads"),
    (dict(prefill_threads=1.5), "prefill_threads"),
])
def test_invalid_engine_options(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        PearlEngine(draft_model=TabularLM(), target_model=TabularLM(), **kwargs)


def test_empty_and_overlong_prompts(tiny_pair):
    engine = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"])
    for bad in ["", "   ", [], [[]]]:
        with pytest.raises(PromptError):
            engine.generate(bad if bad != [[]] else [[]], SamplingParams())
    with pytest.raises(PromptError, match="too long"):
        engine.generate([[5] * 300], SamplingParams())  # context is 256
    with pytest.raises(PromptError, match="out of range"):
        engine.generate([[5, 10_000]], SamplingParams())
    # nothing was generated for the good prompt when a later one is bad
    with pytest.raises(PromptError):
        engine.generate([[5, 6], ""], SamplingParams())


def test_missing_model_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        PearlEngine(draft=str(tmp_path / "nope"), target=str(tmp_path / "nope2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        PearlEngine(target=str(tmp_path / "empty"), method="ar")


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_pair):
    other_tok = make_word_tokenizer(tmp_path / "tok2", [f"x{i}" for i in range(92)])
    other = save_tiny_llama(tmp_path / "other", seed=3, tokenizer_dir=other_tok)
    with pytest.raises(TokenizerMismatchError, match="different tokenizers"):
        PearlEngine(draft=str(other), target=tiny_pair["target"])


def test_cli_generate_json(tiny_pair):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pearl_ray", "generate", "--draft", tiny_pair["draft"], "--target",
           tiny_pair["target"], "--method", "pearl", "--prompt", "w1 w2", "--max-new-tokens", "9",
           "--temperature", "0", "--ignore-eos", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert len(doc["outputs"][0]["token_ids"]) == 9
    assert {"acceptance_rate", "mean_accepted_len", "target_forwards", "tokens_per_s"} <= set(doc["outputs"][0]["stats"])
    bad = subprocess.run(cmd[:-1] + ["--temperature", "-1"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "temperature" in bad.stderr
