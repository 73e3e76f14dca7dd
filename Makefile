# The two commands of the README: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: setup demo test wheel-test lint format bench clean fashion-data
WHEEL_TMP ?= $(or $(TMPDIR),/tmp)/dynadiag-wheel-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'  # dev = every extra ([train], [onnx], ...) + test tools
	# The third-party RigL reference row (sparsifier=sparsimony_rigl); --no-deps: its wheel pins numpy 1.*, RigL needs none
	$(PY) -m pip install --quiet --no-deps sparsimony==0.1.0
	touch $@

setup: $(VENV)/.installed

demo: setup  ## train the default model (small ViT, 90 % DynaDiag) on the bundled digits data
	$(PY) train.py

test: setup  ## the fast test suite (slow tests: `PYTEST_ARGS="-m slow"`; GPU tests: `PYTEST_ARGS="-m cuda"`)
	$(PY) -m pytest -q $(PYTEST_ARGS)

wheel-test: setup  ## build the wheel, install it in a fresh venv outside the checkout, check the core install on `cpu`
	rm -rf build $(WHEEL_TMP) && mkdir -p $(WHEEL_TMP)/cache
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(WHEEL_TMP)/dist .
	$(PY) -m venv --without-pip $(WHEEL_TMP)/venv
	# The fresh venv takes torch & co. from .venv through a path file (nothing downloaded); dynadiag comes from the
	# wheel alone (.venv's editable install is not activated by a plain path entry). wheel_check.py hides the
	# extras' packages ([train], [onnx], ...) before importing dynadiag, so it checks what `pip install dynadiag` gives.
	$(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))" > \
		"$$($(WHEEL_TMP)/venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")/deps.pth"
	$(PY) -m pip --python $(WHEEL_TMP)/venv/bin/python install --quiet --no-deps --no-index $(WHEEL_TMP)/dist/*.whl
	cd $(WHEEL_TMP) && DYNADIAG_CACHE=$(WHEEL_TMP)/cache venv/bin/python $(CURDIR)/.ci/wheel_check.py $(CURDIR)
	rm -rf build

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

fashion-data:  ## install Fashion-MNIST's four IDX files (Debian package dataset-fashion-mnist) for data=fashion_mnist
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST is installed"; \
	elif command -v apt-get >/dev/null; then \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y dataset-fashion-mnist; \
	else echo "no apt-get here: put the four Fashion-MNIST .gz files in a folder and run with data.root=<folder>"; exit 1; fi

bench: setup  ## CPU kernel benchmark (ratios vs dense and CSR)
	$(PY) scripts/bench_kernels.py

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache .ruff_cache
