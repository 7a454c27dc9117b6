"""The model-family matrix (``conftest.FAMILY_MATRIX``): tiny random-weight pairs of Llama, Qwen2, Qwen3,
Mistral and Phi-3 (each with and without a sliding window where the family has one), Gemma-2 and Gemma-3,
built from configs (no downloads).

- Logits: the slot cache (``modeling.batched``) and the single-request runner against a slow reference that
  recomputes the whole sequence with the plain transformers model at every step (its own masks, windows and
  soft-capping), over random feeds, rollbacks, joins and releases, with prompts several times
  the window (fp32, to 1e-4).
- Greedy: PEARL and SD (an unrelated draft, and the target as its own draft) equal target-only decoding,
  which equals transformers' ``generate`` and a cache-free greedy loop, on prompts shorter and longer
  than the window, decoded as one batch.
- Sampled: a seeded PEARL request gives valid tokens, the same tokens again, and the same tokens inside a
  batch. (The sampled law itself does not depend on the family once the logits are right, which the first
  check pins, soft-capping included; test_lossless_stats and test_batch test the law.)
- Families the engine cannot run are refused before any weights load, with ``UnsupportedModelError``
  naming the family.
"""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILY_MATRIX
from pearl_ray import PearlEngine, SamplingParams, UnsupportedModelError
from pearl_ray.modeling.batched import BatchedHFCausalLM
from pearl_ray.modeling.hf import HFCausalLM
from test_batch import _replay, _script

NAMES = list(FAMILY_MATRIX)
PROMPTS = [[1, 5, 9, 13], [1] + list(range(20, 50)), [1, 40, 7, 7, 61, 3, 88, 12, 30, 45, 2, 17, 70]]
NEW = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecomputeLM:
    """The slow reference: keeps the token ids and runs the plain model over all of them at every forward
    (no cache: transformers builds the causal and sliding masks itself)."""

    def __init__(self, model):
        self.model, self.ids = model, []

    def reset(self):
        self.ids = []

    def forward(self, ids, num_logits):
        self.ids = self.ids + list(ids)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([self.ids]), use_cache=False)
        return out.logits[0, -num_logits:].float()

    def crop(self, length):
        self.ids = self.ids[:length]


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_runners_match_a_full_recompute(family_pair, name):
    model = _model(family_pair(name)["target"])
    rng = random.Random(0)
    scripts = [_script(rng, n) for n in (5, 11, 3, 40, 7)]  # sequences of up to ~70 tokens, many windows long
    batched = BatchedHFCausalLM(model)
    want, got = _replay(lambda: RecomputeLM(model), batched, scripts, rng)
    single_want, single_got = _replay(lambda: RecomputeLM(model), _OneSlot(model), scripts[:2], random.Random(1))
    for w, g in zip(want + single_want, got + single_got):
        assert len(w) == len(g)
        for a, b in zip(w, g):
            assert a.shape == b.shape and (a - b).abs().max().item() < 1e-4
    assert batched.slots == [] and batched.held_positions() == 0


class _OneSlot:
    """The single-request runner behind the slot interface ``_replay`` drives (one slot at a time)."""

    def __init__(self, model):
        self.runners = {}
        self.model = model

    def forward(self, feeds):
        out = {}
        for slot, (ids, k) in feeds.items():
            runner = self.runners.setdefault(slot, HFCausalLM(self.model))
            out[slot] = runner.forward(ids, k)
        return out

    def crop(self, slot, length):
        self.runners[slot].crop(length)

    def release(self, slot):
        self.runners.pop(slot, None)


