# One-command set-up, demo, tests and shards. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/blood-cells
OUT    ?= shards
RUN    ?= runs/default
RECIPE ?= launch/recipes/best.yaml
CV     ?= runs/cv-best
FINAL  ?= runs/best-final
DEMO   ?= demo

.PHONY: help setup demo test test-fast shards verify train cv final bench clean

help:
	@echo "make setup                 create $(VENV) and install the package with its dev extra"
	@echo "make demo                  synthetic data -> shards -> train -> evaluate -> plots, all on CPU (about 3 min)"
	@echo "make test                  the whole test suite (what CI runs)"
	@echo "make test-fast             the tests not marked slow"
	@echo "make shards DATA=ROOT [OUT=shards]   pack a dataset root into verified shards"
	@echo "make train [OUT=shards] [RUN=runs/default] [RECIPE=...]   train a recipe (best.yaml) on shards"
	@echo "make cv [RECIPE=...] [CV=runs/cv-best]   grouped 5-fold cross-validation of a recipe, with TTA"
	@echo "make final [FINAL=runs/best-final]   best.yaml on train + val, then evaluate on the test split"
	@echo "make bench                 packing and training throughput benchmarks"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# The stamp reinstalls when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev,export]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	rm -rf $(DEMO)  # a clean demo: data, shards and run (its W&B folder too)
# 4 copies of 50 drawn cells a class (not 8 of 25): more distinct cells, so the tiny model generalises to TEST's.
	$(PY) -m bloodcells_dist.synthetic --out $(DEMO)/data --per-class 200 --copies 4
	$(PY) -m bloodcells_dist.shards pack --src $(DEMO)/data --out $(DEMO)/shards --overwrite
	$(PY) -m bloodcells_dist.shards verify $(DEMO)/shards
	$(PY) -m bloodcells_dist.train --shards $(DEMO)/shards --output-dir $(DEMO)/run --config launch/recipes/demo.yaml --overwrite
	$(PY) -m bloodcells_dist.evaluate --model $(DEMO)/run --shards $(DEMO)/shards --split test
	$(PY) -m bloodcells_dist.report $(DEMO)/run

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

shards: setup
	$(PY) -m bloodcells_dist.shards pack --src $(DATA) --out $(OUT) --overwrite
	$(PY) -m bloodcells_dist.shards verify $(OUT)

train: setup
	$(VENV)/bin/accelerate launch --config_file launch/cpu_1proc.yaml -m bloodcells_dist.train \
		--shards $(OUT) --output-dir $(RUN) --config $(RECIPE)

cv: setup
	$(PY) -m bloodcells_dist.cv --shards $(OUT) --output-dir $(CV) --config $(RECIPE) --tta

final: setup
	$(PY) -m bloodcells_dist.train --shards $(OUT) --output-dir $(FINAL) --config launch/recipes/best.yaml \
		--train-splits train,val --val-split ''
	$(PY) -m bloodcells_dist.evaluate --model $(FINAL) --shards $(OUT) --split test --tta

bench: setup
	$(PY) benchmarks/bench_pack.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_precision.py

clean:
	rm -rf $(DEMO) runs .pytest_cache
