"""The preallocated slot cache (``modeling.slot_cache``, ``modeling.batched``) on the tiny Llama pair.

- Against the earlier ``DynamicCache`` slot cache (``tests/dynamic_slot_cache.py``, the slow reference) and
  the single-request runner: the same logits (fp32 to 1e-5) over random feeds, rollbacks, joins and
  releases; and the same greedy tokens through the batched loop for PEARL, SD and AR.
- Join and leave under load: 200 requests through 4 slots, with the store's tensors (their addresses and
  sizes) unchanged after a warm-up call, on both sides; ``reserve`` sizes it so that it never grows.
- A join or a leave touches only its own row (the other rows' bytes are unchanged); a rollback only
  lowers a length (no tensor changes) and the next feed overwrites what was rolled back.
- Bad crops are refused with the numbers.
"""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from dynamic_slot_cache import DynamicSlotLM
from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.core.batch import BatchLoop, run_batch
from pearl_ray.modeling.batched import BatchedHFCausalLM
from pearl_ray.modeling.hf import HFCausalLM
from test_batch import _replay, _script

PROMPTS = [[1, 5, 9, 13], [1] + list(range(20, 50)), [1, 40, 7, 7, 61, 3, 88, 12, 30, 45, 2, 17, 70], [7, 8]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layout(lm: BatchedHFCausalLM) -> list[tuple[int, tuple[int, ...]]]:
    """Address and shape of every tensor the store holds."""
    return [(t.data_ptr(), tuple(t.shape)) for t in lm.store.tensors()]


def test_logits_equal_the_dynamic_cache_and_the_single_runner(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=torch.float32)
    scripts = [_script(random.Random(0), n) for n in (5, 11, 3, 40, 7, 2)]
    new_want, new = _replay(lambda: HFCausalLM(model), BatchedHFCausalLM(model), scripts, random.Random(1))
    _, old = _replay(lambda: HFCausalLM(model), DynamicSlotLM(model, compact_min=8), scripts, random.Random(1))
    assert sum(map(len, new)) > 60
    for want, got, ref in zip(new_want, new, old):
        assert len(want) == len(got) == len(ref)
        for a, b, c in zip(want, got, ref):
            assert a.shape == b.shape == c.shape
            assert (b - c).abs().max().item() < 1e-5 and (a - b).abs().max().item() < 1e-5


def test_greedy_tokens_equal_the_dynamic_cache(tiny_pair):
    """The same requests through the batched loop, 3 slots for 6 requests (joins and leaves mid-flight),
    over the new store and over the old cache: identical greedy tokens for every method."""
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=3)
    b = eng.backend
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = PROMPTS + [[3, 4, 5, 6, 7, 8, 9], [90]]
    for method in ("pearl", "sd", "ar"):
        requests = [eng.make_request(p, params, method=method, index=i) for i, p in enumerate(prompts)]
        new = run_batch(BatchLoop(b.target_lm, b.draft_lm, None, 3), requests)
        old_target = DynamicSlotLM(b.target_model.model, b.target_model.vocab_size)
        old_draft = DynamicSlotLM(b.draft_model.model, b.draft_model.vocab_size, b.draft_model.draft_to_target)
        old = run_batch(BatchLoop(old_target, old_draft, None, 3), requests)
        assert [ids for ids, _ in new] == [ids for ids, _ in old], method
        assert all(len(ids) == 24 for ids, _ in new)


