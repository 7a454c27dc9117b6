"""Prompt families (training/families.py) and the gen-broad phase of training/distill_draft.py, on tiny models."""

import gzip
import json
from pathlib import Path

import pytest

from training.families import FAMILIES, build_family, humaneval_prompts

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s>{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny word-level tokenizer with a minimal chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_tokenizer(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_splits_and_determinism(family, chat_tokenizer):
    train = build_family(family, chat_tokenizer, "train", seed=0)
    heldout = build_family(family, chat_tokenizer, "heldout", seed=0)
    assert train and heldout
    for items in (train, heldout):
        assert all(it["family"] == family and it["text"] for it in items)
        assert len({it["key"] for it in items}) == len(items)
    assert not {it["key"] for it in train} & {it["key"] for it in heldout}
    assert not {it["text"] for it in train} & {it["text"] for it in heldout}
    assert build_family(family, chat_tokenizer, "train", seed=0) == train
    other = build_family(family, chat_tokenizer, "train", seed=1)
    assert {it["key"] for it in other} == {it["key"] for it in train}  # the seed orders, the split selects
    assert [it["key"] for it in other] != [it["key"] for it in train]


def test_family_sizes(chat_tokenizer):
    chat = build_family("chat", chat_tokenizer, "train") + build_family("chat", chat_tokenizer, "heldout")
    assert len(chat) >= 3000
    assert len(build_family("gsm8k_chat", chat_tokenizer, "train")) == 7473
    assert build_family("code_completion", None, "train")[0]["text"].rstrip().endswith('"""')
    assert isinstance(humaneval_prompts(), list)


def _gen_broad(run_distill, target: Path, out_dir: Path) -> str:
    res = run_distill(["--phase", "gen-broad", "--target", str(target), "--families", "chat,text", "--limit", "4",
                       "--batch", "2", "--gen-tokens", "6", "--out-dir", str(out_dir)])
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _records(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(out_dir.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    return rows


@pytest.mark.slow  # two gen-broad runs (the command itself runs in test_default_pair.py)
def test_gen_broad_smoke_and_resume(tmp_path, chat_tokenizer_dir, run_distill):
    from transformers import AutoTokenizer

    from pearl_ray.testing import save_tiny_llama

    target = save_tiny_llama(tmp_path / "target", seed=0, num_layers=2)
    AutoTokenizer.from_pretrained(str(chat_tokenizer_dir)).save_pretrained(target)
    out = tmp_path / "teacher"
    _gen_broad(run_distill, target, out)
    rows = _records(out)
    assert len(rows) == 4 and {r["family"] for r in rows} == {"chat", "text"}
    for r in rows:
        assert r["finish"] in ("eos", "length") and 1 <= len(r["continuation_ids"]) <= 6
        assert (r["finish"] == "eos") == (r["continuation_ids"][-1] == 2)  # the tiny model's EOS id
    cfg = json.loads((out / "gen_config.json").read_text())
    assert sum(cfg["counts"].values()) == 4
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl.gz")}
    _gen_broad(run_distill, target, out)  # resume: everything in the plan is done
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl.gz")} == before
    assert len(json.loads((out / "gen_config.json").read_text())["runs"]) == 2


def _doctest_checks(name: str, doc: str, ref) -> int:
    """Check every example in a ``code_doctest`` docstring against the reference implementation; return how
    many there are. ``>>> call`` / result lines, ``call == result`` lines and ``Input:`` / ``Output:`` pairs."""
    ns = {name: ref}
    lines = [ln.strip() for ln in doc.splitlines()]
    n = 0
    for i, ln in enumerate(lines):
        if ln.startswith(">>> "):
            got, want = eval(ln[4:], dict(ns)), lines[i + 1]
        elif ln.startswith(f"{name}("):
            call, _, want = ln.rpartition(" == ")
            got = eval(call, dict(ns))
        elif ln.startswith("Input: "):
            assert lines[i + 1].startswith("Output: ")
            got, want = eval(f"{name}({ln[len('Input: '):]})", dict(ns)), lines[i + 1][len("Output: "):]
        else:
            continue
        assert repr(got) == want and got == eval(want), (name, ln)
        n += 1
    return n


def test_code_doctest_prompts():
    import ast
    import inspect

    from training.doctest_tasks import DOCTEST_TASKS, VARIANTS, doctest_examples

    tasks = {t.name: t for t in DOCTEST_TASKS}
    assert len(tasks) == len(DOCTEST_TASKS) >= 150
    train = build_family("code_doctest", None, "train")
    heldout = build_family("code_doctest", None, "heldout")
    assert train and heldout and not {it["key"] for it in train} & {it["key"] for it in heldout}
    assert sorted(it["key"] for it in train + heldout) == sorted(n + s for n in tasks for s in VARIANTS.values())
    by_task = {}
    for it in train + heldout:
        by_task.setdefault(it["key"].split("/")[0], set()).add(it["text"])
    assert all(len(texts) == len(VARIANTS) for texts in by_task.values())  # the renderings differ
    styles = set()
    for it in train + heldout:
        text, task = it["text"], tasks[it["key"].split("/")[0]]
        assert text.endswith('\n    """\n')
        tree = ast.parse(text + "    pass\n")
        fn = tree.body[-1]
        assert isinstance(fn, ast.FunctionDef) and fn.name == task.name and fn.returns is not None
        assert all(a.annotation is not None for a in fn.args.args)
        assert [a.arg for a in fn.args.args] == list(inspect.signature(task.ref).parameters)
        bare = it["key"].endswith(VARIANTS[3])
        markers = {m for m in (">>>", "For example:", "Input: ", "Examples:") if m in text}
        assert not markers if bare else markers
        styles |= markers
        if any(w in text for w in ("List[", "Dict[", "Tuple[", "Optional[")):
            assert text.startswith("from typing import ")
        doc = ast.get_docstring(fn)
        assert task.examples and _doctest_checks(task.name, doc, task.ref) == (0 if bare else len(task.examples))
        for args, out in doctest_examples(task):  # outputs are the reference's results
            assert out == repr(task.ref(*args))
    assert styles == {">>>", "For example:", "Input: ", "Examples:"}
