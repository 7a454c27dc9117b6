"""The engine's request path on the local backend: streaming, the bounded queue, per-call overrides,
typed errors at the edges, and the loop against the independent reference decoders."""

import asyncio
import threading
import time

import pytest

from pearl_ray import (EngineClosedError, InvalidParameterError, PearlEngine, PromptError, QueueFullError,
                       SamplingParams, TokenizerMismatchError)
from pearl_ray.core.baselines import generate_ar, generate_sd
from pearl_ray.core.stopping import StopRule
from pearl_ray.testing import SlowLM, TabularLM

PROMPT = [1, 2, 3]


def pair():
    return TabularLM(6, seed=0), TabularLM(6, seed=5)


def drain(chunks):
    chunks = list(chunks)
    assert all(c.finish_reason is None and c.stats is None for c in chunks[:-1])
    assert chunks[-1].finish_reason is not None and chunks[-1].stats is not None
    return chunks


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=20, ignore_eos=True),
                                    SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=1.0, seed=11)])
def test_stream_deltas_concatenate_to_generate(params):
    target, draft = pair()
    eng = PearlEngine(draft_model=draft, target_model=target, gamma=3)
    want = eng.generate([PROMPT], params)[0]
    chunks = drain(eng.stream(PROMPT, params))
    assert sum((c.token_ids for c in chunks), []) == want.token_ids
    assert len(chunks) > 2  # tokens arrive round by round, not all at the end
    assert chunks[-1].stats.new_tokens == len(want.token_ids)

    async def collect():
        return [c async for c in eng.astream(PROMPT, params)]

    achunks = drain(asyncio.run(collect()))
    assert sum((c.token_ids for c in achunks), []) == want.token_ids


def test_stream_text_deltas_match_the_final_text(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3)
    params = SamplingParams(max_new_tokens=15, ignore_eos=True)
    out = eng.generate("w1 w2 w3", params)[0]
    chunks = drain(eng.stream("w1 w2 w3", params))
    assert "".join(c.text for c in chunks) == out.text
    # with a stop string the held-back tail never leaks the stop text
    stop_word = out.text.split()[4]
    sp = SamplingParams(max_new_tokens=15, ignore_eos=True, stop=[stop_word])
    stopped = eng.generate("w1 w2 w3", sp)[0]
    chunks = drain(eng.stream("w1 w2 w3", sp))
    assert "".join(c.text for c in chunks) == stopped.text and stop_word not in stopped.text


def test_per_call_overrides_do_not_touch_the_engine():
    target, draft = pair()
    eng = PearlEngine(draft_model=draft, target_model=target, gamma=3)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    out = eng.generate([PROMPT], params, gamma=5, method="sd")[0]
    assert out.stats.gamma == 5 and out.stats.method == "sd"
    assert eng.gamma == 3 and eng.method == "pearl" and eng.config.gamma == 3


def test_a_full_queue_refuses_at_once_and_loses_nothing():
    target, draft = pair()
    eng = PearlEngine(draft_model=SlowLM(draft, 0.002), target_model=SlowLM(target, 0.01), gamma=2, max_queued=1)
    params = SamplingParams(max_new_tokens=25, ignore_eos=True)
    alone = PearlEngine(draft_model=draft, target_model=target, gamma=2).generate([[1, 2], [4]], params)
    results = {}

    def run(name, prompt):
        results[name] = eng.generate([prompt], params)[0].token_ids

    first = threading.Thread(target=run, args=("a", [1, 2]))
    first.start()
    while eng.queue_depth < 1:
        time.sleep(0.005)
    second = threading.Thread(target=run, args=("b", [4]))
    second.start()
    while eng.queue_depth < 2:
        time.sleep(0.005)
    t0 = time.monotonic()
    with pytest.raises(QueueFullError, match="max_queued=1"):
        eng.generate([[5]], params)
    assert time.monotonic() - t0 < 0.5
    first.join(30)
    second.join(30)
    assert results == {"a": alone[0].token_ids, "b": alone[1].token_ids}
    assert eng.queue_depth == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=None), "seed"), (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"), (dict(seed=1.5), "seed"),
    (dict(temperature="hot"), "temperature"), (dict(stop=5), "stop"), (dict(max_new_tokens=True), "max_new_tokens"),
])
def test_more_invalid_sampling_params(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        SamplingParams(**kwargs)


def test_edges_of_the_request_path(tiny_pair):
    eng = PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3)
    big = SamplingParams(max_new_tokens=4, ignore_eos=True, seed=2**63 - 1)
    assert len(eng.generate([[5, 6]], big)[0].token_ids) == 4
    assert eng.generate([[5, 6]], {"max_new_tokens": 3, "ignore_eos": True})[0].token_ids  # params as a dict
    with pytest.raises(InvalidParameterError, match="unknown sampling parameters"):
        eng.generate([[5, 6]], {"max_tokens": 3})
    with pytest.raises(PromptError, match="Unicode"):
        eng.generate("w1 \ud800 w2", SamplingParams())
    with pytest.raises(PromptError, match="bytes"):
        eng.generate([b"w1 w2"], SamplingParams())
    # lengths are checked up front, with the numbers, never clamped
    with pytest.raises(InvalidParameterError, match=r"max_new_tokens 251 does not fit: prompt 2 tokens.*at most 250"):
        eng.generate([[5, 6]], SamplingParams(max_new_tokens=251))
    assert eng.generate([[5, 6]], SamplingParams(max_new_tokens=251, ignore_eos=True), method="ar")[0].token_ids  # no window
    with pytest.raises(InvalidParameterError, match="gamma 16 is too large"):
        eng.generate([[5] * 240], SamplingParams(max_new_tokens=1), gamma=16)
    with pytest.raises(InvalidParameterError, match="gamma"):
        eng.generate([[5, 6]], SamplingParams(), gamma=0)
    eng.shutdown()
    with pytest.raises(EngineClosedError):
        eng.generate([[5, 6]], SamplingParams())
    with PearlEngine(target=tiny_pair["target"], method="ar") as ar:
        with pytest.raises(InvalidParameterError, match="needs a draft"):
            ar.generate([[5, 6]], SamplingParams(), method="sd")
    with pytest.raises(EngineClosedError):
        ar.generate([[5, 6]], SamplingParams())


