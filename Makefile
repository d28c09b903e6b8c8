# Two commands: `make train` (set-up + main recipe) and `make test` (set-up + test suite).
# Both work alone on a fresh Debian machine with Python 3.11 (root, package registries only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= mobilenet_qat
EXTRAS ?= dev,export,slurm,plots
# Tests run single-threaded (tests/conftest.py), so one pytest-xdist worker per core uses the machine fully;
# --dist worksteal lets an idle worker take queued tests from a busy one (measured: pytest 5:35 vs 6:35).
TEST_WORKERS ?= 2
APT_PACKAGES := dataset-fashion-mnist wordnet-base
DATA_FILES := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/wordnet/data.noun
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data venv train test test-all test-strict test-fast bench clean

setup: data venv

data:
	@missing=0; for f in $(DATA_FILES); do [ -e $$f ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
		echo "installing data packages: $(APT_PACKAGES)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi

# uv installs what pip would (pip's indexes and constraints handed over), in ~40 s instead of ~95 s on 2 cores;
# anything it cannot take over falls back to pip (.ci/install.py). LIGHTNING_EFF_INSTALLER=pip forces pip.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/install.py
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) .ci/install.py '.[$(EXTRAS)]'
	touch $@

train: setup
	$(PY) train.py +recipe=$(RECIPE)

# `make test` leaves out the `heavy` cases (whole-program multi-process runs, ~2.5 min of CPU) to stay
# under 10 minutes on 2 cores; `make test-all` and CI's strict job run every test.
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not heavy"

test-all: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# `make test` with every warning an error, so new deprecations (torch, lightning, torchao) surface;
# CI runs it through .ci/run-strict as a job that is allowed to fail.
test-strict: setup
	LIGHTNING_EFF_STRICT_WARNINGS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -W error

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow and not ddp"

bench: setup
	$(PY) -m lightning_eff.bench footprint --quick

clean:
	rm -rf outputs multirun bench_results .pytest_cache
