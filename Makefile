# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cpvs-installed
PYTHON ?= python3

.PHONY: demo test test-fast lint completions gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pair torchvision and timm need; pip takes both from this machine's disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cpvs demo cpvs-demo

test: lint
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check cpvs tests benchmarks examples
	$(VENV)/bin/lint-imports

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Every GPU path of cpvs and the speed table, within GPU_CHECK_ARGS' --budget-minutes (default 8); see README "GPU check".
# `make test` runs the same suite's CPU smoke mode (tests/test_gpu_suite.py).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_suite.py $(GPU_CHECK_ARGS)

completions: $(STAMP)
	$(PY) -m cpvs.cli.completion completions/

clean:
	rm -rf $(VENV) cpvs-demo .pytest_cache
