"""``scripts/pretrain_gpt.py --config X.yaml [overrides] [extra Megatron flags]``.

Order of events (every rank runs the same steps):

1. Read and validate the YAML with its overrides (``megatron_hyperball.config``), plus the checks
   that need the launch (world size vs. tp * pp, batch sizes vs. data parallelism). Any problem:
   the message on stderr, exit status 2, nothing written, no process group.
2. Print the resolved learning rate and each factor of the LR law.
3. Translate to ``megatron.training`` flags (``to_megatron_args``) plus: ``--load`` = ``--save``
   (a second run of the same command resumes from the latest checkpoint); with the local layer
   spec ``--no-persist-layer-norm`` (and ``--no-rope-fusion`` without Transformer Engine); on CPU
   the local spec, ``--distributed-backend gloo`` and Megatron's torch.compile fusions off
   (``--no-bias-swiglu-fusion`` ...); ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with TP > 1 (required by
   Megatron's ``validate_args`` before Blackwell). Extra Megatron flags given on the
   command line are appended (a later flag wins). W&B: ``WANDB_MODE`` from the config (offline
   unless ``logging.wandb.project`` is set).
4. Hook the plugin into Megatron's trainer: ``get_megatron_optimizer_config`` becomes
   ``config.megatron_optimizer_config`` (the hyperball name and options reach the optimizer
   factory: Megatron's ``--optimizer`` only accepts 'adam' / 'muon', which also makes
   ``validate_args`` keep AdamH on the ZeRO-1 ``DistributedOptimizer`` and put MuonH on the
   layer-wise optimizer), and ``get_megatron_optimizer`` is wrapped to check that path and
   attach the per-matrix metrics (``pretrain.metrics``).
5. ``parse_and_validate_args`` (Megatron's parser and ``validate_args``), save the resolved
   config next to the checkpoint (``<save>/hyperball_config.yaml``), then Megatron's
   ``pretrain`` with this project's model provider, dataset provider and forward step
   (``pretrain.gpt``). ``compat.training.enable_training_fixes`` (every machine) lets Megatron's
   initialisation use the wheel's prebuilt dataset helpers; on a machine without CUDA the CPU
   layer (``compat.enable_cpu``) and ``compat.training.enable_cpu_training`` make the same loop
   run on CPU with gloo.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional, Sequence

import megatron_hyperball  # noqa: F401  (registers adamh / muonh before megatron.training is imported)

__all__ = ["main", "launch_problems", "megatron_argv", "check_optimizer_path"]

EXIT_CONFIG_ERROR = 2


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launch_problems(cfg, world_size: int) -> list[tuple[str, str]]:
    """Problems between the config and the launch (number of processes)."""
    p: list[tuple[str, str]] = []
    par, sch = cfg.parallelism, cfg.schedule
    mp = par.tp * par.pp
    if world_size % mp:
        p.append(("parallelism", f"tp * pp = {mp} does not divide the number of processes {world_size}; "
                                 f"launch a multiple of {mp} processes"))
        return p
    dp = world_size // mp
    if sch.global_batch_size % (sch.micro_batch_size * dp):
        p.append(("schedule.global_batch_size",
                  f"{sch.global_batch_size} is not divisible by schedule.micro_batch_size * data-parallel size "
                  f"= {sch.micro_batch_size} * {dp} (dp = {world_size} processes / (tp * pp = {mp})); allowed: "
                  f"a multiple of {sch.micro_batch_size * dp}"))
    if cfg.model.moe is not None and dp % par.ep and (dp * par.tp) % par.ep:
        p.append(("parallelism.ep", f"{par.ep} does not divide the data-parallel size {dp}"))
    return p


def _cpu_problems(cfg) -> list[tuple[str, str]]:
    p = []
    if cfg.model.transformer_impl == "transformer_engine":
        p.append(("model.transformer_impl", "'transformer_engine' needs CUDA, and this machine has none; "
                                            "allowed on CPU: auto, local"))
    if cfg.precision == "fp16":
        p.append(("precision", "fp16 (dynamic loss scaling) is not supported on CPU; allowed on CPU: bf16, fp32"))
    moe = cfg.model.moe
    if moe is not None and moe.token_dispatcher != "allgather":
        p.append(("model.moe.token_dispatcher", f"'{moe.token_dispatcher}' needs all-to-all, which gloo "
                                                f"lacks; allowed on CPU: allgather"))
    return p


def _unsupported(cfg) -> list[tuple[str, str]]:
    """Config values the schema accepts but this entry cannot run yet."""
    p = []
    moe = cfg.model.moe
    if moe is not None and moe.sqrt_gate:
        p.append(("model.moe.sqrt_gate", "SqrtGate is not implemented in this release; allowed: false"))
    if moe is not None and moe.router_sphere == "row":
        p.append(("model.moe.router_sphere", "'row' is not implemented in this release; allowed: frobenius, none"))
    # megatron-core 0.19.2's layer-wise optimizer in fp32 (checked on CPU): Muon fails when the
    # optimizer is built (ChainedOptimizer's config assert); MuonH trains but its first checkpoint
    # save fails (the fp32 members are FP32Optimizers, whose sharded state dict has no 'optimizer'
    # key, which LayerWiseDistributedOptimizer.sharded_state_dict reads)
    opt = cfg.optimizer
    if cfg.precision == "fp32" and opt.muon_family and cfg.parallelism.distributed_optimizer:
        if opt.name == "muon":
            p.append(("precision", "fp32 with optimizer 'muon' on Megatron's layer-wise optimizer fails in "
                                   "megatron-core 0.19.2; allowed: bf16"))
        elif cfg.checkpoint.save is not None:
            p.append(("precision", "fp32 with optimizer 'muonh' on the layer-wise optimizer cannot save "
                                   "checkpoints yet (megatron-core 0.19.2); allowed: bf16, or no checkpoint.save"))
    return p


def _stray_overrides(extra: Sequence[str]) -> list[tuple[str, str]]:
    """``name=value`` arguments that are neither config overrides nor Megatron flags."""
    import re

    from megatron_hyperball.config import HyperballConfig

    out = []
    for token in extra:
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=", token)
        if m:
            out.append((m.group(1), f"unknown key (argument {token!r}); allowed top-level keys: "
                                    f"{', '.join(HyperballConfig.model_fields)}; Megatron flags start with --"))
    return out


def megatron_argv(cfg, *, cpu: bool, extra: Sequence[str] = ()) -> list[str]:
    """The ``megatron.training`` command line for ``cfg``."""
    from megatron_hyperball.config.megatron_args import resolve_transformer_impl, to_megatron_args

    impl = "local" if cpu else resolve_transformer_impl(cfg)
    argv = to_megatron_args(cfg, transformer_impl=impl)
    ck = cfg.checkpoint
    if ck.save is not None and ck.load is None:
        argv += ["--load", ck.save]  # resume from the latest checkpoint in the save dir, if any
    if cfg.logging.tensorboard_dir is not None or "--tensorboard-dir" in argv:
        argv += ["--log-validation-ppl-to-tensorboard"]
    if impl == "local":
        argv += ["--no-persist-layer-norm"]  # the local spec's torch norms have no persistent kernel
        if not _have_te():
            argv += ["--no-rope-fusion"]  # Megatron's fused RoPE comes from Transformer Engine
    if cpu:
        # gloo; and Megatron's torch.compile fusions off: they only exist to fuse GPU kernels
        argv += ["--distributed-backend", "gloo", "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
                 "--no-bias-dropout-fusion", "--no-masked-softmax-fusion"]
    return argv + list(extra)


def _have_te() -> bool:
    from megatron_hyperball.models.depth_mup import have_transformer_engine

    return have_transformer_engine()


def _describe_tree(optimizer) -> list[str]:
    """One line per leaf: the chain of Megatron wrappers down to the torch optimizer, e.g.
    'LayerWiseDistributedOptimizer > Float16OptimizerWithFloat16Params > TensorParallelMuonH'."""
    from megatron_hyperball.megatron.factory import describe

    lines = []

    def walk(opt, prefix):
        subs = getattr(opt, "chained_optimizers", None)
        if subs is None:
            lines.append(" > ".join(prefix + [describe(opt)[0]]))
            return
        here = [] if type(opt).__name__ == "ChainedOptimizer" else [type(opt).__name__]
        for sub in subs:
            walk(sub, prefix + here)

    walk(optimizer, [])
    return lines


def check_optimizer_path(cfg, args, optimizer) -> list[str]:
    """Check that the built optimizer runs where it should; returns ``describe`` lines.

    adamh / adamw with ``parallelism.distributed_optimizer``: Megatron's ZeRO-1
    ``DistributedOptimizer``; muonh / muon with it: Megatron's ``LayerWiseDistributedOptimizer``.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    from megatron_hyperball.megatron.factory import leaf_optimizers

    name = cfg.optimizer.name
    leaves = list(leaf_optimizers(optimizer))
    lines = _describe_tree(optimizer)

    def nodes(opt):
        yield opt
        for sub in getattr(opt, "chained_optimizers", ()):
            yield from nodes(sub)

    def inner_name(leaf):
        return type(getattr(leaf, "optimizer", leaf)).__name__

    if cfg.parallelism.distributed_optimizer:
        if cfg.optimizer.muon_family:
            # Megatron chains LayerWiseDistributedOptimizer (the matrices) with ZeRO-1 Adam (the rest)
            layer_wise = [n for n in nodes(optimizer) if isinstance(n, LayerWiseDistributedOptimizer)]
            ok = bool(layer_wise) and args.use_layer_wise_distributed_optimizer and any(
                "Muon" in inner_name(leaf) for lw in layer_wise for leaf in leaf_optimizers(lw))
            want = "LayerWiseDistributedOptimizer (Muon matrices)"
        else:
            ok = (args.use_distributed_optimizer and not args.use_layer_wise_distributed_optimizer
                  and all(isinstance(leaf, DistributedOptimizer) for leaf in leaves))
            want = "ZeRO-1 DistributedOptimizer"
        if not ok:
            raise RuntimeError(f"optimizer '{name}' should run on Megatron's {want}, but got "
                               f"{type(optimizer).__name__}: {'; '.join(lines)}")
    if cfg.optimizer.sphere:
        want_inner = "AdamH" if name == "adamh" else "TensorParallelMuonH"
        if want_inner not in {inner_name(leaf) for leaf in leaves}:
            raise RuntimeError(f"optimizer '{name}': no {want_inner} among the built optimizers ({'; '.join(lines)})")
    return lines


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


