"""The OpenAI-compatible endpoint on Ray Serve (``pearl_ray/serve``), over real HTTP on 127.0.0.1.

One private Ray head for the module (``ray start --head --block`` on free ports, its own temp dir, a
metrics export port), ended by its process handle. Three applications share one Serve instance (the
``serve`` command runs in test_loopback.py, with its own Ray, as a user runs it):
- ``tiny`` at ``/``: tiny random Llama models loaded from disk (a tokenizer with a chat template);
- ``faults`` at ``/faults``: slow tabular models injected, for disconnects and killed workers;
- ``keyed`` at ``/keyed``: tabular models behind API keys (one in its config, two in the head's environment).
Clients: the official ``openai`` package and ``requests``.
"""

import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import requests
from ray import serve

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.serve import ServeConfig, build_app, make_app
from pearl_ray.testing import SlowLM, TabularLM, save_tiny_llama

from ray_utils import free_port, release_shared_ray, run_threads, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
openai = pytest.importorskip("openai")
REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w0{% endif %}")


@pytest.fixture(scope="module")
def cluster(ray_default_ports_module):
    release_shared_ray()  # this module's driver joins the head below
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # no 30 s drain at the end
               PEARL_TEST_API_KEYS=" sk-env1 , sk-env2 ")  # the ``keyed`` app's ingress reads these
    env.pop("RAY_ADDRESS", None)
    port, metrics, tmp = free_port(), free_port(), tempfile.mkdtemp(prefix="rs", dir="/tmp")
    head = subprocess.Popen(  # 8 logical CPUs: the apps' pairs (1 + 1 CPU each) fit at once
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={port}",
         "--num-cpus=8", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={metrics}",
         "--system-config", json.dumps({"metrics_report_interval_ms": 1000})],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _try_init(address), timeout_s=90, interval_s=0.25), "the Ray head did not come up"
        yield SimpleNamespace(address=address, metrics=f"http://127.0.0.1:{metrics}/metrics", env=env)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            head.terminate()
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                head.kill()
            shutil.rmtree(tmp, ignore_errors=True)


def _try_init(address: str) -> bool:
    try:
        ray.init(address=address, log_to_driver=False)
        return True
    except ConnectionError:
        return False


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama target and a different draft sharing a word tokenizer that has a chat template."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve_models")
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root / "tok")
    return {"target": str(save_tiny_llama(root / "target", seed=0, num_layers=2, tokenizer_dir=root / "tok")),
            "draft": str(save_tiny_llama(root / "draft", seed=1, num_layers=1, tokenizer_dir=root / "tok"))}


@pytest.fixture(scope="module")
def server(cluster, tiny_models, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # a colocated pair (both models in the leader); ``faults`` keeps two actors, whose kills its tests exercise
    tiny = ServeConfig(draft=tiny_models["draft"], target=tiny_models["target"], model_name="tiny", gamma=3,
                       num_threads=1, max_ongoing_requests=2, max_queued_requests=2, retry_after_s=1, colocate=True)
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))  # no chat template
    faults = ServeConfig(model_name="toy", gamma=2, num_threads=1, engine_options={"round_timeout_s": 5.0},
                         colocate=False)
    models = {"target_model": SlowLM(target, 0.01), "draft_model": SlowLM(draft, 0.002), "tokenizer": tok,
              "eos_token_ids": ()}
    keyed = ServeConfig(model_name="toy", gamma=2, num_threads=1, colocate=True, api_keys=["sk-one"],
                        api_key_env="PEARL_TEST_API_KEYS")
    keyed_models = {"target_model": target, "draft_model": draft, "tokenizer": tok, "eos_token_ids": ()}
    serve.run_many([serve.RunTarget(make_app(tiny), name="tiny", route_prefix="/"),
                    serve.RunTarget(make_app(faults, models), name="faults", route_prefix="/faults"),
                    serve.RunTarget(make_app(keyed, keyed_models), name="keyed", route_prefix="/keyed")],
                   wait_for_applications_running=False)

    def running():
        apps = serve.status().applications
        states = {name: apps[name].status.value if name in apps else "-" for name in ("tiny", "faults", "keyed")}
        assert "DEPLOY_FAILED" not in states.values(), {n: apps[n].message for n in apps}
        return set(states.values()) == {"RUNNING"}

    assert wait_for(running, timeout_s=300, interval_s=1.0)
    base = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(base=base, tiny=tiny_models, toy_target=target, toy_tokenizer=tok)
    # the apps go with the cluster fixture's serve.shutdown() (all at once; deleting each waits for it)


