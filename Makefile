# fedseg3d: federated 3D segmentation on NVIDIA FLARE. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SITES ?= 4
SEED ?= 0
DATA ?= data/synthetic
WORKSPACE ?= workspace
JOB ?= unet3d_fedbn
ROUNDS ?= 20
LOCAL_EPOCHS ?= 4
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install data jobs sim poc test test-unit test-e2e test-poc lint format clean bench bench-quick

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed ## create the virtualenv and install pinned requirements and the package

data: install ## write the synthetic multi-site data set (SITES, SEED, DATA)
	$(PY) -m fedseg3d.data.synthetic --out $(DATA) --sites $(SITES) --seed $(SEED)

jobs: install ## assemble runnable jobs (config + package) into build/jobs
	$(PY) -m fedseg3d.tools.build_jobs --out build/jobs

sim: data ## run JOB in the FLARE simulator on 2 sites
	$(PY) -m fedseg3d.tools.build_jobs --out build/jobs --job $(JOB) --set sites_per_round=2 --min-clients 2
	$(PY) -m fedseg3d.tools.simulate build/jobs/$(JOB) --sites-root $(DATA) --sites site-1,site-2 --workspace $(WORKSPACE)/sim/$(JOB)
	$(PY) -m fedseg3d.tools.report $(WORKSPACE)/sim/$(JOB)

poc: data ## the main command: POC federation of SITES sites running JOB, live progress, Dice table
	$(PY) poc/run_poc.py --job $(JOB) --data $(DATA) --workspace $(abspath $(WORKSPACE))/poc \
		--set num_rounds=$(ROUNDS) --set local_epochs=$(LOCAL_EPOCHS)

test: install ## the test command: unit tests, simulator end-to-end runs and one POC run
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: install ## unit tests only (seconds)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

BENCH_MODE ?= full
bench: install ## benchmark: local-only, pooled, FedAvg, FedProx, FedBN, POC cost; report (BENCH_MODE=full|quick)
	$(PY) -m benchmarks.run --mode $(BENCH_MODE)

bench-quick: install ## the benchmark's quick mode (2 sites, 2 rounds, tiny volumes; report under workspace/bench)
	$(PY) -m benchmarks.run --mode quick

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install ## apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean: ## remove generated data, builds and workspaces (not the virtualenv)
	rm -rf build $(WORKSPACE) $(DATA)
