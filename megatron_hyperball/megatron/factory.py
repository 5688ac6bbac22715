"""``get_megatron_optimizer`` for the hyperball optimizers.

- ``adamh`` runs on Megatron's own ZeRO-1 ``DistributedOptimizer`` (or its non-sharded mixed-
  precision wrappers): the factory builds Megatron's Adam as usual, then the inner torch AdamW of
  each Megatron optimizer is replaced by ``optim.AdamH`` over the very same fp32 (shard) params and
  param groups, with a layout that sums each matrix's partial norms over the DP shard group and TP.
- ``muonh`` runs through Megatron's emerging-optimizer registry (layer-wise distributed
  optimizer or the non-sharded wrappers) as ``TensorParallelMuonH``; after construction the
  adapter installs the TP layout on it.
Other optimizer names go to Megatron's original factory untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import (
    DistributedOptimizer,
    Float16OptimizerWithFloat16Params,
    ParamKey,
    ParamWithNamePredicate,
    get_standard_config_overrides,
)

from megatron_hyperball.megatron.layout import build_layout, full_shape, group_size
from megatron_hyperball.megatron.muon_h import TensorParallelMuonH
from megatron_hyperball.megatron.options import hyperball_options
from megatron_hyperball.megatron.routing import is_sphere_param, named_params
from megatron_hyperball.optim import AdamH, OPTIMIZERS, canonical_name
from megatron_hyperball.optim.sphere import fixed_radius

_original_get_megatron_optimizer = None  # set by registration.register()


def hyperball_name(name: str) -> str | None:
    """'adamh' / 'muonh' for a hyperball optimizer name or alias, else None."""
    return canonical_name(name) if name.strip().lower() in OPTIMIZERS else None


def _tp_group(param, pg_collection):
    expert = not getattr(param, "allreduce", True)
    if pg_collection is not None and hasattr(pg_collection, "tp"):
        return getattr(pg_collection, "expt_tp", pg_collection.tp) if expert else pg_collection.tp
    if expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


# -- checks before any optimizer is built -----------------------------------------------------------
def _check_no_weight_decay_on_spheres(config, config_overrides, spheres, names) -> None:
    if not config_overrides:
        return
    for key, override in config_overrides.items():
        if override.get("wd_mult", 0.0) == 0.0:
            continue
        for p in spheres:
            if key.matches(p, names[p]):
                raise ValueError(
                    f"config_overrides asks for weight decay (wd_mult={override['wd_mult']}) on "
                    f"'{names[p]}', a sphere matrix of optimizer '{config.optimizer}'. Weight decay "
                    f"is a first-order no-op on the sphere, so sphere parameters take none "
                    f"(allowed: wd_mult=0.0, or leave them out of the override)."
                )


def _check_muon_layout(config, model_chunks) -> None:
    """MuonH needs whole gradients: refuse a DDP that reduce-scatters them for ZeRO-1."""
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    if ddp_config is None or not ddp_config.use_distributed_optimizer:
        return  # gradients are all-reduced: every rank holds whole matrices
    dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    layer_wise = config.use_layer_wise_distributed_optimizer or config.optimizer.startswith("dist_")
    has_layout = getattr(model_chunks[0], "full_param_layout", None) is not None
    if dp > 1 and not (layer_wise and has_layout):
        raise ValueError(
            f"optimizer '{config.optimizer}' (MuonH) orthogonalizes whole matrices, but this DDP was "
            f"built for the ZeRO-1 DistributedOptimizer (use_distributed_optimizer=True), which "
            f"reduce-scatters gradients so no rank holds a whole matrix. Use Megatron's layer-wise "
            f"layout: OptimizerConfig(use_layer_wise_distributed_optimizer=True) and build DDP with "
            f"LayerWiseDistributedOptimizer.compute_full_param_layout(...) (or build DDP with "
            f"use_distributed_optimizer=False)."
        )


@torch.no_grad()
def prepare_model_spheres(spheres, names, radius, pg_collection) -> None:
    """Refuse zero matrices and move matrices onto a fixed-radius sphere, on the model params.

    Runs before Megatron copies model params into its fp32 main params. Norms of TP-sharded
    matrices are summed over TP (one all-reduce per TP group).
    """
    by_group: dict[int, tuple[object, list]] = {}
    for p in spheres:
        g = _tp_group(p, pg_collection)
        by_group.setdefault(id(g), (g, []))[1].append(p)
    for group, params in by_group.values():
        sq = torch.stack([p.detach().float().pow(2).sum() for p in params])
        if group_size(group) > 1:
            # a TP-replicated matrix is counted once
            replicated = [i for i, p in enumerate(params) if not getattr(p, "tensor_model_parallel", False)]
            if replicated and dist.get_rank(group) != 0:
                sq[replicated] = 0
            dist.all_reduce(sq, group=group)
        norms = sq.sqrt().tolist()
        for p, norm in zip(params, norms):
            if not norm > 0 or norm == float("inf"):
                raise ValueError(
                    f"parameter '{names[p]}' (shape {tuple(p.shape)}) has Frobenius norm {norm}; a "
                    f"sphere needs a finite nonzero matrix. Initialise it (e.g. init_method_std > 0) "
                    f"or keep it off the sphere."
                )
            r = fixed_radius(radius, full_shape(p, group))
            if r is not None:
                p.mul_(r / norm)


# -- after construction: install layouts -------------------------------------------------------------
def leaf_optimizers(opt) -> Iterator:
    if hasattr(opt, "chained_optimizers"):
        for sub in opt.chained_optimizers:
            yield from leaf_optimizers(sub)
    else:
        yield opt


def _main_to_model(leaf) -> dict[torch.nn.Parameter, torch.Tensor]:
    """model param -> the tensor the inner torch optimizer updates for it on this rank."""
    pairs = {}
    if isinstance(leaf, DistributedOptimizer):
        for models, mains in zip(leaf.model_float16_groups, leaf.shard_fp32_from_float16_groups):
            pairs.update(zip(models, mains))
        for models, mains in zip(leaf.model_fp32_groups, leaf.shard_fp32_groups):
            pairs.update(zip(models, mains))
        return pairs
    if isinstance(leaf, Float16OptimizerWithFloat16Params):
        for models, mains in zip(leaf.float16_groups, leaf.fp32_from_float16_groups):
            pairs.update(zip(models, mains))
        for params in leaf.fp32_from_fp32_groups:
            pairs.update((p, p) for p in params)
        return pairs
    inner = getattr(leaf, "optimizer", leaf)
    for group in inner.param_groups:
        pairs.update((p, p) for p in group["params"])
    return pairs


def _sphere_layout_for(leaf, sphere_set, pg_collection):
    local = {m: s for m, s in _main_to_model(leaf).items() if m in sphere_set}
    for model_param, main in local.items():
        main._hyperball_model_param = model_param
    if isinstance(leaf, DistributedOptimizer):
        # every rank numbers all spheres of the buffers, its slice possibly empty
        spheres = [p for buf in leaf.buffers for p in buf.params if p in sphere_set]
        dp_group = leaf.data_parallel_group
    else:
        spheres = list(local)  # whole matrices: only this rank's (layer-wise: its share)
        dp_group = None
    device = next(iter(local.values())).device if local else torch.device(
        "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu")
    layout = build_layout(spheres, local, lambda p: (dp_group, _tp_group(p, pg_collection)), device)
    _check_same_count_over_tp(layout, spheres, pg_collection)
    return layout


def _check_same_count_over_tp(layout, spheres, pg_collection) -> None:
    """Ranks that sum partials must agree on the sphere list; never train apart silently."""
    for rs in layout.reduce_sets:
        if group_size(rs.tp_group) <= 1:
            continue
        mine = torch.tensor([len(rs.rows)], dtype=torch.float64, device=layout.device)
        hi, lo = mine.clone(), mine.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=rs.tp_group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=rs.tp_group)
        if hi.item() != lo.item():
            raise RuntimeError(
                f"hyperball: TP ranks hold different numbers of sphere matrices ({lo.item():.0f} vs "
                f"{hi.item():.0f}); their norms cannot be summed. This layout is not supported."
            )


def _install_adamh(leaf, config, hb, sphere_set, pg_collection) -> None:
    if getattr(leaf, "is_stub_optimizer", False) or not hasattr(leaf, "optimizer"):
        return
    if not config.decoupled_weight_decay:
        raise ValueError("optimizer 'adamh' supports decoupled weight decay only "
                         "(OptimizerConfig.decoupled_weight_decay=True)")
    layout = _sphere_layout_for(leaf, sphere_set, pg_collection)
    groups = leaf.optimizer.param_groups
    for group in groups:
        group["sphere"] = any(layout.sphere_of(p) is not None for p in group["params"])
        if group["sphere"]:
            group["weight_decay"] = 0.0  # wd_mult is 0 for spheres; Megatron's scheduler keeps it so
    leaf.optimizer = AdamH.over_param_groups(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        radius=hb.radius,
        update_norm=hb.update_norm,
        layout=layout,
        prepare_spheres=False,
    )


def describe(opt) -> list[str]:
    """Which Megatron wrapper and which inner optimizer (and its package: torch, transformer_engine,
    apex, megatron, megatron_hyperball) each part of a built optimizer runs, e.g.
    'DistributedOptimizer > AdamH (megatron_hyperball)' or '... > FusedAdam (transformer_engine)'."""
    lines = []
    for leaf in leaf_optimizers(opt):
        inner = getattr(leaf, "optimizer", leaf)
        package = type(inner).__module__.split(".")[0]
        lines.append(f"{type(leaf).__name__} > {type(inner).__name__} ({package})")
    return lines


def _check_known_name(name: str) -> None:
    """An optimizer name neither Megatron nor this plugin knows: say which names exist."""
    from megatron.core.optimizer.emerging_optimizers import _EMERGING_OPTIMIZERS

    known = {"adam", "sgd", *_EMERGING_OPTIMIZERS, *OPTIMIZERS}
    if name not in known and name.removeprefix("dist_") not in _EMERGING_OPTIMIZERS:
        raise ValueError(
            f"OptimizerConfig.optimizer={name!r} is not a known optimizer; allowed: "
            f"{', '.join(sorted(known))}"
        )


def _wrap_raw_layer_wise_members(opt, config) -> None:
    """fp32 layer-wise: megatron-core 0.19.2 chains the raw torch optimizers unwrapped (it wraps
    them only for bf16), and ChainedOptimizer then calls prepare_grads() on a torch optimizer.
    Give them Megatron's FP32Optimizer wrapper, as the non-layer-wise fp32 path does."""
    from megatron.core.optimizer import FP32Optimizer
    from megatron.core.optimizer.emerging_optimizers import _eopt_init_state_fn

    stack = [opt]
    while stack:
        node = stack.pop()
        members = getattr(node, "chained_optimizers", None)
        if members is None:
            continue
        for i, sub in enumerate(members):
            if isinstance(sub, torch.optim.Optimizer):
                wrapped = FP32Optimizer(sub, config, _eopt_init_state_fn)
                wrapped.grad_stats_parallel_group = None
                members[i] = wrapped
            else:
                stack.append(sub)


