# One command for the main job, one for the tests; both set up the environment first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: quickstart test lint format clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)  ## sampler study on analytic data: table + plots under outputs/study/
	$(PYTHON) study.py

test: $(STAMP) lint  ## lint, then the whole test suite
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache .hypothesis
