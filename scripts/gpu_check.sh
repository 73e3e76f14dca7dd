#!/usr/bin/env bash
# One command for a GPU machine: build the CUDA extension, run the CUDA and Triton correctness tests against the
# reference backend, then the kernel benchmark (dense cuBLAS fp32/TF32/bf16, cuSPARSE CSR at the same nnz, the
# diagonal kernels; batch-1 and training token counts; ViT-B shapes at 0.5-0.98 sparsity) and the end-to-end
# ViT benchmark. Everything lands in one results folder: gpu_check.log (all output), summary.txt (status and time
# per step), bench_kernels.{json,png}, bench_model.json. About 5 minutes on an H100 (QUICK=1: about 2).
#
#   scripts/gpu_check.sh [RESULTS_DIR]          # default: results/gpu-<UTC timestamp>
#
# Environment: PYTHON (default: .venv/bin/python if its torch sees a GPU, else python3), QUICK=1 for a short
# benchmark, GPU_CHECK_DEVICE=cpu to dry-run the plumbing on a machine without a GPU (tests then skip).
# A failing step is reported in summary.txt and the exit status, and the later steps still run.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-results/gpu-$(date -u +%Y%m%d-%H%M%S)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true

FAILED=0
LOG="$OUT/gpu_check.log"
: >"$LOG"
step() {  # step NAME CMD...: run, append output to $LOG, record status and time
  local name=$1
  shift
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$LOG"
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED=1
}

if [ "${QUICK:-0}" = 1 ]; then
  KERNEL_ARGS=(--tokens 197 12608 --sparsities 0.9 --reps 3)
  MODEL_ARGS=(--models vit_base_patch16_224 --sparsities 0.9 --dtypes fp32 --reps 2)
else
  KERNEL_ARGS=(--tokens 197 12608 --reps 5)
  MODEL_ARGS=(--models vit_base_patch16_224 --sparsities 0.5 0.8 0.9 0.95 --reps 3)
fi
BATCH=64  # 64 x 197 = 12,608 tokens per training step
if [ "$DEVICE" = cpu ]; then  # plumbing dry run only
  KERNEL_ARGS=(--tokens 197 --sparsities 0.9 --shapes proj --reps 1)
  MODEL_ARGS=(--models vit_small_patch16_224 --sparsities 0.9 --dtypes fp32 --reps 1)
  BATCH=2
fi

step env bash -c "$PYTHON -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true; nvcc --version | tail -2 || true"
step build "$PYTHON" -c "
import time; t = time.time()
from dynadiag.kernels import cuda
cuda.load_cuda_library()
print(f'dynadiag CUDA extension ready in {time.time() - t:.1f} s', cuda.cuda_arch_flags())"
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" -o addopts="" -rfE)
# Order: the CUDA backend's correctness first, then the numbers, then the secondary Triton backend.
step tests_cuda "${PYTEST[@]}" tests/test_kernels_cuda.py tests/test_kernels_registry.py
step bench_kernels "$PYTHON" scripts/bench_kernels.py --device "$DEVICE" --no-reference "${KERNEL_ARGS[@]}" --out "$OUT"
step bench_model "$PYTHON" scripts/bench_model.py --device "$DEVICE" --batch "$BATCH" "${MODEL_ARGS[@]}" \
  --out "$OUT/bench_model.json"
step tests_triton "${PYTEST[@]}" tests/test_kernels_triton.py

echo "== summary ($OUT)"
cat "$SUMMARY"
exit $FAILED
