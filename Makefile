# `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run demo test test-faults lint typecheck clean bench bench-quick

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	touch $@ $(VENV)/.run-installed

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(BIN)/presence-svc serve --host $(HOST) --port $(PORT)

# The demo page (a chess study on the browser client) and the dashboard, with tokens in the
# printed URLs: two nodes on a local Redis (127.0.0.1:6379, a fresh key prefix) when one
# answers, else one node on the embedded store. Open the alice and bob URLs in two windows.
demo: $(VENV)/.run-installed
	$(BIN)/python -m presence_svc.web.demo_launch --host $(HOST) --port $(PORT)

test: $(VENV)/.test-installed
	$(BIN)/ruff check presence_svc tests
	$(BIN)/ruff format --check presence_svc tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# Only the fault suite (make test runs it too): Redis restarts, node kills, slow readers, ...
test-faults: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q tests/faults

# Benchmarks on loopback (docs/performance.md); extra options: make bench BENCH_ARGS='...'.
bench: $(VENV)/.bench-installed
	$(BIN)/presence-svc bench --full $(BENCH_ARGS)

bench-quick: $(VENV)/.bench-installed
	$(BIN)/presence-svc bench --quick $(BENCH_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check presence_svc tests
	$(BIN)/ruff format --check presence_svc tests

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
