"""The hyperball options on Megatron's ``OptimizerConfig``.

``HyperballOptimizerConfig`` is an ``OptimizerConfig`` with three more fields; a plain
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


@dataclass
class HyperballOptimizerConfig(OptimizerConfig):
    hyperball_radius: str | float = "init"
    """'init' (R = ||W0||), 'sqrt_max_dim' (R = sqrt(max(m, n))) or a positive number."""

    hyperball_update_norm: str = "exact"
    """'exact' (W' = W - lr R N(u)) or 'shape' (W' = W - lr s u, MD's convention)."""

    hyperball_output_layer: bool = False
    """Put the output layer on a sphere (AdamH; HyperP and Marin do)."""


def hyperball_options(config) -> HyperballOptions:
    """The validated hyperball options of any ``OptimizerConfig``."""
    try:
        radius = names.check_radius(getattr(config, "hyperball_radius", "init"))
        update_norm = names.check_update_norm(getattr(config, "hyperball_update_norm", "exact"))
    except ValueError as e:
        raise ValueError(f"OptimizerConfig.hyperball_{e}") from None
    return HyperballOptions(radius, update_norm, bool(getattr(config, "hyperball_output_layer", False)))
