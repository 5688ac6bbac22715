"""The hyperball optimizers inside megatron-core's optimizer factory.

- ``get_megatron_optimizer`` builds 'adamh' / 'muonh' (and aliases) through the adapter
  (``mcore.factory``) and passes every other name to Megatron's own function.
- ``_EMERGING_OPTIMIZERS['muonh' / 'muon_hyperball' / 'muonmd']``: MuonH (MuonMD) with Megatron's TP-aware
  Newton-Schulz, so Megatron's layer-wise optimizer builds it like its own Muon.
- fp32 members of ``LayerWiseDistributedOptimizer`` get Megatron's ``FP32Optimizer`` wrapper.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import torch

from megatron_hyperball.patches import Patch, register, replace

VERSIONS = ("0.19.",)


def _install_factory() -> None:
    import megatron.core.optimizer as mcore_optimizer

    from megatron_hyperball.mcore import factory

    factory.megatron_get_megatron_optimizer = replace(
        mcore_optimizer, "get_megatron_optimizer", factory.get_megatron_optimizer)
    trainer = sys.modules.get("megatron.training.training")  # imported the name before us
    if trainer is not None and getattr(trainer, "get_megatron_optimizer", None) is factory.megatron_get_megatron_optimizer:
        replace(trainer, "get_megatron_optimizer", factory.get_megatron_optimizer)


register(Patch(
    name="optimizer_factory",
    target="megatron.core.optimizer.get_megatron_optimizer",
    versions=VERSIONS,
    why="Megatron's factory knows adam, sgd and its emerging optimizers only; AdamH must run on the ZeRO-1 "
        "DistributedOptimizer (Megatron builds its Adam, the adapter swaps the inner torch optimizer) and MuonH "
        "needs its sphere index installed after Megatron's layer-wise optimizer is built.",
    install=_install_factory,
))


def _install_registry() -> None:
    from megatron.core.optimizer import emerging_optimizers as eopt
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    from megatron_hyperball.mcore import muon_tp, roles

    entry = eopt.EmergingOptimizerEntry(
        optimizer_cls=muon_tp.TensorParallelMuonH,
        init_state_fn=eopt._eopt_init_state_fn,
        config_to_kwargs=muon_tp.config_to_kwargs,
        # everything off the sphere takes Adam (the same rule as roles.is_sphere_param)
        default_param_overrides={
            ParamKey(with_name_predicate=ParamWithNamePredicate(
                name="not_on_sphere", fn=lambda p, n: not roles.is_sphere_param(n, p))
            ): {"optimizer": "adam"}
        },
    )
    eopt._EMERGING_OPTIMIZERS["muonh"] = entry
    eopt._EMERGING_OPTIMIZERS["muon_hyperball"] = entry
    # MuonMD: the same routing, MuonMD's gain hook on the sphere matrices
    eopt._EMERGING_OPTIMIZERS["muonmd"] = dataclasses.replace(
        entry, optimizer_cls=muon_tp.TensorParallelMuonMD, config_to_kwargs=muon_tp.config_to_kwargs_md)


register(Patch(
    name="muonh_registry_entry",
    target="megatron.core.optimizer.emerging_optimizers._EMERGING_OPTIMIZERS['muonh', 'muon_hyperball', 'muonmd']",
    versions=VERSIONS,
    why="Registers MuonH and MuonMD with Megatron's emerging-optimizer routing (layer-wise distributed optimizer, Adam "
        "for non-matrices). megatron-core 0.19.2's own 'muon_hyperball' entry is built from emerging-optimizers' "
        "MuonHyperball and fails with TypeError 'betas'; it is replaced.",
    install=_install_registry,
))


def _install_layer_wise_fp32() -> None:
    from megatron.core.optimizer import FP32Optimizer
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    init = LayerWiseDistributedOptimizer.__init__

    @functools.wraps(init)
    def __init__(self, optimizers, config, *args, **kwargs):
        init(self, optimizers, config, *args, **kwargs)
        fns = kwargs.get("init_state_fn_list") or (args[1] if len(args) > 1 else None) or []
        for i, member in enumerate(self.chained_optimizers):
            if isinstance(member, torch.optim.Optimizer):
                wrapped = FP32Optimizer(member, config, fns[i] if i < len(fns) else None)
                wrapped.grad_stats_parallel_group = None
                self.chained_optimizers[i] = wrapped

    replace(LayerWiseDistributedOptimizer, "__init__", __init__)


register(Patch(
    name="layer_wise_fp32_members",
    target="megatron.core.optimizer.layer_wise_optimizer.LayerWiseDistributedOptimizer.__init__",
    versions=VERSIONS,
    why="In fp32, megatron-core 0.19.2 chains the raw torch optimizers unwrapped (it wraps them only for bf16), "
        "and ChainedOptimizer then calls prepare_grads() on a torch optimizer. Give them Megatron's "
        "FP32Optimizer wrapper, as the non-layer-wise fp32 path does.",
    install=_install_layer_wise_fp32,
))


def _install_layer_wise_found_inf() -> None:
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    init = LayerWiseDistributedOptimizer.__init__

    @functools.wraps(init)
    def __init__(self, optimizers, config, *args, **kwargs):
        init(self, optimizers, config, *args, **kwargs)
        if not config.loss_scale:
            return  # bf16 without a loss scale: Megatron checks nothing, on any path
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        for member in self.chained_optimizers:
            if isinstance(member, Float16OptimizerWithFloat16Params) and member.grad_scaler is None:
                member.grad_scaler = ConstantGradScaler(config.loss_scale)
                member.found_inf = torch.tensor([0.0], dtype=torch.float, device=device)
                # a matrix's gradient lives on its owner only: reduce found-inf over every rank (as
                # LayerWiseDistributedOptimizer reduces its grad norm), not the model-parallel default
                member.grad_stats_parallel_group = None

    replace(LayerWiseDistributedOptimizer, "__init__", __init__)


register(Patch(
    name="layer_wise_found_inf",
    target="megatron.core.optimizer.layer_wise_optimizer.LayerWiseDistributedOptimizer.__init__",
    versions=VERSIONS,
    why="megatron-core 0.19.2 wraps bf16 layer-wise members in Float16OptimizerWithFloat16Params with no grad "
        "scaler even when a loss scale is set (Megatron's switch for found-inf checks in bf16): a non-finite "
        "gradient is not skipped, the step turns the matrix and its momentum into NaN, and the chain's loss "
        "scale (read from its first member, the layer-wise one) is 1 while the ZeRO-1 Adam member unscales by "
        "the configured scale. Members get the same ConstantGradScaler the standard path builds.",
    install=_install_layer_wise_found_inf,
))


def _merge_hook_states(states: list) -> list:
    """Per hook, the union over ranks of its {field: {sphere_key: value}} state."""
    merged: list[dict] = []
    for hooks in states:
        for i, hook_state in enumerate(hooks):
            while len(merged) <= i:
                merged.append({})
            for field, values in hook_state.items():
                merged[i].setdefault(field, {}).update(values)
    return merged


def _install_layer_wise_hook_state() -> None:
    import torch.distributed as dist
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    original = LayerWiseDistributedOptimizer.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self, *args, **kwargs):
        sd = original(self, *args, **kwargs)
        members = list(({1: sd} if len(self.chained_optimizers) == 1 else sd).values())
        # this rank's own hook states (Megatron has just replaced every rank's groups by one rank's)
        local = []
        for member in self.chained_optimizers:
            inner = getattr(member, "optimizer", member)
            hooks = getattr(inner, "sphere_hooks", None)
            local.append(None if hooks is None else [h.state_dict(inner.sphere_index()) for h in hooks])
        if not any(x is not None for x in local) or not dist.is_initialized():
            return sd
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)  # the same collective pattern as Megatron's own, above
        for i, member in enumerate(members):
            states = [ranks[i] for ranks in gathered if ranks[i] is not None]
            if states:
                merged = _merge_hook_states(states)
                for group in member["optimizer"]["param_groups"]:
                    group["sphere_hooks"] = merged
        return sd

    replace(LayerWiseDistributedOptimizer, "sharded_state_dict", sharded_state_dict)


register(Patch(
    name="layer_wise_hook_state",
    target="megatron.core.optimizer.layer_wise_optimizer.LayerWiseDistributedOptimizer.sharded_state_dict",
    versions=VERSIONS,
    why="The layer-wise optimizer saves one rank's param groups for all (the first non-empty one), but each "
        "rank's hyperball hooks hold per-sphere state (the held radius) for the matrices it owns. The hook "
        "states of all ranks are merged (keyed by parameter name) into the saved groups, so every rank finds "
        "its own after a resume.",
    install=_install_layer_wise_hook_state,
))
