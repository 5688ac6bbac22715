"""Shared test helpers: launching multi-rank workers under torchrun, the ``gpu`` marker.

Multi-rank tests run a worker script from ``tests/workers/`` with
:func:`run_torchrun`; the worker takes the path of a JSON result file as its first
argument and rank 0 writes its result there (``tests/workers/common.py`` has the
worker-side helpers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def run_torchrun(
    script: Union[str, Path],
    nproc: int,
    *args: Any,
    timeout: float = 300,
    workdir: Optional[Union[str, Path]] = None,
    env: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Run ``script OUT.json *args`` on ``nproc`` CPU ranks and return rank 0's result.

    Launches ``python -m torch.distributed.run --standalone --nproc-per-node N`` (a free
    rendezvous port is picked by the OS, so concurrent runs do not collide) with
    ``OMP_NUM_THREADS=1`` and the repository on ``PYTHONPATH``. ``script`` is a path or a
    file name in ``tests/workers/``. If the result has a ``tensors`` entry (a path written
    by ``common.write_result``), it is replaced by the loaded tensors. On a non-zero exit,
    a timeout or a missing result, raises ``RuntimeError`` with the tail of the workers'
    output.
    """
    script = Path(script)
    if not script.is_absolute() and not script.exists():
        script = WORKERS / script
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="torchrun_")) if own_dir else Path(workdir)
    out = workdir / f"{script.stem}_result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc-per-node", str(nproc),
        str(script), str(out), *map(str, args),
    ]
    run_env = dict(os.environ)
    run_env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
    )
    run_env.update(env or {})
    try:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: their own session
            output, _ = proc.communicate()
            raise RuntimeError(
                f"{script.name} x{nproc} timed out after {timeout}s:\n{_tail(output)}"
            ) from None
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"{script.name} x{nproc} failed (exit {proc.returncode}):\n{_tail(output)}"
            )
        result = json.loads(out.read_text())
        if "tensors" in result:
            import torch

            result["tensors"] = torch.load(result["tensors"], weights_only=False)
        return result
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _tail(output: str, lines: int = 80) -> str:
    """Last lines of the workers' output, with the repetitive warning noise dropped."""
    noise = ("UserWarning", "FutureWarning", "warnings.warn(", "No CUDA runtime is found")
    kept = [line for line in output.splitlines() if not any(n in line for n in noise)]
    return "\n".join(kept[-lines:])


@pytest.fixture
def torchrun():
    """The :func:`run_torchrun` launcher as a fixture."""
    return run_torchrun


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
