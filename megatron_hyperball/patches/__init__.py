"""Runtime fixes to megatron-core bugs that hit real runs, each version-guarded and documented.

``apply()`` runs once on ``import megatron_hyperball`` (GPU and CPU alike). A fix applies only to
the megatron-core versions it was written for; on any other version it is skipped and says so,
so a newer Megatron is never patched blindly.
"""

from __future__ import annotations

import functools
import logging

import torch

_log = logging.getLogger(__name__)
_applied: list[str] = []


def _megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def _fix_dp_reshardable_load_no_grad() -> str | None:
    """megatron-core 0.19: ``DistributedOptimizer.load_parameter_state_from_dp_reshardable``
    lacks the ``@torch.no_grad()`` its siblings have. With fp32 params the main-param shards are
    views of the model params (which require grad), so loading a ``dp_reshardable`` checkpoint
    (megatron.training's default for torch_dist) fails with "a view of a leaf Variable that
    requires grad is being used in an in-place operation". The fix runs it under no_grad."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    fn = DistributedOptimizer.load_parameter_state_from_dp_reshardable
    if getattr(fn, "__megatron_hyperball_patch__", False):
        return None
    patched = functools.wraps(fn)(torch.no_grad()(fn))
    patched.__megatron_hyperball_patch__ = True
    DistributedOptimizer.load_parameter_state_from_dp_reshardable = patched
    return "DistributedOptimizer.load_parameter_state_from_dp_reshardable runs under no_grad"


FIXES = {  # fix -> megatron-core version prefixes it is written for
    _fix_dp_reshardable_load_no_grad: ("0.19.",),
}


def apply() -> list[str]:
    """Apply every fix that matches the installed megatron-core; returns what was applied."""
    ver = _megatron_version()
    for fix, versions in FIXES.items():
        if not ver.startswith(versions):
            _log.warning("megatron-hyperball: skipping %s (written for megatron-core %s, found %s)",
                         fix.__name__, versions, ver)
            continue
        done = fix()
        if done:
            _applied.append(done)
    return list(_applied)
