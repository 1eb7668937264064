# Two commands do all set-up on a fresh machine:
#   make train   creates .venv, installs vitlab, trains the default model and writes runs/<name>/
#   make test    creates .venv, installs vitlab with its dev tools, runs ruff and the test suite
# CIFAR-10 is read from $VITLAB_DATA (here: ../shared/data/cifar10 when it exists), else ./data,
# and downloaded into ./data when missing and the network allows.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export VITLAB_DATA ?= $(wildcard $(abspath ../shared/data/cifar10))
TRAIN_ARGS ?= --out runs/main-$(shell date +%Y%m%d-%H%M%S)

.PHONY: train test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

train: $(BIN)/.installed
	$(BIN)/vitlab train $(TRAIN_ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks notebooks
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
