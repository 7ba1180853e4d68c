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

.PHONY: install data train predict shift test lint format bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from this machine's local wheels; the package's ranges then keep it.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

data/chest_xray:
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

data: data/chest_xray

train: install data
	$(BIN)/python train.py $(ARGS)

# make predict ARGS="ckpt_path=outputs/runs/<run> images=<file or folder>"
predict: install
	$(BIN)/python predict.py $(ARGS)

# make shift ARGS="ckpt_path=outputs/runs/<run>": the shift suite on a checkpoint's test split
shift: install data
	$(BIN)/python train.py --config-name shift $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install data
	$(BIN)/python benchmarks/study_benchmark.py $(ARGS)

clean:
	rm -rf outputs data/cache .pytest_cache .ruff_cache
