"""The multi-rank test modules of ``tests/distributed``, reported per module and world size.

A module declares ``WORLD_SIZES = (1, 2, ...)``. For each world size N, every selected module that
lists N runs in one launch:

    python -m torch.distributed.run --standalone --nproc-per-node N -m pytest -q -x -p no:cacheprovider --disable-warnings --tb=short MODULE...

with ``OMP_NUM_THREADS=1`` and the repository on ``PYTHONPATH``. Each rank appends its collected tests
and their results to a report as it goes (``tests/distributed/conftest.py``), and
``test_distributed[MODULE-Nranks]`` passes when every rank ran all of that module's tests and none
failed. One launch per size, not per module: a launch pays ~25 s of
interpreter, torch and megatron-core start-up per rank before its first test (measured on the 2-core
VM), which was a third of the suite when each module had its own. Run one module by hand with
``torchrun --nproc-per-node 2 -m pytest tests/distributed/test_adamh.py``.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import json
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DISTRIBUTED = Path(__file__).resolve().parent / "distributed"
TIMEOUT = 1800  # seconds per launch (all modules of one world size)
REPORT_DIR_VAR = "HYPERBALL_TEST_REPORT_DIR"  # read by tests/distributed/conftest.py


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


def _launch(modules: list[Path], nproc: int, report_dir: Path) -> dict:
    """One torchrun launch of ``modules``; returns its exit code, output and per-rank test cases."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--disable-warnings", "--tb=short",
        *(str(m.relative_to(REPO_ROOT)) for m in modules),
    ]
    env = dict(os.environ)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # torchrun sets its own
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
        **{REPORT_DIR_VAR: str(report_dir)},
    )
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: their own session
        output, _ = proc.communicate()
        returncode = f"timed out after {TIMEOUT}s"
    reports = {}
    for rank in range(nproc):
        path = report_dir / f"rank{rank}.jsonl"
        reports[rank] = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {"cmd": " ".join(cmd[1:]), "returncode": returncode, "output": output, "reports": reports}


@pytest.fixture(scope="session")
def launches(request, tmp_path_factory):
    """``launches(N)``: the one launch of every selected module listing world size N (run on first use)."""
    done: dict[int, dict] = {}

    def get(nproc: int) -> dict:
        if nproc not in done:
            modules = sorted({item.callspec.params["module"] for item in request.session.items
                              if getattr(item, "callspec", None) is not None
                              and item.callspec.params.get("nproc") == nproc and "module" in item.callspec.params})
            done[nproc] = _launch(modules, nproc, tmp_path_factory.mktemp(f"distributed_{nproc}ranks"))
        return done[nproc]

    return get


@pytest.mark.parametrize("module,nproc", LAUNCHES)
def test_distributed(module: Path, nproc: int, launches):
    launch = launches(nproc)
    prefix = f"{module.relative_to(REPO_ROOT).as_posix()}::"
    problems, missing = [], {}
    for rank, records in launch["reports"].items():
        collected = {n for r in records for n in r.get("collected", ()) if n.startswith(prefix)}
        results = [r for r in records if r.get("nodeid", "").startswith(prefix)]
        problems += [f"rank {rank} {r['nodeid']} ({r['when']}):\n{r['longrepr']}" for r in results if r["outcome"] == "failed"]
        unfinished = collected - {r["nodeid"] for r in results}
        if not collected or unfinished:
            missing[rank] = sorted(unfinished) or "nothing collected"
    if problems:
        pytest.fail(f"{module.name} x{nproc} failed:\n" + "\n".join(problems)[-12000:], pytrace=False)
    if missing:
        pytest.fail(f"{module.name} x{nproc}: tests without a result {missing}; `{launch['cmd']}` exited "
                    f"{launch['returncode']}:\n{_tail(launch['output'])}", pytrace=False)