def replica_status(app: str) -> dict:
    return serve.get_deployment_handle("PearlServer", app).status.remote().result(timeout_s=60)


def data_events(response):
    """The JSON payloads of an SSE response, up to and excluding ``[DONE]`` (asserted present)."""
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: "), line
        if line == b"data: [DONE]":
            return
        yield json.loads(line[6:])
    raise AssertionError("the stream ended without data: [DONE]")


def metric_samples(url: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url, timeout=10).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith("ray_pearl_")]


def metric_sum(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# -- the tiny app ------------------------------------------------------------------------------------------
def test_openai_client_streamed_and_not_match_target_greedy(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    ref = PearlEngine(target=server.tiny["target"], method="ar")
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompt = "w1 w2 w3"
    want = ref.generate([prompt], params)[0].text
    kw = dict(model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})

    full = client.completions.create(**kw)
    assert full.choices[0].text == want and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 24 and full.usage.prompt_tokens == len(ref.encode(prompt))
    pearl = full.model_extra["pearl"]
    assert pearl["method"] == "pearl" and pearl["gamma"] == 3 and pearl["new_tokens"] == 24
    assert 0 <= pearl["acceptance_rate"] <= 1 and pearl["tokens_per_target_forward"] >= 1 and pearl["rounds"] > 0
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].model_extra["pearl"]["new_tokens"] == 24
    stop = want.split()[4]  # the text is cut before the stop string's first occurrence
    cut = want[: want.index(stop)]
    stopped = client.completions.create(**kw, stop=[stop, "never"])
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True)) == cut
    for method in ("sd", "ar"):
        out = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "method": method}})
        assert out.choices[0].text == want and out.model_extra["pearl"]["method"] == method
        counts = {k: out.model_extra["pearl"][f"{k}_rounds"] for k in ("plain", "turn", "once")}
        assert sum(counts.values()) == out.model_extra["pearl"]["rounds"], counts
        assert counts["once"] == 0  # colocated on one thread: the sides cannot run at once
        assert (counts["plain"] == out.model_extra["pearl"]["rounds"]) == (method == "ar"), counts

    messages = [{"role": "user", "content": "w5 w6 w7"}]
    tok = ref.tokenizer
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    want_chat = ref.generate([ids], params)[0].text
    ckw = dict(model="tiny", messages=messages, max_completion_tokens=24, temperature=0,
               extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(**ckw)
    assert chat.choices[0].message.content == want_chat and chat.usage.prompt_tokens == len(ids)
    streamed = list(client.chat.completions.create(**ckw, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant" and streamed[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want_chat

    seeded = dict(model="tiny", prompt=prompt, max_tokens=16, temperature=1.0, seed=1234,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**seeded).choices[0].text
    assert client.completions.create(**seeded).choices[0].text == first
    assert "".join(c.choices[0].text for c in client.completions.create(**seeded, stream=True)) == first
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert requests.get(server.base + "/health", timeout=30).json()["status"] == "ok"


def target_logprobs(target_dir: str, prompt_ids: list[int], output_ids: list[int]):
    """The reference: log_softmax of a plain transformers forward of the target over prompt + output."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0]
    n = len(prompt_ids)
    return torch.log_softmax(logits[n - 1: n - 1 + len(output_ids)].float(), dim=-1)


def test_logprobs_through_the_client_equal_the_targets_own_forward(server):
    """Completions (``logprobs: 3``) and chat (``logprobs: true, top_logprobs: 2``), streamed and not, under
    every method: each token's log-probability and its alternatives within 1e-4 of the target's forward."""
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    ref = PearlEngine(target=server.tiny["target"], method="ar")
    tok, params = ref.tokenizer, SamplingParams(max_new_tokens=10, ignore_eos=True)
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    cases = {"completion": ref.encode("w1 w2 w3"), "chat": chat_ids}
    want = {}
    for kind, ids in cases.items():
        out = ref.generate([ids], params)[0].token_ids
        want[kind] = (out, [tok.decode([t]) for t in out], target_logprobs(server.tiny["target"], ids, out))

    def close(a: float, b) -> bool:
        return abs(a - float(b)) < 1e-4

    for method in ("pearl", "sd", "ar"):
        extra = {"ignore_eos": True, "method": method}
        kw = dict(model="tiny", prompt="w1 w2 w3", max_tokens=10, temperature=0, logprobs=3, extra_body=extra)
        full = client.completions.create(**kw).choices[0].logprobs
        streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)
                    if c.choices and c.choices[0].logprobs]
        out_ids, tokens, rows = want["completion"]
        for lp in (full, SimpleNamespace(**{k: sum((getattr(c, k) for c in streamed), []) for k in (
                "tokens", "token_logprobs", "top_logprobs", "text_offset")})):
            assert lp.tokens == tokens, (method, lp.tokens, tokens)
            assert lp.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
            for i, tid in enumerate(out_ids):
                assert close(lp.token_logprobs[i], rows[i, tid]), (method, i, lp.token_logprobs[i], rows[i, tid])
                values, top = rows[i].topk(3)
                expect = {tok.decode([t]): float(v) for t, v in zip(top.tolist(), values)}
                expect[tokens[i]] = float(rows[i, tid])  # the chosen token is always listed
                assert lp.top_logprobs[i].keys() == expect.keys(), (method, i, lp.top_logprobs[i], expect)
                assert all(close(lp.top_logprobs[i][t], v) for t, v in expect.items())

        ckw = dict(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2,
                   extra_body=extra)
        full = client.chat.completions.create(**ckw).choices[0].logprobs.content
        streamed = [e for c in client.chat.completions.create(**ckw, stream=True)
                    if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        out_ids, tokens, rows = want["chat"]
        for content in (full, streamed):
            assert [e.token for e in content] == tokens, (method, [e.token for e in content], tokens)
            for i, e in enumerate(content):
                tid = out_ids[i]
                assert close(e.logprob, rows[i, tid]) and e.bytes == list(e.token.encode()), (method, i, e)
                values, top = rows[i].topk(2)
                assert [t.token for t in e.top_logprobs] == [tok.decode([t]) for t in top.tolist()]
                assert all(close(t.logprob, v) for t, v in zip(e.top_logprobs, values))
    plain = client.completions.create(model="tiny", prompt="w1", max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked: not sent


BAD = [  # (route, raw body, status, param, code)
    ("/v1/completions", b'{"prompt": "w1", "max_tokens": 4', 400, None, "invalid_json"),
    ("/v1/completions", b'{"prompt": "w1 \xff\xfe w2"}', 400, None, "invalid_encoding"),
    ("/v1/completions", b'["w1"]', 400, None, "invalid_type"),
    ("/v1/completions", b'{"max_tokens": 4}', 400, "prompt", "missing_required_parameter"),
    ("/v1/chat/completions", b'{"max_tokens": 4}', 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages", "invalid_value"),
    ("/v1/chat/completions", b'{"messages": [{"role": "bot", "content": "w1"}]}', 400, "messages.0.role", None),
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "max_tokens": "4"}', 400, "max_tokens", "invalid_type"),
    ("/v1/completions", b'{"prompt": "w1", "max_tokens": 0}', 400, "max_tokens", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "temperature": -0.5}', 400, "temperature", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "top_p": 1.5}', 400, "top_p", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "seed": -1}', 400, "seed", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "n": 2}', 400, "n", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "stream": 1}', 400, "stream", "invalid_type"),
    ("/v1/completions", b'{"prompt": "w1", "stop": [3]}', 400, "stop", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "gamma": 0}', 400, "gamma", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "method": "beam"}', 400, "method", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "stream_options": {"include_usage": true}}', 400, "stream_options", None),
    ("/v1/completions", b'{"prompt": [1, 4000]}', 400, "prompt", "invalid_value"),
    ("/v1/completions", b'{"prompt": "' + b"w1 " * 300 + b'"}', 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", b'{"prompt": "w1", "max_tokens": 4000}', 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", b'{"prompt": "w1", "model": "gpt-4o"}', 404, "model", "model_not_found"),
    ("/faults/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w1"}]}', 400, "messages",
     "chat_template_missing"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w1 \\ud800 w2"}]}', 400, "messages",
     "invalid_value"),  # a lone surrogate (JSON lets it through, UTF-8 cannot encode it)
    # found by a probe (2026-12-07): each was a 500 or was accepted without a word
    ("/v1/completions", b'{"prompt": "w1", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None, "too_deep"),
    ("/v1/completions", b'{"prompt": "w1", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None, "too_deep"),
    ("/v1/completions", b'{"prompt": "w1", "x": "' + b"a" * (9 * 2**20) + b'"}', 400, None, "body_too_large"),
    ("/v1/completions", b'{"prompt": "w1", "stop": ""}', 400, "stop", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "stop": ["w2", ""]}', 400, "stop", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "logprobs": 6}', 400, "logprobs", "invalid_value"),
    ("/v1/completions", b'{"prompt": "w1", "logprobs": true}', 400, "logprobs", "invalid_type"),
    ("/v1/completions", b'{"prompt": "w1", "echo": true}', 400, "echo", "unsupported_parameter"),
    ("/v1/completions", b'{"prompt": "w1", "logit_bias": {"5": 10}}', 400, "logit_bias", "unsupported_parameter"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2}', 400,
     "top_logprobs", "invalid_value"),  # without logprobs: true
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w1"}], "logprobs": true, '
     b'"top_logprobs": 6}', 400, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w1"}], "tools": [{"type": "function"}]}',
     400, "tools", "unsupported_parameter"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w1"}], "response_format": '
     b'{"type": "json_object"}}', 400, "response_format", "unsupported_parameter"),
    ("/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "w1"}]}', 400, "messages",
     "invalid_value"),
]


def test_api_keys_guard_every_v1_route_and_leave_health_open(server):
    """No key, a wrong key and the right ones (from the config and from the ingress's environment), through the
    ``openai`` client and plain HTTP; ``/health`` answers without a key."""
    base = server.base + "/keyed"
    body = {"model": "toy", "prompt": [4, 5], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    routes = [("get", "/v1/models", None), ("post", "/v1/completions", body),
              ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}]})]
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-one"},
                    {"Authorization": "Bearer sk-one-and-more"}, {"Authorization": "Basic sk-one"}):
        for method, route, payload in routes:
            r = requests.request(method, base + route, json=payload, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, route, r.status_code, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key", err
            assert r.headers.get("WWW-Authenticate") == "Bearer"
    assert requests.get(base + "/health", timeout=30).json()["status"] == "ok"  # open

    wrong = openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model="toy", prompt=[4, 5], max_tokens=3)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    want = toy_reference(server, 3)
    for key in ("sk-one", "sk-env1", "sk-env2"):
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["toy"]
        out = client.completions.create(model="toy", prompt=[4, 5], max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == want
        streamed = client.completions.create(model="toy", prompt=[4, 5], max_tokens=3, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in streamed) == want
        with pytest.raises(openai.BadRequestError):  # past the key check: this tokenizer has no chat template
            client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "w1"}])


def test_unknown_routes_and_methods_answer_in_the_openai_error_shape(server):
    for method, route, status in (("post", "/v1/nope", 404), ("get", "/v1/completions", 405),
                                  ("post", "/v1/completions/", 404), ("get", "/v1/models/", 404)):
        r = requests.request(method, server.base + route, json={"prompt": "w1"}, timeout=30, allow_redirects=False)
        assert r.status_code == status, (method, route, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and route in err["message"], err


def test_tiny_temperatures_decode(server):
    for t in (1e-39, 1e-8, 1e-3):
        r = requests.post(server.base + "/v1/completions", timeout=60,
                          json={"prompt": "w1 w2", "max_tokens": 6, "temperature": t, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, (t, r.text)


def test_every_bad_input_is_answered_and_the_server_keeps_serving(server):
    good = {"prompt": "w1 w2", "max_tokens": 2, "temperature": 0, "some_unknown_field": {"ignored": True},
            "logprobs": None, "echo": False, "tools": [], "logit_bias": {}, "presence_penalty": 0,
            "response_format": {"type": "text"}}  # unsupported fields at their "off" values are served
    for route, body, status, param, code in BAD:
        r = requests.post(server.base + route, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, (body[:80], r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert err["type"] == "invalid_request_error" and err["param"] == param, (body[:80], err)
        assert code is None or err["code"] == code, (body[:80], err)
        ok = requests.post(server.base + "/v1/completions", json=good, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1, ok.text


def test_bounded_load_answers_every_request_once(server):
    """24 clients for 8 s against a replica that holds 2 requests and queues 2 more; rejected clients wait
    for Retry-After."""
    clients, duration_s, max_tokens = 24, 8.0, 16
    url = server.base + "/v1/completions"
    finished_before = replica_status("tiny")["finished"]
    results, errors, sent = [], [], collections.Counter()

    def client(i: int) -> None:
        session, seq, end = requests.Session(), 0, time.monotonic() + duration_s
        try:
            while time.monotonic() < end:
                body = {"model": "tiny", "prompt": f"w{i % 90} w{seq % 90}", "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": seq % 2 == 1}
                sent[i] += 1
                t0 = time.monotonic()
                r = session.post(url, json=body, timeout=120)
                results.append((i, seq, r.status_code, time.monotonic() - t0, r.headers.get("Retry-After"), r.text))
                seq += 1
                if r.status_code != 200:
                    time.sleep(float(r.headers.get("Retry-After", 1)))  # as a polite client does
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    wall_s = time.monotonic() - t0
    assert not errors and not any(t.is_alive() for t in threads), errors[:3]
    assert len(results) == sum(sent.values())  # every request answered exactly once
    assert len({(i, seq) for i, seq, *_ in results}) == len(results)
    by_status = collections.Counter(status for _, _, status, *_ in results)
    assert set(by_status) <= {200, 503}, by_status
    ids, ok_latency, rejected_latency = set(), [], []
    for _, seq, status, latency, retry_after, text in results:
        if status == 503:
            assert retry_after == "1" and json.loads(text)["error"]["code"] == "overloaded", text
            rejected_latency.append(latency)
            continue
        ok_latency.append(latency)
        if seq % 2:  # streamed
            events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
            assert text.rstrip().endswith("data: [DONE]") and events[-1]["choices"][0]["finish_reason"] == "length"
            assert events[-1]["pearl"]["new_tokens"] == max_tokens
            ids.add(events[0]["id"])
        else:
            doc = json.loads(text)
            assert doc["usage"]["completion_tokens"] == max_tokens
            ids.add(doc["id"])
    assert by_status[200] > 0 and by_status[503] > 0 and len(ids) == by_status[200]
    assert replica_status("tiny")["finished"] - finished_before == by_status[200]  # none lost, none doubled
    assert max(rejected_latency) < 5.0  # rejected at once, never a hang
    q = statistics.quantiles(ok_latency, n=100) if len(ok_latency) > 1 else ok_latency * 99
    print(f"\n[load] {len(results)} requests from {clients} clients in {wall_s:.1f} s: {by_status[200]} ok "
          f"({by_status[200] / wall_s:.2f} req/s, {by_status[200] * max_tokens / wall_s:.1f} tok/s), "
          f"{by_status[503]} x 503; ok latency p50 {statistics.median(ok_latency):.3f} s p99 {q[98]:.3f} s; "
          f"503 latency p50 {statistics.median(rejected_latency):.3f} s max {max(rejected_latency):.3f} s")
    assert requests.get(server.base + "/health", timeout=30).status_code == 200
    assert wait_for(lambda: replica_status("tiny")["ongoing"] == 0, timeout_s=30)
    r = requests.post(url, json={"prompt": "w1", "max_tokens": 3, "temperature": 0, "ignore_eos": True}, timeout=30)
    assert r.status_code == 200


def test_eight_concurrent_streams_equal_their_answers_and_share_rounds(server):
    """8 streamed openai clients at once on one replica (max_num_seqs 8): each stream equals its non-streamed
    answer, and the pair's continuous loop ran them together (far fewer loop rounds than their sum)."""
    client = openai.OpenAI(base_url=server.base + "/faults/v1", api_key="unused", max_retries=0, timeout=120)
    prompts = [[4, 5], [1], [2, 3, 1], [0, 4], [5, 5, 5], [3], [1, 2], [4, 0, 2, 1]]
    methods = ["pearl", "sd", "ar", "pearl", "pearl", "sd", "ar", "pearl"]
    kws = [dict(model="toy", prompt=p, max_tokens=24 + 4 * i, temperature=0,
                extra_body={"ignore_eos": True, "method": m}) for i, (p, m) in enumerate(zip(prompts, methods))]
    want = [client.completions.create(**kw).choices[0].text for kw in kws]
    leader = replica_status("faults")["workers"]["target"]
    rounds_before = ray.get(leader.loop_status.remote(), timeout=30)["rounds"]

    def one(i):
        chunks = list(client.completions.create(**kws[i], stream=True))
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].model_extra["pearl"]["rounds"]

    results, errors = run_threads(one, 8, 180)
    assert not errors, errors
    got = [results[i][0] for i in range(8)]
    per_request_rounds = [results[i][1] for i in range(8)]
    assert got == want
    loop_rounds = ray.get(leader.loop_status.remote(), timeout=30)["rounds"] - rounds_before
    assert 0 < loop_rounds < sum(per_request_rounds) / 2, (loop_rounds, per_request_rounds)


# -- faults (slow injected models) -------------------------------------------------------------------------
def test_extreme_sampling_parameters_never_break_the_streams_beside_them(server):
    """A fuzz of extreme sampling parameters (tiny top_p and temperature, huge top_k, random seeds and stops),
    one request at a time, while 4 greedy streams run: each fuzz request is answered 200 or 400, every stream
    finishes with its normal output, and no worker restarts. ``top_p: 1e-300`` alone used to end every stream
    beside it and restart the target."""
    import random

    rng = random.Random(1234)
    want = toy_reference(server, 300)
    restarts = replica_status("faults")["restarts"]
    url = server.base + "/faults/v1/completions"
    body = {"model": "toy", "prompt": [4, 5], "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True}

    def stream(_):
        text = ""
        with requests.post(url, json=body, stream=True, timeout=180) as r:
            for event in data_events(r):
                assert "error" not in event, event
                text += event["choices"][0]["text"]
        return text

    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(run_threads(stream, 4, 240)))
    runner.start()
    time.sleep(1.0)  # the streams are under way
    statuses = collections.Counter()
    for i in range(200):
        if not runner.is_alive() and i >= 8:
            break
        if i == 0:  # the probe's request first, then the fuzz
            fuzz = {"model": "toy", "prompt": [4, 5], "max_tokens": 8, "temperature": 0.7, "top_p": 1e-300}
            r = requests.post(url, json=fuzz, timeout=120)
            assert r.status_code == 200, r.text
            statuses[r.status_code] += 1
            continue
        fuzz = {"model": "toy", "prompt": [rng.randrange(6) for _ in range(rng.randint(1, 4))],
                "max_tokens": rng.randint(1, 12), "stream": rng.random() < 0.5,
                "temperature": rng.choice([0, 1e-300, 5e-324, 1e-39, 1e-8, 0.7, 2.0]),
                "top_p": rng.choice([1e-300, 5e-324, 1e-46, 1e-44, 1e-30, 0.5, 1.0]),
                "top_k": rng.choice([-1, 0, 1, 3, 10**12]), "seed": rng.randrange(2**63),
                "method": rng.choice(["pearl", "sd", "ar"]), "gamma": rng.randint(1, 16)}
        r = requests.post(url, json=fuzz, timeout=120)
        statuses[r.status_code] += 1
        assert r.status_code in (200, 400), (fuzz, r.status_code, r.text[:500])
        if fuzz["stream"] and r.status_code == 200:
            assert "error" not in r.text, (fuzz, r.text[-500:])
    runner.join(240)
    results, errors = outcome[0]
    assert not errors and results == {i: want for i in range(4)}, (errors, results)
    assert replica_status("faults")["restarts"] == restarts
    print(f"\n[fuzz] {sum(statuses.values())} extreme requests beside 4 streams: {dict(statuses)}")


def toy_reference(server, max_tokens: int) -> str:
    ref = PearlEngine(target_model=server.toy_target, tokenizer=server.toy_tokenizer, method="ar", eos_token_ids=())
    return ref.generate([[4, 5]], SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))[0].text


def test_client_disconnect_frees_the_pair(server):
    url = server.base + "/faults/v1/completions"
    body = {"model": "toy", "prompt": [4, 5], "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    t0 = time.monotonic()
    assert requests.post(url, json=body, timeout=120).status_code == 200
    full_s = time.monotonic() - t0
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=60) as r:
        events = data_events(r)
        next(events), next(events)
    t0 = time.monotonic()  # the connection is closed: the next request must not wait for the abandoned one
    r = requests.post(url, json={**body, "max_tokens": 3}, timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 200 and took < full_s / 2, (took, full_s)
    assert wait_for(lambda: replica_status("faults")["ongoing"] == 0, timeout_s=10)


def test_draft_killed_mid_stream_keeps_the_stream_lossless(cluster, server):
    status = replica_status("faults")
    assert wait_for(lambda: replica_status("faults")["draft_ready"], timeout_s=120)
    draft = replica_status("faults")["workers"]["draft"]
    want = toy_reference(server, 80)
    body = {"model": "toy", "prompt": [4, 5], "max_tokens": 80, "temperature": 0, "ignore_eos": True, "stream": True}
    text, last = "", None
    with requests.post(server.base + "/faults/v1/completions", json=body, stream=True, timeout=120) as r:
        for n, event in enumerate(data_events(r)):
            assert "error" not in event, event
            if n == 1:
                ray.kill(draft)
            text += event["choices"][0]["text"]
            last = event
    assert text == want and last["choices"][0]["finish_reason"] == "length"
    assert last["pearl"]["draft_failures"] >= 1 and last["pearl"]["new_tokens"] == 80, last["pearl"]
    assert wait_for(lambda: (s := replica_status("faults"))["draft_ready"] and s["workers"]["draft"] != draft, 120)
    assert status["restarts"]["draft"] < replica_status("faults")["restarts"]["draft"]
    assert wait_for(lambda: metric_sum(metric_samples(cluster.metrics), "ray_pearl_draft_failures_total") >= 1, 60)


def test_target_killed_mid_request_gives_an_error_event_then_recovers(cluster, server):
    target = replica_status("faults")["workers"]["target"]
    body = {"model": "toy", "prompt": [4, 5], "max_tokens": 80, "temperature": 0, "ignore_eos": True, "stream": True}
    t0, events = time.monotonic(), []
    with requests.post(server.base + "/faults/v1/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for n, event in enumerate(data_events(r)):
            events.append(event)
            if n == 1:
                ray.kill(target)
    assert time.monotonic() - t0 < 30
    error = events[-1].get("error")
    assert error and error["status"] == 503 and error["code"] == "target_unavailable", events[-1]
    want = toy_reference(server, 5)

    def recovered() -> bool:
        r = requests.post(server.base + "/faults/v1/completions", timeout=60,
                          json={**body, "stream": False, "max_tokens": 5})
        return r.status_code == 200 and r.json()["choices"][0]["text"] == want

    assert wait_for(recovered, timeout_s=120, interval_s=1.0)
    assert replica_status("faults")["workers"]["target"] != target
    assert wait_for(lambda: metric_sum(metric_samples(cluster.metrics), "ray_pearl_worker_restarts_total",
                                       side="target") >= 1, 60)


# -- metrics and the config file ---------------------------------------------------------------------------
def test_metrics_reach_the_export_endpoint(cluster, server):
    for max_tokens in (8, 12):
        r = requests.post(server.base + "/faults/v1/completions", timeout=60, json={
            "prompt": [4, 5], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True})
        assert r.status_code == 200
    requests.post(server.base + "/v1/completions", json={"prompt": "w1", "n": 3}, timeout=30)
    need = ["ray_pearl_requests_total", "ray_pearl_prompt_tokens_total", "ray_pearl_generation_tokens_total",
            "ray_pearl_spec_decode_num_draft_tokens_total", "ray_pearl_spec_decode_num_accepted_tokens_total",
            "ray_pearl_spec_decode_acceptance_rate_count", "ray_pearl_spec_decode_mean_accepted_length_count",
            "ray_pearl_time_to_first_token_seconds_count", "ray_pearl_time_per_output_token_seconds_count",
            "ray_pearl_e2e_request_latency_seconds_count", "ray_pearl_num_requests_running",
            "ray_pearl_num_requests_waiting", "ray_pearl_request_success_total", "ray_pearl_rounds_total"]
    samples = []

    def exported() -> bool:
        samples[:] = metric_samples(cluster.metrics)
        names = {s.name for s in samples}
        held = sum(metric_sum(samples, f"ray_pearl_num_requests_{state}") for state in ("running", "waiting"))
        return (all(n in names for n in need) and metric_sum(samples, "ray_pearl_requests_total", status="400") > 0
                and held == 0)  # the gauges catch up within an export interval

    assert wait_for(exported, timeout_s=60, interval_s=1.0), [(s.name, s.labels, s.value) for s in samples
                                                             if not s.name.endswith("_bucket")]
    m = lambda name, **labels: metric_sum(samples, name, **labels)  # noqa: E731
    assert m("ray_pearl_requests_total", status="200", model="toy") >= 2
    assert m("ray_pearl_generation_tokens_total", model="toy") >= 20
    accepted = m("ray_pearl_spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= m("ray_pearl_spec_decode_num_draft_tokens_total")
    rate = m("ray_pearl_spec_decode_acceptance_rate_sum") / m("ray_pearl_spec_decode_acceptance_rate_count")
    assert 0 < rate <= 1
    ttft = m("ray_pearl_time_to_first_token_seconds_sum") / m("ray_pearl_time_to_first_token_seconds_count")
    e2e = m("ray_pearl_e2e_request_latency_seconds_sum") / m("ray_pearl_e2e_request_latency_seconds_count")
    assert 0 < ttft <= e2e < 60
    # the faults app's pair drafts in separate actors: PEARL's rounds are at once (the rounds of requests
    # whose draft was killed, verifying alone, count as one side's turn)
    assert m("ray_pearl_rounds_total", model="toy", schedule="once") > 0


def test_the_serve_config_files_parse_and_build():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    docs = [yaml.safe_load((REPO / "clusters/serve/pearl.yaml").read_text())]
    service = yaml.safe_load((REPO / "clusters/serve/rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    docs.append(yaml.safe_load(service["spec"]["serveConfigV2"]))
    for doc in docs:
        (app,) = ServeDeploySchema.model_validate(doc).applications
        assert app.import_path == "pearl_ray.serve:build_app"
        config = ServeConfig.model_validate(app.args)
        assert len(config.bundles()) == 3
        built = build_app(app.args)  # what Serve deploys: the ingress bound to the model deployment
        ingress = built._bound_deployment
        model = ingress.init_args[0]._bound_deployment
        assert (ingress.name, model.name) == ("OpenAIIngress", "PearlServer")
        assert model.max_ongoing_requests == config.max_ongoing_requests
        assert model._replica_config.placement_group_bundles == config.bundles()
        assert model.init_args[0]["target"] == config.target == app.args["target"]
    with pytest.raises(ValueError, match="draf_num_cpus"):
        ServeConfig.model_validate({"draf_num_cpus": 1})


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-v", "-s"]))
