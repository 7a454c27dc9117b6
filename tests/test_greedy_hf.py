"""Greedy equivalence on tiny random Llama models loaded through the real loader (fp32)."""

import pytest

from pearl_ray import PearlEngine, SamplingParams


def outputs(engine, prompts, params):
    return [o.token_ids for o in engine.generate(prompts, params)]


PROMPTS = [[1, 5, 9, 13], [1, 40], [1] + list(range(20, 50))]


@pytest.fixture(scope="module")
def ar_reference(tiny_pair):
    engine = PearlEngine(target=tiny_pair["target"], method="ar")
    return engine, outputs(engine, PROMPTS, SamplingParams(max_new_tokens=23, ignore_eos=True))


@pytest.mark.parametrize("gamma", [1, 3, 4])
@pytest.mark.parametrize("method", ["pearl", "sd"])
def test_unrelated_draft_matches_target_greedy(tiny_pair, ar_reference, method, gamma):
    engine = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], method=method, gamma=gamma)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=23, ignore_eos=True))
    assert [o.token_ids for o in outs] == ar_reference[1]
    assert all(len(o.token_ids) == 23 for o in outs)  # 23 is not a multiple of gamma
    assert all(o.stats.new_tokens == 23 and o.finish_reason == "length" for o in outs)


def test_draft_equal_to_target_accepts_everything(tiny_pair, ar_reference):
    for method in ("pearl", "sd"):
        engine = PearlEngine(draft=tiny_pair["target"], target=tiny_pair["target"], method=method, gamma=4)
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=23, ignore_eos=True))
        assert [o.token_ids for o in outs] == ar_reference[1]
        for o in outs:
            assert o.stats.acceptance_rate == 1.0 and o.stats.recovered_tokens == 0
            assert o.stats.tokens_per_target_forward > 2.0


def test_unrelated_draft_is_mostly_rejected_but_progresses(tiny_pair):
    engine = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=4)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    assert out.stats.acceptance_rate < 0.3
    assert out.stats.rounds <= 30  # at least one committed token per round


@pytest.mark.parametrize("method", ["pearl", "sd", "ar"])
@pytest.mark.parametrize("eos_index", [0, 2, 6, 9])
def test_eos_inside_an_accepted_window_stops_exactly(tiny_pair, ar_reference, method, eos_index):
    full = ar_reference[1][0]
    eos = full[eos_index]
    first = full.index(eos)  # the first occurrence is where generation must stop
    draft = tiny_pair["target"]  # everything accepted: EOS lands inside an accepted window
    engine = PearlEngine(draft=draft, target=tiny_pair["target"], method=method, gamma=4, eos_token_ids=[eos])
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=23))[0]
    assert out.token_ids == full[: first + 1]
    assert out.finish_reason == "eos"
    fixed = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=23, ignore_eos=True))[0]
    assert fixed.token_ids == full


def test_text_prompts_and_stop_strings(tiny_pair):
    engine = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3)
    out = engine.generate("w1 w2 w3", SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    words = out.text.split()
    assert len(out.token_ids) == 12 and len(words) >= 1
    stop_word = words[2] if len(words) > 2 else words[0]
    stopped = engine.generate("w1 w2 w3", SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop_word]))[0]
    assert stopped.finish_reason == "stop"
    assert stop_word not in stopped.text
    assert stopped.token_ids == out.token_ids[: len(stopped.token_ids)]


def test_streamed_tokens_equal_output(tiny_pair):
    engine = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3)
    got = []
    out = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=17, ignore_eos=True),
                          on_tokens=lambda i, ids: got.extend(ids))[0]
    assert got == out.token_ids


def test_teacher_forced_acceptance_equals_greedy_sd(tiny_pair, ar_reference):
    """One draft pass over the target's output gives vanilla SD's greedy acceptance counts
    (training/compare_drafts.py relies on it)."""
    from pearl_ray.core.metrics import GenerationStats, greedy_sd_acceptance
    from pearl_ray.modeling.hf import load_model

    draft = load_model(tiny_pair["draft"], target_vocab_size=ar_reference[0].backend.vocab_size).runner
    for gamma in (1, 3, 4):
        sd = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], method="sd", gamma=gamma)
        stats = GenerationStats.merge([o.stats for o in sd.generate(
            PROMPTS, SamplingParams(max_new_tokens=23, ignore_eos=True))])
        accepted = verified = 0
        for prompt, out in zip(PROMPTS, ar_reference[1]):
            draft.reset()
            logits = draft.forward(prompt + out[:-1], len(out))
            a, v = greedy_sd_acceptance([p == t for p, t in zip(logits.argmax(-1).tolist(), out)], gamma)
            accepted, verified = accepted + a, verified + v
        assert (accepted, verified) == (stats.accepted_tokens, stats.verified_tokens), gamma
