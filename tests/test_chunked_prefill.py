"""Chunked prompt passes (``BatchLoop.max_prefill_tokens``, ``EngineConfig.max_prefill_tokens_per_round``).

- The slot cache: a prompt fed in chunks (no logits) beside decoding rows gives the single-request runner's
  logits (fp32 to 1e-5), and its chunks never widen the decoding rows' forward.
- Greedy: with chunking, every request's tokens equal those without it and target-only decoding's, for
  PEARL, SD and AR, fixed and adaptive windows.
- The scheduler: while a long prompt goes in, every running request commits tokens in each round that
  carries a chunk; no round feeds more prompt tokens than the budget, and the draft caches the same chunks
  in the same rounds as the target. Chunk rounds are kept out of the policy's cost feedback.
- Over the slow reference ``PerSlotLM`` (exact tabular models) sampled requests keep their tokens too.
- A request cancelled mid-prompt frees its staged slots; the option's checks (engine, CLI, Serve).
"""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.core.batch import BatchLoop, run_batch
from pearl_ray.errors import InvalidParameterError
from pearl_ray.modeling.batched import BatchedHFCausalLM
from pearl_ray.modeling.hf import HFCausalLM

RNG = random.Random(11)
LONG = [RNG.randint(3, 95) for _ in range(120)]
MID = [RNG.randint(3, 95) for _ in range(45)]
SHORT = [[5, 9, 14, 3], [7], [20, 21, 22, 23, 24, 25], [40, 41]]


def test_chunks_in_a_staged_slot_match_the_single_request_runner(tiny_pair):
    """Two slots decode while a third reads a 100-token prompt in chunks of 16 (0 logits) in the same
    forwards; its last feed asks for logits and joins the shared cache. Every logit row equals the
    single-request runner's, and the chunks add no positions to the decoding rows."""
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["target"], dtype=torch.float32)
    rng = random.Random(5)
    prompts = {0: [rng.randint(3, 95) for _ in range(9)], 1: [rng.randint(3, 95) for _ in range(4)],
               2: [rng.randint(3, 95) for _ in range(100)]}
    singles = {s: HFCausalLM(model) for s in prompts}
    for m in singles.values():
        m.reset()
    batched = BatchedHFCausalLM(model)
    want, got = {s: [] for s in prompts}, {s: [] for s in prompts}
    for s in (0, 1):
        got[s].append(batched.forward({s: (prompts[s], 1)})[s])
        want[s].append(singles[s].forward(prompts[s], 1))
    fed = 0
    while fed < 100:
        steps = {s: [rng.randint(3, 95) for _ in range(1 + s)] for s in (0, 1)}
        n = min(16, 100 - fed)
        last = fed + n == 100
        feeds = {s: (ids, 1) for s, ids in steps.items()}
        feeds[2] = (prompts[2][fed:fed + n], 3 if last else 0)
        out = batched.forward(feeds)
        if not last:
            assert set(out) == {0, 1} and 2 in batched.slots and batched.cache_len(2) == fed + n
            assert batched.last_shape == (2, 2, max(batched.cache_len(0), batched.cache_len(1)))  # not the chunk
        for s, ids in steps.items():
            got[s].append(out[s])
            want[s].append(singles[s].forward(ids, 1))
        want[2].append(singles[2].forward(prompts[2][fed:fed + n], 3 if last else 1))
        if last:
            got[2].append(out[2])
        fed += n
    step = {s: ([rng.randint(3, 95)], 1) for s in prompts}
    out = batched.forward(step)
    for s in prompts:
        got[s].append(out[s])
        want[s].append(singles[s].forward(*step[s]))
    assert len(got[2]) == 2 and got[2][0].shape[0] == 3
    want[2] = [want[2][-2], want[2][-1]]
    for s in prompts:
        assert len(got[s]) == len(want[s])
        for a, b in zip(want[s], got[s]):
            assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    batched.forward({3: (prompts[2][:20], 0)})  # a staged slot released mid-prompt frees its row
    held = batched.held_positions()
    batched.release(3)
    assert 3 not in batched.slots and batched.held_positions() == held - 20


