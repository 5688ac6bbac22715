"""``megatron.training`` with the plugin: the trainer builds the hyperball optimizers from its args.

Installed by ``patches.apply_training()`` before Megatron parses arguments (the YAML entry and
the drop-in launcher both call it). The plugin's flags come from ``mcore.args.add_plugin_args``.
"""

from __future__ import annotations

import functools
import importlib
import threading

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


_indicators: dict = {}  # id(model list) -> mcore.indicators.Indicators (or None: interval 0)


def _install_train_step_indicators() -> None:
    from megatron.training import get_args
    from megatron.training import training as trainer

    original = trainer.train_step

    @functools.wraps(original)
    def train_step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs):
        margs = get_args()
        key = id(model)
        if key not in _indicators:
            from megatron_hyperball.mcore import indicators

            _indicators[key] = indicators.install(model, getattr(margs, "hyperball_metrics_interval", 0) or 0,
                                                  optimizer, clip_grad=getattr(margs, "clip_grad", 0.0))
        metrics = _indicators[key]
        iteration = kwargs.get("iteration", args[3] if len(args) > 3 else None)
        iteration = (margs.curr_iteration if iteration is None else iteration) + 1  # as training_log logs it
        if metrics is None or not metrics.due(iteration):
            return original(forward_step_func, data_iterator, model, optimizer, *args, **kwargs)
        with metrics.step(iteration) as info:
            result = original(forward_step_func, data_iterator, model, optimizer, *args, **kwargs)
            info["grad_norm"] = result[5]
        return result

    replace(trainer, "train_step", train_step)


register(Patch(
    name="train_step_indicators",
    target="megatron.training.training.train_step",
    versions=VERSIONS,
    group="training",
    why="HyperP's instability indicators (mcore.indicators) need forward hooks during the forward passes of a "
        "logging step only, and the step's grad norm. megatron.training has no per-step hook; train() calls the "
        "train_step of megatron.training.training. On a step that is not a multiple of "
        "--hyperball-metrics-interval the wrapper does one integer comparison (no hook, no sync, no collective); "
        "on a logging step it registers the hooks, runs the step, removes them and does one all-reduce.",
    install=_install_train_step_indicators,
))


class _SectionedWandb:
    """Megatron's W&B writer (the ``wandb`` module) whose ``log`` also writes each known metric under
    its sectioned alias (``dashboard.wandb_alias``); everything else is passed through."""

    def __init__(self, wandb):
        self._wandb = wandb

    def log(self, data, *args, **kwargs):
        from megatron_hyperball.dashboard import wandb_alias

        if isinstance(data, dict):
            aliases = {a: v for k, v in data.items() if (a := wandb_alias(k)) is not None and a not in data}
            if aliases:
                data = {**data, **aliases}
        return self._wandb.log(data, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._wandb, name)


def _install_wandb_sections() -> None:
    from megatron.training import global_vars

    original = global_vars._set_wandb_writer

    @functools.wraps(original)
    def _set_wandb_writer(args):
        original(args)
        writer = global_vars._GLOBAL_WANDB_WRITER
        if writer is not None and not isinstance(writer, _SectionedWandb):
            global_vars._GLOBAL_WANDB_WRITER = _SectionedWandb(writer)

    replace(global_vars, "_set_wandb_writer", _set_wandb_writer)


