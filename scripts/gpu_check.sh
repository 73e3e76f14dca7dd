#!/usr/bin/env bash
# One prepared GPU measurement of at most BUDGET_S seconds (default 300), resumable. Every step appends JSON lines
# to WORK/results.jsonl as it measures, so a run cut off by a time limit still reports; re-running with the same
# WORK skips the steps (and the measured groups of a step) already done. Steps, in order of value:
#
#   env          GPU, clocks, driver, torch/CUDA, compilers
#   build        the CUDA extension (v1 and v2 kernels) only: no CPU extension on a GPU run
#   ops          fwd / dX / dV per ViT-B layer at 197 and 12,608 tokens, fp32 and bf16, by CUDA-graph replay:
#                diagonal v1, dense strict fp32 / TF32 / bf16; useful TFLOP/s, ceiling fraction, ratio vs dense
#   ops_v2       the same for the v2 kernels (own process: a crash or sticky CUDA error must not cost v1's numbers)
#   ops_g32      grouped layers (runs of 32 offsets, 90 %): grouped_triton and bsr_triton against dense
#   tests_cuda   the GPU tests: v1, v2, grouped_triton and bsr_triton against the dense reference
#   determinism  dV bitwise over 5 calls (v1 uses atomics, v2 must be bitwise equal)
#   ops_rest     1,576 and 50,432 tokens, with cuSPARSE CSR; then v2 and grouped at those token counts
#   ksweep       sparsity 0.5-0.98 for proj and fc1 at 12,608 tokens, fitted to time = a + b K
#   profile      the measured cost profile for backend=auto (written to WORK and to the dynadiag cache)
#   validation   the CUDA input-validation test alone, python -X faulthandler (+ a gdb backtrace if it crashes)
#   probe        which TORCH_CHECK message kinds crash this process (one process per kind; the 50365c8 segfault)
#   model        end-to-end ViT-B/16 at 90 % (fp32, bf16; auto vs dense)
#   ncu          a short Nsight Compute section set for the v1/v2 apply and dV kernels, within the time left
#   report       WORK/README.md with the tables (always rewritten, also after a resumed run)
#
#   scripts/gpu_check.sh [WORK]
#
# Every step runs under `timeout` with the time left (less a reserve for the report and the archive) and is recorded
# as skipped when its estimate exceeds it; nothing runs past the budget, ncu included.
#
# Where results go: WORK (default docs/benchmarks/gpu/NAME) holds every file. When DEST is set (GPU_CHECK_DEST, else
# the environment's OUT, as on a lent device machine), DEST receives exactly two files after every step:
# results.jsonl and NAME.tar.gz (the whole WORK folder).
# NAME: GPU_CHECK_NAME, else <gpu>-<revision>; the revision is GPU_CHECK_REV, else the file REVISION at the top of
# the tree, else git's short commit, else "norev" (a copied tree may have no .git).
#
# Environment: PYTHON (default .venv/bin/python if its torch sees a GPU, else python3); BUDGET_S; GPU_CHECK_DEVICE=cpu
# dry-runs the whole script on a machine without a GPU (tiny shapes, CPU kernels, Triton's interpreter, the CUDA-only
# steps skipped, estimates scaled down).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${BUDGET_S:-300}
RESERVE=10 # seconds kept for the report and the archive
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
export PYTHONFAULTHANDLER=1 # every Python process prints a backtrace on a crash
DRY=0
if [ "$DEVICE" = cpu ]; then
  DRY=1
  export TRITON_INTERPRET=1 # grouped_triton on CPU tensors runs in Triton's interpreter
fi

if [ -n "${GPU_CHECK_NAME:-}" ]; then
  NAME=$GPU_CHECK_NAME
else
  GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
  GPU=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
  REV=${GPU_CHECK_REV:-}
  [ -z "$REV" ] && [ -f REVISION ] && REV=$(head -c 40 REVISION | tr -cd 'a-zA-Z0-9._-')
  [ -z "$REV" ] && REV=$(git rev-parse --short HEAD 2>/dev/null || true)
  NAME=$GPU-${REV:-norev}
