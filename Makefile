# The README's commands. `make bench` (the main job) and `make test` each set everything
# up on a fresh machine: a virtualenv, pinned dependencies, the build (CUDA kernels when
# nvcc and a CUDA torch are there), then the benchmarks or the tests.
# `make gpu-check` is for a GPU machine whose python3 already has torch (nothing fetched);
# GPU_CHECK_ARGS passes options to tools/gpu_check.py (e.g. --phases bench, or test,sanitize).

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_PIN   ?= torch==2.14.1
BENCH_PEERS ?= peft bitsandbytes torchao galore-torch
RESULTS_DIR ?= benchmarks/results
BENCH_ARGS  ?=
GPU_CHECK_ARGS ?=
export CCACHE_DIR ?= $(HOME)/.cache/lowrank_ext-ccache
# paths below the checkout hash as relative ones: a clone elsewhere (CI's) reuses the objects
export CCACHE_BASEDIR ?= $(CURDIR)

.PHONY: test bench build deps bench-deps gpu-check gpu-peers clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.deps: requirements-dev.txt | $(PY)
	$(PY) -m pip install -q "$(TORCH_PIN)" -r requirements-dev.txt
	touch $@

deps: $(VENV)/.deps

build: deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import lowrank_ext, json; print(json.dumps(lowrank_ext.build_info()))"

test: build
	$(PY) -m pytest -q

# Peers are optional: the harness names each one it skips and why.
# Each is installed alone (one that fails leaves the others), and the stamp is written only
# when all are in, so a later `make bench` tries the missing ones again.
$(VENV)/.bench-deps: | $(VENV)/.deps
	@ok=1; for peer in $(BENCH_PEERS); do \
	  $(PY) -m pip install -q "$(TORCH_PIN)" "$$peer" || { echo "bench peer $$peer not installed"; ok=0; }; \
	done; if [ $$ok = 1 ]; then touch $@; fi

bench-deps: $(VENV)/.bench-deps

bench: build bench-deps
	$(PY) -m lowrank_ext.bench --out $(RESULTS_DIR) $(BENCH_ARGS)

gpu-check:
	python3 tools/gpu_check.py --results-dir $(RESULTS_DIR) $(GPU_CHECK_ARGS)

# Here, before a GPU session: the benchmark peers the GPU machines lack, copied from this venv
# (after `make bench-deps`) into .peers/ (git-ignored; carry it: gpu_check puts it on the
# path). bitsandbytes keeps its CPU and CUDA 13 libraries only (all of them: ~120 MB, over the
# 64 MiB a call carries).
gpu-peers:
	rm -rf .peers && mkdir -p .peers
	site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	cp -r $$site/bitsandbytes $$site/galore_torch .peers/
	find .peers/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
	find .peers -name __pycache__ -prune -exec rm -rf {} +
	du -sh .peers

clean:
	rm -rf build lowrank_ext/_C*.so *.egg-info
