"""``scripts/pretrain_gpt.py --config X.yaml [overrides] [extra Megatron flags]``: one YAML config
through Megatron's own training loop, on GPUs or (gloo) on a CPU-only machine.

Every rank runs :func:`main`:

1. validate the config, the launch and the files and folders it names (``config.config_for_launch``
   with ``files=True``), importing neither torch nor Megatron (``scripts/pretrain_gpt.py`` defers
   ``megatron_hyperball/__init__.py``, which imports both): any problem is printed once per node
   (``LOCAL_RANK`` 0) as ``key.path: message`` lines on stderr and the process exits with status 2,
   in well under a second, before any process group, folder or file exists;
2. print the lr law; import the package (torch, megatron-core, the optimizer registration);
3. translate to Megatron's flags (``pretrain.megatron_args``), install the plugin's patches
   (``megatron_hyperball.patches``; the CPU layer first without CUDA), let Megatron parse and
   validate them (a refusal, e.g. of an extra flag: printed once, status 2, still before any process
   group or folder);
4. run Megatron's ``pretrain`` with the providers of ``pretrain.gpt``. The resolved config is
   written to ``<checkpoint.save>/hyperball_config.yaml`` after each checkpoint save has returned
   (``patches.training.AFTER_CHECKPOINT_SAVE``), so it always describes the checkpoint beside it.

``--check-only`` stops after step 1 (status 0 or 2): the launchers run it before torchrun.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
import warnings
from typing import Optional, Sequence

__all__ = ["main", "EXIT_CONFIG_ERROR", "CHECK_ONLY_FLAG", "DEFERRED_INIT_ATTR"]

EXIT_CONFIG_ERROR = 2
CHECK_ONLY_FLAG = "--check-only"
DEFERRED_INIT_ATTR = "_init_deferred"
"""Set on the ``megatron_hyperball`` module by scripts/pretrain_gpt.py while its __init__ waits."""


class _MegatronArgsError(Exception):
    pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_hyperball.config import ConfigError, config_for_launch, split_argv
    from megatron_hyperball.config.launch import report_once_per_node as _report

    argv = list(sys.argv[1:] if argv is None else argv)
    check_only = CHECK_ONLY_FLAG in argv
    argv = [a for a in argv if a != CHECK_ONLY_FLAG]
    world_size = _env_int("WORLD_SIZE", 1)

    # 1. the config, the launch and the file system, before anything else exists
    try:
        cfg, extra = config_for_launch(argv, world_size, cpu=_no_cuda, files=True)
    except ConfigError as e:
        _report(str(e))
        return EXIT_CONFIG_ERROR
    path = split_argv(argv)[0]
    if check_only:
        _print0(f"[hyperball] config check passed: {path} ({world_size} processes)")
        return 0

    # 2. the resolved learning rate; then torch, megatron-core and the optimizer registration
    for line in _lr_lines(cfg):
        _print0(line)
    _complete_package_import()
    import torch

    from megatron_hyperball.pretrain.megatron_args import megatron_argv, set_environment

    cpu = not torch.cuda.is_available()

    # 3. Megatron's command line and environment
    margv = megatron_argv(cfg, cpu=cpu, extra=extra)
    set_environment(cfg)
    _print0("[hyperball] megatron args: " + " ".join(margv))

    # the plugin inside megatron.training (and on CPU the CPU layer under it)
    from megatron_hyperball import patches

    if cpu:
        from megatron_hyperball import compat

        compat.enable_cpu()
    patches.apply_training(cpu=cpu)

    # Megatron's parser (with the plugin's flags) and validate_args
    try:
        args = _parse_and_validate(margv)
    except _MegatronArgsError as e:
        _report(f"invalid Megatron arguments (from {path} and the extra flags {' '.join(extra) or '(none)'}):\n"
                f"  {e}")
        return EXIT_CONFIG_ERROR

    # 4. the resolved config beside each checkpoint once it is saved; Megatron's pretrain
    _save_config_after_checkpoints(cfg, margv, args.rank)
    _pretrain(cfg, args)
    _finish()
    return 0


def _no_cuda() -> bool:
    """True on a machine without CUDA (imports torch: asked only when the config depends on it)."""
    import torch

    return not torch.cuda.is_available()


def _complete_package_import() -> None:
    """Run ``megatron_hyperball/__init__.py`` if scripts/pretrain_gpt.py deferred it (it imports
    torch and megatron-core and registers adamh / muonh before megatron.training is imported)."""
    pkg = sys.modules.get("megatron_hyperball")
    if pkg is not None and pkg.__dict__.pop(DEFERRED_INIT_ATTR, False):
        pkg.__spec__.loader.exec_module(pkg)
    import megatron_hyperball  # noqa: F401


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
    """Megatron's parse_args (with the plugin's flags) and validate_args, then its global state
    (tokenizer, TensorBoard / W&B writers). A refusal raises _MegatronArgsError with Megatron's
    message, before anything is created."""
    from megatron.training import arguments
    from megatron.training.global_vars import set_global_variables

    from megatron_hyperball.mcore.args import add_plugin_args

    saved = sys.argv
    sys.argv = [saved[0] if saved else "pretrain_gpt.py"] + margv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = arguments.parse_args(extra_args_provider=add_plugin_args)
    except SystemExit as e:  # argparse: usage and 'error: ...' (printed by every rank otherwise)
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise _MegatronArgsError(lines[-1] if lines else f"Megatron's parser exited with {e.code}") from None
    finally:
        sys.argv = saved
    sys.stderr.write(err.getvalue())
    for flag, name in (("use_checkpoint_args", "--use-checkpoint-args"), ("yaml_cfg", "--yaml-cfg")):
        if getattr(args, flag, None):
            raise _MegatronArgsError(f"{name}: the YAML config defines the run; allowed: leave it out")
    try:
        arguments.validate_args(args, {})
    except (AssertionError, ValueError) as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        text = str(e) or f"{where.line} ({os.path.basename(where.filename)}:{where.lineno})"
        raise _MegatronArgsError(f"Megatron's validate_args refused them: {text}") from None
    set_global_variables(args)
    return args


def _save_config_after_checkpoints(cfg, margv: list[str], rank: int) -> None:
    """On global rank 0: write ``<checkpoint.save>/hyperball_config.yaml`` after every checkpoint
    save (never before: a run that fails to load or to save leaves the previous one in place)."""
    if cfg.checkpoint.save is None or rank != 0:
        return
    from megatron_hyperball.config import save_resolved_config
    from megatron_hyperball.patches.training import AFTER_CHECKPOINT_SAVE

    def write(iteration: int) -> None:
        path = save_resolved_config(cfg, cfg.checkpoint.save, megatron_args=margv)
        print(f"[hyperball] resolved config saved to {path} (checkpoint of iteration {iteration})", flush=True)

    AFTER_CHECKPOINT_SAVE.append(write)


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
