"""The GSM8K evaluation job: prompts and answer extraction, bad input, the results file, the pair pool,
and the job end to end on tiny models: a local Ray (files, columns, plots, equal greedy outputs, resume),
two pairs on a simulated 2-node cluster, and ``ray job submit`` to a ``ray start --head`` cluster.

Tiny random models answer nonsense: accuracy only has to be computed. Ray tests shut down what they start.
"""

import collections
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pearl_ray.errors import ResourcesUnavailable, TargetUnavailable
from pearl_ray.evals import gsm8k
from pearl_ray.evals.dispatch import PairPool, WorkItem
from pearl_ray.evals.gsm8k_job import is_pair_failure, main
from pearl_ray.evals.records import ResultsFile, read_records

from ray_utils import free_port, private_ray, release_shared_ray, stop_process, wait_for

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("ar", "sd", "pearl")


# -- prompts and answers (pure) ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, strict, flexible", [
    ("So she pays $1,234.50 in total. The answer is $1,234.50.", None, "1234.50"),  # strict wants a plain number
    ("The answer is 1,234.", "1234", "1234"),
    ("It is 5 - 12 = -7 degrees. The answer is -7.", "-7", "-7"),
    ("5 + 13 = 18. The answer is 18. Next, 20 - 4 = 16 more", "18", "16"),
    ("the answer is 18.", None, "18"),  # strict-match is case-sensitive, as lm-eval
    ("I do not know.", None, None),
    ("", None, None),
])
def test_extraction_matches_lm_eval(text, strict, flexible):
    got = gsm8k.score(text, "18")
    assert (got["pred_strict"], got["pred_flexible"]) == (strict, flexible)
    assert got["correct_strict"] == (strict == "18") and got["correct_flexible"] == (flexible == "18")


def test_gold_normalisation_and_stop_cut():
    assert gsm8k.gold_answer("He pays 3 * 400 = <<3*400=1200>>1,200\n#### 1,200") == "1200"
    assert gsm8k.gold_answer("no marker") is None
    assert gsm8k.exact_match("$1,200.", "1200") and not gsm8k.exact_match("1200.0", "1200")
    assert not gsm8k.exact_match(None, "3") and not gsm8k.exact_match("3", None)
    # scoring stops at the next "Q:" (lm-eval's `until`), so the next made-up question's numbers do not count
    out = " 2 + 3 = 5. The answer is 5.\n\nQ: A man has 7 apples and 9 pears.\nA: The answer is 16."
    assert gsm8k.score(out, "5") == {"pred_strict": "5", "correct_strict": True, "pred_flexible": "5",
                                     "correct_flexible": True}


def test_prompts(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    text = gsm8k.build_prompt(q)
    assert text.count("Q: ") == 9 and text.endswith(f"\n\nQ: {q}\nA:") and text.count("The answer is") == 8
    assert gsm8k.build_prompt(q, num_shots=2).count("Q: ") == 3
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(ValueError, match="chat template"):
        gsm8k.chat_prompt(q, tok)
    tok.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = gsm8k.chat_prompt(q, tok)
    assert chat.startswith(f"<|user|>Q: {q}\n") and "The answer is N." in chat and chat.endswith("<|assistant|>")
    assert "Q: There are 15 trees" not in chat  # zero-shot


# -- bad input: a clear error before any model loads ---------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--methods", "ar,paerl"], "unknown method(s) ['paerl']"),
    (["--data", "/nonexistent/test.jsonl"], "not found"),
    (["--target", "/nonexistent/model"], "--target: model path '/nonexistent/model' does not exist"),
    (["--draft", "/nonexistent/draft"], "--draft: model path"),
    (["--out", str(REPO / "README.md")], "is a file"),
    (["--offset", "100000"], "past the 1319 questions"),
    (["--prompt-format", "chat"], "needs a chat template"),
    (["--limit", "abc"], None),  # argparse
])
def test_bad_input_fails_before_models_load(tiny_pair_long, tmp_path, capsys, args, message):
    import ray

    release_shared_ray()  # an earlier module's shared Ray: this checks that the job starts none
    base = ["--draft", tiny_pair_long["draft"], "--target", tiny_pair_long["target"], "--out", str(tmp_path / "o")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message is None or message in err, err
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


def test_bad_input_exit_code_of_the_script():
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "eval_gsm8k.py"), "--limit", "0"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--limit must be >= 1" in res.stderr


