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


def test_fused_round_verifies_the_window_it_drafted():
    """Vanilla SD in one round (the sides in turn): the target's rows cover the pending tokens and the whole
    window drafted this round, so every candidate is decided at once and nothing stays pending; the
    two-round form (a draft-only round, then a verify-only one) commits the same tokens."""
    from pearl_ray.core.rounds import fuse

    fused = RoundOptions(gamma=3, greedy=True, pre_verify=False, post_verify=False, fused=True)
    s = PearlState([1, 2], 2)
    plan = plan_round(s, fused)
    assert plan.draft.num_steps == 3 and plan.target.num_rows == 1 and not plan.fused
    plan = fuse(plan, 3)
    assert plan.target.num_rows == 4 and plan.fused
    out = pearl_step(s, plan, DraftChunk(plan.round_id, 2, [5, 6, 7]), TargetOutput(plan.round_id, 2, [5, 6, 7, 8]),
                     None, fused)
    assert s.committed == [1, 2, 5, 6, 7, 8] and s.pending == [] and out.bonus_token_id == 8
    assert out.num_candidates == 3 and out.candidate_positions == [0, 1, 2]
    plan = fuse(plan_round(s, fused), 3)  # a rejection at the second candidate
    out = pearl_step(s, plan, DraftChunk(plan.round_id, 6, [9, 10, 11]), TargetOutput(plan.round_id, 6, [9, 4, 0, 0]),
                     None, fused)
    assert s.committed[6:] == [9, 4] and s.pending == [] and out.recovered_token_id == 4 and out.num_accepted == 1
    # a window left pending by a round at once is verified first, then this round's draft
    s = PearlState([1], 1, pending=[4, 5], pending_positions=[1, 2])
    plan = fuse(plan_round(s, fused), 2)
    assert plan.draft.start_pos == 3 and plan.target.num_rows == 5
    out = pearl_step(s, plan, DraftChunk(plan.round_id, 3, [6, 7]), TargetOutput(plan.round_id, 1, [4, 5, 6, 7, 3]),
                     None, fused)
    assert s.committed == [1, 4, 5, 6, 7, 3] and out.num_candidates == 4 and out.candidate_positions == [1, 2, 0, 1]
    # a draft that returned nothing: the pending tokens and a bonus row
    s = PearlState([1], 1, pending=[4], pending_positions=[1])
    plan = fuse(plan_round(s, fused), 0)
    out = pearl_step(s, plan, DraftChunk(plan.round_id, 2, []), TargetOutput(plan.round_id, 1, [4, 9]), None, fused)
    assert s.committed == [1, 4, 9] and out.bonus_token_id == 9
    # rows that do not match the window are refused
    s = PearlState([1], 1)
    with pytest.raises(RuntimeError, match="fused"):
        pearl_step(s, fuse(plan_round(s, fused), 2), DraftChunk(1, 1, [4, 5, 6]), TargetOutput(1, 1, [4, 5, 6]),
                   None, fused)
    # the same target behaviour through two-round vanilla SD commits the same tokens
    two = RoundOptions(gamma=3, greedy=True, pre_verify=False, post_verify=False)
    a, b = PearlState([1, 2], 2), PearlState([1, 2], 2)
    truth = [5, 6, 7, 8, 9, 4, 0, 0, 3, 3, 3, 3, 3]

    def target_rows(state, n):  # the target's argmax at each position: a fixed continuation
        start = len(state.committed) - 2
        return [truth[start + i] if start + i < len(truth) else 3 for i in range(n)]

    for draft in ([5, 6, 7], [9, 10, 11], [0, 3, 3]):
        plan = fuse(plan_round(a, fused), len(draft))
        pearl_step(a, plan, DraftChunk(plan.round_id, len(a.committed), draft),
                   TargetOutput(plan.round_id, len(a.committed), target_rows(a, len(draft) + 1)), None, fused)
        run(b, draft, [], two)
        plan = plan_round(b, two)
        assert plan.draft.num_steps == 0
        pearl_step(b, plan, DraftChunk(plan.round_id, plan.draft.start_pos, []),
                   TargetOutput(plan.round_id, len(b.committed), target_rows(b, len(draft) + 1)), None, two)
        assert a.committed == b.committed and a.pending == b.pending == []
