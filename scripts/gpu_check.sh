#!/usr/bin/env bash
# One prepared GPU measurement, about 5 minutes on an H200, resumable. Every step appends JSON lines to
# <OUT>/results.jsonl as it measures, so a run cut off by a time limit still reports; re-running with the same OUT
# skips the steps (and the measured groups of a step) already done. Steps, in order of value:
#
#   env          GPU, clocks, driver, torch/CUDA, compilers
#   build        the CUDA extension (v1 and v2 kernels)
#   validation   the CUDA input-validation test alone, python -X faulthandler (+ a gdb backtrace if it crashes)
#   probe        which TORCH_CHECK message kinds crash this process (one process per kind; the 50365c8 segfault)
#   tests_cuda   the CUDA + registry tests (v1 and v2 against the dense reference)
#   ops          fwd / dX / dV per ViT-B layer at 197, 1,576, 12,608, 50,432 tokens, fp32 and bf16, by CUDA-graph
#                replay: diagonal v1 and v2, dense strict fp32 / TF32 / bf16, CSR; useful TFLOP/s, ceiling fraction
#   determinism  dV bitwise over 5 calls (v1 uses atomics, v2 must be bitwise equal)
#   ksweep       sparsity 0.5-0.98 for proj and fc1 at 12,608 tokens, fitted to time = a + b K
#   profile      the measured cost profile for backend=auto (written to OUT and to the dynadiag cache)
#   ncu          a short Nsight Compute section set for the v1/v2 apply and dV kernels (if ncu is allowed)
#   model        end-to-end ViT-B/16 at 90 % (fp32, bf16; auto vs dense), if time is left
#   report       OUT/README.md with the tables (always rewritten, also after a resumed run)
#
#   scripts/gpu_check.sh [OUT]     # default OUT: docs/benchmarks/gpu/<gpu>-<commit>
#
# Environment: PYTHON (default .venv/bin/python if its torch sees a GPU, else python3); BUDGET_S (default 300: a
# step whose estimate exceeds the time left is recorded as skipped, and every step runs under `timeout` with the
# time left); GPU_CHECK_DEVICE=cpu dry-runs the plumbing on a machine without a GPU (tiny shapes, CUDA steps skip).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${BUDGET_S:-300}
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
export PYTHONFAULTHANDLER=1 # every Python process prints a backtrace on a crash

if [ -z "${1:-}" ]; then
  GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
  GPU=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
  OUT=docs/benchmarks/gpu/$GPU-$COMMIT
else
  OUT=$1
fi
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
LOG="$OUT/gpu_check.log"
touch "$RES" "$LOG"
START=$SECONDS
MEASURE=("$PYTHON" scripts/gpu_measure.py --device "$DEVICE" --out "$OUT")
PYTEST=("$PYTHON" -X faulthandler -m pytest -q -p no:cacheprovider -m "not slow" -o addopts="" -rfE)
FAILED=0

record() { # record STEP STATUS RC SECONDS [NOTE]
  printf '{"time": %s, "step": "%s:run", "status": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' \
    "$(date +%s)" "$1" "$2" "$3" "$4" "${5:-}" >>"$RES"
}

step() { # step NAME ESTIMATE_S CMD...: run unless done before; under `timeout` with the time left
  local name=$1 estimate=$2
  shift 2
  if grep -q "\"step\": \"$name:run\", \"status\": \"done\"" "$RES"; then
    echo "== $name: done in an earlier run, skipped" | tee -a "$LOG"
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt "$estimate" ]; then
    echo "== $name: skipped (${left}s left, needs about ${estimate}s)" | tee -a "$LOG"
    record "$name" skipped null 0 "budget"
    return 0
  fi
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  STEP_LEFT=$left
  if declare -F "$1" >/dev/null; then # a function here: it applies $STEP_LEFT to its own commands
    "$@" 2>&1 | tee -a "$LOG"
  else
    timeout --signal=TERM --kill-after=10 "$left" "$@" 2>&1 | tee -a "$LOG"
  fi
  local rc=${PIPESTATUS[0]}
  local status=done
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; fi
  record "$name" "$status" "$rc" $((SECONDS - t0))
  [ "$rc" -eq 0 ] || FAILED=1
}

