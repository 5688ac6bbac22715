#!/usr/bin/env bash
# Launch scripts/pretrain_gpt.py on one machine with torchrun --standalone.
#
#   scripts/launch_single_node.sh --config configs/gpt_125m_muonh.yaml [KEY=VALUE ...] [Megatron flags ...]
#
# Environment variables:
#   NPROC            processes on this machine (default: the number of visible GPUs; 2 without GPUs)
#   PYTHON           Python interpreter (default: .venv/bin/python of this checkout, else python3)
#   OMP_NUM_THREADS  CPU threads per process (default: 1 without GPUs, else left to torchrun)
#   TORCHRUN_ARGS    extra torchrun arguments, e.g. "--max-restarts 0" (default: none)
#
# Every argument is passed to scripts/pretrain_gpt.py (--config takes a file or a shipped config's
# name, e.g. gpt_125m_muonh: scripts/megatron-hyperball configs lists them). The full command is
# printed before it runs.
# The config is checked first (pretrain_gpt.py --check-only, well under a second, no torch import):
# a config error exits with status 2 before torchrun starts (under torchrun a failed child makes
# torchrun itself exit 1).
set -euo pipefail

# shellcheck source=scripts/_launch_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch_env.sh"
WORLD_SIZE="$NPROC" "$PYTHON" "$ROOT/scripts/pretrain_gpt.py" --check-only "$@"
CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "${EXTRA[@]}"
     "$ROOT/scripts/pretrain_gpt.py" "$@")
echo "+ ${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS }$(printf '%q ' "${CMD[@]}")"
exec "${CMD[@]}"
