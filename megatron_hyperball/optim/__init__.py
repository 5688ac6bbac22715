"""Hypersphere optimizers in pure torch (no Megatron import): one optimizer per file.

``OPTIMIZERS`` maps every accepted name (and alias) to its class.
"""

from megatron_hyperball.optim.adam_h import AdamH
from megatron_hyperball.optim.hyperball import HyperballOptimizer
from megatron_hyperball.optim.muon_h import MuonH
from megatron_hyperball.optim.sphere import RADIUS_MODES, UPDATE_NORM_MODES, SphereLayout

OPTIMIZERS = {
    "adamh": AdamH,
    "adam_hyperball": AdamH,
    "muonh": MuonH,
    "muon_hyperball": MuonH,
}


def canonical_name(name: str) -> str:
    """'adam_hyperball' -> 'adamh' etc.; a clear error for anything else."""
    key = name.strip().lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; hyperball optimizers: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[key].name.lower()


__all__ = [
    "AdamH", "MuonH", "HyperballOptimizer", "SphereLayout", "OPTIMIZERS", "RADIUS_MODES",
    "UPDATE_NORM_MODES", "canonical_name",
]