def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True,
                           pg_collection=None, dump_param_to_param_group_map=None):
    """Megatron's ``get_megatron_optimizer``, plus 'adamh' / 'muonh' (aliases adam_hyperball,
    muon_hyperball). See the module doc for how each is built."""
    original = _original_get_megatron_optimizer
    name = hyperball_name(config.optimizer.removeprefix("dist_"))
    if name is None:
        _check_known_name(config.optimizer)
        return original(config, model_chunks, config_overrides, use_gloo_process_groups,
                        pg_collection, dump_param_to_param_group_map)
    hb = hyperball_options(config)
    if name == "muonh" and hb.output_layer:
        raise ValueError("hyperball_output_layer=True is for adamh; with muonh the output layer takes Adam")
    names = named_params(model_chunks)
    spheres = [p for p, n in names.items() if is_sphere_param(n, p, output_layer=hb.output_layer)]
    sphere_set = set(spheres)
    _check_no_weight_decay_on_spheres(config, config_overrides, spheres, names)
    if name == "muonh":
        _check_muon_layout(config, model_chunks)
    prepare_model_spheres(spheres, names, hb.radius, pg_collection)

    overrides = dict(get_standard_config_overrides(config) if config_overrides is None else config_overrides)
    on_sphere = ParamWithNamePredicate(name="hyperball_sphere", fn=lambda p, _n: p in sphere_set)
    overrides[ParamKey(with_name_predicate=on_sphere)] = {"wd_mult": 0.0}

    if name == "adamh":
        adam_config = dataclasses.replace(config, optimizer="adam")
        opt = original(adam_config, model_chunks, overrides, use_gloo_process_groups, pg_collection,
                       dump_param_to_param_group_map)
        for leaf in leaf_optimizers(opt):
            _install_adamh(leaf, config, hb, sphere_set, pg_collection)
        return opt

    muon_config = dataclasses.replace(
        config, optimizer="dist_muonh" if config.optimizer.startswith("dist_") else "muonh")
    opt = original(muon_config, model_chunks, overrides, use_gloo_process_groups, pg_collection,
                   dump_param_to_param_group_map)
    _wrap_raw_layer_wise_members(opt, muon_config)
    for leaf in leaf_optimizers(opt):
        inner = getattr(leaf, "optimizer", leaf)
        if isinstance(inner, TensorParallelMuonH):
            inner.set_layout(_sphere_layout_for(leaf, sphere_set, pg_collection))
    return opt