fi
WORK=${1:-docs/benchmarks/gpu/$NAME}
DEST=${GPU_CHECK_DEST:-${OUT:-}}
mkdir -p "$WORK"
[ -n "$DEST" ] && mkdir -p "$DEST"
RES="$WORK/results.jsonl"
LOG="$WORK/gpu_check.log"
touch "$RES" "$LOG"
START=$SECONDS
MEASURE=("$PYTHON" scripts/gpu_measure.py --device "$DEVICE" --out "$WORK")
PYTEST=("$PYTHON" -X faulthandler -m pytest -q -p no:cacheprovider -m "not slow" -o addopts="" -rfE)
FAILED=0

left() { echo $((BUDGET - RESERVE - (SECONDS - START))); }

publish() { # DEST gets results.jsonl and one archive of WORK (refreshed after every step: a cut-off run still returns)
  [ -n "$DEST" ] || return 0
  cp "$RES" "$DEST/results.jsonl.tmp" && mv "$DEST/results.jsonl.tmp" "$DEST/results.jsonl"
  tar -czf "$DEST/$NAME.tar.gz.tmp" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null &&
    mv "$DEST/$NAME.tar.gz.tmp" "$DEST/$NAME.tar.gz"
}

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
  [ "$DRY" = 1 ] && estimate=$(((estimate + 9) / 10)) # the dry run's shapes are tiny
  local t_left
  t_left=$(left)
  if [ "$t_left" -lt "$estimate" ] || [ "$t_left" -le 0 ]; then
    echo "== $name: skipped (${t_left}s left, needs about ${estimate}s)" | tee -a "$LOG"
    record "$name" skipped null 0 "budget"
    return 0
  fi
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  STEP_LEFT=$t_left
  if declare -F "$1" >/dev/null; then # a function here: it bounds its own commands by $STEP_LEFT
    "$@" 2>&1 | tee -a "$LOG"
  else
    timeout --signal=TERM --kill-after=5 "$t_left" "$@" 2>&1 | tee -a "$LOG"
  fi
  local rc=${PIPESTATUS[0]}
  local status=done
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; fi
  record "$name" "$status" "$rc" $((SECONDS - t0))
  [ "$rc" -eq 0 ] || FAILED=1
  publish
}

cuda_step() { # a step that needs a GPU: recorded as skipped in the dry run
  if [ "$DRY" = 1 ]; then
    record "$1" skipped null 0 "dry run (cpu)"
    return 0
  fi
  step "$@"
}

validation() { # the test that segfaulted on 50365c8, alone; a gdb backtrace when it crashes (time left permitting)
  local t0=$SECONDS
  timeout "$STEP_LEFT" "${PYTEST[@]}" tests/test_kernels_cuda.py -k "input_validation"
  local rc=$?
  local rest=$((STEP_LEFT - (SECONDS - t0)))
  if [ "$rc" -ge 128 ] && [ "$rc" -ne 137 ] && [ "$rest" -gt 20 ] && command -v gdb >/dev/null; then
    echo "validation crashed (rc=$rc): gdb backtrace -> $WORK/validation_backtrace.txt"
    timeout "$rest" gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args "$PYTHON" -m pytest -q \
      -p no:cacheprovider -o addopts="" tests/test_kernels_cuda.py -k "input_validation" \
      >"$WORK/validation_backtrace.txt" 2>&1
    tail -40 "$WORK/validation_backtrace.txt"
  fi
  return "$rc"
}

