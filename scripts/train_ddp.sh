#!/usr/bin/env bash
# Multi-process (DistributedDataParallel) training on one machine with torchrun.
#
#   scripts/train_ddp.sh 4 model=vit_b data=imagenet sparsity=0.9      # 4 processes (GPUs, or CPU ranks)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 scripts/train_ddp.sh 8 ...   # per node, for several nodes
#
# Every rank must write to the same run directory (rank 0 alone writes files, the others read last.pt
# when resuming), but each process would otherwise compute its own ${now:...} Hydra directory. So the
# directory is fixed once here and passed to all ranks as hydra.run.dir; set RUN_DIR to choose it, and
# re-run the same command with the same RUN_DIR to resume after a crash (resume=auto is the default).
# data.batch_size is the global batch and must be divisible by the number of processes.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC_PER_NODE [hydra overrides...]" >&2
  exit 2
fi
NPROC=$1
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python
RUN_DIR="${RUN_DIR:-outputs/ddp/$(date +%Y-%m-%d_%H-%M-%S)}"
# Each rank gets an equal share of the cores unless the caller says otherwise (torchrun would set 1).
THREADS=$(( $(nproc) / NPROC ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}"

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  "$ROOT/train.py" "hydra.run.dir=$RUN_DIR" "$@"