def test_a_reduced_vocabulary_draft_with_another_target_is_a_tokenizer_error(tiny_pair, tmp_path):
    from pearl_ray.modeling.default_pair import draft_dir
    from pearl_ray.testing import save_tiny_llama

    with pytest.raises(TokenizerMismatchError, match="tokenizer"):  # another tokenizer altogether
        PearlEngine(draft="default-draft", target=tiny_pair["target"])
    # the same tokenizer, but a vocabulary of another size than the one the draft's id map was made for:
    # only the vocabulary check can refuse this pair
    other = save_tiny_llama(tmp_path / "wide", vocab_size=49160, hidden_size=16, num_layers=1,
                            tokenizer_dir=draft_dir())
    with pytest.raises(TokenizerMismatchError, match="reduced vocabulary made for a target with 49152"):
        PearlEngine(draft="default-draft", target=str(other))


def test_cli_chat_without_a_template_is_a_clear_error(tiny_pair):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pearl_ray", "generate", "--target", tiny_pair["target"], "--method", "ar",
           "--prompt", "w1", "--chat"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 2 and "chat template" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_loop_matches_the_reference_decoders(temperature):
    """SD and AR run through the one PEARL loop; the straightforward loops in ``core.baselines`` are their
    oracles (same tokens, same seeds)."""
    target, draft = pair()
    eng = PearlEngine(draft_model=draft, target_model=target, gamma=3)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=temperature, seed=4)
    for i, prompt in enumerate([[1, 2], [3], [4, 5, 1]]):
        stop = StopRule(20, (), True)
        seed = eng.make_request(prompt, params, index=i).seed
        ar = generate_ar(target, prompt, stop, seed, temperature)[0]
        sd = generate_sd(draft, target, prompt, 3, stop, seed, temperature)[0]
        got = {m: eng.generate([[0]] * i + [prompt], params, method=m)[i].token_ids for m in ("ar", "sd")}
        assert got == {"ar": ar, "sd": sd}


def test_ray_pairs_that_share_a_device_are_colocated_by_default():
    """colocate=None: one worker for a CPU pair with one target rank, packed; two actors where the sides have
    devices of their own (GPUs asked for), several target ranks, or a spread placement; explicit values win."""
    from pearl_ray.config import EngineConfig

    assert EngineConfig(backend="ray").colocate is True
    assert EngineConfig(backend="ray", placement="PACK").colocate is True
    assert EngineConfig(backend="ray", colocate=False).colocate is False
    for options in (dict(placement="STRICT_SPREAD"), dict(placement="SPREAD"), dict(tensor_parallel_size=2),
                    dict(target_num_gpus=1, device="cuda"), dict(draft_num_gpus=0.5)):
        assert EngineConfig(backend="ray", **options).colocate is False, options
    assert EngineConfig().colocate is False  # local: one process anyway, no Ray workers
    assert EngineConfig(backend="ray", colocate=True, tensor_parallel_size=2).colocate  # the draft beside rank 0
    with pytest.raises(InvalidParameterError):
        EngineConfig(backend="ray", colocate=True, placement="STRICT_SPREAD")  # one worker cannot spread
