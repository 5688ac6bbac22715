"""``scripts/pretrain_gpt.py --config X.yaml [overrides] [extra Megatron flags]``: one YAML config
through Megatron's own training loop, on GPUs or (gloo) on a CPU-only machine.

Every rank runs :func:`main`: validate the config and the launch (any problem: one
``key.path: message`` line each on stderr, exit status 2, before any process group or folder
exists), print the lr law, translate to Megatron's flags (``pretrain.megatron_args``), install the
plugin's patches (``megatron_hyperball.patches``; the CPU layer first without CUDA), let Megatron
parse and validate with the plugin's flags, save the resolved config next to the checkpoint, and
run Megatron's ``pretrain`` with the providers of ``pretrain.gpt``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional, Sequence

import megatron_hyperball  # noqa: F401  (registers adamh / muonh before megatron.training is imported)

__all__ = ["main", "EXIT_CONFIG_ERROR"]

EXIT_CONFIG_ERROR = 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from megatron_hyperball.config import ConfigError, config_for_launch, save_resolved_config
    from megatron_hyperball.pretrain.megatron_args import megatron_argv, set_environment

    argv = list(sys.argv[1:] if argv is None else argv)
    cpu = not torch.cuda.is_available()

    # 1. the config and the launch, before anything else exists
    try:
        cfg, extra = config_for_launch(argv, _env_int("WORLD_SIZE", 1), cpu=cpu)
    except ConfigError as e:
        if _env_int("LOCAL_RANK", 0) == 0:  # once per node
            print(str(e), file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR

    # 2. the resolved learning rate
    for line in _lr_lines(cfg):
        _print0(line)

    # 3. Megatron's command line and environment
    margv = megatron_argv(cfg, cpu=cpu, extra=extra)
    set_environment(cfg)
    _print0("[hyperball] megatron args: " + " ".join(margv))

    # 4. the plugin inside megatron.training (and on CPU the CPU layer under it)
    from megatron_hyperball import patches

    if cpu:
        from megatron_hyperball import compat

        compat.enable_cpu()
    patches.apply_training(cpu=cpu)

    # 5. Megatron's parser (with the plugin's flags) and validate_args
    args = _parse_and_validate(margv)

    # 6. the resolved config next to the checkpoint
    if args.rank == 0 and cfg.checkpoint.save is not None:
        path = save_resolved_config(cfg, cfg.checkpoint.save, megatron_args=margv)
        print(f"[hyperball] resolved config saved to {path}", flush=True)

    # 7. Megatron's pretrain
    _pretrain(cfg, args)
    _finish()
    return 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _print0(msg: str) -> None:
    if _env_int("RANK", 0) == 0:
        print(msg, flush=True)


def _lr_lines(cfg) -> list[str]:
    lines = [f"[hyperball] {cfg.lr_summary()}"]
    law = cfg.lr_law_result()
    if law is not None:
        lines.append(f"[hyperball] lr factors: eta0={law.eta0:.6g} sqrt(B/B0)={law.batch_factor:.6g} "
                     f"sqrt(d0/depth)={law.depth_factor:.6g} (T/T0)^-{law.exponent:g}={law.tokens_factor:.6g} "
                     f"-> lr={law.lr:.6g}")
    alpha = cfg.block_output_alpha()
    lines.append(f"[hyperball] optimizer {cfg.optimizer.name}; Depth-muP block_output_scale "
                 f"{cfg.hyperp.block_output_scale} -> alpha = {'off' if alpha is None else f'{alpha:.6g}'}")
    return lines


def _parse_and_validate(margv: list[str]):
    from megatron.training.arguments import parse_and_validate_args

    from megatron_hyperball.mcore.args import add_plugin_args

    saved = sys.argv
    sys.argv = [saved[0] if saved else "pretrain_gpt.py"] + margv
    try:
        return parse_and_validate_args(extra_args_provider=add_plugin_args)
    finally:
        sys.argv = saved


def _pretrain(cfg, args) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_hyperball.pretrain import gpt

    _log_run_info(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*recommended to use a ModelConfig")
        container = pretrain_cfg_container_from_args(args)
    model_provider, datasets_provider = gpt.providers(cfg)
    training.pretrain(container, datasets_provider, ModelType.encoder_or_decoder, gpt.forward_step,
                      model_provider=model_provider)


def _log_run_info(cfg) -> None:
    """The lr law and the config into Megatron's W&B config and TensorBoard text (last rank)."""
    from megatron.training import get_tensorboard_writer, get_wandb_writer

    from megatron_hyperball.config import resolved_config_yaml

    wb, tb = get_wandb_writer(), get_tensorboard_writer()
    if wb is not None:
        record = {"hyperball/lr": cfg.resolved_lr(), "hyperball/min_lr": cfg.resolved_min_lr()}
        law = cfg.lr_law_result()
        if law is not None:
            record.update({f"hyperball/lr_law/{k}": v for k, v in law.as_dict().items() if k != "lr"})
        wb.config.update(dict(record, hyperball_config=cfg.model_dump(mode="json")), allow_val_change=True)
    if tb is not None:
        tb.add_text("hyperball/lr_law", cfg.lr_summary(), 0)
        tb.add_text("hyperball/config", "```\n" + resolved_config_yaml(cfg) + "\n```", 0)


def _finish() -> None:
    """Flush Megatron's TensorBoard writer and leave the process group."""
    import torch

    from megatron.training import get_tensorboard_writer

    tb = get_tensorboard_writer()
    if tb is not None:
        tb.flush()
        tb.close()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
