"""The hyperball options on Megatron's ``OptimizerConfig``.

``HyperballOptimizerConfig`` is an ``OptimizerConfig`` with the hyperball fields (and the
magnitude-direction gain fields of AdamMD / MuonMD); a plain
``OptimizerConfig`` gets their defaults. Megatron passes the one config object everywhere, so the
options travel with it through ``get_megatron_optimizer`` and ``megatron.training``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.optimizer import OptimizerConfig

from megatron_hyperball import names


@dataclass
class HyperballOptions:
    radius: str | float = "init"
    update_norm: str = "exact"
    output_layer: bool = False  # put the output layer (LM head) on a sphere too (AdamH only)
    gains: str = names.GAIN_MODES[0]
    gain_parametrization: str = names.GAIN_PARAMETRIZATIONS[0]
    gain_lr: float = names.DEFAULT_GAIN_LR
    allow_missing_gains: bool = False
    split_qkv: bool = False  # Q, K, V of the fused linear_qkv each on its own sphere (AdamH / MuonH)


@dataclass
class HyperballOptimizerConfig(OptimizerConfig):
    hyperball_radius: str | float = "init"
    """'init' (R = ||W0||), 'sqrt_max_dim' (R = sqrt(max(m, n))) or a positive number."""

    hyperball_update_norm: str = "exact"
    """'exact' (W' = W - lr R N(u)) or 'shape' (W' = W - lr s u, MD's convention)."""

    hyperball_output_layer: bool = False
    """Put the output layer on a sphere (AdamH; HyperP and Marin do)."""

    hyperball_split_qkv: bool = False
    """Q, K and V of Megatron's fused linear_qkv each on its own sphere (HyperP's separate matrices;
    AdamH / MuonH, MuonH with Megatron's muon_split_qkv Newton-Schulz)."""

    md_gains: str = names.GAIN_MODES[0]
    """AdamMD / MuonMD: which gains W = diag(g_row) V diag(g_col) learns: row_col, row, col, scalar, none."""

    md_gain_parametrization: str = names.GAIN_PARAMETRIZATIONS[0]
    """'softplus' (g = softplus(raw), raw initialised so g = 1) or 'direct' (g = raw)."""

    md_gain_lr: float = names.DEFAULT_GAIN_LR
    """Peak lr of the gains' Adam; follows the run's schedule shape (seed 004: 1e-3)."""

    md_allow_missing_gains: bool = False
    """Load a checkpoint that has no gains (e.g. AdamH's / MuonH's): gains start at 1 (W = V), with a
    warning. Without it such a load is refused, naming this option."""


def hyperball_options(config) -> HyperballOptions:
    """The validated hyperball options of any ``OptimizerConfig``."""
    try:
        radius = names.check_radius(getattr(config, "hyperball_radius", "init"))
        update_norm = names.check_update_norm(getattr(config, "hyperball_update_norm", "exact"))
    except ValueError as e:
        raise ValueError(f"OptimizerConfig.hyperball_{e}") from None
    gains = getattr(config, "md_gains", names.GAIN_MODES[0])
    parametrization = getattr(config, "md_gain_parametrization", names.GAIN_PARAMETRIZATIONS[0])
    gain_lr = getattr(config, "md_gain_lr", names.DEFAULT_GAIN_LR)
    names.check_gain_options(gains, parametrization, gain_lr, where="OptimizerConfig.md_*")
    allow_missing = getattr(config, "md_allow_missing_gains", False)
    if not isinstance(allow_missing, bool):
        raise ValueError(f"OptimizerConfig.md_allow_missing_gains={allow_missing!r}; allowed: True, False")
    split_qkv = getattr(config, "hyperball_split_qkv", False)
    if not isinstance(split_qkv, bool):
        raise ValueError(f"OptimizerConfig.hyperball_split_qkv={split_qkv!r}; allowed: True, False")
    return HyperballOptions(radius, update_norm, bool(getattr(config, "hyperball_output_layer", False)),
                            gains, parametrization, float(gain_lr), allow_missing, split_qkv)