def _lr_law_record(cfg) -> dict:
    record = {"hyperball/lr": cfg.resolved_lr(), "hyperball/min_lr": cfg.resolved_min_lr()}
    law = cfg.lr_law_result()
    if law is not None:
        for key in ("eta0", "batch_tokens", "depth", "total_tokens", "B0", "d0", "T0", "exponent",
                    "batch_factor", "depth_factor", "tokens_factor"):
            record[f"hyperball/lr_law/{key}"] = getattr(law, key)
    return record


def _log_run_info(cfg) -> None:
    """The LR law and the config into Megatron's W&B config and TensorBoard text (last rank)."""
    from megatron.training import get_tensorboard_writer, get_wandb_writer

    from megatron_hyperball.config import resolved_config_yaml

    wb, tb = get_wandb_writer(), get_tensorboard_writer()
    if wb is not None:
        wb.config.update(dict(_lr_law_record(cfg), hyperball_config=cfg.model_dump(mode="json")),
                          allow_val_change=True)
    if tb is not None:
        tb.add_text("hyperball/lr_law", cfg.lr_summary(), 0)
        tb.add_text("hyperball/config", "```\n" + resolved_config_yaml(cfg) + "\n```", 0)


def _config_path(argv: Sequence[str]) -> Optional[str]:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _top_level_overrides(argv: list[str]) -> list[str]:
    """Bare ``seed=1`` / ``precision=bf16`` (top-level keys, no dot) as ``--set`` overrides."""
    from megatron_hyperball.config import HyperballConfig

    out = []
    for token in argv:
        key = token.split("=", 1)[0]
        if "=" in token and not token.startswith("-") and key in HyperballConfig.model_fields:
            out += ["--set", token]
        else:
            out.append(token)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_hyperball.config import ConfigError, config_from_argv

    argv = _top_level_overrides(list(sys.argv[1:] if argv is None else argv))
    world_size = _env_int("WORLD_SIZE", 1)
    announce = _env_int("LOCAL_RANK", 0) == 0

    # 1. validate everything that can be checked without Megatron or a process group
    import torch

    cpu = not torch.cuda.is_available()
    try:
        cfg, extra = config_from_argv(argv)
        problems = _stray_overrides(extra) + launch_problems(cfg, world_size) + _unsupported(cfg)
        if cpu:
            problems += _cpu_problems(cfg)
        if problems:
            raise ConfigError(problems, _config_path(argv))
    except ConfigError as e:
        if announce:
            print(str(e), file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR

    # 2. the resolved learning rate
    for line in _lr_lines(cfg):
        _print0(line)

    # 3. Megatron's command line and environment
    from megatron_hyperball.config import megatron_optimizer_config, save_resolved_config, wandb_environment

    margv = megatron_argv(cfg, cpu=cpu, extra=extra)
    os.environ.update(wandb_environment(cfg))
    if cfg.parallelism.tp > 1:
        # Megatron's validate_args requires it with TP (or CP) > 1 before Blackwell: one CUDA work
        # queue keeps TP communication ordered with compute. Set before CUDA is initialised.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _print0("[hyperball] megatron args: " + " ".join(margv))

    from megatron_hyperball.compat.training import enable_cpu_training, enable_training_fixes

    enable_training_fixes()
    if cpu:
        from megatron_hyperball.compat import enable_cpu

        enable_cpu()
        enable_cpu_training()

    # 4. hook the plugin into Megatron's trainer (imported after megatron_hyperball registered)
    import megatron.training.training as mtraining
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_hyperball.megatron import factory
    from megatron_hyperball.pretrain import gpt, metrics

    mtraining.get_megatron_optimizer_config = lambda args: megatron_optimizer_config(cfg, args)
    build_optimizer = factory.get_megatron_optimizer

    def get_megatron_optimizer(config, model_chunks, *a, **kw):
        optimizer = build_optimizer(config, model_chunks, *a, **kw)
        from megatron.training import get_args

        for line in check_optimizer_path(cfg, get_args(), optimizer):
            _print0(f"[hyperball] optimizer: {line}")
        metrics.install(optimizer, model_chunks, cfg.resolved_metrics_interval())
        return optimizer

    mtraining.get_megatron_optimizer = get_megatron_optimizer
    gpt.configure(cfg)

    # 5. Megatron's parser + validate_args, then Megatron's pretrain
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "pretrain_gpt.py"] + margv
    try:
        args = parse_and_validate_args()
    finally:
        sys.argv = saved_argv
    if args.rank == 0 and cfg.checkpoint.save is not None:
        path = save_resolved_config(cfg, cfg.checkpoint.save, megatron_args=margv)
        print(f"[hyperball] resolved config saved to {path}", flush=True)
    _log_run_info(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*recommended to use a ModelConfig")
        container = pretrain_cfg_container_from_args(args)
    mtraining.pretrain(
        container,
        gpt.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        gpt.forward_step,
        model_provider=gpt.model_provider,
    )
    _finish()
    return 0


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
