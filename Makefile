# Two entry points on a fresh machine (Python 3.11 + pip, no GPU needed):
#   make demo   - install; build shards from the embedded synthetic COCO set (train and a held-out
#                 val split), preview jigsaw images, pre-train a small backbone for a few iterations
#                 with region accuracy on the held-out shards, and export it
#   make test   - install, then lint (ruff check, ruff format --check) and run the test suite
#   make test-fast - the suite without the tests marked slow (under a minute), for the edit-test loop
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install demo test test-fast lint format bench clean gpu-check gpu-experiment

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[test,dali]"
	touch $@

demo: install
	$(BIN)/jigsawdata make-synthetic $(DEMO)/coco
	$(BIN)/jigsawdata make-synthetic $(DEMO)/coco --split val --images 16 --seed 1
	$(BIN)/jigsawdata build-shards $(DEMO)/coco --split train --out $(DEMO)/shards --workers 2
	$(BIN)/jigsawdata build-shards $(DEMO)/coco --split val --out $(DEMO)/val-shards
	$(BIN)/jigsawdata info $(DEMO)/shards
	$(BIN)/jigsawdata verify $(DEMO)/shards
	$(BIN)/jigsawdata preview $(DEMO)/shards --out $(DEMO)/preview.png
	rm -rf $(DEMO)/run
	$(BIN)/jigsawdata pretrain --shards $(DEMO)/shards --out $(DEMO)/run --arch resnet18 --iterations 10 \
		--batch 8 --warmup 2 --log-every 2 --erf-images 2 --workers 2 --val-shards $(DEMO)/val-shards --val-every 5
	$(BIN)/jigsawdata evaluate-pretrain $(DEMO)/run --shards $(DEMO)/val-shards
	$(BIN)/jigsawdata export $(DEMO)/run --format torchvision --out $(DEMO)/resnet18-jigsaw.pth

test: lint
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow" -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m jigsawdata.benchmarks.build_shards

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache

# Everything that needs a CUDA GPU, into one report folder; without a GPU it says so and exits 0.
# GPU_PYTHON=python3 uses an interpreter that already has the dependencies instead of .venv.
GPU_PYTHON ?=
GPU_REPORT ?= gpu-report
gpu-check: $(if $(GPU_PYTHON),,install)
	$(or $(GPU_PYTHON),$(BIN)/python) -m jigsawdata.benchmarks.gpu_check --out $(GPU_REPORT)

# The gpu experiment preset (erf vs random init vs cost-matched scratch, 2 seeds) on one GPU.
GPU_EXPERIMENT ?= gpu-experiment
gpu-experiment: $(if $(GPU_PYTHON),,install)
	$(or $(GPU_PYTHON),$(BIN)/python) -m jigsawdata experiment --preset gpu --out $(GPU_EXPERIMENT)
