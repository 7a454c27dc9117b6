"""The PEARL state machine's transitions (spec §3 table), with hand-built messages."""

import pytest

from pearl_ray.core.messages import DraftChunk, TargetOutput
from pearl_ray.core.rounds import PearlState, RoundOptions, VerifyMode, pearl_step, plan_round

OPTS = RoundOptions(gamma=3, greedy=True)


def run(state, drafted, target_argmax, opts=OPTS):
    plan = plan_round(state, opts)
    chunk = DraftChunk(plan.round_id, plan.draft.start_pos, drafted if plan.draft.num_steps else [])
    tout = TargetOutput(plan.round_id, plan.target.start_pos, target_argmax) if plan.target.num_rows else None
    return plan, pearl_step(state, plan, chunk, tout, None, opts)


def test_pre_reject_commits_recovered_token():
    s = PearlState([1, 2], 2)
    assert s.mode is VerifyMode.PRE
    plan, out = run(s, [5, 6, 7], [9])
    assert plan.target.num_rows == 1 and plan.draft.num_steps == 3
    assert s.committed == [1, 2, 9] and s.pending == [] and out.recovered_token_id == 9
    assert out.num_accepted == 0 and out.num_candidates == 1


def test_pre_accept_then_post_all_accept_then_post_reject():
    s = PearlState([1, 2], 2)
    _, out = run(s, [5, 6, 7], [5])
    assert s.committed == [1, 2, 5] and s.pending == [6, 7] and s.mode is VerifyMode.POST
    plan, out = run(s, [8, 9, 10], [6, 7, 8])  # POST: pending 6, 7 + d0 = 8 all accepted
    assert plan.target.num_rows == 3 and out.num_candidates == 3
    assert s.committed == [1, 2, 5, 6, 7, 8] and s.pending == [9, 10]
    _, out = run(s, [11, 12, 13], [9, 4, 0])  # reject at i = 1 -> recovered 4
    assert s.committed == [1, 2, 5, 6, 7, 8, 9, 4] and s.pending == [] and out.num_accepted == 1
    assert out.update.appended_token_ids == [9, 4] and out.update.pending_token_ids == []


def test_stale_messages_raise():
    s = PearlState([1, 2], 2)
    plan = plan_round(s, OPTS)
    with pytest.raises(RuntimeError, match="stale"):
        pearl_step(s, plan, DraftChunk(plan.round_id + 1, plan.draft.start_pos, [1, 2, 3]),
                   TargetOutput(plan.round_id, 2, [1]), None, OPTS)
    with pytest.raises(RuntimeError, match="stale"):
        pearl_step(s, plan, DraftChunk(plan.round_id, plan.draft.start_pos, [1, 2, 3]),
                   TargetOutput(plan.round_id, 5, [1]), None, OPTS)


def test_empty_chunk_is_a_fallback_round_with_bonus():
    s = PearlState([1, 2], 2, pending=[6, 7], pending_positions=[1, 2])
    plan = plan_round(s, OPTS)
    out = pearl_step(s, plan, DraftChunk(plan.round_id, plan.draft.start_pos, []),
                     TargetOutput(plan.round_id, 2, [6, 7, 3]), None, OPTS)
    assert s.committed == [1, 2, 6, 7, 3] and out.bonus_token_id == 3 and s.pending == []


def test_ablations_are_options_of_the_same_step():
    no_pre = RoundOptions(gamma=2, greedy=True, pre_verify=False)
    s = PearlState([1], 1)
    plan, out = run(s, [4, 5], [], no_pre)
    assert plan.target.num_rows == 0 and s.pending == [4, 5] and s.committed == [1]
    plan, out = run(s, [6, 7], [4, 5, 6], no_pre)  # POST: pending 4, 5 + d0 = 6
    assert s.committed == [1, 4, 5, 6] and s.pending == [7]
    no_post = RoundOptions(gamma=2, greedy=True, post_verify=False)
    s = PearlState([1], 1)
    run(s, [4, 5], [4], no_post)
    assert s.pending == [5]
    plan, out = run(s, [9, 9], [5, 8], no_post)  # draft idle, bonus row
    assert plan.draft.num_steps == 0 and s.committed == [1, 4, 5, 8] and out.bonus_token_id == 8
