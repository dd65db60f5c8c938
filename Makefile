# The commands the README shows. `make test` installs what it needs itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-all run bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check jaxode tests benchmarks experiments

test: lint
	$(BIN)/pytest -q -m "not slow"

test-all: lint
	$(BIN)/pytest -q

run: setup
	$(BIN)/jaxode run configs/odenet_digits_quick.yaml

bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m benchmarks.solve
	$(BIN)/python -m benchmarks.gradients
	$(BIN)/python -m benchmarks.models
	$(BIN)/python -m benchmarks.odenet_step

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
