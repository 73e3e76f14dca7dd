#!/usr/bin/env bash
# The pruning study of docs/results/pruning.md: one dense model on digits, then magnitude / Wanda / DSnoT /
# dense-to-diagonal at several sparsities, one-shot and with a short fine-tune, next to DynaDiag from scratch.
#
#   scripts/prune_study.sh OUTDIR [override ...]      e.g. scripts/prune_study.sh outputs/prune_study
#   PY=python3 scripts/prune_study.sh ...             another interpreter (default .venv/bin/python)
#   EPOCHS=15 (dense and DynaDiag training), FT_EPOCHS=1 (fine-tune), SPARSITIES=0.5,0.8,0.9,0.95,
#   DYNADIAG_SPARSITIES (default: SPARSITIES; empty: none)
#
# The overrides go to every command. Runs are sequential (the development machines have 2 cores).
# Then: python scripts/prune_table.py OUTDIR
set -euo pipefail
OUTDIR=${1:?usage: scripts/prune_study.sh OUTDIR [override ...]}
shift
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-15}
FT=${FT_EPOCHS:-1}
S=${SPARSITIES:-0.5,0.8,0.9,0.95}
DS=${DYNADIAG_SPARSITIES-$S}
mkdir -p "$OUTDIR"
common=(logger=local "$@")
set -x
if [ ! -f "$OUTDIR/dense/summary.json" ]; then
  $PY train.py sparsifier=dense trainer.epochs="$EPOCHS" "${common[@]}" hydra.run.dir="$OUTDIR/dense" >"$OUTDIR/dense.log" 2>&1
fi
$PY prune.py -m ckpt="$OUTDIR/dense" method=magnitude,wanda,dsnot,diag sparsity="$S" finetune.epochs=0,"$FT" \
  "${common[@]}" hydra.sweep.dir="$OUTDIR/prune" >"$OUTDIR/prune.log" 2>&1
if [ -n "$DS" ]; then
  $PY train.py -m sparsifier=dynadiag sparsity="$DS" trainer.epochs="$EPOCHS" "${common[@]}" hydra.sweep.dir="$OUTDIR/dynadiag" \
    >"$OUTDIR/dynadiag.log" 2>&1
fi
