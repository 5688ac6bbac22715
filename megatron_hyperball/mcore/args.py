"""The plugin's command-line flags, on Megatron's own parser, and the optimizer config built from them.

``add_plugin_args`` is an ``extra_args_provider`` (Megatron's extension point of
``parse_and_validate_args``): it adds the ``--hyperball-*`` and ``--md-*`` flags and lets
``--optimizer`` take the hyperball and magnitude-direction names. ``optimizer_config_from_args`` is what ``megatron.training`` needs instead of
its ``get_megatron_optimizer_config(args)``: the ``HyperballOptimizerConfig`` with every
``OptimizerConfig`` field read from ``args`` plus the hyperball options, and the config overrides
with the per-group learning rates.

``add_launcher_args`` is what the drop-in launcher (``python -m megatron_hyperball.run``) chains
after a script's own ``extra_args_provider``: the plugin's flags (unless the script added them),
Depth-muP's ``--block-output-scale`` and ``--hyperball-router-sphere`` (the YAML entry takes both
from its config instead), and a
"did you mean" hint when an unrecognized flag is close to a known one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from typing import Any

from megatron_hyperball import names
from megatron_hyperball.mcore.roles import role_of

__all__ = ["add_plugin_args", "add_block_output_scale_arg", "add_launcher_args", "has_flag",
           "add_router_sphere_arg", "ROUTER_SPHERE_FLAG",
           "optimizer_config_from_args", "md_options_from_args", "MD_FLAGS", "param_group_overrides", "PER_GROUP_LR_KEYS", "BLOCK_OUTPUT_SCALE_FLAG"]

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


def _block_output_scale(text: str):
    try:
        return names.parse_block_output_scale(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    group.add_argument("--hyperball-split-qkv", action="store_true",
                       help="adamh / muonh: Q, K and V of the fused linear_qkv each on its own sphere")
    for key in PER_GROUP_LR_KEYS:
        group.add_argument(f"--hyperball-{key.replace('_', '-')}", type=_positive_float, default=None,
                           help=f"peak lr of the {key.split('_')[0]} parameters (decays like the main lr)")
    group.add_argument("--hyperball-metrics-interval", type=_non_negative_int, default=0,
                       help="log per-matrix-type weight norms / relative updates every N steps (0: off)")
    # AdamMD / MuonMD (seed 004); None = not given: the default, and refused with another optimizer
    group.add_argument("--md-gains", choices=names.GAIN_MODES, default=None,
                       help=f"adammd / muonmd: gains of W = diag(g_row) V diag(g_col) (default "
                            f"{names.GAIN_MODES[0]}); allowed: {', '.join(names.GAIN_MODES)}")
    group.add_argument("--md-gain-parametrization", choices=names.GAIN_PARAMETRIZATIONS, default=None,
                       help=f"adammd / muonmd: g = softplus(raw) or g = raw (default "
                            f"{names.GAIN_PARAMETRIZATIONS[0]}); allowed: {', '.join(names.GAIN_PARAMETRIZATIONS)}")
    group.add_argument("--md-gain-lr", type=_positive_float, default=None,
                       help=f"adammd / muonmd: peak lr of the gains' Adam, decays like --lr (default "
                            f"{names.DEFAULT_GAIN_LR:g}); allowed: a positive number")
    group.add_argument("--md-allow-missing-gains", action="store_true", default=None,
                       help="adammd / muonmd: resume from a checkpoint without gains (they start at 1)")
    return parser


MD_FLAGS = {"md_gains": names.GAIN_MODES[0], "md_gain_parametrization": names.GAIN_PARAMETRIZATIONS[0],
            "md_gain_lr": names.DEFAULT_GAIN_LR, "md_allow_missing_gains": False}
"""The ``--md-*`` flags' args attributes and their defaults."""


def md_options_from_args(args: Any) -> dict:
    """The ``--md-*`` values for the optimizer config, defaults filled; ValueError naming the flag
    when one is given with an optimizer that has no gains."""
    optimizer = str(getattr(args, "optimizer", "") or "").removeprefix("dist_")
    key = names.OPTIMIZER_ALIASES.get(optimizer, optimizer)
    md = key in names.MD_OPTIMIZERS
    out = {}
    for attr, default in MD_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None and not md:
            raise ValueError(f"--{attr.replace('_', '-')} given with --optimizer {optimizer}, which has no gains; "
                             f"allowed only with {', '.join(names.MD_OPTIMIZERS)}")
        out[attr] = default if value is None else value
    return out


