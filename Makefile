# One-command set-up, demo, tests and shards. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BC     := $(VENV)/bin/bloodcells
DATA   ?= ../shared/blood-cells
OUT    ?= shards
RUN    ?= runs/default
RECIPE ?= launch/recipes/best.yaml
CV     ?= runs/cv-best
FINAL  ?= runs/best-final
DEMO   ?= demo
PBC    ?= ../PBC_dataset_normal_DIB
PBC_OUT ?= shards-pbc
PRETRAIN ?= runs/pbc-pretrain
TUNED  ?= runs/bloodcells-finetune-final
TRAIN_FLAGS ?=
TEST_WORKERS ?= auto
# Where torch and torchvision come from. Empty (the default): the package index pip uses, which works everywhere
# (on Linux that wheel brings the CUDA and triton wheels, about 4 GB). On a CPU-only machine that can reach it:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PINS := $(shell grep -oE '"torch(vision)?[<>=][^"]*"' pyproject.toml)  # pyproject.toml's versions of both

.PHONY: help setup demo test test-fast lint docs shards verify train cv final transfer bench clean

help:
	@echo "make setup [TORCH_INDEX=URL]   create $(VENV) and install the package with its dev and export extras"
	@echo "                           (TORCH_INDEX=https://download.pytorch.org/whl/cpu: CPU-only torch, no CUDA wheels)"
	@echo "make demo                  synthetic data -> shards -> train -> evaluate -> plots, all on CPU"
	@echo "make test                  the whole test suite, end-to-end launches included (what CI runs)"
	@echo "make test-fast             the in-process layer (tests not marked e2e)"
	@echo "make lint                  ruff (style, imports, bugs) and mypy (types)"
	@echo "make docs                  render docs/config.md and the result tables from bloodcells_dist and results/"
	@echo "make shards DATA=ROOT [OUT=shards]   pack a dataset into verified shards"
	@echo "make train [OUT=shards] [RUN=runs/default] [RECIPE=...]   train a recipe (best.yaml) on shards"
	@echo "make cv [RECIPE=...] [CV=runs/cv-best]   grouped 5-fold cross-validation of a recipe, with TTA"
	@echo "make final [FINAL=runs/best-final]   best.yaml on train + val, then evaluate on the test split"
	@echo "make transfer PBC=DIR DATA=DIR   pack PBC, pretrain on it, fine-tune on DATA (train + val), evaluate on DATA's test"
	@echo "make bench                 packing, training throughput, precision and start-up benchmarks"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# The stamp reinstalls when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
ifneq ($(TORCH_INDEX),)
	$(PY) -m pip install $(TORCH_PINS) --index-url $(TORCH_INDEX)
endif
	$(PY) -m pip install -e ".[dev,export]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	rm -rf $(DEMO)  # a clean demo: data, shards and run (its W&B folder too)
# 4 copies of 50 drawn cells a class (not 8 of 25): more distinct cells, so the tiny model generalises to TEST's.
	$(BC) synthetic --out $(DEMO)/data --per-class 200 --copies 4
	$(BC) pack --src $(DEMO)/data --out $(DEMO)/shards --overwrite
	$(BC) verify $(DEMO)/shards
	$(BC) train --shards $(DEMO)/shards --output-dir $(DEMO)/run --config launch/recipes/demo.yaml --overwrite
	$(BC) evaluate --model $(DEMO)/run --shards $(DEMO)/shards --split test
	$(BC) report $(DEMO)/run

# Both run the tests on every core (pytest-xdist; TEST_WORKERS=0 runs them in this one process, TEST_WORKERS=4
# on four) and print the slowest tests and the wall time they took.
test: setup
	@start=$$(date +%s); $(PY) -m pytest -n $(TEST_WORKERS) --durations=15; rc=$$?; \
		echo "make test: $$(( $$(date +%s) - start )) s wall"; exit $$rc

test-fast: setup
	@start=$$(date +%s); $(PY) -m pytest -n $(TEST_WORKERS) -m "not e2e" --durations=10; rc=$$?; \
		echo "make test-fast: $$(( $$(date +%s) - start )) s wall (budget: 60 s on an idle 2-core machine)"; exit $$rc

lint: setup
	$(VENV)/bin/ruff check bloodcells_dist tests benchmarks scripts
	$(VENV)/bin/mypy bloodcells_dist scripts

docs: setup
	$(PY) scripts/render_docs.py

shards: setup
	$(BC) pack --src $(DATA) --out $(OUT) --overwrite
	$(BC) verify $(OUT)

train: setup
	$(VENV)/bin/accelerate launch --config_file launch/cpu_1proc.yaml -m bloodcells_dist.train \
		--shards $(OUT) --output-dir $(RUN) --config $(RECIPE)

cv: setup
	$(BC) cv --shards $(OUT) --output-dir $(CV) --config $(RECIPE) --tta

final: setup
	$(BC) train --shards $(OUT) --output-dir $(FINAL) --config launch/recipes/best.yaml \
		--train-splits train,val --val-split ''
	$(BC) evaluate --model $(FINAL) --shards $(OUT) --split test --tta

# The transfer chain: PBC (class folders as published) -> shards -> pbc-pretrain.yaml -> the fine-tuning recipe on
# DATA's train + val, started from that model -> DATA's test split. TRAIN_FLAGS go to both trainings.
transfer: setup
	$(BC) pack --src $(PBC) --out $(PBC_OUT) --name pbc --test-fraction 0.15 --overwrite
	$(BC) verify $(PBC_OUT)
	$(BC) train --shards $(PBC_OUT) --config launch/recipes/pbc-pretrain.yaml --output-dir $(PRETRAIN) --overwrite \
		$(TRAIN_FLAGS)
	$(BC) evaluate --model $(PRETRAIN) --shards $(PBC_OUT) --split test
	$(BC) pack --src $(DATA) --out $(OUT) --overwrite
	$(BC) verify $(OUT)
	$(BC) train --shards $(OUT) --config launch/recipes/bloodcells-finetune.yaml --init-from $(PRETRAIN) \
		--train-splits train,val --val-split '' --output-dir $(TUNED) --overwrite $(TRAIN_FLAGS)
	$(BC) evaluate --model $(TUNED) --shards $(OUT) --split test

bench: setup
	$(PY) benchmarks/bench_pack.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_precision.py
	$(PY) benchmarks/bench_startup.py

clean:
	rm -rf $(DEMO) runs .pytest_cache
