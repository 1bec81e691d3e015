# FieldScope — `make demo` runs the kit on the bundled model; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Where the datasets and reference models live (never committed).
export FIELDSCOPE_SHARED ?= $(abspath ../shared)

.PHONY: install install-edge test lint format demo doctor clean

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
# in edge/), mypy on the clean part of edge/, declared vs used dependencies.
lint: $(STAMP)
	$(PY) -m ruff check edge training scripts tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/deptry .

format: $(STAMP)
	$(PY) -m ruff format edge training scripts tests

test: $(STAMP) lint
	$(PY) -m pytest -q -rs

doctor: $(STAMP)
	$(PY) -m edge doctor

# The kit's main job on this machine: the bundled blood-smear model on a replay of its samples.
DEMO_PORT ?= 8080
demo: $(STAMP)
	$(PY) -m edge serve --config scripts/demo.toml --port $(DEMO_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