def _greedy_loop(model, prompt, n):
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_target_only_and_transformers(family_pair, name):
    pair = family_pair(name)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    target_only = PearlEngine(target=pair["target"], method="ar")
    want = [o.token_ids for o in target_only.generate(PROMPTS, params)]
    model = _model(pair["target"])
    model.generation_config.eos_token_id = None  # as ignore_eos
    for prompt, ids in zip(PROMPTS, want):
        hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW,
                            pad_token_id=0)[0, len(prompt):].tolist()
        assert ids == hf == _greedy_loop(model, prompt, NEW)
    for draft, method, gamma in ((pair["draft"], "pearl", 3), (pair["draft"], "sd", 4), (pair["target"], "pearl", 4)):
        engine = PearlEngine(draft=draft, target=pair["target"], method=method, gamma=gamma)
        outs = engine.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == want, (method, draft)
        if draft == pair["target"]:  # the target as its own draft: every drafted token accepted
            assert all(o.stats.acceptance_rate == 1.0 for o in outs)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_is_valid_and_reproducible(family_pair, name):
    pair = family_pair(name)
    engine = PearlEngine(draft=pair["draft"], target=pair["target"], gamma=3)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=1.0, seed=7)
    alone = engine.generate([PROMPTS[1]], params)[0].token_ids
    assert len(alone) == 16 and all(0 <= t < engine.vocab_size for t in alone)
    assert engine.generate([PROMPTS[1]], params)[0].token_ids == alone
    # the same request first in a batch (its seed depends on its place in the call) beside two others
    batch = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], params)
    assert batch[0].token_ids == alone and all(len(o.token_ids) == 16 for o in batch)


def _slow_masks(pos, fed, kv_len, window):
    """``slot_mask`` one entry at a time: a real query at position q sees the row's positions k <= q (within
    the window); a padding query sees key 0 only."""
    rows, t = pos.shape
    out = torch.zeros(rows, 1, t, kv_len, dtype=torch.bool)
    for r in range(rows):
        for j in range(t):
            q = int(pos[r, j])
            for k in range(kv_len):
                if j < int(fed[r]):
                    out[r, 0, j, k] = k <= q and (window is None or q - k < window)
                else:
                    out[r, 0, j, k] = k == 0
    return out


def test_slot_masks_match_a_slow_reference():
    """Rows laid out as the slot store lays them out: each row at its own length, its new tokens right-padded
    (a row may have none this forward), keys spanning the longest row or more (a compiled forward spans
    the whole store). No query row is ever empty, even with a window of 1 on a row with nothing to feed (an
    empty row makes some attention kernels NaN)."""
    from pearl_ray.modeling.slot_cache import slot_mask

    rng = random.Random(5)
    for _ in range(20):
        rows, t = rng.randint(1, 4), rng.randint(1, 5)
        start = torch.tensor([rng.randint(0, 12) for _ in range(rows)])
        fed = torch.tensor([rng.randint(0, t) for _ in range(rows)])
        pos = start[:, None] + torch.arange(t)
        kv_len = max(1, int((start + fed).max())) + rng.choice([0, 0, 7])
        windows = {"full_attention": None, "w1": 1, "w3": 3}
        got = slot_mask(pos, fed, kv_len, windows)
        additive = slot_mask(pos, fed, kv_len, windows, torch.float32)
        for kind, window in windows.items():
            want = _slow_masks(pos, fed, kv_len, window)
            assert torch.equal(got[kind], want), (kind, pos, fed)
            assert got[kind].any(-1).all()
            assert torch.equal(additive[kind] == 0, want) and (additive[kind] < -1e30).eq(~want).all()


def _config_only(path, tokenizer_dir, family, **kw):
    """A model folder holding only a config (no weights) and the word tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.for_model(family, vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **kw).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family,kw", [
    ("qwen3_next", {}),  # linear-attention layers
    ("llama4_text", {"attention_chunk_size": 8}),  # chunked attention layers
    ("gemma3_text", {"use_bidirectional_attention": True, "head_dim": 8}),
])
def test_unsupported_families_are_refused_before_loading(tmp_path, tiny_tokenizer_dir, tiny_pair, family, kw):
    path = _config_only(tmp_path / family, tiny_tokenizer_dir, family, **kw)
    for target, draft in ((path, None), (tiny_pair["target"], path)):
        with pytest.raises(UnsupportedModelError) as err:
            PearlEngine(target=target, draft=draft, method="ar" if draft is None else "pearl")
        assert family in str(err.value)


def test_sliding_layers_need_a_mask_taking_attention(family_pair):
    from pearl_ray.modeling.families import check_model

    model = _model(family_pair("mistral-window")["target"])
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="mistral"):
        check_model(model)
    with pytest.raises(UnsupportedModelError):
        BatchedHFCausalLM(model)
    full = _model(family_pair("mistral")["target"])
    full.config._attn_implementation = "flash_attention_2"
    assert check_model(full).window is None  # full attention only: the 2D padding mask serves any implementation
