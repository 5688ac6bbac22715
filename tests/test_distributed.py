"""The multi-rank test modules of ``tests/distributed``, each launched once per world size it lists.

A module declares ``WORLD_SIZES = (1, 2, ...)``; for each size this runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m pytest -q -x -p no:cacheprovider --disable-warnings --tb=short MODULE

with ``OMP_NUM_THREADS=1`` and the repository on ``PYTHONPATH``, and fails with the tail of the
ranks' output unless every rank passes. Run one module by hand the same way (``torchrun
--nproc-per-node 2 -m pytest tests/distributed/test_adamh.py``).
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DISTRIBUTED = Path(__file__).resolve().parent / "distributed"
TIMEOUT = 900  # seconds per launch


def world_sizes(module: Path) -> tuple[int, ...]:
    """The module's ``WORLD_SIZES`` (read without importing it)."""
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WORLD_SIZES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{module.name} declares no WORLD_SIZES")


LAUNCHES = [
    pytest.param(module, n, id=f"{module.stem}-{n}rank{'s' if n > 1 else ''}")
    for module in sorted(DISTRIBUTED.glob("test_*.py"))
    for n in world_sizes(module)
]


def _tail(output: str, lines: int = 120) -> str:
    """The last lines of the ranks' output, with the repetitive warning noise dropped."""
    noise = ("UserWarning", "FutureWarning", "warnings.warn(", "No CUDA runtime is found")
    kept = [line for line in output.splitlines() if not any(n in line for n in noise)]
    return "\n".join(kept[-lines:])


@pytest.mark.parametrize("module,nproc", LAUNCHES)
def test_distributed(module: Path, nproc: int):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--disable-warnings", "--tb=short", str(module.relative_to(REPO_ROOT)),
    ]
    env = dict(os.environ)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # torchrun sets its own
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: their own session
        output, _ = proc.communicate()
        pytest.fail(f"{module.name} x{nproc} timed out after {TIMEOUT}s:\n{_tail(output)}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[1:])} exited {proc.returncode}:\n{_tail(output)}", pytrace=False)
