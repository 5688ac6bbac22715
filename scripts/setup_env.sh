#!/usr/bin/env bash
# Sets up a fresh machine: a Python 3.12 venv in .venv with the package and its test extras.
# Usage: bash scripts/setup_env.sh        (PYTHON=/path/to/python3.12 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.12 "env PYENV_VERSION=3.12.1 python3" python3; do
    if $cand -c 'import sys; assert sys.version_info[:2] >= (3, 12)' 2>/dev/null; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup_env.sh: need Python >= 3.12 (megatron-core 0.19 requires it); set PYTHON=" >&2; exit 1; }
echo "+ $PY -m venv .venv"
$PY -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
echo "+ .venv/bin/pip install -e .[test]"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import megatron_hyperball, megatron.core; from megatron_hyperball.compat import backends; print('ok:', megatron.core.__version__, backends())"
