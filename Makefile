# cellsynth — two commands: `make run` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
# Off these machines, point this at the CPU wheel index, e.g.
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
CONFIG ?= conf/local.yaml
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: run test bench clean install

install: $(STAMP)

# Reinstall only when the dependency list changes; the editable install picks up code changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test]"
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cellsynth run --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Diagnostics that run on a lake or a dataset you name (see each one's --help); `make bench` skips them.
BENCH_NEEDS_ARGS := association privacy_offset_off privacy_spread radio_outer_seeds repro

bench: $(STAMP)
	@set -e; for b in bench/*.py; do \
	  case $$(basename $$b) in _*) continue;; esac; \
	  case " $(BENCH_NEEDS_ARGS) " in *" $$(basename $$b .py) "*) echo "== $$b: skipped (needs arguments, see --help)"; continue;; esac; \
	  echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf lake .pytest_cache bench/results/*.tmp spark-warehouse metastore_db derby.log
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
