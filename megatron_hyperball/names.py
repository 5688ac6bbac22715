"""The allowed values every layer shares: optimizer names, sphere radius and update-norm modes,
Depth-muP block-output scales. Pure Python (no torch, no Megatron), so config/, optim/, models/ and
the Megatron adapter all read the same table and print the same "allowed: ..." lists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptimizerName:
    """One optimizer a run can name."""

    name: str
    megatron: str   # the --optimizer value Megatron's argparse accepts (and its distributed-optimizer routing)
    sphere: bool    # hyperball family: weight matrices live on spheres
    muon: bool      # orthogonalized (whole matrices: Megatron's layer-wise optimizer)
    md: bool = False  # magnitude-direction: learned gains around the sphere direction (seed 004)


OPTIMIZERS = {
    o.name: o
    for o in (
        OptimizerName("adamw", "adam", sphere=False, muon=False),
        OptimizerName("muon", "muon", sphere=False, muon=True),
        OptimizerName("adamh", "adam", sphere=True, muon=False),
        OptimizerName("muonh", "muon", sphere=True, muon=True),
        OptimizerName("adammd", "adam", sphere=True, muon=False, md=True),
        OptimizerName("muonmd", "muon", sphere=True, muon=True, md=True),
    )
}
OPTIMIZER_ALIASES = {"adam": "adamw", "adam_hyperball": "adamh", "muon_hyperball": "muonh"}
MD_OPTIMIZERS = tuple(n for n, o in OPTIMIZERS.items() if o.md)
HYPERBALL_OPTIMIZERS = tuple(n for n, o in OPTIMIZERS.items() if o.sphere)


def allowed_optimizers() -> str:
    return ", ".join([*OPTIMIZERS, *(f"{a} (= {c})" for a, c in OPTIMIZER_ALIASES.items())])


def canonical_optimizer(name: Any) -> str:
    """'adam' -> 'adamw', 'Adam_Hyperball' -> 'adamh', ...; ValueError naming the allowed names."""
    if not isinstance(name, str):
        raise ValueError(f"optimizer name must be a string, got {name!r}; allowed: {allowed_optimizers()}")
    key = name.strip().lower()
    key = OPTIMIZER_ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {allowed_optimizers()}")
    return key


def hyperball_name(name: str) -> str | None:
    """'adamh' / 'muonh' for a hyperball optimizer name or alias (any case), else None."""
    key = name.strip().lower() if isinstance(name, str) else ""
    key = OPTIMIZER_ALIASES.get(key, key)
    return key if key in HYPERBALL_OPTIMIZERS else None


# -- magnitude-direction gains (AdamMD / MuonMD) ----------------------------------------------------
GAIN_MODES = ("row_col", "row", "col", "scalar", "none")
GAIN_PARAMETRIZATIONS = ("softplus", "direct")
DEFAULT_GAIN_LR = 1e-3  # seed 004: Adam groups at fixed lrs, 1e-3 for the gains


def check_gain_options(gains: Any, gain_parametrization: Any, gain_lr: Any, where: str = "MagnitudeDirection") -> None:
    """ValueError naming the option and the allowed values."""
    if gains not in GAIN_MODES:
        raise ValueError(f"{where}: gains={gains!r}; allowed: {', '.join(GAIN_MODES)}")
    if gain_parametrization not in GAIN_PARAMETRIZATIONS:
        raise ValueError(f"{where}: gain_parametrization={gain_parametrization!r}; "
                         f"allowed: {', '.join(GAIN_PARAMETRIZATIONS)}")
    if (isinstance(gain_lr, bool) or not isinstance(gain_lr, (int, float))
            or not (math.isfinite(gain_lr) and gain_lr > 0)):
        raise ValueError(f"{where}: gain_lr={gain_lr!r}; allowed: a positive finite number (e.g. 1e-3)")


# -- sphere options ---------------------------------------------------------------------------------
RADIUS_MODES = ("init", "sqrt_max_dim", "<positive number>")
UPDATE_NORM_MODES = ("exact", "shape")


def check_radius(radius: Any) -> str | float:
    """'init', 'sqrt_max_dim' or a positive finite number (numeric strings too)."""
    allowed = ", ".join(RADIUS_MODES)
    if isinstance(radius, str):
        if radius in ("init", "sqrt_max_dim"):
            return radius
        try:
            radius = float(radius)
        except ValueError:
            raise ValueError(f"radius={radius!r} is not a radius mode; allowed: {allowed}") from None
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        raise ValueError(f"radius={radius!r} is not a radius mode; allowed: {allowed}")
    if not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius={radius!r} must be a positive finite number; allowed: {allowed}")
    return float(radius)


def check_update_norm(update_norm: Any) -> str:
    if update_norm not in UPDATE_NORM_MODES:
        raise ValueError(f"update_norm={update_norm!r} is not an update-norm mode; "
                         f"allowed: {', '.join(UPDATE_NORM_MODES)}")
    return update_norm


# -- Depth-muP --------------------------------------------------------------------------------------
BLOCK_OUTPUT_SCALES = ("1/sqrt(2L)", "1/L", "<positive number>", "none")
_OFF = {"none", "off", "false"}
_LAWS = {"1/sqrt(2l)": "1/sqrt(2L)", "1/l": "1/L"}


def parse_block_output_scale(value: Any) -> str | float | None:
    """'1/sqrt(2L)', '1/L', a positive float, or None (off), without knowing the depth.

    Accepts None / False / 'none' / 'off', the two laws in any case and spacing, numbers and
    numeric strings."""
    allowed = ", ".join(BLOCK_OUTPUT_SCALES)
    if value is None or value is False:
        return None
    if isinstance(value, bool):  # True: ambiguous
        raise ValueError(f"block_output_scale={value!r} is not a scale; allowed: {allowed}")
    if isinstance(value, str):
        key = re.sub(r"\s+", "", value).lower()
        if key in _OFF:
            return None
        if key in _LAWS:
            return _LAWS[key]
        try:
            value = float(key)
        except ValueError:
            raise ValueError(f"block_output_scale={value!r} is not a scale; allowed: {allowed}") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"block_output_scale={value!r} is not a scale; allowed: {allowed}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"block_output_scale={value!r} must be a positive finite number; allowed: {allowed}")
    return value


def resolve_block_output_scale(value: Any, num_layers: int | None) -> float | None:
    """alpha for ``value`` at depth L = ``num_layers`` (None: off). The laws need L >= 1."""
    parsed = parse_block_output_scale(value)
    if parsed is None or isinstance(parsed, float):
        return parsed
    if num_layers is None or isinstance(num_layers, bool) or int(num_layers) != num_layers or num_layers < 1:
        raise ValueError(f"block_output_scale={parsed!r} needs num_layers >= 1 (got {num_layers!r}); "
                         f"use a number or 'none' otherwise")
    L = int(num_layers)
    return 1.0 / math.sqrt(2 * L) if parsed == "1/sqrt(2L)" else 1.0 / L


# -- MoE ---------------------------------------------------------------------------------------------
ROUTER_SPHERE_MODES = ("frobenius", "row", "none")
"""frobenius: the router is one sphere matrix (HyperP); row: each expert's routing vector on its own
sphere (seed 004's MD recipe); none: the router takes Adam."""

AUX_LOSS_TYPES = ("global_aux_loss", "aux_loss", "seq_aux_loss")
"""Megatron's load-balancing losses (``--moe-router-load-balancing-type``): global_aux_loss is
HyperP's (switch loss on the full softmax, token counts over every data-parallel rank); aux_loss
counts one micro-batch, seq_aux_loss one sequence."""

DEFAULT_AUX_LOSS_COEFF_SPHERE = 0.1   # HyperP's MoE runs (sphere optimizers tolerate larger weights)
DEFAULT_AUX_LOSS_COEFF = 0.01         # Megatron's suggested start (--moe-aux-loss-coeff help)


def resolve_router_sphere(mode: str | None, sphere_optimizer: bool) -> str:
    """The router mode a run uses: the configured one, else frobenius with a sphere optimizer
    (HyperP) and none otherwise."""
    if mode is None:
        return "frobenius" if sphere_optimizer else "none"
    if mode not in ROUTER_SPHERE_MODES:
        raise ValueError(f"router_sphere={mode!r} is not a router mode; allowed: {', '.join(ROUTER_SPHERE_MODES)}")
    return mode
