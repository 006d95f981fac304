# Two commands: `make run` and `make test`. Each creates .venv and installs into it
# (idempotently: reinstalls only when pyproject.toml changes).  `make test` also builds
# .venv-crewai, the same way, for the CrewAI tests (crewai pins openai<3; .venv stays on 3).

SHELL := /bin/bash
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
CVENV  := .venv-crewai
CBIN   := $(CVENV)/bin
CSTAMP := $(CVENV)/.installed

# First Python in the supported range (>=3.11,<3.14) found on PATH.
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not ((3,11) <= sys.version_info[:2] < (3,14)))' 2>/dev/null && { echo $$p; break; }; done)

.PHONY: setup setup-crewai tools run test test-main test-lowest lint bench bench-quick e2e clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: need Python >=3.11,<3.14 on PATH" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# The CrewAI environment: the project (editable), the crewai extra, the test and lint tools.
$(CSTAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: need Python >=3.11,<3.14 on PATH" >&2; exit 1; }
	@test -x $(CBIN)/python || $(PYTHON) -m venv $(CVENV)
	$(CBIN)/python -m pip install --quiet --upgrade pip
	$(CBIN)/python -m pip install --quiet -e '.[crewai,test,lint]'
	@touch $@

setup: $(STAMP)

setup-crewai: $(CSTAMP)

# promtool and prometheus-pushgateway (system packages), installed only when missing.
tools:
	@bash scripts/install_tools.sh

run: $(STAMP)
	$(BIN)/conclave deliberate --agents 72 --latency-ms 100

# tests/adapters/llm/crewai/ is excluded from the main run by path (tests/conftest.py) and run in
# .venv-crewai: both runs, every time.
test: test-main $(CSTAMP)
	CONCLAVE_CREWAI_TESTS=1 $(CBIN)/python -m pytest -q -n 2 tests/adapters/llm/crewai

# The main suite alone; `.ci/run` runs it once per supported Python, each in a venv of its
# own: `make test-main PYTHON=/path/to/python3.12 VENV=.venv-3.12`.
test-main: $(STAMP) tools
	$(BIN)/python -m pytest -q -n 2

# The oldest versions pyproject.toml allows (scripts/lowest_constraints.py prints them), in
# .venv-lowest: a floor is a claim, and CI checks it once.  The main job, then the tests of
# what each floor is for (the kernel, the openai adapter and bridge, metrics, Valkey, display).
LVENV := .venv-lowest
test-lowest:
	@test -n "$(PYTHON)" || { echo "error: need Python >=3.11,<3.14 on PATH" >&2; exit 1; }
	@test -x $(LVENV)/bin/python || $(PYTHON) -m venv $(LVENV)
	$(LVENV)/bin/python -m pip install --quiet --upgrade pip
	$(LVENV)/bin/python scripts/lowest_constraints.py > $(LVENV)/constraints.txt
	$(LVENV)/bin/python -m pip install --quiet -c $(LVENV)/constraints.txt -e '.[test]'
	@$(LVENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(trio|attrs|rich|openai|httpx2|coredis|prometheus.client) ' || true
	$(LVENV)/bin/conclave deliberate --agents 72 --latency-ms 100 --quiet
	$(LVENV)/bin/python -m pytest -q -m "not slow" tests/kernel tests/adapters/llm/test_openai_chat.py \
		tests/adapters/llm/test_bridge.py tests/adapters/test_prometheus.py \
		tests/adapters/valkey/test_connection.py tests/cli/test_display.py

# The modules that import crewai are type-checked in .venv-crewai, against the real crewai
# (the main environment cannot install it; there they are excluded, see pyproject.toml).
CREWAI_TYPED := adapters/llm/crewai.py adapters/llm/_crewai_agents.py $(wildcard tests/adapters/llm/crewai/*.py)

lint: $(STAMP) $(CSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(CBIN)/mypy $(CREWAI_TYPED)

# The full run writes the README's table and plot to benchmarks/results/.
bench: $(STAMP) $(CSTAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.run --out benchmarks/results --update-readme

bench-quick: $(STAMP) $(CSTAMP)
	$(BIN)/python -m benchmarks.run --quick

# Not part of `make test`: builds llama-cpp-python (~13 min the first time).
# `make e2e BACKEND=crewai` runs 72 CrewAI agents (from .venv-crewai) instead.
BACKEND ?= openai
e2e: $(STAMP) $(if $(filter crewai,$(BACKEND)),$(CSTAMP))
	BACKEND=$(BACKEND) bash scripts/e2e_local_llm.sh

clean:
	rm -rf $(VENV) .venv-3.* $(CVENV) $(LVENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
