#!/usr/bin/env bash
# The one device call of the GPU benchmark of the issue-7 GPU targets (benchmarks/GPU.md explains it):
#
#   run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=540)
#
# 1. installs the carried wheels (.whl/: monai, einops, nibabel -- pure Python; torch is already on the
#    machine and is NOT carried) into /tmp/site, 2. puts the repo root and /tmp/site on PYTHONPATH,
# 3. runs `python -m benchmarks.gpu_bench` on CUDA from the repo root. $OUT gets results.json, results.md
# (rewritten after every measurement, so a run cut short keeps what it measured) and log.txt (everything printed).
# Arguments are passed on to benchmarks.gpu_bench, e.g. `bash benchmarks/run_gpu.sh --budget-s 300 --no-compile`.
# Environment: OUT (default /tmp/gpu_bench_out), PYTHON (default python3), SITE (default /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_bench_out}"
PYTHON="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"

{
  echo "== $(date -u '+%F %T UTC') run_gpu.sh $*"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not available"
  ls -l .whl/*.whl
} 2>&1 | tee "$LOG"

if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl 2>&1 | tee -a "$LOG"; then
  echo "run_gpu.sh: installing the carried wheels failed (carry=[\".whl\"]? see benchmarks/GPU.md)" | tee -a "$LOG"
  exit 3
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$PYTHON" - 2>&1 <<'EOF' | tee -a "$LOG"; then
import einops, monai, nibabel, torch
print(f"python ok: torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}); "
      f"monai {monai.__version__} from {monai.__file__}; einops {einops.__version__}; nibabel {nibabel.__version__}")
import medseg_diff.config, medseg_diff.inference.sliding_window, medseg_diff.kinds.diffusion  # noqa: F401,E401
import medseg_diff.training.trainer, benchmarks.harness  # noqa: F401,E401
EOF
  echo "run_gpu.sh: the imports failed; nothing was measured" | tee -a "$LOG"
  exit 4
fi

"$PYTHON" -m benchmarks.gpu_bench --device cuda --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