def test_200_requests_through_4_slots_keep_the_store_in_place(tiny_pair):
    """After a warm-up call the store's tensors are never reallocated (same addresses and sizes at every
    forward of both sides), however requests join and leave."""
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=4, max_num_seqs=4)
    b = eng.backend
    rng = random.Random(3)
    prompts = [[rng.randint(3, 95) for _ in range(rng.randint(1, 12))] for _ in range(200)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    eng.generate([[5] * 12] * 4 + prompts[:4], params)  # warm-up: 4 rows of the longest prompt
    want = {"target": _layout(b.target_lm), "draft": _layout(b.draft_lm)}
    grown = (b.target_lm.store.reallocations, b.draft_lm.store.reallocations)
    seen = {"forwards": 0, "moved": 0, "slots": 0}
    for side, lm in (("target", b.target_lm), ("draft", b.draft_lm)):
        real = lm.forward

        def watch(feeds, lm=lm, real=real, side=side):
            out = real(feeds)
            seen["forwards"] += 1
            seen["moved"] += _layout(lm) != want[side]
            seen["slots"] = max(seen["slots"], len(lm.slots))
            return out

        lm.forward = watch
    outs = eng.generate(prompts, params)
    assert len(outs) == 200 and all(len(o.token_ids) == 10 for o in outs)
    assert seen["forwards"] > 200 and seen["moved"] == 0 and seen["slots"] <= 4
    assert (b.target_lm.store.reallocations, b.draft_lm.store.reallocations) == grown
    assert b.target_lm.slots == [] and b.target_lm.held_positions() == 0 and b.draft_lm.held_positions() == 0
    assert b.target_lm.store.rows == 4  # four rows served 200 requests


def test_reserve_sizes_the_store_once(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=torch.float32)
    lm = BatchedHFCausalLM(model, rows=4, max_len=100)
    rng = random.Random(7)
    lm.forward({s: ([rng.randint(3, 95) for _ in range(5 + s)], 1) for s in range(4)})
    layout = _layout(lm)
    assert lm.store.rows == 4 and lm.store.length >= 100 and lm.store.reallocations == 0
    assert lm.cache_bytes() == 4 * lm.store.length * lm.store.bytes_per_position()
    for _ in range(60):
        slot = rng.randrange(4)
        if rng.random() < 0.2:
            lm.release(slot)
        elif lm.cache_len(slot) > 3 and rng.random() < 0.3:
            lm.crop(slot, rng.randint(1, lm.cache_len(slot)))
        else:
            lm.forward({s: ([rng.randint(3, 95)], 1) for s in range(4) if s != slot or rng.random() < 0.5})
        assert max(lm.cache_len(s) for s in range(4)) <= 80
    assert _layout(lm) == layout and lm.store.reallocations == 0
    lm.reserve(2, 10)  # smaller than it is: nothing changes
    assert _layout(lm) == layout


def _row(lm, slot):
    """The bytes the store holds for ``slot``'s live positions, every layer."""
    row, n = lm.row_of[slot], lm.cache_len(slot)
    return [t[row, :, :n].clone() for t in lm.store.tensors()]


def test_join_leave_and_rollback_touch_only_their_own_row(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=torch.float32)
    lm = BatchedHFCausalLM(model, rows=4, max_len=64)
    rng = random.Random(2)
    lm.forward({s: ([rng.randint(3, 95) for _ in range(4 + 3 * s)], 1) for s in range(3)})
    before = {s: _row(lm, s) for s in (0, 2)}
    lm.release(1)  # a leave
    lm.forward({7: ([rng.randint(3, 95) for _ in range(9)], 1)})  # a join: the freed row, nothing else moves
    assert lm.row_of[7] == 1
    for s in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(before[s], _row(lm, s)))
    # rollback: a length goes down, no tensor changes; the next feed is computed as if never fed before
    single = HFCausalLM(model)
    single.reset()
    prompt = [rng.randint(3, 95) for _ in range(6)]
    lm.forward({3: (prompt, 1)})
    single.forward(prompt, 1)
    drafted = [rng.randint(3, 95) for _ in range(4)]
    lm.forward({3: (drafted, 4), 0: ([5], 1)})
    layout = _layout(lm)
    lm.crop(3, 7)
    assert lm.cache_len(3) == 7 and _layout(lm) == layout
    fresh = [rng.randint(3, 95) for _ in range(3)]
    got = lm.forward({3: (fresh, 3), 2: ([6, 7], 2)})[3]
    want = single.forward(drafted[:1] + fresh, 4)[1:]
    assert (got - want).abs().max().item() < 1e-5


def test_bad_crops_are_refused(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=torch.float32)
    lm = BatchedHFCausalLM(model)
    lm.forward({0: ([3, 4, 5], 1)})
    with pytest.raises(ValueError, match="of 3 positions to 4"):
        lm.crop(0, 4)
    with pytest.raises(ValueError, match="of 3 positions to -1"):
        lm.crop(0, -1)
    with pytest.raises(ValueError, match="holds nothing"):
        lm.crop(5, 2)
    lm.crop(5, 0)  # nothing to drop: fine
    lm.crop(0, 0)  # to nothing: the slot is released
    assert lm.slots == [] and lm.cache_len(0) == 0
    with pytest.raises(ValueError, match="needs >= 1 token"):
        lm.forward({1: ([], 0)})
