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
# Every argument is passed to scripts/pretrain_gpt.py. The full command is printed before it runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
  NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  if [[ "$NGPU" -gt 0 ]]; then NPROC="$NGPU"; else NPROC=2; fi
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export OMP_NUM_THREADS=1
fi

# shellcheck disable=SC2206
EXTRA=(${TORCHRUN_ARGS:-})
CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "${EXTRA[@]}"
     "$ROOT/scripts/pretrain_gpt.py" "$@")
echo "+ ${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS }$(printf '%q ' "${CMD[@]}")"
exec "${CMD[@]}"
