# The commands the README shows. `make test` installs what it needs itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: setup test test-all run bench lint docs docs-serve wheel clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check jaxode tests benchmarks experiments docs/hooks.py hatch_build.py

# One pytest-xdist worker a core (at most 4: each holds its own compiled programs).
XDIST := -n auto --maxprocesses 4

test: lint
	$(BIN)/pytest -q -m "not slow" $(XDIST)

test-all: lint
	$(BIN)/pytest -q $(XDIST)

run: setup
	$(BIN)/jaxode run odenet_digits_quick

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev,docs]"
	touch $(DOCS_STAMP)

# The documentation site (docs/, mkdocs.yml) into site/; warnings are errors.
docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	$(BIN)/mkdocs serve

# The wheel and sdist into dist/.
wheel: setup
	$(BIN)/python -m build --no-isolation --outdir dist .

bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m benchmarks.solve
	$(BIN)/python -m benchmarks.gradients
	$(BIN)/python -m benchmarks.small_gradients
	$(BIN)/python -m benchmarks.work_precision
	$(BIN)/python -m benchmarks.models
	$(BIN)/python -m benchmarks.odenet_step
	$(BIN)/python -m benchmarks.stiff
	$(BIN)/python -m benchmarks.multistep
	$(BIN)/python -m benchmarks.events

clean:
	rm -rf $(VENV) runs site dist .pytest_cache .ruff_cache