validation() { # the test that segfaulted on 50365c8, alone; a gdb backtrace when it crashes
  timeout "$STEP_LEFT" "${PYTEST[@]}" tests/test_kernels_cuda.py -k "input_validation"
  local rc=$?
  if [ "$rc" -ge 128 ] && [ "$rc" -ne 137 ] && command -v gdb >/dev/null; then
    echo "validation crashed (rc=$rc): gdb backtrace -> $OUT/validation_backtrace.txt"
    timeout 120 gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args "$PYTHON" -m pytest -q -p no:cacheprovider \
      -o addopts="" tests/test_kernels_cuda.py -k "input_validation" >"$OUT/validation_backtrace.txt" 2>&1
    tail -40 "$OUT/validation_backtrace.txt"
  fi
  return "$rc"
}

run_ncu() { # a few kernels, one launch each, standard sections plus the FFMA and instruction counts
  if ! command -v ncu >/dev/null; then
    echo "ncu not on PATH: skipped"
    return 0
  fi
  local spec
  for spec in "diag_v1 fwd" "diag_v2 fwd" "diag_v1 dv" "diag_v2 dv"; do
    set -- $spec
    timeout 60 ncu --launch-skip 2 --launch-count 1 --kernel-name "regex:(apply|sddmm)" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --metrics smsp__sass_thread_inst_executed_op_ffma_pred_on.sum,smsp__inst_executed.sum \
      "${MEASURE[@]}" one --method "$1" --op "$2" --shapes fc2 --tokens 12608 >"$OUT/ncu_$1_$2.txt" 2>&1
    echo "ncu $1 $2: rc=$? -> $OUT/ncu_$1_$2.txt"
    grep -E "ERR|permission|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput" "$OUT/ncu_$1_$2.txt" | head -8
  done
}

step env 10 "${MEASURE[@]}" env
step build 90 "$PYTHON" -c "
import time; t = time.time()
if '$DEVICE' == 'cuda':
    from dynadiag.kernels import cuda; cuda.load_cuda_library(); print('flags', cuda.cuda_arch_flags())
else:
    from dynadiag.kernels.cpu import load_cpu_library; load_cpu_library()
print(f'dynadiag extension ready in {time.time() - t:.1f} s')"
step validation 20 validation
step probe 40 "${MEASURE[@]}" probe
# v1 and the baselines first, v2 (never run on hardware before) in their own processes afterwards: a crash or a
# sticky CUDA error in v2 must not cost the v1 numbers.
step tests_cuda 90 "${PYTEST[@]}" tests/test_kernels_registry.py tests/test_kernels_cuda.py -k "not input_validation"
step ops 60 "${MEASURE[@]}" ops --versions v1
[ "$DEVICE" = cuda ] && step ops_v2 30 "${MEASURE[@]}" ops --versions v2 --no-baselines --tag _v2
step determinism 10 "${MEASURE[@]}" determinism --versions v1
[ "$DEVICE" = cuda ] && step determinism_v2 10 "${MEASURE[@]}" determinism --versions v2 --tag _v2
step ksweep 20 "${MEASURE[@]}" ksweep --versions v1
[ "$DEVICE" = cuda ] && step ksweep_v2 15 "${MEASURE[@]}" ksweep --versions v2 --tag _v2
step profile 5 "${MEASURE[@]}" profile --versions $([ "$DEVICE" = cuda ] && echo v1 v2 || echo v1)
step ncu 40 run_ncu
if [ "$DEVICE" = cuda ]; then
  step model 60 "$PYTHON" scripts/bench_model.py --device cuda --batch 64 --models vit_base_patch16_224 \
    --sparsities 0.9 --dtypes fp32 bf16 --reps 2 --out "$OUT/bench_model.json"
fi
"${MEASURE[@]}" report >>"$LOG" 2>&1 # always (re)written: OUT/README.md

echo "== $OUT ($((SECONDS - START)) s)"
grep ':run"' "$RES" | tail -20
exit $FAILED
