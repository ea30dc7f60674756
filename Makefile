# heddle: every target bootstraps .venv when missing. torch is installed first (pinned to the
# CPU wheel 2.13.0 only when no torch is importable) so that pip never resolves an unpinned torch
# to a multi-GB CUDA build; an existing torch is left alone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.heddle-installed
NPROC  ?= 2
PYTEST_ARGS ?=

.PHONY: demo test bench docs gpu-check install clean fault-campaign cluster-campaign bench-cluster

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed: left alone"; \
	else \
	  echo "installing torch==2.13.0 first"; $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/heddle run -n $(NPROC) examples/train_lm.py --steps 600 --log-every 50

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Quick set of every scenario at 2 processes (budget 9 min), then the report even when a scenario
# failed (the target still fails). `make bench BENCH_MD=docs/benchmarks.md` also refreshes the docs.
BENCH_MD ?=
bench: $(STAMP)
	@start=$$(date +%s); status=0; \
	$(VENV)/bin/heddle bench quick --nproc 2 --out heddle-results || status=$$?; \
	$(VENV)/bin/heddle bench report heddle-results $(if $(BENCH_MD),--markdown $(BENCH_MD)) || status=$$?; \
	echo "make bench: $$(( $$(date +%s) - start )) s wall, exit $$status"; exit $$status

# The docs site (mkdocs-material + mkdocstrings API reference) into site/; --strict: a broken
# link or reference fails (tests/docs/test_docs_build.py runs the same build in make test).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
	@echo "open site/index.html"

# Seeded fault campaign for the checkpoint (issue 13): >= 40 trials of SIGKILL at snapshot / flush /
# commit / retention points, keeper death and disk full (tmpfs mounts: run as root); prints the table.
FAULT_TRIALS ?= 42
FAULT_SEED ?= 0
fault-campaign: $(STAMP)
	$(PY) -m tests.checkpoint.fault_campaign --trials $(FAULT_TRIALS) --seed $(FAULT_SEED)

# Emulated 2-node cluster (needs root + iproute2): bootstrap across nodes with torchrun, mpirun and
# SLURM variables, then the node-loss campaign table (14 trials, docs/cluster.md).
cluster-campaign: $(STAMP)
	$(PY) -m heddle.cluster.bootstrap_check
	$(PY) -m heddle.cluster.campaign

# Cross-node benchmarks on the emulated cluster (needs root + iproute2; long): link ceiling, compression
# under DDP/FSDP2, the DDP hook, MoE, Ulysses, adaptive SP at 1/10/25 Gbit/s; tables in docs/compress.md.
bench-cluster: $(STAMP)
	$(PY) benchmarks/cluster.py --json bench-cluster.json --out heddle-results

# Every CUDA path on one GPU (Triton kernels vs torch bit for bit, Ulysses with flash/SDPA, the
# checkpoint's pinned side-stream snapshot, the bf16 Trainer step and MFU): a pass/fail + timing
# table in under 8 minutes. Without CUDA it says so in one line and exits 0.
gpu-check: $(STAMP)
	$(PY) -m heddle.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
