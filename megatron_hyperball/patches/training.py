"""``megatron.training`` with the plugin: the trainer builds the hyperball optimizers from its args.

Installed by ``patches.apply_training()`` before Megatron parses arguments (the YAML entry and
the drop-in launcher both call it). The plugin's flags come from ``mcore.args.add_plugin_args``.
"""

from __future__ import annotations

import functools
import importlib

from megatron_hyperball.patches import Patch, register, replace

VERSIONS = ("0.19.",)


def _install_prebuilt_helpers() -> None:
    utils = importlib.import_module("megatron.core.datasets.utils")
    original = utils.compile_helpers

    @functools.wraps(original)
    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return original()
        return None

    replace(utils, "compile_helpers", compile_helpers)


register(Patch(
    name="prebuilt_dataset_helpers",
    target="megatron.core.datasets.utils.compile_helpers",
    versions=VERSIONS,
    group="training",
    why="initialize_megatron() runs `make -C megatron/core/datasets` on rank 0. The megatron-core wheel ships "
        "the C++ dataset helpers prebuilt (helpers_cpp.cpython-*.so) but no Makefile, so make fails and "
        "compile_helpers() calls sys.exit(1). When the extension imports there is nothing to build.",
    install=_install_prebuilt_helpers,
))


def _install_validate_args_names() -> None:
    from megatron.training import arguments

    from megatron_hyperball import names

    original = arguments.validate_args

    @functools.wraps(original)
    def validate_args(args, *a, **kw):
        name = names.hyperball_name(getattr(args, "optimizer", "") or "")
        if name is None:
            return original(args, *a, **kw)
        args.optimizer = names.OPTIMIZERS[name].megatron
        try:
            return original(args, *a, **kw)
        finally:
            args.optimizer = name

    replace(arguments, "validate_args", validate_args)


register(Patch(
    name="validate_args_hyperball_names",
    target="megatron.training.arguments.validate_args",
    versions=VERSIONS,
    group="training",
    why="validate_args moves every optimizer other than adam/sgd to the layer-wise distributed optimizer, which "
        "must not happen to AdamH (it runs on ZeRO-1). It validates the Megatron base optimizer (adam for adamh, "
        "muon for muonh) and the name is put back afterwards.",
    install=_install_validate_args_names,
))


def _print_rank0(msg: str) -> None:
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def _install_trainer_optimizer() -> None:
    from megatron.training import get_args
    from megatron.training import training as trainer

    from megatron_hyperball import names
    from megatron_hyperball.mcore import factory, tree
    from megatron_hyperball.mcore.args import optimizer_config_from_args

    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        optimizer = factory.get_megatron_optimizer(config, model_chunks, *args, **kwargs)
        margs = get_args()
        name = names.hyperball_name(config.optimizer) or config.optimizer
        for line in tree.check_path(optimizer, name, distributed=bool(
                margs.use_distributed_optimizer or margs.use_layer_wise_distributed_optimizer),
                layer_wise=bool(margs.use_layer_wise_distributed_optimizer)):
            _print_rank0(f"[hyperball] optimizer: {line}")
        interval = getattr(margs, "hyperball_metrics_interval", 0) or 0
        if interval > 0:
            from megatron_hyperball.mcore import metrics

            metrics.install(optimizer, model_chunks, interval)
        return optimizer

    replace(trainer, "get_megatron_optimizer_config", optimizer_config_from_args)
    replace(trainer, "get_megatron_optimizer", get_megatron_optimizer)


register(Patch(
    name="trainer_optimizer",
    target="megatron.training.training.{get_megatron_optimizer_config,get_megatron_optimizer}",
    versions=VERSIONS,
    group="training",
    why="setup_model_and_optimizer builds a plain OptimizerConfig from args; the hyperball options "
        "(--hyperball-*) and per-group lrs must reach the factory, the built optimizer's path is checked and "
        "printed (AdamH on ZeRO-1, MuonH layer-wise), and the per-matrix metrics are attached to it.",
    install=_install_trainer_optimizer,
))


AFTER_CHECKPOINT_SAVE: list = []
"""Callables ``fn(iteration)`` run on every rank after each persistent checkpoint save of the
training loop has returned (the entry writes the resolved config beside the checkpoint there)."""


def _install_after_checkpoint_save() -> None:
    from megatron.training import training as trainer

    original = trainer.save_checkpoint

    @functools.wraps(original)
    def save_checkpoint(iteration, *args, **kwargs):
        result = original(iteration, *args, **kwargs)
        if not kwargs.get("non_persistent_ckpt", False):
            for fn in list(AFTER_CHECKPOINT_SAVE):
                fn(iteration)
        return result

    replace(trainer, "save_checkpoint", save_checkpoint)


register(Patch(
    name="after_checkpoint_save",
    target="megatron.training.training.save_checkpoint",
    versions=VERSIONS,
    group="training",
    why="The resolved config (hyperball_config.yaml) must describe the checkpoint beside it, so it is written "
        "only once a checkpoint save has succeeded: a run that fails before (e.g. a changed model refused by "
        "the checkpoint loader) leaves the previous one untouched. megatron.training has no hook there; the "
        "loop calls the save_checkpoint it imported into megatron.training.training.",
    install=_install_after_checkpoint_save,
))
