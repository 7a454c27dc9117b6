"""Errors that belong to one request end that request alone (``RequestFailed``), in the batched loop the local
backend steps: non-finite target rows (greedy and sampled), an out-of-memory prompt pass on joining (alone,
beside another joiner, or as a chunk of a long prompt). The requests decoded beside it give exactly the tokens
of a run without it, and every slot is freed. An error of the forward over the whole batch still escapes
``step`` (its owner fails the batch). Faults come from ``testing.FaultyLM``: requests whose prompt starts with
``MARK`` misbehave, the others see the plain tabular model. The Ray side is in ``test_ray_faults.py``."""

import dataclasses

import pytest
import torch

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.core.batch import BatchLoop, run_batch
from pearl_ray.errors import RequestFailed
from pearl_ray.testing import FaultyLM, TabularLM

MARK = [5, 5, 5]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.9, top_p=0.9, seed=11)


def _engine(fault: str, after: int = 1, max_num_seqs: int = 4) -> PearlEngine:
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    return PearlEngine(draft_model=draft, target_model=FaultyLM(target, MARK, fault, after), gamma=3,
                       max_num_seqs=max_num_seqs)


def _good(eng: PearlEngine) -> dict:
    """Requests of every method, greedy and sampled, none of them marked."""
    return {0: eng.make_request([1, 2], GREEDY, method="pearl"),
            1: eng.make_request([3], SAMPLED, method="sd", index=1),
            2: eng.make_request([4, 5, 1], GREEDY, method="ar"),
            3: eng.make_request([2, 2, 3, 1], SAMPLED, method="pearl", index=3)}


def _alone(eng: PearlEngine, requests: dict, max_num_seqs: int = 4) -> dict:
    """The reference: the same requests through a fresh loop, with nothing marked among them."""
    b = eng.backend
    outs = run_batch(BatchLoop(b.target_lm, b.draft_lm, None, max_num_seqs), list(requests.values()))
    return {key: ids for key, (ids, _) in zip(requests, outs)}


def _drain(loop: BatchLoop, got: dict, errors: dict, batch_sizes: dict | None = None) -> None:
    while not loop.idle:
        _step(loop, got, errors, batch_sizes)


def _step(loop: BatchLoop, got: dict, errors: dict, batch_sizes: dict | None = None) -> None:
    for ev in loop.step():
        if ev.finished:
            if ev.error is not None:
                errors[ev.key] = ev.error
            else:
                got[ev.key] = ev.output_ids
                if batch_sizes is not None:
                    batch_sizes[ev.key] = max(t.batch_size for t in ev.stats.round_timings)
    # what each running request's target slot holds is what its mirror says (a failed forward's rows rolled back)
    for s in loop.active:
        assert loop.target.cache_len(s.slot) == len(s.target.cached), (s.key, s.target.cached)


def _all_free(eng: PearlEngine) -> bool:
    return not eng.backend.target_lm.models and not eng.backend.draft_lm.models


@pytest.mark.parametrize("after", [1, 3])
def test_non_finite_rows_fail_only_their_request(after):
    """Marked requests (one greedy, one sampled) get NaN logits from their ``after``-th forward on: on their
    prompt pass (1) or mid-flight (3). Each ends with ``RequestFailed``; the four beside them finish with
    exactly the tokens of a run without them."""
    eng = _engine("nan", after, max_num_seqs=6)
    good = _good(eng)
    want = _alone(eng, good)
    loop = BatchLoop(eng.backend.target_lm, eng.backend.draft_lm, None, 6)
    loop.add(eng.make_request(MARK + [1], GREEDY, method="pearl"), key="nan-greedy")
    for key, r in good.items():
        loop.add(r, key=key)
    loop.add(eng.make_request(MARK + [2], SAMPLED, method="sd", index=9), key="nan-sampled")
    got, errors, sizes = {}, {}, {}
    _drain(loop, got, errors, sizes)
    assert set(errors) == {"nan-greedy", "nan-sampled"}, errors
    assert all(isinstance(e, RequestFailed) and "not finite" in str(e) for e in errors.values()), errors
    assert got == want
    assert max(sizes.values()) == 6  # they did share rounds with the marked ones
    assert loop.request_failures == 2 and _all_free(eng)


