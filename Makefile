# onthefly: `make demo` and `make test` are all a new user needs. `make help` lists every target.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch, torchvision and torchaudio are pinned here (not in pyproject, which takes a range) so pip picks
# the wheels that match each other; set TORCH_PINS= to keep whatever torch your environment already has.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
PYTEST_ARGS ?=
# test processes (pytest-xdist; whole files per process, so module fixtures stay whole); TEST_WORKERS=0 runs in one
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format clean

help:  ## list every target with one line each
	@grep -E '^[a-zA-Z_%-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-24s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_PINS)" ]; then $(PY) -m pip install -q $(TORCH_PINS); fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv (once) and install onthefly with its dev extras

demo: $(STAMP)  ## train + evaluate OGM-GE, OPM, OPM+OGM, joint and uni-modal models on the synthetic benchmark (4 seeds, ~4 min on 2 cores) and print the table
	$(PY) -m onthefly.demo

test: $(STAMP)  ## run the whole test suite (what CI runs), slow end-to-end tests included, in TEST_WORKERS=2 processes
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)  ## run the fast tests only (skips `slow`)
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff: lint rules and formatting check (what CI runs before the tests)
	$(PY) -m ruff check src tests data_prep
	$(PY) -m ruff format --check src tests data_prep

format: $(STAMP)  ## ruff: fix what can be fixed automatically, then format
	$(PY) -m ruff check --fix src tests data_prep
	$(PY) -m ruff format src tests data_prep

clean:  ## remove run outputs and caches (keeps .venv and data/)
	rm -rf outputs multirun wandb .pytest_cache experiments/results
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