def _loop(eng, budget, max_num_seqs=4, policy=None):
    b = eng.backend
    loop = BatchLoop(b.target_lm, b.draft_lm, policy, max_num_seqs)
    loop.max_prefill_tokens = budget
    return loop


def test_chunked_prompts_give_the_unchunked_greedy_tokens(tiny_pair):
    """Two long prompts among short ones, 4 slots: with a 16-token budget the tokens equal the whole-prompt
    loop's and target-only decoding alone, for PEARL, SD and AR, with a fixed window and the policy's."""
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompts = [SHORT[0], LONG, SHORT[1], MID, SHORT[2], SHORT[3]]
    ar = PearlEngine(target=tiny_pair["target"], method="ar")
    want = [ar.generate([p], params)[0].token_ids for p in prompts]
    for gamma in (3, None):
        eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=gamma, max_num_seqs=4)
        assert eng.backend.loop.max_prefill_tokens == 256  # the default reaches the loop
        for method in ("pearl", "sd", "ar"):
            reqs = [eng.make_request(p, params, method=method, index=i) for i, p in enumerate(prompts)]
            whole = [ids for ids, _ in run_batch(_loop(eng, None, policy=eng.backend.policy), reqs)]
            loop = _loop(eng, 16, policy=eng.backend.policy)
            chunked = run_batch(loop, reqs)
            assert [ids for ids, _ in chunked] == whole == want, (gamma, method)
            assert eng.backend.target_lm.slots == [] and eng.backend.draft_lm.slots == []
            if method == "ar":  # a target forward per round, plus 7 chunks of 16 (the rest went in round 1)
                long_stats = chunked[1][1]
                assert long_stats.target_forwards - len(long_stats.round_timings) == 7, gamma
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=4,
                      max_prefill_tokens_per_round=16)
    assert eng.backend.loop.max_prefill_tokens == 16
    assert [o.token_ids for o in eng.generate(prompts, params)] == want


class _Counting:
    """Wraps a ``BatchedLM``: the prompt tokens it is fed for ``slot`` in each call (0 logits, or its first
    feed) and every call's feeds."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []

    def forward(self, feeds):
        self.calls.append({s: (len(ids), k) for s, (ids, k) in feeds.items()})
        return self.lm.forward(feeds)

    def __getattr__(self, name):
        return getattr(self.lm, name)


class _RecordingPolicy:
    """A fixed window, and every ``observe`` call recorded (the policy's interface)."""

    def __init__(self, window, plain_first=0):
        self.window, self.observed, self.plain_first = window, [], plain_first

    def decide(self, views, prompt_tokens=0):
        self.plain_first -= 1
        return "turn", (0 if self.plain_first >= 0 else self.window)

    def observe(self, *args):
        self.observed.append(args)

    def finished(self, *args):
        pass


def test_running_requests_advance_in_the_rounds_that_carry_chunks(tiny_pair):
    """Three requests decode; then a 120-token prompt joins. With a 16-token budget, in every round that
    feeds part of it each running request commits at least one token, no round feeds more than 16 of its
    tokens, the draft caches the same chunk as the target in the same round, and the policy hears nothing
    of those rounds (nor of the round that feeds the prompt's rest and gives its first token)."""
    from pearl_ray.core.proposer import BatchedDraftSide, LocalDraftPhase

    budget = 16
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=4,
                      max_prefill_tokens_per_round=budget)
    target, draft = _Counting(eng.backend.target_lm), _Counting(eng.backend.draft_lm)
    policy = _RecordingPolicy(3)
    loop = BatchLoop(target, LocalDraftPhase(BatchedDraftSide(draft)), policy, 4)
    loop.max_prefill_tokens = budget
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for i, p in enumerate(SHORT[:3]):
        loop.add(eng.make_request(p, params, method="pearl", index=i, gamma=3), key=i)
    for _ in range(2):
        loop.step()
    long_slot = 3
    loop.add(eng.make_request(LONG, SamplingParams(max_new_tokens=8, ignore_eos=True), method="pearl", gamma=3),
             key="long")
    target.calls.clear()
    draft.calls.clear()
    observed_before = len(policy.observed)
    per_round, first_token_round = [], None
    while first_token_round is None:
        n_target, n_draft = len(target.calls), len(draft.calls)
        events = loop.step()
        got = {ev.key: len(ev.token_ids) for ev in events}
        fed = sum(n for c in target.calls[n_target:] for s, (n, k) in c.items() if s == long_slot and n > 1)
        draft_fed = sum(n for c in draft.calls[n_draft:] for s, (n, k) in c.items() if s == long_slot and k == 0)
        per_round.append((fed, draft_fed, got))
        if got.get("long"):
            first_token_round = len(per_round)
    chunk_rounds = [r for r in per_round if r[0] and "long" not in r[2]]
    assert sum(r[0] for r in per_round) == len(LONG)
    assert max(r[0] for r in per_round) <= 16, f"a round fed {max(r[0] for r in per_round)} prompt tokens"
    assert len(chunk_rounds) == 7
    for fed, draft_fed, got in chunk_rounds:
        assert draft_fed == fed  # the draft reads the prompt in step with the target
        assert all(got.get(i, 0) >= 1 for i in range(3)), got  # every running stream advanced this round
    assert len(policy.observed) - observed_before == len(per_round) - len(chunk_rounds) - 1
    for key in list(range(3)) + ["long"]:
        loop.cancel(key)


