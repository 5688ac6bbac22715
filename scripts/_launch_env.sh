# Sourced by the launchers: picks PYTHON, NPROC and OMP_NUM_THREADS the same way for each.
#   PYTHON: the repo's .venv if present, else python3;  NPROC: GPUs on this node, 2 without;
#   OMP_NUM_THREADS: 1 on a machine without CUDA (ranks share the cores).
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