# --- Paper tables (experiments/*.yaml; docs/reproducing.md) ---------------------------------------------
# LAUNCHER: a preset of conf/hydra/launcher/: serial (default: one job after another), parallel (joblib), local
# (submitit on this machine), slurm (one Slurm job array). Every missing job of the table goes into one multirun.
LAUNCHER ?= serial
# FIDELITY: clean (our protocol) | official (the released code's choices, docs/method.md §9); empty: the spec's own
# default (docs/reproducing.md says which tables default to official). Results of each fidelity are kept apart.
FIDELITY ?=
SEEDS ?=
PARTITION ?=
ACCOUNT ?=
RETRY_FAILED ?=
# DRY_RUN=1, or make's own -n / --dry-run: list the jobs a table would run (the table command itself runs, in
# dry-run mode, so that `make reproduce-table-zoo --dry-run` shows the jobs rather than one command line)
MAKE_DRY_RUN := $(findstring n,$(firstword -$(MAKEFLAGS)))
DRY_RUN ?= $(if $(MAKE_DRY_RUN),1)
ARGS ?=
.PHONY: tables
ifneq ($(filter-out clean official,$(FIDELITY)),)
$(error FIDELITY=$(FIDELITY): use clean or official (or leave it empty: the spec's default))
endif
TABLE_FIDELITY = $(if $(FIDELITY),--fidelity $(FIDELITY))

tables: $(STAMP)  ## list every table spec with its runs, datasets, job states and projected device-hours [FIDELITY=]
	$(PY) -m onthefly.tables list $(TABLE_FIDELITY)

reproduce-table-%: $(STAMP)  ## run + build one table: make reproduce-table-cvpr-t2 [FIDELITY=official|clean] [LAUNCHER=serial|parallel|local|slurm] [PARTITION=gpu] [ACCOUNT=] [SEEDS=0,1,2] [RETRY_FAILED=1] [DRY_RUN=1] [ARGS="key=value ..."]
	+$(PY) -m onthefly.tables run $* $(TABLE_FIDELITY) --launcher $(LAUNCHER) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(RETRY_FAILED),--retry-failed) $(if $(DRY_RUN),--dry-run) $(ARGS)

build-table-%: $(STAMP)  ## build one table from the runs that finished, and say what is failed, running or missing [FIDELITY=]
	$(PY) -m onthefly.tables build $* $(TABLE_FIDELITY) $(if $(SEEDS),--seeds $(SEEDS)) $(ARGS)

report-table-%: $(STAMP)  ## a W&B report for one table (offline: writes its specification to experiments/results/<name>/) [FIDELITY=]
	$(PY) -m onthefly.tables report $* $(TABLE_FIDELITY) $(ARGS)

# ---- Data preparation ------------------------------------------------------------------------------------------
# Raw download -> cache under $(ONTHEFLY_DATA)/<dataset> (default data/<dataset>), or OUT=... . Resumable: run a
# target again after an interruption, or after fixing files (git lfs pull); finished clips are skipped, and clips
# whose stored data was damaged are prepared again. A prep that finds or caches nothing exits non-zero.
# WORKERS=N processes (default: one per core); AUDIO=<recipe>; ARGS="key=value ..." passes any other option
# (python -m data_prep.<dataset> --help lists them). Run from the repository root.
.PHONY: prep-cremad prep-kinetics-sounds prep-vggsound prep-vggsound-merge prep-ucf101 prep-mosi prep-avqa bench-prep verify-cache
PREP_COMMON = $(if $(OUT),out_root=$(OUT)) $(if $(WORKERS),workers=$(WORKERS)) $(if $(AUDIO),audio=$(AUDIO)) $(ARGS)
need = @test -n "$($(1))" || { echo "usage: $(2)"; exit 2; }
# FIDELITY=official: the released code's prep options (docs/data.md), into <data root>/<dataset>_official (the
# folder fidelity=official reads; OUT= still wins), so the clean and the official cache live side by side.
OFFICIAL = $(filter official,$(FIDELITY))
official_prep = $(if $(OFFICIAL),$(2) out_root=$(or $(OUT),$(or $(ONTHEFLY_DATA),data)/$(1)_official))

prep-cremad: $(STAMP)  ## cache CREMA-D: make prep-cremad RAW=/path/to/CREMA-D [OUT=] [SPLITS=dir of lists] [SPLIT=speaker] [FIDELITY=official]
	$(call need,RAW,make prep-cremad RAW=/path/to/CREMA-D [OUT=...] [SPLITS=/dir/with/train.csv+test.csv])
	$(if $(OFFICIAL),$(call need,SPLITS,make prep-cremad FIDELITY=official RAW=/path/to/CREMA-D SPLITS=/path/to/OGM-GE_CVPR2022/data/CREMAD (its train.csv + test.csv)))
	$(PY) -m data_prep.cremad raw_root=$(RAW) $(if $(SPLITS),splits=$(SPLITS)) $(if $(SPLIT),split=$(SPLIT)) $(call official_prep,cremad,frame_times=second_start resample=kaiser_best) $(PREP_COMMON)

prep-kinetics-sounds: $(STAMP)  ## cache Kinetics-Sounds: make prep-kinetics-sounds RAW=/path/to/kinetics400 [SPLITS=lists] [FIDELITY=official]
	$(call need,RAW,make prep-kinetics-sounds RAW=/path/to/kinetics400 [SPLITS=/path/to/lists] [OUT=...])
	$(PY) -m data_prep.kinetics_sounds raw_root=$(RAW) $(if $(SPLITS),lists=$(SPLITS)) $(call official_prep,kinetics_sounds,frame_times=second_start downmix=first) $(PREP_COMMON)

prep-vggsound: $(STAMP)  ## cache VGGSound: make prep-vggsound RAW=/path/to/vggsound CSV=vggsound.csv [SHARD=i/n] [FIDELITY=official]
	$(call need,RAW,make prep-vggsound RAW=/path/to/vggsound CSV=/path/to/vggsound.csv [SHARD=3/16] [OUT=...])
	$(call need,CSV,make prep-vggsound RAW=/path/to/vggsound CSV=/path/to/vggsound.csv [SHARD=3/16] [OUT=...])
	$(PY) -m data_prep.vggsound raw_root=$(RAW) csv=$(CSV) $(if $(SHARD),shard=$(SHARD)) $(call official_prep,vggsound,frame_times=second_start downmix=mean audio=segment) $(PREP_COMMON)

prep-vggsound-merge: $(STAMP)  ## join VGGSound shards (OUT/shards/*) into one cache: make prep-vggsound-merge [OUT=] [FIDELITY=official]
	$(PY) -m data_prep.vggsound merge $(if $(OFFICIAL),out_root=$(or $(OUT),$(or $(ONTHEFLY_DATA),data)/vggsound_official),$(if $(OUT),out_root=$(OUT))) $(ARGS)

prep-ucf101: $(STAMP)  ## cache UCF-101: make prep-ucf101 RAW=/path/to/UCF-101 SPLITS=ucfTrainTestlist FLOW=tvl1_flow
	$(call need,RAW,make prep-ucf101 RAW=/path/to/UCF-101 SPLITS=/path/to/ucfTrainTestlist FLOW=/path/to/tvl1_flow)
	$(call need,SPLITS,make prep-ucf101 RAW=/path/to/UCF-101 SPLITS=/path/to/ucfTrainTestlist FLOW=/path/to/tvl1_flow)
	$(call need,FLOW,make prep-ucf101 RAW=/path/to/UCF-101 SPLITS=/path/to/ucfTrainTestlist FLOW=/path/to/tvl1_flow)
	$(PY) -m data_prep.ucf101 raw_root=$(RAW) splits=$(SPLITS) flow=$(FLOW) $(if $(FOLD),fold=$(FOLD)) $(PREP_COMMON)

prep-mosi: $(STAMP)  ## cache CMU-MOSI from a MulT or MMSA pickle: make prep-mosi PKL=/path/to/mosi_data.pkl [OUT=]
	$(call need,PKL,make prep-mosi PKL=/path/to/mosi_data.pkl [OUT=...] [ARGS=overwrite=true])
	$(PY) -m data_prep.mosi pkl=$(PKL) $(if $(OUT),out_root=$(OUT)) $(ARGS)

prep-avqa: $(STAMP)  ## cache AVQA: make prep-avqa ANN=/path/to/avqa (MEDIA=/path/to/videos | VGGSOUND_CACHE=data/vggsound) [FORMAT=music]
	$(call need,ANN,make prep-avqa ANN=/path/to/annotations (MEDIA=/path/to/videos | VGGSOUND_CACHE=/path/to/vggsound/cache) [FORMAT=yang|music] [OUT=...])
	$(PY) -m data_prep.avqa ann=$(ANN) $(if $(MEDIA),media=$(MEDIA)) $(if $(VGGSOUND_CACHE),vggsound_cache=$(VGGSOUND_CACHE)) $(if $(FORMAT),format=$(FORMAT)) $(PREP_COMMON)

verify-cache: $(STAMP)  ## decode a whole cache, naming each bad clip: make verify-cache DATASET=cremad [ROOT=path] [ARGS=mark=true]
	$(call need,DATASET,make verify-cache DATASET=cremad|kinetics_sounds|vggsound|ucf101|mosi|avqa|avqa_music [ROOT=path] [ARGS=mark=true])
	$(PY) -m data_prep.verify dataset=$(DATASET) $(if $(ROOT),root=$(ROOT)) $(ARGS)

bench-prep: $(STAMP)  ## prep throughput (clips/s per process) and cache bytes per clip, on generated realistic clips
	$(PY) -m data_prep.bench $(ARGS)

.PHONY: bench
bench: $(STAMP)  ## training performance figures on this machine: method overhead, input pipeline, protocol shapes, DDP
	$(PY) -m onthefly.bench $(ARGS)