def test_an_adaptive_request_defers_its_prompt_on_a_local_draft(tiny_pair):
    """Under the policy, on a draft in the loop's process, the draft reads a long prompt in the first round
    that drafts for it, not chunk by chunk: chunk rounds run the target alone. That round's draft time is
    kept out of the policy's step costs, and the tokens are target-only decoding's."""
    from pearl_ray.core.proposer import BatchedDraftSide, LocalDraftPhase

    budget = 16
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], max_num_seqs=4,
                      max_prefill_tokens_per_round=budget)
    target, draft = _Counting(eng.backend.target_lm), _Counting(eng.backend.draft_lm)
    policy = _RecordingPolicy(3, plain_first=2)  # the first decoding round, one more plain, then windows of 3
    loop = BatchLoop(target, LocalDraftPhase(BatchedDraftSide(draft)), policy, 4)
    loop.max_prefill_tokens = budget
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    request = eng.make_request(LONG, params, method="pearl")
    assert request.rounds.adaptive
    loop.add(request, key="long")
    rounds = []
    done = None
    while done is None:
        n_target, n_draft, n_observed = len(target.calls), len(draft.calls), len(policy.observed)
        for ev in loop.step():
            if ev.finished:
                done = ev
        rounds.append((sum(n for c in target.calls[n_target:] for n, _ in c.values()),
                       max((n for c in draft.calls[n_draft:] for n, _ in c.values()), default=0),
                       policy.observed[n_observed:]))
    chunk_rounds = len(LONG) // budget - (len(LONG) % budget == 0)
    assert all(fed == budget and drafted == 0 for fed, drafted, _ in rounds[:chunk_rounds]), rounds
    # the prompt's rest and its first token, then a plain round: the draft still reads nothing
    assert [drafted for _, drafted, _ in rounds[chunk_rounds:chunk_rounds + 2]] == [0, 0], rounds
    catch_up = rounds[chunk_rounds + 2]
    assert catch_up[1] == len(LONG) + 2  # the prompt and the two tokens since, in one forward
    assert len(catch_up[2]) == 1 and catch_up[2][0][3] > 0 and catch_up[2][0][5] == 0.0  # no step cost learned
    assert any(obs[5] > 0 for _, _, observed in rounds[chunk_rounds + 3:] for obs in observed)
    ar = PearlEngine(target=tiny_pair["target"], method="ar")
    assert done.output_ids == ar.generate([LONG], params)[0].token_ids
    assert done.stats.draft_forwards > 0