def test_resume_refuses_other_settings(tiny_pair_long, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"settings": {"protocol": "eos"}}))
    assert main(["--draft", tiny_pair_long["draft"], "--target", tiny_pair_long["target"], "--out", str(out)]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


# -- the results file and the pair pool (no Ray) ------------------------------------------------------------
def test_results_file_cuts_a_torn_line_and_refuses_duplicates(tmp_path):
    path = tmp_path / "results.jsonl"
    f = ResultsFile(path, ("qid", "method"))
    f.append({"qid": 0, "method": "ar", "x": 1})
    with open(path, "ab") as raw:
        raw.write(b'{"qid": 1, "meth')  # a write cut short by a kill
    assert read_records(path) == [{"qid": 0, "method": "ar", "x": 1}]
    f = ResultsFile(path, ("qid", "method"))
    assert f.done == {(0, "ar")}
    f.append({"qid": 1, "method": "ar", "x": 2})
    with pytest.raises(KeyError, match="already recorded"):
        f.append({"qid": 1, "method": "ar", "x": 3})
    assert [json.loads(line)["qid"] for line in path.read_text().splitlines()] == [0, 1]


def test_pair_pool_retries_a_failed_question_on_another_pair():
    """Pair 0's target dies whenever it reaches SD, pair 2 cannot be placed: every (question, method) is still
    recorded exactly once, by the pairs that work, and pair 0 is retired."""
    def start(index):
        if index == 2:
            raise ResourcesUnavailable("no room for pair 2")
        return index

    def run(engine, index, item):
        for m in list(item.methods):
            if engine == 0 and m == "sd":
                raise TargetUnavailable("the target died")
            time.sleep(0.005)
            yield m, {"qid": item.key, "method": m, "pair": index}

    records = []
    report = PairPool(3, start, run, records.append, is_pair_failure).run_all(
        [WorkItem(q, list(METHODS)) for q in range(8)])
    counts = collections.Counter((r["qid"], r["method"]) for r in records)
    assert counts == {(q, m): 1 for q in range(8) for m in METHODS}
    assert not report.failed and report.pairs_retired == [0] and list(report.start_errors) == [2]
    assert {r["pair"] for r in records if r["method"] == "sd"} == {1}


def test_pair_pool_runs_several_questions_at_once_per_pair():
    """--max-num-seqs: each pair's engine gets up to that many questions at once (its loop batches them)."""
    import threading

    lock, running, peak = threading.Lock(), {0: 0, 1: 0}, {0: 0, 1: 0}

    def run(engine, index, item):
        with lock:
            running[index] += 1
            peak[index] = max(peak[index], running[index])
        time.sleep(0.05)
        with lock:
            running[index] -= 1
        for m in list(item.methods):
            yield m, {"qid": item.key, "method": m, "pair": index}

    records = []
    report = PairPool(2, lambda i: i, run, records.append, is_pair_failure, slots_per_pair=3).run_all(
        [WorkItem(q, list(METHODS)) for q in range(24)])
    counts = collections.Counter((r["qid"], r["method"]) for r in records)
    assert counts == {(q, m): 1 for q in range(24) for m in METHODS} and not report.failed
    assert peak == {0: 3, 1: 3}


def test_pair_pool_gives_up_after_max_attempts_and_stops_on_bugs():
    def dead(engine, index, item):
        raise TargetUnavailable("always down")
        yield  # a generator

    report = PairPool(2, lambda i: i, dead, lambda r: None, is_pair_failure, max_attempts=2,
                      max_pair_failures=10).run_all([WorkItem(q, ["ar"]) for q in range(3)])
    assert sorted(it.key for it in report.failed) == [0, 1, 2] and all(it.attempts == 2 for it in report.failed)

    def buggy(engine, index, item):
        raise ValueError("a bad request fails on every pair: not retried")
        yield

    with pytest.raises(ValueError, match="not retried"):
        PairPool(2, lambda i: i, buggy, lambda r: None, is_pair_failure).run_all([WorkItem(0, ["ar"])])


# -- the report (no Ray) -------------------------------------------------------------------------------------
def report_record(qid: int, method: str, **over) -> dict:
    """One results.jsonl line as the job writes it, for 16 greedy tokens decoded in 16 plain rounds."""
    record = {"qid": qid, "method": method, "pair": "s/0", "temperature": 0.0, "token_ids": list(range(16)),
              "correct_strict": False, "correct_flexible": False, "finish_reason": "length", "new_tokens": 16,
              "wall_s": 2.0, "rounds": 16, "plain_rounds": 16, "turn_rounds": 0, "once_rounds": 0, "pre_rounds": 16 if method != "ar" else 0,
              "post_rounds": 0, "draft_idle_s": 1.0, "target_idle_s": 0.1, "target_forwards": 16,
              "accepted_tokens": 0, "verified_tokens": 0, "drafted_tokens": 0, "runs": 0, "fallback_rounds": 0,
              "draft_failures": 0, "acceptance_rate": None, "mean_accepted_len": None}
    record.update(over)
    return record


def test_report_says_when_a_method_never_drafted(tmp_path):
    """The adaptive policy chose plain decoding in every PEARL round: its row says so with the round count,
    never acceptance 0 / MAL 0, and the CSV keeps NaN there; SD, which drafted, shows its acceptance."""
    import math

    import pandas as pd

    from pearl_ray.evals import gsm8k_report

    sd = dict(rounds=8, plain_rounds=2, turn_rounds=6, pre_rounds=8, drafted_tokens=24, verified_tokens=20, accepted_tokens=15,
              runs=5, target_forwards=8, acceptance_rate=0.75, mean_accepted_len=3.0)
    records = [r for q in (0, 1) for r in (report_record(q, "ar"), report_record(q, "sd", **sd),
                                           report_record(q, "pearl"))]
    df = gsm8k_report.to_frame(records)
    summary, bad, text = gsm8k_report.write_summary(df, tmp_path)
    assert bad == []
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ")]
    rows = {cells[0]: dict(zip(lines[0], cells)) for cells in lines[1:]}
    assert rows["pearl"]["acceptance"] == "never drafted (the policy chose plain decoding in 32 rounds)", text
    assert rows["pearl"]["MAL"] == "-"
    assert (rows["sd"]["acceptance"], rows["sd"]["MAL"]) == ("0.750", "3.00")  # 30 of 40 accepted in 10 runs
    assert rows["ar"]["acceptance"] == "-"
    assert rows["sd"]["rounds plain/turn/once"] == "25%/75%/0%" and rows["pearl"]["rounds plain/turn/once"] == "100%/0%/0%"
    csv = pd.read_csv(tmp_path / "summary.csv").set_index("method")
    assert math.isnan(csv.loc["pearl", "acceptance_rate"]) and math.isnan(csv.loc["pearl", "mean_accepted_len"])
    assert csv.loc["pearl", "drafted_tokens"] == 0 and csv.loc["pearl", "total_rounds"] == 32
    assert csv.loc["sd", "acceptance_rate"] == pytest.approx(0.75)


# -- the job on Ray ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair_long(tmp_path_factory, tiny_tokenizer_dir):
    """Tiny random Llamas whose context holds an 8-shot GSM8K prompt (the word tokenizer maps it to ~1k ids)."""
    from pearl_ray.testing import save_tiny_llama

    root = tmp_path_factory.mktemp("long")
    return {side: str(save_tiny_llama(root / side, seed=seed, num_layers=layers, tokenizer_dir=tiny_tokenizer_dir,
                                      max_position_embeddings=2048))
            for side, seed, layers in (("target", 0, 2), ("draft", 1, 1))}


def job_args(pair, out, *extra):
    return ["--draft", pair["draft"], "--target", pair["target"], "--max-new-tokens", "12", "--gamma", "3",
            "--out", str(out), *extra]


def check_outputs(out: Path, questions: int) -> list[dict]:
    """The files exist, the summary has its columns and a row per method, the plots are PNGs, every
    (question, method) is recorded once and greedy outputs agree across methods."""
    import pandas as pd

    for name in ("results.jsonl", "summary.csv", "summary.md", "config.json"):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["method"]) == list(METHODS)
    for col in ("accuracy_strict", "accuracy_flexible", "tokens_per_s", "speedup_vs_ar", "speedup_vs_ar_ci_lo",
                "speedup_vs_sd", "acceptance_rate", "mean_accepted_len", "tokens_per_target_forward", "rounds",
                "pre_rounds", "post_rounds", "draft_idle_s", "target_idle_s"):
        assert col in summary.columns, col
    assert (summary["questions"] == questions).all() and summary["accuracy_flexible"].between(0, 1).all()
    assert "lossless: every question's greedy tokens are identical" in (out / "summary.md").read_text()
    for png in ("tokens_per_s.png", "speedup.png", "acceptance_by_position.png", "round_timeline.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    records = read_records(out / "results.jsonl")
    assert collections.Counter((r["qid"], r["method"]) for r in records) == {
        (q, m): 1 for q in range(questions) for m in METHODS}
    for q in range(questions):
        outs = {r["method"]: r["token_ids"] for r in records if r["qid"] == q}
        assert outs["ar"] == outs["sd"] == outs["pearl"] and len(outs["ar"]) == 12
    return records


@pytest.fixture
def shared_ray():
    """The suite's shared private Ray (``ray_utils.private_ray``), for one test."""
    yield from private_ray()


@pytest.mark.slow
@pytest.mark.ray
def test_job_end_to_end_and_resume(tiny_pair_long, tmp_path, shared_ray):
    import ray

    out = tmp_path / "run"
    assert main(job_args(tiny_pair_long, out, "--limit", "2", "--no-colocate")) == 0
    first = (out / "results.jsonl").read_bytes()
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"qid": 2, "method": "ar", "new_tok')  # an interrupted write
    assert main(job_args(tiny_pair_long, out, "--limit", "3", "--no-colocate")) == 0  # resume: only question 2 runs
    data = (out / "results.jsonl").read_bytes()
    assert data.startswith(first) and data.count(b"\n") == 9
    records = check_outputs(out, 3)
    r = next(r for r in records if r["method"] == "pearl")
    assert r["rounds"] == r["pre_rounds"] + r["post_rounds"] == len(r["round_timings"]) and r["gamma"] == 3
    by_schedule = {s: sum(t["schedule"] == s for t in r["round_timings"]) for s in ("plain", "turn", "once")}
    assert by_schedule == {s: r[f"{s}_rounds"] for s in by_schedule} and sum(by_schedule.values()) == r["rounds"]
    assert r["once_rounds"] > 0  # separate actors: the sides work at the same time
    pair = json.loads((out / "config.json").read_text())["sessions"][0]["pairs"][0]
    assert not pair["colocated"] and pair["draft_node"] == pair["target_node"]  # STRICT_PACK
    config = json.loads((out / "config.json").read_text())
    first_s, second_s = config["sessions"]
    assert (first_s["records_before"], first_s["records_written"]) == (0, 6)
    assert (second_s["records_before"], second_s["records_written"]) == (6, 3)
    pair = second_s["pairs"][0]
    assert pair["engine"]["backend"] == "ray" and pair["engine"]["gamma"] == 3 and pair["target_node"]
    assert second_s["versions"]["ray"] == ray.__version__ and "commit" in second_s["git"]
    assert second_s["hardware"]["cpu_count"] >= 1 and "--limit 3" in second_s["command"]


@pytest.fixture
def two_node_cluster(ray_default_ports):
    import ray
    from ray.cluster_utils import Cluster

    release_shared_ray()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp  # the cluster helper writes its address file under <RAY_TMPDIR>/ray
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": tmp})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield {n.node_id for n in nodes}
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old


@pytest.mark.slow
@pytest.mark.ray
def test_two_pairs_on_two_nodes_answer_each_question_once(tiny_pair_long, tmp_path, two_node_cluster):
    out = tmp_path / "pairs"
    assert main(job_args(tiny_pair_long, out, "--limit", "4", "--num-pairs", "2")) == 0
    check_outputs(out, 4)
    pairs = json.loads((out / "config.json").read_text())["sessions"][0]["pairs"]
    assert len(pairs) == 2 and {p["target_node"] for p in pairs} == two_node_cluster  # one pair per node
    assert all(p["draft_node"] == p["target_node"] for p in pairs)  # STRICT_PACK
    assert all(p["colocated"] for p in pairs)  # a CPU pair: one worker by default


def dashboard_up(address: str) -> bool:
    """Any HTTP answer (even 401 without a token) means the dashboard is serving."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_to_a_head_started_by_the_test(tiny_pair_long, tmp_path, ray_default_ports):
    """`ray start --head --block` (token auth, its own ports and temp dir) and `ray job submit --working-dir`;
    the job must end SUCCEEDED with its files written. The head is ended by its process handle."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dash = free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(16), HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TMPDIR", None)
    ports = {f"--{name}": free_port() for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "ray-client-server-port", "runtime-env-agent-port",
                                                   "metrics-export-port")}
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={tmp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", *(f"{k}={v}" for k, v in ports.items())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "job"
    address = f"http://127.0.0.1:{dash}"
    try:
        entry = [sys.executable, "jobs/eval_gsm8k.py", *job_args(tiny_pair_long, out, "--limit", "2")]
        runtime_env = json.dumps({"excludes": ["models/", "results/"]})
        assert wait_for(lambda: dashboard_up(address), timeout_s=90, interval_s=1.0), "the dashboard did not start"
        logs = []
        for attempt in range(4):  # the job agent may come up a little after the dashboard
            job_id = f"gsm8k-{attempt}"
            res = subprocess.run([ray_bin, "job", "submit", "--address", address, "--submission-id", job_id,
                                  "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--", *entry],
                                 env=env, capture_output=True, text=True, timeout=300)
            logs.append(res.stdout + res.stderr)
            if f"Job '{job_id}' succeeded" in logs[-1] or f"Job '{job_id}' failed" in logs[-1]:
                break
            time.sleep(5)
        status = subprocess.run([ray_bin, "job", "status", "--address", address, job_id], env=env,
                                capture_output=True, text=True, timeout=60)
        assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, "\n".join(logs)[-5000:]
        records = read_records(out / "results.jsonl")
        assert len(records) == 6 and (out / "summary.md").is_file() and (out / "round_timeline.png").is_file()
        config = json.loads((out / "config.json").read_text())
        assert config["sessions"][0]["ray_connection"] == "joined"
    finally:
        stop_process(head, 60)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
