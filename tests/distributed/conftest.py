"""Fixtures for the multi-rank test modules in this folder (gloo, CPU, under torchrun).

The modules here are ordinary pytest modules run by every rank of

    torchrun --nproc-per-node N -m pytest tests/distributed/test_X.py

(``tests/test_distributed.py`` launches every module listing a world size in its ``WORLD_SIZES``
together, once per size, and reads the per-rank reports written here). Collected without torchrun (no ``WORLD_SIZE`` in the environment), they are
ignored. A test marked ``@pytest.mark.world_size(2)`` (or ``(2, 4)``) is skipped in a launch of
another size. The process group (gloo) and the CPU layer are set up once per launch; the
``parallel`` fixture sets up Megatron's model-parallel state for one test and destroys it after.
"""

from __future__ import annotations

import datetime
import json
import os

import pytest

UNDER_TORCHRUN = "WORLD_SIZE" in os.environ and "RANK" in os.environ
HERE = os.path.dirname(os.path.abspath(__file__))

# set by tests/test_distributed.py: each rank appends a line per collected test and per test result
REPORT_DIR = os.environ.get("HYPERBALL_TEST_REPORT_DIR")

if not UNDER_TORCHRUN:
    collect_ignore_glob = ["test_*.py"]


def _report(record: dict) -> None:
    """Append ``record`` to this rank's report, flushed at once: a rank killed mid-launch keeps its lines."""
    if UNDER_TORCHRUN and REPORT_DIR:
        with open(os.path.join(REPORT_DIR, f"rank{os.environ['RANK']}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_finish(session):
    _report({"collected": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report):
    if report.when == "call" or not report.passed:  # a test's result; setup/teardown only when not passed
        _report({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                 "longrepr": str(report.longrepr)[-6000:] if report.failed else ""})


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "world_size(*sizes): run only in a torchrun launch with one of these world sizes"
    )


def pytest_collection_modifyitems(config, items):
    here = [item for item in items if str(item.path).startswith(os.path.join(HERE, ""))]
    if not UNDER_TORCHRUN:  # a module named on the command line is collected anyway
        for item in here:
            item.add_marker(pytest.mark.skip(
                reason="a multi-rank test: run it with torchrun --nproc-per-node N -m pytest (or tests/test_distributed.py)"))
        return
    world = int(os.environ["WORLD_SIZE"])
    for item in here:
        marker = item.get_closest_marker("world_size")
        if marker is not None and world not in marker.args:
            item.add_marker(pytest.mark.skip(
                reason=f"needs world size {' or '.join(map(str, marker.args))}, this launch has {world}"))


@pytest.fixture(scope="session", autouse=True)
def distributed():
    """gloo process group from torchrun's environment and the CPU layer, for the whole launch."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # a rank that failed alone leaves the others in a collective: do not wait 30 minutes
    dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=300))
    from megatron_hyperball.compat import enable_cpu

    enable_cpu()
    import megatron_hyperball  # noqa: F401  (registers adamh / muonh with Megatron's factory)

    yield
    from megatron_hyperball.mcore.builders import destroy_parallel

    destroy_parallel()
    dist.destroy_process_group()


@pytest.fixture
def parallel(distributed):
    """``parallel(tp=1, pp=1, ep=1, seed=1234)``: (re)initialise Megatron's parallel state and
    seed; destroyed when the test ends. Call it again in one test to switch layouts."""
    from megatron_hyperball.mcore.builders import destroy_parallel, init_parallel

    def init(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234, **kwargs):
        init_parallel(tp=tp, pp=pp, ep=ep, seed=seed, **kwargs)

    yield init
    destroy_parallel()


@pytest.fixture
def shared_tmp_path(tmp_path):
    """One temporary folder for all ranks (rank 0's ``tmp_path``)."""
    import torch.distributed as dist
    from pathlib import Path

    box = [str(tmp_path)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])
