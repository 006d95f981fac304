# Two commands: `make run` and `make test`. Each creates .venv and installs into it
# (idempotently: reinstalls only when pyproject.toml changes).

SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

# First Python in the supported range (>=3.11,<3.14) found on PATH.
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not ((3,11) <= sys.version_info[:2] < (3,14)))' 2>/dev/null && { echo $$p; break; }; done)

.PHONY: setup run test lint bench bench-quick e2e clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: need Python >=3.11,<3.14 on PATH" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/conclave deliberate --agents 72 --latency-ms 100

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The full run writes the README's table and plot to benchmarks/results/.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.run --out benchmarks/results --update-readme

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

# Not part of `make test`: builds llama-cpp-python (~13 min the first time).
e2e: $(STAMP)
	bash scripts/e2e_local_llm.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
