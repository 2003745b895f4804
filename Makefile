# d2v — two commands do everything on a fresh machine:
#   make pretrain MODALITY=vision     (set up, demo corpus, shard, pretrain on local Ray, register in MLflow)
#   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2v-installed
TORCH_CPU := torch==2.13.0

MODALITY ?= vision
PRESET ?= tiny
# VERSION empty: the modality's default data2vec version (model/presets.py DEFAULT_VERSION, `d2v pretrain --help`)
VERSION ?=
DATA ?= data/$(MODALITY)
WORKERS ?= 2
RUN_NAME ?=
PYTEST_ARGS ?=

.PHONY: setup test bench gpu-check pretrain workflow mlflow-ui clean

setup: $(STAMP)

# CPU torch first, with pip (a local wheel here; an unpinned torch would pull a multi-GB CUDA build), then
# the project with uv: it resolves, installs and byte-compiles in parallel (~55 s here vs ~110 s for pip)
# and keeps the installed torch, which satisfies torch>=2.5. Byte-compiled up front because a machine with
# PYTHONDONTWRITEBYTECODE=1 (this one) would otherwise recompile ray/torch/mlflow in every Ray worker.
$(STAMP): pyproject.toml
	@command -v espeak-ng >/dev/null || { echo "installing espeak-ng (offline speech synthesis for the audio demo corpus)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; fi; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_CPU) uv
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m workers.bench

# On a CUDA machine (never part of `make test`): bf16 steps/s and MFU, peak memory, 1-rank DDP over NCCL,
# a 1-GPU Ray Train run, and a GPU-written checkpoint loaded on CPU; one JSON line. Uses .venv when it exists,
# else the machine's python3 (a GPU image with torch; d2v's other dependencies as README says).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m workers.gpu_check $(GPU_CHECK_ARGS)

pretrain: setup
	$(VENV)/bin/d2v demo-data $(MODALITY) data/demo-$(MODALITY) --skip-existing
	$(VENV)/bin/d2v shard $(MODALITY) --input data/demo-$(MODALITY)/pretrain --output $(DATA)
	$(VENV)/bin/d2v pretrain $(MODALITY) --data $(DATA) --preset $(PRESET) $(if $(VERSION),--version $(VERSION)) --workers $(WORKERS) $(if $(RUN_NAME),--run-name $(RUN_NAME))

workflow: setup
	$(VENV)/bin/d2v workflow $(MODALITY) $(if $(VERSION),--version $(VERSION))

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
