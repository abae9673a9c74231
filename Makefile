# modalstore: every stage chains by its output files, so `make` redoes only what is out of date.
#   make demo   set up, generate demo data, extract, train, evaluate, report
#   make test   set up, run the test suite (what CI runs)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

DEMO_SAMPLES ?= 1600
SEED         ?= 0
DATA    := data/demo
STORE   := stores/demo
RUNS    := runs/demo
EXTRACT_CONFIG := configs/extract_demo.yaml
TRAIN_CONFIG   := configs/train_demo.yaml
# Outputs are out of date when the code that made them changed, not only their inputs.
EXTRACT_CODE := $(wildcard features/*.py) $(filter-out pipelines/demo_data.py pipelines/datasets.py,$(wildcard pipelines/*.py))
TRAIN_CODE   := $(wildcard fusion/*.py)
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup data features train evaluate report demo test bench lint format clean distclean help

help:
	@echo "make demo      set everything up and run the whole pipeline on the demo data"
	@echo "make test      set up and run the test suite (what CI runs)"
	@echo "stages: setup data features train evaluate report bench lint clean distclean"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[text,remote,dev]'
	@touch $@

setup: $(STAMP)

$(DATA)/manifest.csv: $(STAMP) pipelines/demo_data.py
	$(BIN)/modalstore demo-data $(DATA) --samples $(DEMO_SAMPLES) --seed $(SEED)

data: $(DATA)/manifest.csv

$(STORE)/store.json: $(DATA)/manifest.csv $(EXTRACT_CONFIG) $(EXTRACT_CODE)
	$(BIN)/modalstore extract $(EXTRACT_CONFIG)
	@touch $@  # computes only changed groups; an extractor whose output changes bumps its `version`

features: $(STORE)/store.json

$(RUNS)/.trained: $(STORE)/store.json $(TRAIN_CONFIG) $(TRAIN_CODE)
	$(BIN)/modalstore train $(TRAIN_CONFIG)
	@touch $@

train: $(RUNS)/.trained

$(RUNS)/.evaluated: $(RUNS)/.trained
	$(BIN)/modalstore evaluate $(RUNS)
	@touch $@

evaluate: $(RUNS)/.evaluated

$(RUNS)/report.md: $(RUNS)/.evaluated
	$(BIN)/modalstore report $(RUNS) > /dev/null

report: $(RUNS)/report.md

demo: $(RUNS)/report.md
	@cat $(RUNS)/report.md

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STORE)/store.json
	$(BIN)/python -m pip install --quiet -e '.[text,remote,dev,bench]'
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/extract_overhead.py
	$(BIN)/python benchmarks/loader_peers.py
	$(BIN)/python benchmarks/loader_resume.py
	$(BIN)/python benchmarks/shuffle_quality.py
	$(BIN)/python benchmarks/loader_memory.py
	$(BIN)/python benchmarks/loader_bucketing.py
	$(BIN)/python benchmarks/fsdd_mfcc.py
	$(BIN)/python benchmarks/store_catalog.py
	$(BIN)/python benchmarks/gpu_loader.py --store $(STORE)
	$(BIN)/python benchmarks/loader_cuda_check.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/driver_memory.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf data stores runs .bench .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) *.egg-info