register(Patch(
    name="wandb_sections",
    target="megatron.training.global_vars._set_wandb_writer",
    versions=VERSIONS,
    group="training",
    why="W&B groups panels into sections by the first '/' of a name; Megatron's scalars ('lm loss', "
        "'learning-rate', 'grad-norm', its MoE losses) have none and land in one flat 'Charts' list. The writer "
        "Megatron stores (the wandb module) is wrapped so each such metric, and the sphere metrics hyperball/*, "
        "is also logged under a sectioned alias (loss/, lr/, spheres/, moe/; dashboard.wandb_alias) in the same "
        "wandb.log call. The original names stay (TensorBoard and W&B), so nothing that reads them changes.",
    install=_install_wandb_sections,
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


# -- the drop-in launcher (python -m megatron_hyperball.run pretrain_gpt.py ...) -------------------

EXTRA_ARGS_PROVIDERS: list = []
"""``extra_args_provider``s chained by ``parse_args_plugin_flags`` after the script's own provider
and ``add_plugin_args`` (the drop-in launcher adds ``mcore.args.add_launcher_args`` here)."""


def _install_parse_args_plugin_flags() -> None:
    from megatron.training import arguments

    from megatron_hyperball.mcore.args import add_plugin_args, has_flag

    original = arguments.parse_args

    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        def provider(parser):
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            if not has_flag(parser, "--hyperball-radius"):  # the YAML entry passes add_plugin_args itself
                parser = add_plugin_args(parser)
            for extra in list(EXTRA_ARGS_PROVIDERS):
                parser = extra(parser)
            return parser

        return original(provider, ignore_unknown_args)

    replace(arguments, "parse_args", parse_args)


register(Patch(
    name="parse_args_plugin_flags",
    target="megatron.training.arguments.parse_args",
    versions=VERSIONS,
    group="training",
    why="A user's script (Megatron-LM's pretrain_gpt.py calls parse_and_validate_args(extra_args_provider="
        "add_modelopt_args or None); pretrain() parses nothing in 0.19) builds Megatron's parser with its own "
        "extra_args_provider, which knows nothing of --optimizer adamh/muonh or --hyperball-*. parse_and_validate_"
        "args calls the module's parse_args: it now chains add_plugin_args (unless the parser has it) and "
        "EXTRA_ARGS_PROVIDERS after the script's provider, so the flags are on Megatron's own parser and a "
        "misspelled or out-of-range value is argparse's usage error (status 2).",
    install=_install_parse_args_plugin_flags,
))


_depth_mup_reported: list = []


def _block_output_alpha():
    """(value as given, alpha) from Megatron's global args, or None when --block-output-scale is
    absent (the YAML entry's parser) or none."""
    from megatron.training import get_args

    from megatron_hyperball import names

    try:
        args = get_args()
    except AssertionError:  # a GPTModel built outside megatron.training (no global args)
        return None
    value = getattr(args, "block_output_scale", None)
    if value is None:
        return None
    return value, names.resolve_block_output_scale(value, args.num_layers)


def _install_gpt_model_block_output_scale() -> None:
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_hyperball.models.depth_mup import apply_depth_mup

    original = GPTModel.__init__

    @functools.wraps(original)
    def __init__(self, config, transformer_layer_spec, *args, **kwargs):
        scale = _block_output_alpha()
        if scale is None:
            return original(self, config, transformer_layer_spec, *args, **kwargs)
        value, alpha = scale
        original(self, config, apply_depth_mup(transformer_layer_spec, alpha), *args, **kwargs)
        if not _depth_mup_reported:
            layers = list(getattr(getattr(self, "decoder", None), "layers", None) or ())
            scaled = sum(getattr(layer.self_attn_bda, "alpha", None) == alpha
                         and getattr(layer.mlp_bda, "alpha", None) == alpha for layer in layers)
            _depth_mup_reported.append(alpha)
            _print_rank0(f"[hyperball] Depth-muP: block output scale {value} -> alpha = {alpha:.6g} "
                         f"(L = {config.num_layers}; {scaled}/{len(layers)} layers of this stage scaled)")

    replace(GPTModel, "__init__", __init__)


register(Patch(
    name="gpt_model_block_output_scale",
    target="megatron.core.models.gpt.gpt_model.GPTModel.__init__ (transformer_layer_spec)",
    versions=VERSIONS,
    group="training",
    why="--block-output-scale (the drop-in launcher's flag) must reach the model Megatron-LM's script builds. "
        "Its layer spec comes from megatron.training.models.gpt.default_layer_spec (0.19's config-container "
        "path), from gpt_builders' own imports of the gpt_layer_specs functions (the model_provider path) or "
        "from --spec; each binds the spec functions by name, but all hand the spec to GPTModel. Its "
        "self_attn_bda / mlp_bda entries become models.depth_mup's scaled bias-dropout-add (weights and "
        "checkpoints unchanged). Without --block-output-scale (the YAML entry) it changes nothing.",
    install=_install_gpt_model_block_output_scale,
))


_lock = threading.RLock()  # the module global swapped below


def _install_builder_layer_wise_layout() -> None:
    from megatron.core.optimizer.layer_wise_optimizer import (
        LayerWiseDistributedOptimizer,
        tag_params_for_buffer_routing,
    )
    from megatron.training import get_args
    from megatron.training.models import dist_utils

    original = dist_utils._ddp_wrap

    class _LayerWiseLayout:  # what _ddp_wrap asks of DistributedOptimizer: the layout of one chunk
        compute_full_param_layout = staticmethod(LayerWiseDistributedOptimizer.compute_full_param_layout)

    @functools.wraps(original)
    def _ddp_wrap(model, data_parallel_random_init, ddp_config, overlap_param_gather_with_optimizer_step,
                  use_megatron_fsdp=False, use_torch_fsdp2=False, **kwargs):
        args = get_args()
        if not (getattr(args, "use_layer_wise_distributed_optimizer", False)
                and getattr(args, "use_layer_wise_param_layout", True)
                and not use_megatron_fsdp and not use_torch_fsdp2):
            return original(model, data_parallel_random_init, ddp_config, overlap_param_gather_with_optimizer_step,
                            use_megatron_fsdp, use_torch_fsdp2, **kwargs)
        # as megatron.training.training.wrap_model_chunks_with_ddp does for get_model
        ddp_config.use_distributed_optimizer = True
        tag_params_for_buffer_routing(model)
        with _lock:
            saved = dist_utils.DistributedOptimizer
            dist_utils.DistributedOptimizer = _LayerWiseLayout
            try:
                return original(model, data_parallel_random_init, ddp_config, overlap_param_gather_with_optimizer_step,
                                use_megatron_fsdp, use_torch_fsdp2, **kwargs)
            finally:
                dist_utils.DistributedOptimizer = saved

    replace(dist_utils, "_ddp_wrap", _ddp_wrap)


register(Patch(
    name="builder_layer_wise_layout",
    target="megatron.training.models.dist_utils._ddp_wrap",
    versions=VERSIONS,
    group="training",
    why="Megatron-LM's pretrain_gpt.py (0.19) builds the model through the config container's builder, whose "
        "_ddp_wrap ignores the layer-wise optimizer: it computes no shard-aligned layout although "
        "use_layer_wise_param_layout is Megatron's default, so MuonH silently gets the legacy ping-pong path (Adam "
        "params inside the layer-wise optimizer, not on ZeRO-1; in fp32 ChainedOptimizer then asserts on the "
        "members' configs). It now wires the model as get_model's wrap_model_chunks_with_ddp does: "
        "use_distributed_optimizer on the DDP config, params tagged for buffer routing, "
        "LayerWiseDistributedOptimizer.compute_full_param_layout; the optimizer is then the one the YAML entry "
        "gets (MuonH layer-wise, the rest on ZeRO-1). --no-use-layer-wise-param-layout keeps the legacy path.",
    install=_install_builder_layer_wise_layout,
))
