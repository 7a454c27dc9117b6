"""One configuration: each engine option is declared once (``config.EngineConfig``, with its default, check and
help), and ``ServeConfig``, the command line and the GSM8K job's settings take it from there; one preset rule
(``presets.apply_preset``) and one length rule (``config.fit_context``) for the engine, the endpoint and the job.
No models, no Ray."""

import argparse
import dataclasses

import pytest

from pearl_ray.config import (MAX_GAMMA, OPTIONS, EngineConfig, add_options, check_flags, check_option, fit_context,
                              options_from_args)
from pearl_ray.errors import ContextLengthError, InvalidParameterError, PromptError

CHECKED = {name: f.metadata["checks"] for name, f in OPTIONS.items() if f.metadata["checks"]}
BAD = {"ge": lambda b: b - 1, "gt": lambda b: b, "le": lambda b: b + 1}


def bad_values(name: str) -> list:
    checks = CHECKED[name]
    if "choices" in checks:
        return ["no-such-choice"]
    values = [BAD[k](b) for k, b in checks.items() if k in BAD]
    return values + ["7"]  # a number as text is not a number


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_every_checked_option_refuses_bad_values_naming_itself(name):
    for bad in bad_values(name):
        with pytest.raises(InvalidParameterError, match=name):
            EngineConfig(**{name: bad})
        with pytest.raises(InvalidParameterError, match=name):
            check_option(name, bad)
    check_option(name, OPTIONS[name].default)  # the declared default passes its own check


def test_the_serve_config_takes_the_engine_options_declared_defaults_and_bounds():
    from pydantic import ValidationError

    from pearl_ray.serve import ServeConfig

    own = {"gamma": None, "draft": "default-draft", "target": "default-target"}  # the endpoint's differences
    shared = [n for n in ServeConfig.model_fields if n in OPTIONS]
    assert len(shared) >= 15, shared
    config = ServeConfig()
    for name in shared:
        assert getattr(config, name) == own.get(name, OPTIONS[name].default), name
    assert config.placement_strategy == OPTIONS["placement"].default
    for name in shared:
        if name not in CHECKED:
            continue
        for bad in bad_values(name):
            if bad == "7" and "choices" not in CHECKED[name]:
                continue  # pydantic converts numeric text (lax mode)
            with pytest.raises(ValidationError, match=name):
                ServeConfig(**{name: bad})


def test_command_line_flags_come_from_the_declarations():
    from pearl_ray.cli import GENERATE_OPTIONS, SERVE_OPTIONS, build_parser, check_generate_args

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, names in (("generate", GENERATE_OPTIONS), ("serve", SERVE_OPTIONS)):
        flags = {a.dest: a for a in sub.choices[command]._actions}
        for name in names:
            assert name in flags, (command, name)
            if "choices" in CHECKED.get(name, {}):
                assert tuple(flags[name].choices) == tuple(CHECKED[name]["choices"]), (command, name)
    args = parser.parse_args(["generate", "--prompt", "hi", "--no-pre-verify", "--gamma", "0",
                              "--max-prefill-tokens-per-round", "0"])
    check_generate_args(args)
    options = options_from_args(args, GENERATE_OPTIONS, keep_unset=False)
    assert options["pre_verify"] is False and options["post_verify"] is True
    assert options["gamma"] is None and options["max_prefill_tokens_per_round"] is None  # 0: auto, whole prompts
    assert "transport" not in options and "colocate" not in options  # not given: Ray's options stay out
    for flag, value, words in (("--gamma", "17", ["--gamma", "0 = auto"]), ("--num-threads", "0", ["--num-threads"]),
                               ("--max-prefill-tokens-per-round", "-1", ["--max-prefill-tokens-per-round", "0 = "])):
        with pytest.raises(InvalidParameterError) as exc:
            check_generate_args(parser.parse_args(["generate", "--prompt", "hi", flag, value]))
        assert all(w in str(exc.value) for w in words), exc.value


def test_flags_of_a_surface_with_its_own_defaults():
    parser = argparse.ArgumentParser()
    add_options(parser, ("gamma", "max_num_seqs", "colocate"), defaults={"gamma": 0, "max_num_seqs": 1})
    args = parser.parse_args([])
    assert (args.gamma, args.max_num_seqs, args.colocate) == (0, 1, None)
    assert options_from_args(args, ("gamma", "max_num_seqs")) == {"gamma": None, "max_num_seqs": 1}
    check_flags(parser.parse_args(["--max-num-seqs", "3", "--no-colocate"]), ("gamma", "max_num_seqs", "colocate"))
    with pytest.raises(InvalidParameterError, match="--gamma must be an integer in"):
        check_flags(parser.parse_args(["--gamma", str(MAX_GAMMA + 1)]), ("gamma",))


def test_the_job_settings_carry_the_engine_options(tmp_path):
    from pearl_ray.evals.gsm8k_job import ENGINE_OPTIONS, JOB_DEFAULTS, JobSettings, UsageError, parse_settings

    fields = {f.name: f for f in dataclasses.fields(JobSettings)}
    for name in ENGINE_OPTIONS:
        assert fields[name].default == JOB_DEFAULTS.get(name, OPTIONS[name].default), name
    s = parse_settings(["--limit", "2", "--out", str(tmp_path / "o"), "--max-num-seqs", "3", "--no-colocate"])
    assert (s.max_num_seqs, s.colocate, s.gamma, s.draft) == (3, False, 0, "default-draft")
    for bad in (["--max-num-seqs", "0"], ["--gamma", "17"], ["--draft-num-cpus", "-1"]):
        with pytest.raises(UsageError, match=bad[0]):
            parse_settings(["--out", str(tmp_path / "o"), *bad])


def test_one_preset_rule():
    from pearl_ray.engine import apply_preset as engine_preset
    from pearl_ray.modeling.presets import apply_preset

    # unset = absent, None or the entry point's default; set wins; only the entry point's keys are filled
    got = apply_preset("default", {"draft": None, "target": "mine", "gamma": 4}, {"gamma": 4}, keys={"draft", "target"})
    assert got == {"draft": "default-draft", "target": "mine", "gamma": 4}
    assert engine_preset("default", None, None, "pearl", 4, "local", {})[:2] == ("default-draft", "default-target")


def test_one_length_rule():
    assert fit_context(100, 10, 4) == 85 and fit_context(100, 10, 0, 89) == 89
    with pytest.raises(PromptError, match="too long"):
        fit_context(100, 99, 0)
    with pytest.raises(ContextLengthError, match="gamma 16 is too large") as exc:
        fit_context(100, 90, 16, 1)
    assert exc.value.part == "prompt"
    with pytest.raises(ContextLengthError, match="at most 85 fit") as exc:
        fit_context(100, 10, 4, 86)
    assert exc.value.part == "max_new_tokens" and isinstance(exc.value, InvalidParameterError)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
