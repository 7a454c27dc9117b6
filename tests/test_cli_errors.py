"""CLI input errors: each is one ``error: ...`` line on stderr with exit status 2, no traceback, and is found
before any model loads (or Ray starts). "Before" is shown by naming a model path that does not exist beside the
bad value: the message must be about the value, not the path.

Three cases run as the real command (``python -m pearl_ray``: nothing else may reach stderr, and ``serve`` must
not start Ray), concurrently in one module fixture since each imports torch; the other ``generate`` cases call
the same ``main`` in this process."""

import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/path"

# id -> (subcommand and options, words the one error line must contain)
GENERATE_CASES = {
    "empty-prompt": (["--prompt", ""], ["--prompt", "empty"]),
    "blank-second-prompt": (["--prompt", "hi", "--prompt", "   "], ["--prompt", "empty", "2 of 2"]),
    "max-new-tokens-0": (["--prompt", "hi", "--max-new-tokens", "0"], ["max_new_tokens"]),
    "temperature-nan": (["--prompt", "hi", "--temperature", "nan"], ["temperature"]),
    "top-p-above-1": (["--prompt", "hi", "--top-p", "1.5"], ["top_p"]),
    "top-k-negative": (["--prompt", "hi", "--top-k", "-1"], ["top_k"]),
    "seed-2**63": (["--prompt", "hi", "--seed", str(2**63)], ["seed"]),
    "gamma-17": (["--prompt", "hi", "--gamma", "17"], ["--gamma", "0 = auto"]),
    "num-threads-0": (["--prompt", "hi", "--num-threads", "0"], ["--num-threads"]),
    "tp-size-0": (["--prompt", "hi", "--tensor-parallel-size", "0"], ["--tensor-parallel-size"]),
    "empty-stop": (["--prompt", "hi", "--stop", ""], ["stop"]),
}
SERVE_CASES = {
    "serve-max-num-seqs-0": (["--max-num-seqs", "0"], ["max_num_seqs: Input should be greater than or equal to 1"]),
    "serve-port-70000": (["--port", "70000"], ["--port", "70000"]),
}


def _run(case_id: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # would join a cluster instead
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    ray_tmp = tempfile.mkdtemp(prefix="rcli", dir="/tmp")  # short: Ray's socket paths live under it
    env["RAY_TMPDIR"] = ray_tmp
    if case_id in GENERATE_CASES:
        cmd = ["generate", "--target", MISSING, *GENERATE_CASES[case_id][0]]
    else:
        cmd = ["serve", "--target", MISSING, "--start-timeout-s", "30", *SERVE_CASES[case_id][0]]
    try:
        res = subprocess.run([sys.executable, "-m", "pearl_ray", *cmd], capture_output=True, text=True,
                             timeout=180, env=env, cwd=ROOT)
        ray_files = sorted(os.listdir(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"returncode": res.returncode, "stderr": res.stderr, "ray_files": ray_files}


AS_COMMAND = ["empty-prompt", *SERVE_CASES]


@pytest.fixture(scope="module")
def results():
    with ThreadPoolExecutor(max_workers=len(AS_COMMAND)) as pool:
        return dict(zip(AS_COMMAND, pool.map(_run, AS_COMMAND)))


@pytest.fixture
def generate_result(results, run_main):
    """``generate_result(case_id)``: the command's result, run as a command or in this process."""
    from pearl_ray.cli import main

    def get(case_id: str) -> dict:
        if case_id in results:
            return results[case_id]
        res = run_main(main, ["generate", "--target", MISSING, *GENERATE_CASES[case_id][0]])
        return {"returncode": res.returncode, "stderr": res.stderr}

    return get


def _check_one_line_error(res: dict, words: list[str]) -> str:
    err = res["stderr"]
    assert "Traceback" not in err, err
    assert res["returncode"] == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), err
    for word in words:
        assert word in line, line
    return line


@pytest.mark.parametrize("case_id", list(GENERATE_CASES))
def test_generate_input_error_is_one_line_before_models_load(generate_result, case_id):
    line = _check_one_line_error(generate_result(case_id), GENERATE_CASES[case_id][1])
    assert "nonexistent" not in line and "does not exist" not in line, line  # checked before loading the target


@pytest.mark.parametrize("case_id", list(SERVE_CASES))
def test_serve_input_error_is_one_line_before_ray_starts(results, case_id):
    res = results[case_id]
    line = _check_one_line_error(res, SERVE_CASES[case_id][1])
    assert "nonexistent" not in line, line
    assert "Ray" not in res["stderr"], res["stderr"]
    assert res["ray_files"] == [], f"Ray started (its temp dir holds {res['ray_files']})"
