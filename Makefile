# FieldScope — `make demo` runs the kit on both bundled models; `make test` runs the linters
# and the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Where the datasets and reference models live (never committed).
export FIELDSCOPE_SHARED ?= $(abspath ../shared)

.PHONY: install install-edge test test-arm64 lint format demo doctor clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[edge,clinic,train,dev]'
	touch $(STAMP)

install: $(STAMP)

# What a Pi needs: no TensorFlow.
install-edge:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[edge]'

# ruff, then the architecture's checkers: import contracts (layers, no cycles, no TensorFlow
# in edge/), mypy on all of edge/, declared vs used dependencies.
lint: $(STAMP)
	$(PY) -m ruff check edge training scripts tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/deptry .

format: $(STAMP)
	$(PY) -m ruff format edge training scripts tests

test: $(STAMP) lint
	$(PY) -m pytest -q -rs

# The Raspberry Pi path on an emulated arm64 Raspberry Pi OS: offline install, the installed
# daemon, both bundles' answers against this machine's (root; tests/arm64/run.py says what).
test-arm64: $(STAMP)
	$(PY) tests/arm64/run.py

doctor: $(STAMP)
	$(PY) -m edge doctor

# The kit on this machine: both bundled uses (blood smear, skin), each replaying its samples.
DEMO_PORT ?= 8080
demo: $(STAMP)
	$(PY) -m edge serve --config scripts/demo.toml --port $(DEMO_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