def test_out_of_memory_on_a_join_fails_only_the_joining_request():
    """Three requests decode; then a marked request (its prompt pass raises ``torch.OutOfMemoryError``) and a
    good one join in the same round. The marked one ends with ``RequestFailed``; the others, the good joiner
    included, give exactly their tokens without it (the rows that ran before the prompt pass raised were
    rolled back)."""
    eng = _engine("oom", max_num_seqs=5)
    good = _good(eng)
    want = _alone(eng, good)
    loop = BatchLoop(eng.backend.target_lm, eng.backend.draft_lm, None, 5)
    for key in (0, 1, 2):
        loop.add(good[key], key=key)
    got, errors = {}, {}
    for _ in range(2):
        _step(loop, got, errors)
    assert not got and not errors
    loop.add(eng.make_request(MARK + [1, 2], GREEDY, method="pearl"), key="oom")
    loop.add(good[3], key=3)
    _drain(loop, got, errors)
    assert set(errors) == {"oom"} and isinstance(errors["oom"], RequestFailed), errors
    assert "OutOfMemoryError" in str(errors["oom"])
    assert got == want
    assert loop.request_failures == 1 and _all_free(eng)


def test_out_of_memory_on_a_lone_join_and_in_prompt_chunks():
    """The marked request joins alone while others decode, and, with prompt chunks, reads its prompt over
    several rounds (the pass that raises is its first chunk): it fails alone either way."""
    for chunk in (None, 3):
        eng = _engine("oom", max_num_seqs=4)
        good = {k: r for k, r in _good(eng).items() if k != 3}
        want = _alone(eng, good)
        loop = BatchLoop(eng.backend.target_lm, eng.backend.draft_lm, None, 4)
        loop.max_prefill_tokens = chunk
        for key, r in good.items():
            loop.add(r, key=key)
        got, errors = {}, {}
        _step(loop, got, errors)
        loop.add(eng.make_request(MARK + [1, 2, 3, 4], GREEDY, method="sd"), key="oom")
        _drain(loop, got, errors)
        assert set(errors) == {"oom"} and got == want, (chunk, errors)
        assert _all_free(eng)


def test_an_error_of_the_whole_forward_still_escapes_step():
    """A forward with no prompt pass in it that raises is the batch's error: ``step`` raises (the local
    backend then fails every request; the Ray leader ends them with ``TargetUnavailable``)."""
    eng = _engine("nan", after=10 ** 6)
    b = eng.backend
    loop = BatchLoop(b.target_lm, b.draft_lm, None, 4)
    for key, r in _good(eng).items():
        loop.add(r, key=key)
    loop.step()  # the prompt passes

    def broken(feeds):
        raise RuntimeError("the device fell over")

    b.target_lm.forward = broken
    try:
        with pytest.raises(RuntimeError, match="fell over"):
            loop.step()
    finally:
        del b.target_lm.forward
    assert loop.request_failures == 0
    assert len(loop.fail_all(RuntimeError("the batch failed"))) == 4 and loop.idle


def test_a_request_whose_join_raises_fails_alone():
    """A request whose stop rule cannot even be built (stop strings, and the loop has no decoder) ends alone
    at its join; the others go on as without it."""
    eng = _engine("nan", after=10 ** 6)
    b = eng.backend
    good = {k: r for k, r in _good(eng).items() if k in (0, 2)}
    want = _alone(eng, good)
    plain = eng.make_request([3, 4], SamplingParams(max_new_tokens=8), method="pearl")
    stops = dataclasses.replace(plain, params=dataclasses.replace(plain.params, stop=("x",)))
    loop = BatchLoop(b.target_lm, b.draft_lm, None, 4)
    loop.add(stops, key="stop")
    for key, r in good.items():
        loop.add(r, key=key)
    got, errors = {}, {}
    _drain(loop, got, errors)
    assert set(errors) == {"stop"} and isinstance(errors["stop"], RequestFailed), errors
    assert "tokenizer" in str(errors["stop"])
    assert got == want and loop.request_failures == 1 and _all_free(eng)


def test_faulty_lm_is_the_plain_model_for_unmarked_requests():
    target = TabularLM(6, seed=0)
    faulty = FaultyLM(target, MARK, "nan", after=1)
    for prompt in ([1, 2, 3], MARK[:2] + [1]):
        faulty.reset()
        target.reset()
        assert torch.equal(faulty.forward(prompt, 2), target.forward(prompt, 2))
    faulty.reset()
    assert torch.isnan(faulty.forward(MARK, 1)).all()
    with pytest.raises(ValueError):
        FaultyLM(target, MARK, "slow")
