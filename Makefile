# onthefly: `make demo` and `make test` are all a new user needs. `make help` lists every target.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch, torchvision and torchaudio are pinned here (not in pyproject, which takes a range) so pip picks
# the wheels that match each other; set TORCH_PINS= to keep whatever torch your environment already has.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast clean

help:  ## list every target with one line each
	@grep -E '^[a-zA-Z_%-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-24s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_PINS)" ]; then $(PY) -m pip install -q $(TORCH_PINS); fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv (once) and install onthefly with its dev extras

demo: $(STAMP)  ## train + evaluate every method on the synthetic benchmark (3 seeds) and print the table
	$(PY) -m onthefly.demo

test: $(STAMP)  ## run the whole test suite (what CI runs), slow end-to-end tests included
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## run the fast tests only (skips `slow`)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:  ## remove run outputs and caches (keeps .venv and data/)
	rm -rf outputs multirun wandb .pytest_cache experiments/results
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

# --- Paper tables (experiments/*.yaml) -------------------------------------------------------------------
LAUNCHER ?= local
SEEDS ?=
PARTITION ?=
ARGS ?=
.PHONY: tables

tables: $(STAMP)  ## list every table spec with its runs, datasets and status
	$(PY) -m onthefly.tables list

reproduce-table-%: $(STAMP)  ## sweep + build one table: make reproduce-table-cvpr-t1 [LAUNCHER=joblib|slurm|submitit_local] [PARTITION=gpu] [SEEDS=0,1,2]
	$(PY) -m onthefly.tables run $* --launcher $(LAUNCHER) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(PARTITION),--partition $(PARTITION)) $(ARGS)
