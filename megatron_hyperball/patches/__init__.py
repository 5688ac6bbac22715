"""Every runtime change this plugin makes to megatron-core, in one registry.

Each entry names its target, the megatron-core versions it was written for, why it exists, and
how to install it. ``apply(group)`` installs the entries of a group once per process, after one
version check: an entry written for other versions is skipped with a warning, so a newer
Megatron is never patched blindly. Groups:

- ``core``: on ``import megatron_hyperball`` (GPU and CPU alike): the optimizer registration and
  fixes of megatron-core bugs that hit real runs.
- ``training``: before ``megatron.training`` parses arguments (the entry, or the drop-in launcher).
- ``cpu``: the CPU training layer, with ``megatron_hyperball.compat.enable_cpu()``.

``applied()`` lists what is installed in this process:

    python -c "import megatron_hyperball; from megatron_hyperball import patches; print(patches.applied())"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

_log = logging.getLogger(__name__)
MARKER = "__megatron_hyperball_patch__"


@dataclass(frozen=True)
class Patch:
    name: str
    target: str                       # what it changes, as a dotted path
    versions: tuple[str, ...]         # megatron-core version prefixes it was written for
    why: str
    install: Callable[[], None]
    group: str = "core"
    needed: Callable[[], bool] = lambda: True   # e.g. only when Megatron runs torch's AdamW


REGISTRY: list[Patch] = []
_applied: dict[str, Patch] = {}
_skipped: dict[str, str] = {}


def register(patch: Patch) -> Patch:
    REGISTRY.append(patch)
    return patch


def replace(owner, attr: str, new: Callable) -> Callable:
    """Set ``owner.attr = new`` (marked as this plugin's) and return the original."""
    original = getattr(owner, attr)
    setattr(new, MARKER, True)
    setattr(owner, attr, new)
    return original


def megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def apply(group: str = "core") -> list[str]:
    """Install every not-yet-installed entry of ``group`` that fits this megatron-core."""
    from megatron_hyperball.patches import checkpoint, cpu_training, moe, optimizer, training  # noqa: F401

    version = megatron_version()
    for patch in REGISTRY:
        if patch.group != group or patch.name in _applied or patch.name in _skipped:
            continue
        if not version.startswith(patch.versions):
            _skipped[patch.name] = f"written for megatron-core {'/'.join(patch.versions)}x, found {version}"
            _log.warning("megatron-hyperball: patch %s skipped (%s)", patch.name, _skipped[patch.name])
            continue
        if not patch.needed():
            continue
        patch.install()
        _applied[patch.name] = patch
        _log.info("megatron-hyperball: patched %s (%s)", patch.target, patch.name)
    return applied()


def apply_training(cpu: bool = False) -> list[str]:
    """The ``training`` group, plus ``cpu`` (after ``compat.enable_cpu()``) on a machine without CUDA."""
    apply("core")
    apply("training")
    if cpu:
        from megatron_hyperball import compat

        if not compat.is_enabled():
            raise RuntimeError("patches.apply_training(cpu=True): call megatron_hyperball.compat.enable_cpu() first")
        apply("cpu")
    return applied()


def applied() -> list[str]:
    """'name: target' of every installed entry, in installation order."""
    return [f"{p.name}: {p.target}" for p in _applied.values()]