def test_the_per_slot_reference_gives_the_same_tokens_sampled_too():
    """Over the slow reference ``BatchedLM`` (one tabular model per slot, exact logits) chunked prompts change
    nothing, sampled requests included: a chunk draws no coin and the draft samples nothing while caching."""
    from pearl_ray.config import EngineConfig, Request
    from pearl_ray.core.sides import PerSlotLM
    from pearl_ray.testing import TabularLM

    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    cases = [(40, "pearl", 1.0), (3, "pearl", 0.0), (25, "sd", 1.0), (30, "ar", 0.8), (2, "sd", 0.0), (33, "pearl", 0.0)]

    def requests():
        out = []
        for i, (n, method, temperature) in enumerate(cases):
            params = SamplingParams(max_new_tokens=15, temperature=temperature, seed=70 + i, ignore_eos=True)
            prompt = tuple(random.Random(i).randrange(6) for _ in range(n))
            out.append(Request(prompt, params, method, EngineConfig().round_options(method, 3, params.greedy), 70 + i))
        return out

    runs = []
    for budget in (None, 7):
        loop = BatchLoop(PerSlotLM(lambda: TabularLM(table=target.table)),
                         PerSlotLM(lambda: TabularLM(table=draft.table)), None, 4)
        loop.max_prefill_tokens = budget
        runs.append([ids for ids, _ in run_batch(loop, requests())])
    assert runs[0] == runs[1]


def test_a_request_cancelled_mid_prompt_frees_its_staged_slots(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, max_num_seqs=4)
    loop = _loop(eng, 16)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    loop.add(eng.make_request(SHORT[0], params, method="pearl"), key="short")
    loop.add(eng.make_request(LONG, params, method="pearl"), key="long")
    for _ in range(3):
        loop.step()
    b = eng.backend
    assert 1 in b.target_lm.staged and 1 in b.draft_lm.staged  # both sides hold part of the prompt
    assert loop.cancel("long")
    assert b.target_lm.slots == [0] and b.draft_lm.slots == [0]
    while not loop.idle:
        loop.step()
    assert b.target_lm.slots == [] and b.draft_lm.slots == []


def test_the_option_is_checked_everywhere(tiny_pair):
    from pearl_ray.cli import build_parser, serve_config
    from pearl_ray.config import EngineConfig
    from pearl_ray.serve import ServeConfig

    for bad in (0, -3, 2.5, "64"):
        with pytest.raises(InvalidParameterError, match="max_prefill_tokens_per_round"):
            EngineConfig(max_prefill_tokens_per_round=bad)
    assert EngineConfig(max_prefill_tokens_per_round=None).max_prefill_tokens_per_round is None
    assert ServeConfig().max_prefill_tokens_per_round == EngineConfig().max_prefill_tokens_per_round == 256
    parser = build_parser()
    assert serve_config(parser.parse_args(["serve", "--max-prefill-tokens-per-round", "0"])
                        ).max_prefill_tokens_per_round is None
    assert serve_config(parser.parse_args(["serve", "--max-prefill-tokens-per-round", "64"])
                        ).max_prefill_tokens_per_round == 64
    with pytest.raises(InvalidParameterError, match="max-prefill-tokens-per-round"):
        serve_config(parser.parse_args(["serve", "--max-prefill-tokens-per-round", "-1"]))


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("family", ["gemma3", "mistral-window"])
def test_chunked_prompts_on_sliding_window_models(family_pair, family):
    """A prompt fed in 8-token chunks, several times past a 6-token window, into a model with sliding layers
    (Gemma-3's hybrid, windowed Mistral's every layer): each chunk's masks honour the window at its logical
    positions, so PEARL's greedy tokens equal target-only decoding of the whole prompt."""
    pair = family_pair(family)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [LONG[:40], SHORT[0], MID[:20]]
    ar = PearlEngine(target=pair["target"], method="ar")
    want = [ar.generate([p], params)[0].token_ids for p in prompts]
    eng = PearlEngine(draft=pair["draft"], target=pair["target"], gamma=3, max_num_seqs=3,
                      max_prefill_tokens_per_round=8)
    assert [o.token_ids for o in eng.generate(prompts, params)] == want
    assert [o.token_ids for o in eng.generate(prompts, params, method="ar")] == want
