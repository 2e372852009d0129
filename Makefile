# fedseg3d: federated 3D segmentation on NVIDIA FLARE. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FEDSEG3D := $(VENV)/bin/fedseg3d
SITES ?= 4
SEED ?= 0
DATA ?= data/synthetic
REALDATA ?= data/real
WORKSPACE ?= workspace
JOB ?= unet3d_fedbn
# job knobs, space-separated: make sim JOB=unet3d_fedbn_quantized SET=scheme=int3
SET ?=
SET_ARGS = $(foreach s,$(SET),--set $(s))
ROUNDS ?= 20
LOCAL_EPOCHS ?= 4
PYTEST_ARGS ?=
BENCH_ARGS ?=
EPSILON_BUDGET ?= 50
PROVISION ?= build/provision
DEPLOY_WORKSPACE ?= build/deploy-local
DEPLOY_ROUNDS ?= 2
DEPLOY_PORT ?=
SITE ?=
ORG ?=
PRIVACY_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install data realdata jobs sim poc poc-stop test test-unit test-e2e test-poc lint format clean provision add-site deploy-local test-deploy audit bench-privacy bench bench-quick bench-real bench-compression

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed ## create the virtualenv and install pinned requirements and the package

data: install ## write the synthetic multi-site data set (SITES, SEED, DATA)
	$(FEDSEG3D) data synthetic --out $(DATA) --sites $(SITES) --seed $(SEED)

realdata: install ## fetch TotalSegmentator's pinned source archive through pip and build 3 real sites in REALDATA (docs/real_data.md)
	$(FEDSEG3D) data real --out $(REALDATA)

jobs: install ## assemble runnable jobs (config + package) into build/jobs
	$(FEDSEG3D) build-jobs --out build/jobs

sim: data ## run JOB (knobs: SET) in the FLARE simulator on 2 sites (DP jobs: budgets in WORKSPACE/privacy, EPSILON_BUDGET)
	$(FEDSEG3D) build-jobs --out build/jobs --job $(JOB) --set sites_per_round=2 --min-clients 2 $(SET_ARGS)
	$(FEDSEG3D) simulate build/jobs/$(JOB) --sites-root $(DATA) --sites site-1,site-2 --workspace $(WORKSPACE)/sim/$(JOB) \
		--privacy-dir $(WORKSPACE)/privacy --default-budget $(EPSILON_BUDGET)
	$(FEDSEG3D) report $(WORKSPACE)/sim/$(JOB)

audit: install ## membership-inference audit of the last `make sim` run of JOB (docs/privacy_audit.md)
	$(FEDSEG3D) audit --run-dir $(WORKSPACE)/sim/$(JOB) --sites-root $(DATA)

bench-privacy: install ## Dice vs epsilon vs attack AUC of the DP jobs: docs/privacy_benchmark.{md,json,png} (~12 min; BENCH_ARGS=--quick)
	$(PY) benchmarks/privacy_tradeoff.py $(BENCH_ARGS)

poc: data ## the main command: POC federation of SITES sites running JOB, live progress, Dice table
	$(FEDSEG3D) poc run --job $(JOB) --data $(DATA) --workspace $(abspath $(WORKSPACE))/poc \
		--set num_rounds=$(ROUNDS) --set local_epochs=$(LOCAL_EPOCHS) $(SET_ARGS)

poc-stop: install ## stop a POC left running (--keep-running) or interrupted: processes, port 8002
	$(FEDSEG3D) poc stop --workspace $(abspath $(WORKSPACE))/poc

test: install ## the test command: unit, simulator, POC, benchmark-quick and provisioned-deployment tests
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: install ## unit tests only (seconds)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

provision: install ## signed mTLS startup kits for provisioning/project.yml in PROVISION, site policies in local/ (PRIVACY_ARGS='--privacy-scope dp_update')
	$(FEDSEG3D) provision --workspace $(PROVISION) $(PRIVACY_ARGS)

add-site: install ## one more hospital with the existing root CA: make add-site SITE=site-5 ORG=hospital_e
	$(FEDSEG3D) add-site --name $(SITE) --org $(ORG) --workspace $(PROVISION) $(PRIVACY_ARGS)

deploy-local: data ## provisioned kits on localhost: server + SITES sites, JOB submitted via the admin API (DEPLOY_ROUNDS)
	$(FEDSEG3D) deploy-local --sites $(SITES) --data $(DATA) --workspace $(DEPLOY_WORKSPACE) --job $(JOB) \
		--set num_rounds=$(DEPLOY_ROUNDS) --set local_epochs=$(LOCAL_EPOCHS) $(SET_ARGS) $(if $(DEPLOY_PORT),--port $(DEPLOY_PORT))

test-deploy: install ## provisioned-kit deployment and security tests on a free port (about 1.5 min)
	$(PY) -m pytest -q tests/deploy $(PYTEST_ARGS)

BENCH_MODE ?= full
bench: install ## benchmark: 6 methods x 3 seeds, 95% intervals, goals, POC cost (BENCH_MODE=full|quick; BENCH_ARGS='--seeds 0,1,2')
	$(PY) -m benchmarks.run --mode $(BENCH_MODE) $(BENCH_ARGS)

bench-quick: install ## the benchmark's quick mode (2 sites, 2 rounds, 2 seeds, tiny volumes; report under workspace/bench)
	$(PY) -m benchmarks.run --mode quick $(BENCH_ARGS)

bench-real: realdata ## the benchmark on the real sites in REALDATA (3 sites, 3 seeds; BENCH_ARGS as for bench)
	$(PY) -m benchmarks.run --mode $(BENCH_MODE) --data real --real-root $(REALDATA) $(BENCH_ARGS)

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install ## apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench-compression: install ## Dice vs bytes per scheme, 3 runs each (simulator, ~40 min on 2 cores): docs/compression_benchmark.{md,json,png}
	$(PY) benchmarks/compression.py --workspace $(WORKSPACE)/bench_compression

clean: ## remove generated data, builds and workspaces (not the virtualenv)
	rm -rf build $(WORKSPACE) $(DATA)
