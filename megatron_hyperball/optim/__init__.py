"""The hyperball optimizers in pure torch (no Megatron import): a base update per param group,
then batched weight-update hooks, the sphere step innermost.

    sphere.py         the sphere step's math and the shard-to-sphere SphereIndex
    hooks.py          SphereHook (the extension contract), SphereRetraction (the sphere step)
    hyperball.py      HyperballOptimizer: base update -> hooks, one reduction per step
    adam_h.py         AdamH = Adam + sphere step;  muon_h.py  MuonH = Muon + sphere step
    gains.py          MagnitudeDirectionHook: W = diag(g_row) V diag(g_col), V on the sphere
    adam_md.py        AdamMD = AdamH + gains;      muon_md.py MuonMD = MuonH + gains

``OPTIMIZERS`` maps each name to its class (aliases resolve through ``megatron_hyperball.names``).
"""

from megatron_hyperball.names import OPTIMIZER_ALIASES, hyperball_name
from megatron_hyperball.optim.adam_h import AdamH
from megatron_hyperball.optim.adam_md import AdamMD
from megatron_hyperball.optim.gains import GAIN_MODES, GAIN_PARAMETRIZATIONS, MagnitudeDirectionHook
from megatron_hyperball.optim.hooks import SphereBatch, SphereHook, SphereRetraction
from megatron_hyperball.optim.hyperball import HyperballOptimizer
from megatron_hyperball.optim.muon_h import MuonH
from megatron_hyperball.optim.muon_md import MuonMD
from megatron_hyperball.optim.sphere import RADIUS_MODES, UPDATE_NORM_MODES, SphereIndex

OPTIMIZERS = {"adamh": AdamH, "muonh": MuonH, "adammd": AdamMD, "muonmd": MuonMD}  # aliases: names.OPTIMIZER_ALIASES


def canonical_name(name: str) -> str:
    """'adam_hyperball' -> 'adamh' etc. (``names.hyperball_name``); a clear error for anything else."""
    key = hyperball_name(name)
    if key is None:
        allowed = sorted([*OPTIMIZERS, *(a for a, c in OPTIMIZER_ALIASES.items() if c in OPTIMIZERS)])
        raise ValueError(f"unknown optimizer {name!r}; hyperball optimizers: {', '.join(allowed)}")
    return key


__all__ = [
    "AdamH", "MuonH", "HyperballOptimizer", "SphereIndex", "SphereHook", "SphereBatch",
    "SphereRetraction", "OPTIMIZERS", "RADIUS_MODES", "UPDATE_NORM_MODES", "canonical_name",
    "AdamMD", "MuonMD", "MagnitudeDirectionHook", "GAIN_MODES", "GAIN_PARAMETRIZATIONS",
]
