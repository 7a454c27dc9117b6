"""Log-probabilities of generated tokens (``SamplingParams.logprobs``), local backend: every method, greedy and
sampled, batched and streamed, against a plain transformers forward of the target over prompt + output. The
Ray backend's check is in test_ray_engine.py, the endpoint's in test_serve.py."""

import pytest
import torch

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.core import batch as batch_mod
from pearl_ray.core.logprobs import TokenIds, token_logprobs

PROMPTS = [[1, 5, 9, 20], [3, 7], [2, 30, 31, 32, 33, 34]]
TOL = 1e-4


def reference_logprobs(target_dir: str, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of a plain transformers forward over prompt + output: row i scores output[i]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(output)], dim=-1)


def assert_matches(reference: torch.Tensor, output: list[int], logprobs, n: int) -> None:
    assert logprobs is not None and len(logprobs) == len(output), (len(output), logprobs and len(logprobs))
    for i, (tok, entry) in enumerate(zip(output, logprobs)):
        assert entry.token_id == tok
        assert abs(entry.logprob - float(reference[i, tok])) < TOL, (i, entry.logprob, float(reference[i, tok]))
        values, ids = reference[i].topk(n)
        assert [t for t, _ in entry.top] == ids.tolist(), (i, entry.top, ids.tolist())
        assert max(abs(v - float(w)) for (_, v), w in zip(entry.top, values)) < TOL if n else entry.top == ()


@pytest.fixture(scope="module")
def references(tiny_pair):
    cache = {}

    def get(prompt, output):
        key = (tuple(prompt), tuple(output))
        if key not in cache:
            cache[key] = reference_logprobs(tiny_pair["target"], prompt, output)
        return cache[key]

    return get


@pytest.mark.parametrize("method", ["ar", "sd", "pearl"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_a_plain_forward_of_the_target(tiny_pair, references, method, temperature):
    """Greedy and sampled: whatever tokens were committed, each one's log-probability and top-3 are the
    target's raw distribution at its position."""
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=temperature, seed=7, logprobs=3)
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3, method=method) as eng:
        outs = eng.generate(PROMPTS, params)
        for prompt, out in zip(PROMPTS, outs):
            assert_matches(references(prompt, out.token_ids), out.token_ids, out.logprobs, 3)
        chunks = list(eng.stream(PROMPTS[0], params))  # streamed: the same entries, chunk by chunk
        streamed = [lp for c in chunks for lp in (c.logprobs or [])]
        assert [c.token_ids for c in chunks[:-1]] and all(len(c.logprobs) == len(c.token_ids) for c in chunks[:-1])
        assert [e.token_id for e in streamed] == sum((c.token_ids for c in chunks), [])
        assert_matches(references(PROMPTS[0], [e.token_id for e in streamed]), [e.token_id for e in streamed],
                       streamed, 3)
        if temperature == 0.0:
            assert [e.token_id for e in streamed] == outs[0].token_ids


def test_adaptive_gamma_zero_alternatives_and_a_stop_string(tiny_pair, references):
    """The policy's windows (gamma unset), logprobs=0 (no alternatives) and an output cut by a stop string."""
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"]) as eng:
        base = SamplingParams(max_new_tokens=16, ignore_eos=True)
        first = eng.generate([PROMPTS[1]], base)[0]
        stop = eng.tokenizer.decode(first.token_ids[5:6])
        out = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=0,
                                                        stop=stop))[0]
        assert out.finish_reason == "stop" and len(out.token_ids) < 16
        assert_matches(references(PROMPTS[1], out.token_ids), out.token_ids, out.logprobs, 0)


def test_requests_that_do_not_ask_pay_nothing(tiny_pair, monkeypatch):
    """In a batch where one request asks, the other gets None and no rows of its own are scored; outputs are
    unchanged by asking."""
    scored = []
    real = batch_mod.logprob_rows
    monkeypatch.setattr(batch_mod, "logprob_rows", lambda rows: scored.append(rows.shape[0]) or real(rows))
    plain = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], gamma=3) as eng:
        want = [o.token_ids for o in eng.generate(PROMPTS, plain)]
        assert scored == []
        asked = eng.make_request(PROMPTS[0], SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=2))
        other = eng.make_request(PROMPTS[1], plain, index=1)
        results = eng._backend.generate_batch([asked, other])
    (ids0, _), (ids1, _) = results
    assert [list(ids0), list(ids1)] == want[:2]
    assert len(ids0.logprobs) == 12 and getattr(ids1, "logprobs", None) is None
    assert 0 < len(scored) <= 12  # one scoring per round of the asking request, none for the other


def test_token_logprobs_pairs_rows_with_tokens():
    rows = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]), -1)
    a, b = token_logprobs(rows, [2, 0], 2)
    assert a.token_id == 2 and a.logprob == pytest.approx(float(rows[0, 2])) and [t for t, _ in a.top] == [1, 2]
    assert b.top[0] == (0, pytest.approx(float(rows[1, 0])))
    with pytest.raises(ValueError):
        token_logprobs(rows, [0, 1, 2], 1)
    import pickle

    ids = pickle.loads(pickle.dumps(TokenIds([2, 0], [a, b])))
    assert ids == [2, 0] and ids.logprobs == [a, b]


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True, "3"])
def test_bad_logprobs_counts_are_refused(bad):
    from pearl_ray import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="logprobs"):
        SamplingParams(logprobs=bad)
