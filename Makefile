# The two commands of the README: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: setup demo test lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup  ## train the default model (small ViT, 90 % DynaDiag) on the bundled digits data
	$(PY) train.py

test: setup  ## the fast test suite (slow and GPU tests: `make test PYTEST_ARGS="-m slow"`)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup  ## CPU kernel benchmark (ratios vs dense and CSR)
	$(PY) scripts/bench_kernels.py

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache .ruff_cache
