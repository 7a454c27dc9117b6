"""Cache rollback helper, stop rule and metrics arithmetic."""

import torch

from pearl_ray.core.metrics import GenerationStats, greedy_sd_acceptance
from pearl_ray.modeling.hf import PREFILL_MIN_TOKENS, HFCausalLM, crop_to
from pearl_ray.core.stopping import StopRule


def test_crop_to_keeps_the_first_n_positions():
    from transformers import DynamicCache, LlamaConfig

    cfg = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2)
    cache = DynamicCache(config=cfg)
    k = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 4).contiguous()
    for layer in range(2):
        cache.update(k, k.clone(), layer)
    crop_to(cache, 7)
    assert cache.get_seq_length() == 7
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == list(range(7))
    crop_to(cache, 7)
    assert cache.get_seq_length() == 7
    crop_to(cache, 0)
    assert cache.get_seq_length() == 0


def test_stop_rule_cuts_at_first_committed_eos_and_at_length():
    rule = StopRule(max_new_tokens=10, eos_token_ids=[2])
    assert rule.check([5, 6, 2, 7, 2], 5).keep == 3
    assert rule.check([5, 6], 2).finished is False
    r = rule.check(list(range(3, 15)), 12)
    assert (r.finished, r.keep, r.reason) == (True, 10, "length")
    assert StopRule(10, [2], ignore_eos=True).check([2, 2], 2).finished is False


def test_metrics_definitions():
    s = GenerationStats()
    # round 1: 1 candidate accepted; round 2: 3 candidates, 2 accepted then a rejection; round 3: 2 accepted
    s.observe_round(4, 1, 1, False, False, [0])
    s.observe_round(4, 3, 2, True, False, [1, 2, 0])
    s.observe_round(4, 2, 2, False, False, [0, 1])
    s.target_forwards = 4
    s.finish(new_tokens=8, wall_s=2.0, finish_reason="length")
    assert s.accepted_tokens == 5 and s.verified_tokens == 6
    assert s.acceptance_rate == 5 / 6 and s.draft_utilisation == 5 / 12
    assert s.runs == 2 and s.mean_accepted_len == 2.5  # runs [1, 1, 1] ended by rejection (3), final run 2
    assert s.mal_official == 3.0
    assert s.tokens_per_target_forward == 2.0 and s.tokens_per_s == 4.0
    assert s.acceptance_by_position == [2 / 3, 1.0, 1.0]  # position 0 rejected once in round 2
    merged = GenerationStats.merge([s, s])
    assert merged.acceptance_rate == s.acceptance_rate and merged.new_tokens == 16


def test_stop_string_spanning_several_tokens_is_found_at_its_last_token():
    decode = lambda ids: "".join("xy"[i % 2] if i >= 26 else chr(97 + i) for i in ids)  # noqa: E731
    rule = StopRule(max_new_tokens=50, stop=["cde"], decode=decode)
    out = [30, 31] * 20 + [2, 3, 4, 5, 6]  # 40 filler tokens, then c d e f g
    r = rule.check(out, len(out))
    assert (r.finished, r.keep, r.reason) == (True, 43, "stop")
    assert rule.cut_text("xyabcdefg") == "xyab"
    assert rule.check([30, 31, 2, 3], 4).finished is False


def test_prompt_passes_borrow_prefill_threads_and_give_them_back():
    """``prefill_threads`` applies to forwards of >= PREFILL_MIN_TOKENS tokens only (the prompt pass), and the
    thread count is restored afterwards, also when the forward raises; logits do not change."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    seen = []
    inner = model.forward

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return inner(*args, **kwargs)

    model.forward = spy
    runner = HFCausalLM(model)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        prompt = [i % 64 for i in range(PREFILL_MIN_TOKENS + 3)]
        plain = runner.forward(prompt, 2)
        runner.reset()
        runner.prefill_threads = 2
        borrowed = runner.forward(prompt, 2)
        runner.forward([5], 1)  # a decoding step keeps the worker's own count
        assert seen == [1, 2, 1] and torch.get_num_threads() == 1
        assert torch.allclose(plain, borrowed, atol=1e-5)
        runner.reset()
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        try:
            runner.forward(prompt, 1)
        except RuntimeError:
            pass
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_greedy_sd_acceptance_from_matches():
    T, F = True, False
    assert greedy_sd_acceptance([T, T, T, T, T], 4) == (4, 4)  # a full window, then the bonus token at 4
    assert greedy_sd_acceptance([T, F, T, T, F, T], 2) == (4, 5)  # [T F] [T T] bonus@4 [T] (end of output)
    assert greedy_sd_acceptance([F, F, F], 4) == (0, 3)
    assert greedy_sd_acceptance([], 3) == (0, 0)
