"""The measurement suite (training/measure_pair.py) end to end on a tiny pair: every family, both protocols, the
cost ratio and the side-by-side speed table."""

import pandas as pd
import pytest

from pearl_ray.testing import CHAT_TEMPLATE, make_word_tokenizer, save_tiny_llama

from ray_utils import private_ray

pytestmark = [pytest.mark.slow, pytest.mark.ray]
shared_ray = pytest.fixture(scope="module", autouse=True)(private_ray)  # the suite's PEARL-on-Ray engine joins it


def test_measure_suite_on_a_tiny_pair(tmp_path, run_main):
    """``python -m training.measure_pair``'s ``main`` in the test process (the command form is the same
    ``main``); the chat family's prompts, built from the stdlib's sources, are cached in this process."""
    from training.measure_pair import main

    tok = make_word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(92)], chat_template=CHAT_TEMPLATE)
    target = save_tiny_llama(tmp_path / "t", seed=0, tokenizer_dir=tok, max_position_embeddings=2048)
    draft = save_tiny_llama(tmp_path / "d", seed=1, num_layers=1, tokenizer_dir=tok, max_position_embeddings=2048)
    out = tmp_path / "out"
    res = run_main(main, ["--draft", str(draft), "--target", str(target), "--num-prompts", "2", "--speed-prompts",
                          "1", "--max-new-tokens", "12", "--pearl-gamma", "3", "--out", str(out)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "LOSSLESSNESS FAILURE" not in res.stdout
    acc = pd.read_csv(out / "acceptance.csv")
    families = {"gsm8k_fewshot", "gsm8k_chat", "chat", "code", "code_chat"}
    assert set(acc.family) == families and set(acc.protocol) == {"eos", "fixed"}
    assert {"acceptance", "mean_accepted_len", "by_position", "tokens_per_target_forward"} <= set(acc.columns)
    assert acc.acceptance.between(0, 1).all()
    speed = pd.read_csv(out / "speed.csv")
    assert set(speed.family) == families and {"ar", "sd", "pearl", "pearl_over_ar"} <= set(speed.columns)
    assert (speed[["ar", "sd", "pearl"]] > 0).all().all()
    md = (out / "measure.md").read_text()
    for col in ("acceptance (eos)", "acceptance (fixed)", "PEARL/AR", " c "):
        assert col in md


def test_compare_drafts_on_a_tiny_pair(tmp_path, run_main):
    """training/compare_drafts.py: one row per draft, a column per family, target outputs cached and reused.
    Its ``main`` runs in the test process (the command form is the same ``main``)."""
    from training.compare_drafts import main

    tok = make_word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(92)], chat_template=CHAT_TEMPLATE)
    target = save_tiny_llama(tmp_path / "t", seed=0, tokenizer_dir=tok, max_position_embeddings=2048)
    drafts = [save_tiny_llama(tmp_path / f"d{i}", seed=1 + i, num_layers=1, tokenizer_dir=tok,
                              max_position_embeddings=2048) for i in range(2)]
    cache, out = tmp_path / "targets.json", tmp_path / "cmp.csv"
    argv = [*map(str, drafts), str(target), "--target", str(target), "--num-prompts", "2", "--max-new-tokens", "10",
            "--cache", str(cache), "--out", str(out)]
    res = run_main(main, argv)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    table = pd.read_csv(out)
    families = ["gsm8k_fewshot", "gsm8k_chat", "chat", "code", "code_chat"]
    assert list(table.columns) == ["draft"] + families + ["mean"] and len(table) == 3
    assert table[families].stack().between(0, 1).all()
    assert (table.iloc[2][families] == 1.0).all()  # the target as its own draft accepts everything
    stamp = cache.stat().st_mtime_ns
    res = run_main(main, argv)
    assert res.returncode == 0 and "target outputs for" not in res.stdout and cache.stat().st_mtime_ns == stamp
