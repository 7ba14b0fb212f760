# medseg-diff: set-up, demo and tests. `make demo` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch, pinned by version (constraints.txt pins the same): the CPU build where no NVIDIA GPU is present (from
# this machine's wheel folder, else PyTorch's CPU index), PyPI's CUDA build of the same version where one is.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
CONSTRAINTS ?= constraints.txt
# the extras `make setup` installs: everything (tracking, synth, dicom) and the test tools
EXTRAS ?= all,dev

.PHONY: setup demo test test-slow test-floors bench clean

setup: $(VENV)/.installed
	@# NiiVue viewer for report.html, from npm (prints why and carries on when npm is absent or offline)
	@sh tools/fetch_niivue.sh

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@# an isolated venv: packages of the host Python do not leak in (an old .venv made with
	@# --system-site-packages is made again)
	@if [ -f $(VENV)/pyvenv.cfg ] && grep -q "include-system-site-packages = true" $(VENV)/pyvenv.cfg; then \
	    echo "setup: $(VENV) sees the host's site-packages; making it again"; rm -rf $(VENV); fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(MAKE) --no-print-directory torch TORCH_PY=$(PY)
	@$(MAKE) --no-print-directory install INSTALL_PY=$(PY) INSTALL_ARGS='-c $(CONSTRAINTS) -e ".[$(EXTRAS)]"'
	@touch $@

# pip install $(INSTALL_ARGS) into the venv of INSTALL_PY, done by uv (the same versions from the same constraints;
# about 30 s for torch and the whole project against pip's 1 min 45 s on 2 cores, which is what keeps `make demo`
# under 5 minutes), by pip where uv cannot be installed or fails. --compile-bytecode does what pip does by default:
# where PYTHONDONTWRITEBYTECODE is set (as on this project's machines) nothing else ever writes the .pyc files, and
# every process would compile torch, MONAI and MLflow from source again (7 s more per start; the tests 9 min, not 5)
UV_VERSION ?= 0.13.10
.PHONY: install
install:
	@if $(INSTALL_PY) -m pip install -q "uv==$(UV_VERSION)" >/dev/null 2>&1 && \
	    $(dir $(INSTALL_PY))uv pip install -q --compile-bytecode --python $(INSTALL_PY) $(INSTALL_ARGS); then \
	    echo "setup: installed with uv $(UV_VERSION)"; \
	else \
	    echo "setup: uv unavailable or failed, installing with pip"; \
	    $(INSTALL_PY) -m pip install -q $(INSTALL_ARGS); \
	fi

# torch==$(TORCH_VERSION) into the venv of TORCH_PY: CUDA only where an NVIDIA GPU exists, never a multi-GB CUDA
# download on a CPU-only machine
.PHONY: torch
torch:
	@if $(TORCH_PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
	    echo "setup: torch $$($(TORCH_PY) -c 'import torch; print(torch.__version__)') already there"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "setup: NVIDIA GPU found, installing torch==$(TORCH_VERSION) with CUDA"; \
	    $(TORCH_PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	elif WHEEL=$$($(TORCH_PY) -m pip install -q --dry-run --no-deps --report - "torch==$(TORCH_VERSION)" 2>/dev/null | \
	        $(TORCH_PY) tools/local_wheel.py +cpu) && [ -n "$$WHEEL" ]; then \
	    echo "setup: no GPU, installing the local CPU build $$WHEEL"; \
	    $(MAKE) --no-print-directory install INSTALL_PY=$(TORCH_PY) INSTALL_ARGS="-c $(CONSTRAINTS) $$WHEEL"; \
	else \
	    echo "setup: no GPU, installing CPU torch==$(TORCH_VERSION) from $(TORCH_CPU_INDEX)"; \
	    $(TORCH_PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi

demo: setup
	$(PY) pipelines/demo.py --out demo_out

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The declared floors: a fresh venv with the oldest release pyproject.toml allows of every direct dependency
# (tools/floors.py; torch stays at TORCH_VERSION) and a smoke subset of the tests (.ci/run runs it after `make test`)
FLOORS_VENV ?= .venv-floors
SMOKE_TESTS ?= tests/data/test_io.py tests/data/test_manifest_check.py tests/data/test_synth.py \
	tests/models tests/diffusion/test_sampler.py tests/evaluation/test_metrics.py tests/evaluation/test_stats.py \
	tests/evaluation/test_lesionwise.py tests/inference/test_predict.py tests/tracking/test_registry.py \
	tests/dicom/test_outputs.py tests/test_extras.py tests/data/test_augment.py tests/evaluation/test_workers.py \
	tests/data/test_export_nnunet.py tests/tracking/test_serve.py
test-floors:
	@rm -rf $(FLOORS_VENV) && $(PYTHON) -m venv $(FLOORS_VENV)
	@$(MAKE) --no-print-directory torch TORCH_PY=$(FLOORS_VENV)/bin/python
	$(FLOORS_VENV)/bin/python tools/floors.py --extras all --skip torch > $(FLOORS_VENV)/floors.txt
	@cat $(FLOORS_VENV)/floors.txt
	@$(MAKE) --no-print-directory install INSTALL_PY=$(FLOORS_VENV)/bin/python \
	    INSTALL_ARGS='-c $(FLOORS_VENV)/floors.txt -e ".[all]" "pytest>=8" "pytest-timeout>=2.3"'
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider $(SMOKE_TESTS)

# Cost of the diffusion model vs the U-Net on the CPU (FLOPs, bytes saved for backward, step and volume times;
# a few minutes on 2 cores). Tables printed and written to $(BENCH_OUT)/cost.{md,json}. Every benchmark: benchmarks/README.md
BENCH_OUT ?= /tmp/medseg-diff-bench
bench: setup
	$(PY) -m benchmarks.bench_cost --out $(BENCH_OUT)

clean:
	rm -rf demo_out .pytest_cache $(FLOORS_VENV)