BLOCK_OUTPUT_SCALE_FLAG = "--block-output-scale"


def has_flag(parser: argparse.ArgumentParser, flag: str) -> bool:
    """Whether ``parser`` already has the option ``flag``."""
    return flag in parser._option_string_actions


def add_block_output_scale_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--block-output-scale``: Depth-muP's alpha on every attention / MLP output before its residual
    add (``models.depth_mup``), parsed without the depth; resolved with ``--num-layers`` when the
    model is built (patch ``gpt_model_block_output_scale``). Default: off, i.e. Megatron's model."""
    if has_flag(parser, BLOCK_OUTPUT_SCALE_FLAG):
        return parser
    group = parser.add_argument_group("megatron-hyperball (drop-in launcher)")
    group.add_argument(BLOCK_OUTPUT_SCALE_FLAG, type=_block_output_scale, default=None, dest="block_output_scale",
                       help="Depth-muP: scale each attention / MLP output by alpha before its residual add; "
                            f"allowed: {', '.join(names.BLOCK_OUTPUT_SCALES)} (default: none). "
                            "L is --num-layers.")
    return parser


ROUTER_SPHERE_FLAG = "--hyperball-router-sphere"


def add_router_sphere_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--hyperball-router-sphere``: the YAML entry's ``model.moe.router_sphere`` for an MoE model the
    script builds (patch ``dropin_moe_model``); None = not given: frobenius with a sphere optimizer."""
    if has_flag(parser, ROUTER_SPHERE_FLAG):
        return parser
    parser.add_argument(ROUTER_SPHERE_FLAG, choices=names.ROUTER_SPHERE_MODES, default=None,
                        dest="hyperball_router_sphere",
                        help="MoE router under a sphere optimizer: frobenius (one sphere, the default), row (each "
                             "expert's routing vector its own sphere), none (Adam); allowed: "
                             f"{', '.join(names.ROUTER_SPHERE_MODES)}")
    return parser


def _suggest_close_flags(parser: argparse.ArgumentParser) -> None:
    """Append 'did you mean --x?' to argparse's 'unrecognized arguments' error when an unknown
    option is close to a known one (e.g. --hyperball-radiuss). Same exit (2), same usage line."""
    if getattr(parser, "_hyperball_suggests", False):
        return
    error = parser.error

    def error_with_hint(message: str):
        match = re.match(r"unrecognized arguments: (.*)", message)
        if match:
            known = [o for o in parser._option_string_actions if o.startswith("--")]
            hints = []
            for token in match.group(1).split():
                if not token.startswith("--"):
                    continue
                close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1, cutoff=0.85)
                if close:
                    action = parser._option_string_actions[close[0]]
                    if action.choices:
                        allowed = f" (allowed: {', '.join(map(str, action.choices))})"
                    elif action.help and "allowed: " in action.help:
                        allowed = f" ({action.help[action.help.index('allowed: '):]})"
                    else:
                        allowed = ""
                    hints.append(f"{token}: did you mean {close[0]}{allowed}?")
            if hints:
                message = f"{message}; {'; '.join(hints)}"
        return error(message)

    parser.error = error_with_hint
    parser._hyperball_suggests = True


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The drop-in launcher's ``extra_args_provider`` tail: :func:`add_plugin_args` (unless the
    parser has it already), :func:`add_block_output_scale_arg`, :func:`add_router_sphere_arg`, and
    close-match hints."""
    if not has_flag(parser, "--hyperball-radius"):
        parser = add_plugin_args(parser)
    parser = add_block_output_scale_arg(parser)
    parser = add_router_sphere_arg(parser)
    _suggest_close_flags(parser)
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

    md = md_options_from_args(args)
    kwargs = {f.name: md[f.name] if f.name in md else getattr(args, f.name)
              for f in dataclasses.fields(HyperballOptimizerConfig) if f.name in md or hasattr(args, f.name)}
    config = HyperballOptimizerConfig(**kwargs)
    overrides = dict(get_standard_config_overrides(config=config))
    overrides.update(param_group_overrides(args))
    return config, overrides
