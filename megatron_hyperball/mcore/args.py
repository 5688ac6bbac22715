"""The plugin's command-line flags, on Megatron's own parser, and the optimizer config built from them.

``add_plugin_args`` is an ``extra_args_provider`` (Megatron's extension point of
``parse_and_validate_args``): it adds the ``--hyperball-*`` flags and lets ``--optimizer`` take
the hyperball names. ``optimizer_config_from_args`` is what ``megatron.training`` needs instead of
its ``get_megatron_optimizer_config(args)``: the ``HyperballOptimizerConfig`` with every
``OptimizerConfig`` field read from ``args`` plus the hyperball options, and the config overrides
with the per-group learning rates.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from megatron_hyperball import names
from megatron_hyperball.mcore.roles import role_of

__all__ = ["add_plugin_args", "optimizer_config_from_args", "param_group_overrides", "PER_GROUP_LR_KEYS"]

PER_GROUP_LR_KEYS = ("embedding_lr", "output_lr", "scalar_lr")


def _radius(text: str):
    try:
        return names.check_radius(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a positive number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a positive finite number")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: 0 (off) or a positive integer") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: 0 (off) or a positive integer")
    return value


def add_plugin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's flags to Megatron's parser and the hyperball names to ``--optimizer``."""
    for action in parser._actions:  # argparse keeps choices on the action; extend, never replace
        if "--optimizer" in action.option_strings and action.choices is not None:
            extra = [n for n in (*names.HYPERBALL_OPTIMIZERS, "adam_hyperball", "muon_hyperball")
                     if n not in action.choices]
            action.choices = [*action.choices, *extra]
    group = parser.add_argument_group("megatron-hyperball")
    group.add_argument("--hyperball-radius", type=_radius, default="init",
                       help=f"sphere radius; allowed: {', '.join(names.RADIUS_MODES)}")
    group.add_argument("--hyperball-update-norm", choices=names.UPDATE_NORM_MODES, default="exact",
                       help="exact: W - lr R u/||u||; shape: W - lr s u (MD's convention)")
    group.add_argument("--hyperball-output-layer", action="store_true",
                       help="adamh: put the (untied) output layer on a sphere too")
    for key in PER_GROUP_LR_KEYS:
        group.add_argument(f"--hyperball-{key.replace('_', '-')}", type=_positive_float, default=None,
                           help=f"peak lr of the {key.split('_')[0]} parameters (decays like the main lr)")
    group.add_argument("--hyperball-metrics-interval", type=_non_negative_int, default=0,
                       help="log per-matrix-type weight norms / relative updates every N steps (0: off)")
    return parser


def param_group_overrides(args: Any) -> dict:
    """Megatron ``config_overrides`` for the per-group lrs: ``{ParamKey: {max_lr, min_lr}}``, the
    group decaying to the same fraction min_lr / lr as the main lr."""
    from megatron.core.optimizer import ParamKey, ParamWithNamePredicate

    out = {}
    frac = (args.min_lr / args.lr) if args.lr else 0.0
    for key in PER_GROUP_LR_KEYS:
        lr = getattr(args, f"hyperball_{key}", None)
        if lr is None:
            continue
        pred = ParamWithNamePredicate(name=f"hyperball_{key}",
                                      fn=lambda p, n, key=key: role_of(n, p).lr_key == key)
        out[ParamKey(with_name_predicate=pred)] = {"max_lr": float(lr), "min_lr": float(lr) * frac}
    return out


def optimizer_config_from_args(args: Any):
    """(HyperballOptimizerConfig, config_overrides) from Megatron's parsed ``args``."""
    from megatron.core.optimizer import get_standard_config_overrides

    from megatron_hyperball.mcore.options import HyperballOptimizerConfig

    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(HyperballOptimizerConfig)
              if hasattr(args, f.name)}
    config = HyperballOptimizerConfig(**kwargs)
    overrides = dict(get_standard_config_overrides(config=config))
    overrides.update(param_group_overrides(args))
    return config, overrides
