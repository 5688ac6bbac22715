#!/usr/bin/env bash
# Launch scripts/pretrain_gpt.py on several machines with torchrun's static rendezvous.
# Run this script once on every node, with the same arguments and environment except NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch_multi_node.sh --config configs/gpt_1.3b_muonh.yaml
#
# Environment variables:
#   NNODES           number of nodes (required)
#   NODE_RANK        this node's rank, 0 .. NNODES-1 (required)
#   MASTER_ADDR      host name or address of node 0, reachable from every node (required)
#   MASTER_PORT      a free TCP port on node 0 (default: 29500)
#   NPROC            processes per node (default: the number of visible GPUs; 2 without GPUs)
#   PYTHON           Python interpreter (default: .venv/bin/python of this checkout, else python3)
#   OMP_NUM_THREADS  CPU threads per process (default: 1 without GPUs, else left to torchrun)
#   TORCHRUN_ARGS    extra torchrun arguments (default: none)
#
# Every argument is passed to scripts/pretrain_gpt.py (--config takes a file or a shipped config's
# name, e.g. gpt_125m_muonh: scripts/megatron-hyperball configs lists them). The full command is
# printed before it runs.
# Paths in the config (checkpoint.save, data) must be valid on every node; the checkpoint
# directory must be on a file system all nodes share.
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node: 0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"

# shellcheck source=scripts/_launch_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch_env.sh"
# the config first (no torch import): a config error exits with status 2 before torchrun starts
WORLD_SIZE="$((NNODES * NPROC))" "$PYTHON" "$ROOT/scripts/pretrain_gpt.py" --check-only "$@"
CMD=("$PYTHON" -m torch.distributed.run
     --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "${EXTRA[@]}"
     "$ROOT/scripts/pretrain_gpt.py" "$@")
echo "+ ${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS }$(printf '%q ' "${CMD[@]}")"
exec "${CMD[@]}"
