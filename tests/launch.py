"""Run a worker script under torchrun (gloo, CPU) and read the JSON its rank 0 wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKERS = Path(__file__).resolve().parent / "workers"


def torchrun(script: str, nproc: int, out: Path, *args: str, timeout: int = 600) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKERS / script), str(out), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise RuntimeError(f"{' '.join(cmd[2:])} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(Path(out).read_text())
    if "tensors" in result:
        result["tensors"] = torch.load(result["tensors"])
    return result
