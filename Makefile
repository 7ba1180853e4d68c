# `make train` trains the study's model; `make test` runs lint and the test suite. Both set up
# the virtual environment (.venv) and the data link themselves on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the chest X-rays are; `make data` links data/chest_xray to it.
PNEUMONIA_DATA ?= ../shared/data/chest_xray
ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist): most integration tests wait on a train.py subprocess's imports,
# so two processes use both of a 2-core machine's cores. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2

.PHONY: help install data train sweep compare predict shift test lint format bench clean
.DEFAULT_GOAL := help

help: ## this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-z]+:.*## / {printf "  make %-9s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo '  (ARGS="..." passes Hydra overrides, e.g. make train ARGS="optimizer=sgd")'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from this machine's local wheels; the package's ranges then keep it.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	# dev: pytest and ruff; sweep: Optuna and submitit, tested here too
	$(BIN)/pip install --quiet -e '.[dev,sweep]'
	touch $@

install: $(BIN)/.installed ## the virtual environment (.venv) with the package and its test tools

# Links data/chest_xray to PNEUMONIA_DATA, or says where to get the X-rays.
define link_data
	@if [ -d "$(PNEUMONIA_DATA)" ]; then \
		mkdir -p data && ln -sfn "$$(cd "$(PNEUMONIA_DATA)" && pwd)" data/chest_xray && \
		echo "linked data/chest_xray -> $$(readlink data/chest_xray)"; \
	else \
		echo "No chest X-rays at PNEUMONIA_DATA=$(PNEUMONIA_DATA)."; \
		echo "Download Kaggle's 'chest-xray-pneumonia' (Kermany et al., CC BY 4.0), unzip it, then run"; \
		echo "  make data PNEUMONIA_DATA=/path/to/chest_xray"; \
		echo "or point a run at it directly: python train.py data.root=/path/to/chest_xray"; \
		exit 1; \
	fi
endef

# The other targets link the data once, and keep a link made by `make data`.
data/chest_xray:
	$(link_data)

data: ## (re)link data/chest_xray to PNEUMONIA_DATA (../shared/data/chest_xray)
	$(link_data)

train: install data/chest_xray ## train the study's model (ARGS: overrides, e.g. experiment=robust_cnn)
	$(BIN)/python train.py $(ARGS)

# make sweep ARGS="hparams_search=study_grid hydra/launcher=joblib"
sweep: install data/chest_xray ## a multirun sweep (ARGS: hparams_search=study_grid, -m key=a,b, ...)
	$(BIN)/python train.py -m $(ARGS)

DIR ?=
compare: install ## rank the runs under DIR=<sweep or runs folder> in one table
	@test -n "$(DIR)" || { echo 'usage: make compare DIR=outputs/multiruns/<time>'; exit 2; }
	$(BIN)/python -m pneumonia.compare "$(DIR)" $(ARGS)

# make predict ARGS="ckpt_path=outputs/runs/<run> images=<file or folder>"
predict: install ## P(PNEUMONIA) of images (ARGS="ckpt_path=<run> images=<folder>")
	$(BIN)/python predict.py $(ARGS)

# make shift ARGS="ckpt_path=outputs/runs/<run>": the shift suite on a checkpoint's test split
shift: install data/chest_xray ## the shift suite on a checkpoint (ARGS="ckpt_path=<run>")
	$(BIN)/python train.py --config-name shift $(ARGS)

lint: install ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## ruff fix and format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint data/chest_xray ## lint, then the whole test suite on the real data
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: install data/chest_xray ## the speed benchmarks
	$(BIN)/python benchmarks/study_benchmark.py $(ARGS)

clean: ## remove outputs, the image cache and tool caches
	rm -rf outputs data/cache .pytest_cache .ruff_cache
