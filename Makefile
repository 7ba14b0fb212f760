# medseg-diff: set-up, demo and tests. `make demo` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU wheel index used only when no NVIDIA GPU is present and the resolver would otherwise pick a CUDA build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed
	@# NiiVue viewer for report.html, from npm (prints why and carries on when npm is absent or offline)
	@sh tools/fetch_niivue.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# Torch: keep one that is already importable; else a CUDA build only where an NVIDIA GPU exists;
	@# else the CPU build (never a multi-GB CUDA download on a CPU-only machine).
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "setup: keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "setup: NVIDIA GPU found, installing torch with CUDA"; \
	    $(PY) -m pip install -q "torch>=2.4"; \
	elif $(PY) -m pip install -q --dry-run --no-deps --report - "torch==$(TORCH_CPU_VERSION)" 2>/dev/null | grep -q '+cpu'; then \
	    echo "setup: no GPU, installing the local CPU build torch==$(TORCH_CPU_VERSION)+cpu"; \
	    $(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)"; \
	else \
	    echo "setup: no GPU, installing CPU torch from $(TORCH_CPU_INDEX)"; \
	    $(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

demo: setup
	$(PY) pipelines/demo.py --out demo_out

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# Cost of the diffusion model vs the U-Net on the CPU (FLOPs, bytes saved for backward, step and volume times;
# a few minutes on 2 cores). Tables printed and written to $(BENCH_OUT)/cost.{md,json}. Every benchmark: benchmarks/README.md
BENCH_OUT ?= /tmp/medseg-diff-bench
bench: setup
	$(PY) -m benchmarks.bench_cost --out $(BENCH_OUT)

clean:
	rm -rf demo_out .pytest_cache
