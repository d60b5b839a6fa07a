# dae_jax: every target sets itself up; `make demo` or `make test` alone works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
sources := dae_jax experiments tests
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: all install tfds-prepare demo test test-all lint format bench fashion-mnist clean

all: lint test

# The lean set (no TensorFlow) plus the dev tools.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bm3d,natural]'
	touch $@

# TensorFlow, which tensorflow-datasets needs to download and prepare a dataset online.
tfds-prepare: $(VENV)/.tfds-prepare

$(VENV)/.tfds-prepare: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,bm3d,natural,tfds-prepare]'
	touch $@

# Fashion-MNIST from Debian's `dataset-fashion-mnist` package (offline, no TensorFlow needed).
# Elsewhere dae-jax falls back to tensorflow-datasets, which downloads and prepares it: that
# needs TensorFlow, so the tfds-prepare extra is installed then.
fashion-mnist: install
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Debian package dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist' to use it offline"; \
	  fi; \
	  echo "note: tensorflow-datasets will download Fashion-MNIST; installing TensorFlow to prepare it (.[tfds-prepare])"; \
	  $(MAKE) --no-print-directory tfds-prepare; \
	fi

# Trains the default config on Fashion-MNIST into runs/demo/. Run again, it resumes an
# interrupted demo, or says the demo is trained and redraws its figures.
demo: install fashion-mnist
	$(BIN)/dae-jax train --workdir=runs/demo --config=dae_jax/configs/default.py

# Training speed (float32, bfloat16) against the device's measured matmul peak, and time to a
# test PSNR: runs/bench/bench.json, bench.md, figures/ (dae-jax bench --help; --quick: < 3 min).
bench: install
	$(BIN)/dae-jax bench --workdir=runs/bench

# Tests run over TEST_WORKERS pytest-xdist processes, each test module in one of them (its
# fixtures built once); TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= 2

# The fast tier: every test not marked slow, in process (no subprocess per test); under 5
# minutes on 2 cores (3.0-3.4 min measured with 2 workers, 5.2 min in one process).
test: install
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadscope

# Every test: the fast tier and the slow one (experiment scripts end to end, the wheel
# install, several devices or processes, signals and kill/resume).
test-all: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

lint: install
	$(BIN)/ruff check $(sources)
	$(BIN)/ruff format --check $(sources)
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix $(sources)
	$(BIN)/ruff format $(sources)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
