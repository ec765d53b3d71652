# One entry point for setup, serving, tests and lint. Every target creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install system-deps serve test lint format docs perf-doc bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its test tools

serve: $(STAMP)  ## run the server (ARGS="--port 9000" to pass options)
	$(BIN)/batching-server $(ARGS)

system-deps:  ## prometheus and promtool, which the tests run for real
	.ci/system-deps

test: $(STAMP) system-deps  ## run the whole test suite, slow tests included
	$(BIN)/python -m pytest

lint: $(STAMP)  ## ruff, ruff format and mypy, as CI runs them
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

docs: $(STAMP)  ## regenerate docs/settings.md and settings.toml from batching_server/settings.py
	$(BIN)/python -m batching_server.settings_doc

bench: $(STAMP)  ## the headline benchmark: seed-style against tuned, with the targets
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.compare

perf-doc: $(STAMP)  ## render docs/performance.md and README's headline from benchmarks/results/*.json
	$(BIN)/python -m benchmarks.report

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
