# `make run` starts the whole stack, `make test` runs every test tier. The first use of any target
# creates .venv and installs the project; editing pyproject.toml reinstalls.

VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint fmt demo clean bench chaos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/paysaga up

test: $(STAMP)  ## every tier; two xdist workers, one per integration stack (tests/conftest.py)
	$(BIN)/pytest -q -n 2 --dist loadgroup

bench: $(STAMP)  ## checkout throughput vs the Temporal ceiling; writes bench/results.json
	$(BIN)/python -m bench.run $(ARGS)

chaos: $(STAMP)  ## payments while the worker is SIGKILLed; exits non-zero on any violation
	$(BIN)/python -m bench.chaos $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# needs `make run` in another terminal
demo: $(STAMP)
	$(BIN)/paysaga demo

# state of the local stack (Temporal history, app and sandbox databases) and tool caches;
# the virtualenv stays (rm -rf .venv to rebuild it)
clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache .hypothesis build
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