run_ncu() { # a few kernels, one launch each, each bounded by the step's time left
  if ! command -v ncu >/dev/null; then
    echo "ncu not on PATH: skipped"
    return 0
  fi
  local t0=$SECONDS spec rest
  for spec in "diag_v1 fwd" "diag_v2 fwd" "diag_v1 dv" "diag_v2 dv"; do
    rest=$((STEP_LEFT - (SECONDS - t0)))
    if [ "$rest" -lt 20 ]; then
      echo "ncu: ${rest}s left, stopped before $spec"
      break
    fi
    set -- $spec
    timeout --kill-after=5 "$((rest < 60 ? rest : 60))" ncu --launch-skip 2 --launch-count 1 \
      --kernel-name "regex:(apply|sddmm)" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --metrics smsp__sass_thread_inst_executed_op_ffma_pred_on.sum,smsp__inst_executed.sum \
      "${MEASURE[@]}" one --method "$1" --op "$2" --shapes fc2 --tokens 12608 >"$WORK/ncu_$1_$2.txt" 2>&1
    echo "ncu $1 $2: rc=$? -> $WORK/ncu_$1_$2.txt"
    grep -E "ERR|permission|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput" "$WORK/ncu_$1_$2.txt" | head -8
  done
}

FIRST=(--tokens 197 12608)
REST=(--tokens 1576 50432)
GROUPED=(--grouped 32 --versions grouped_triton bsr_triton --no-csr)
V1=(--versions v1)

step env 10 "${MEASURE[@]}" env
step build 60 "$PYTHON" -c "
import time; t = time.time()
if '$DEVICE' == 'cuda':
    from dynadiag.kernels import cuda; cuda.load_cuda_library(); print('flags', cuda.cuda_arch_flags())
else:  # the dry run's v1 ops are the CPU kernels
    from dynadiag.kernels.cpu import load_cpu_library; load_cpu_library()
print(f'dynadiag extension ready in {time.time() - t:.1f} s')"
step ops 40 "${MEASURE[@]}" ops "${V1[@]}" "${FIRST[@]}" --no-csr
cuda_step ops_v2 25 "${MEASURE[@]}" ops --versions v2 --no-baselines --tag _v2 "${FIRST[@]}"
step ops_g32 40 "${MEASURE[@]}" ops "${GROUPED[@]}" --tag _g32 "${FIRST[@]}"
cuda_step tests_cuda 60 "${PYTEST[@]}" tests/test_kernels_cuda.py tests/test_kernels_grouped_triton.py \
  tests/test_kernels_bsr_triton.py -k "not input_validation and not compile_for_gpus_without_one"
step determinism 10 "${MEASURE[@]}" determinism "${V1[@]}"
cuda_step determinism_v2 10 "${MEASURE[@]}" determinism --versions v2 --tag _v2
step ops_rest 40 "${MEASURE[@]}" ops "${V1[@]}" --tag _rest "${REST[@]}"
cuda_step ops_v2_rest 20 "${MEASURE[@]}" ops --versions v2 --no-baselines --tag _v2_rest "${REST[@]}"
step ops_g32_rest 30 "${MEASURE[@]}" ops "${GROUPED[@]}" --tag _g32_rest "${REST[@]}"
step ksweep 20 "${MEASURE[@]}" ksweep "${V1[@]}"
cuda_step ksweep_v2 15 "${MEASURE[@]}" ksweep --versions v2 --tag _v2
step profile 5 "${MEASURE[@]}" profile --versions $([ "$DRY" = 0 ] && echo v1 v2 || echo v1)
cuda_step validation 20 validation
step probe 40 "${MEASURE[@]}" probe
cuda_step model 60 "$PYTHON" scripts/bench_model.py --device cuda --batch 64 --models vit_base_patch16_224 \
  --sparsities 0.9 --dtypes fp32 bf16 --reps 2 --out "$WORK/bench_model.json"
cuda_step ncu 40 run_ncu
timeout "$RESERVE" "${MEASURE[@]}" report >>"$LOG" 2>&1 # always (re)written: WORK/README.md
publish

echo "== $WORK ($((SECONDS - START)) s)${DEST:+; $DEST: results.jsonl, $NAME.tar.gz}"
grep ':run"' "$RES" | tail -25
exit $FAILED
