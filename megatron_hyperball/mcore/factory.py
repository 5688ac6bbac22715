"""``get_megatron_optimizer`` for the hyperball optimizers.

- ``adamh`` runs on Megatron's own ZeRO-1 ``DistributedOptimizer`` (or its non-sharded mixed-
  precision wrappers): the factory builds Megatron's Adam as usual, then the inner torch AdamW of
  each Megatron optimizer is replaced by ``optim.AdamH`` over the very same fp32 (shard) params and
  param groups, with a sphere index that sums each matrix's partial norms over the DP shard group and TP.
- ``muonh`` runs through Megatron's emerging-optimizer registry (layer-wise distributed
  optimizer or the non-sharded wrappers) as ``TensorParallelMuonH``; after construction the
  adapter installs its sphere index (norms summed over TP).
- ``adammd`` / ``muonmd`` are the same two paths with ``optim.AdamMD`` / ``TensorParallelMuonMD``:
  the gain hook also gets a layout (``mcore.coords``: where each local ZeRO-1 slice / TP shard sits
  in the full matrix), so its gain-gradient partial sums travel in the sphere scalars' all-reduce.

Gains and TP: every rank keeps each matrix's gains as *full* vectors (length m and n), not
TP-sharded ones. A TP shard contributes the partial sums of the rows and columns it holds (zeros
elsewhere), the one reduction sums them over DP and TP, and every rank steps identical full
vectors. Sharding them would save m + n floats per matrix and cost a second layout of every gain
(and of its checkpoint entry) per TP size; full vectors keep the checkpoint independent of the TP
and DP layout, and fused QKV / gate-up need nothing special (rows are in Megatron's TP-gathered
order). The embedding and output layer are not spheres under MD, so they take no gains.
Other optimizer names go to Megatron's original factory untouched.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import DistributedOptimizer, ParamKey, ParamWithNamePredicate, get_standard_config_overrides

from megatron_hyperball import names
from megatron_hyperball.mcore import tree
from megatron_hyperball.mcore.coords import param_blocks
from megatron_hyperball.mcore.muon_tp import TensorParallelMuonH
from megatron_hyperball.mcore.options import hyperball_options
from megatron_hyperball.mcore.reduce import Reduction, all_reduce_partials_, group_rank, group_size
from megatron_hyperball.mcore.roles import is_sphere_param, named_params, sphere_mode
from megatron_hyperball.mcore.sphere_index import QKV_PARTS, build_index, full_shape, qkv_part_of_rows, sphere_keys
from megatron_hyperball.optim import AdamH, AdamMD
from megatron_hyperball.optim.sphere import fixed_radius

#: Megatron's own get_megatron_optimizer (set by the ``optimizer_factory`` patch).
megatron_get_megatron_optimizer = None


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
def prepare_model_spheres(spheres, param_names, radius, pg_collection, qkv_splits=None) -> None:
    """Refuse zero matrices and move matrices onto a fixed-radius sphere, on the model params.

    Runs before Megatron copies model params into its fp32 main params. Norms of TP-sharded
    matrices are summed over TP (one all-reduce per TP group). A split QKV (``qkv_splits``) is
    checked and scaled part by part (its Q, K, V rows).
    """
    qkv_splits = qkv_splits or {}
    entries = []  # (param, part rows mask or None, full shape of the sphere, label)
    for p in spheres:
        tp_group = tree.tp_group_of(p, pg_collection)
        shape = full_shape(p, tp_group)
        split = qkv_splits.get(p)
        if split is None:
            entries.append((p, None, shape, param_names[p]))
            continue
        rows = _local_rows(p, tp_group, None, p.device).view(p.shape[0], -1)[:, 0]
        part = qkv_part_of_rows(rows, split)
        for i, (rows_per_group, label) in enumerate(zip(split, QKV_PARTS[len(split)])):
            entries.append((p, part == i, (shape[0] // sum(split) * rows_per_group, shape[1]),
                            f"{param_names[p]}[{label}]"))
    sq = (torch.stack([(p if mask is None else p[mask]).detach().float().pow(2).sum() for p, mask, _, _ in entries])
          if entries else torch.zeros(0))
    all_reduce_partials_(sq.unsqueeze(1), [
        Reduction(tp_group=tree.tp_group_of(p, pg_collection),
                  replicated_over_tp=not getattr(p, "tensor_model_parallel", False)) for p, _, _, _ in entries])
    norms = sq.sqrt().tolist()
    for (p, mask, shape, label), norm in zip(entries, norms):
        if not norm > 0 or norm == float("inf"):
            raise ValueError(
                f"parameter '{label}' (shape {tuple(p.shape)}) has Frobenius norm {norm}; a "
                f"sphere needs a finite nonzero matrix. Initialise it (e.g. init_method_std > 0) "
                f"or keep it off the sphere."
            )
        r = fixed_radius(radius, shape)
        if r is not None:
            if mask is None:
                p.mul_(r / norm)
            else:
                p[mask] *= r / norm


# -- after construction: install sphere indexes ------------------------------------------------------
def _sphere_index_for(leaf, sphere_set, pg_collection, param_names, qkv_splits=None):
    mains = {p: m.tensor for p, m in tree.main_params(leaf).items() if p in sphere_set}
    for model_param, main in mains.items():
        main._hyperball_model_param = model_param  # the TP attributes live on the model param
    if isinstance(leaf, DistributedOptimizer):
        # every rank numbers all spheres of the buffers, its slice possibly empty
        spheres = [p for buf in leaf.buffers for p in buf.params if p in sphere_set]
        dp_group = leaf.data_parallel_group
    else:
        spheres = list(mains)  # whole matrices: only this rank's (layer-wise: its share)
        dp_group = None
    device = next(iter(mains.values())).device if mains else torch.device(
        "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu")
    index = build_index(spheres, mains, lambda p: (dp_group, tree.tp_group_of(p, pg_collection)), device,
                        param_names, rows_of=_element_rows(leaf, pg_collection), qkv_splits=qkv_splits)
    _check_same_count_over_tp(index)
    return index


def _flat_range(leaf, model_param):
    """(start, end) of the model param's TP shard that this rank's ZeRO-1 optimizer holds; None when the
    leaf is not Megatron's DistributedOptimizer (it holds the whole shard)."""
    if not isinstance(leaf, DistributedOptimizer):
        return None
    r = leaf._get_model_param_range_map(model_param)["param"]
    return r.start, r.end


def _local_rows(model_param, tp_group, flat, device) -> torch.Tensor:
    """The full-matrix row (int64) of each element of a rank's TP shard of ``model_param``, or of
    its ZeRO-1 ``flat`` range of that shard (``mcore.coords``)."""
    rows = [torch.arange(b.row, b.row + b.rows, device=device).repeat_interleave(b.cols)
            for b in param_blocks(model_param, group_size(tp_group), group_rank(tp_group), flat)]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=device)


def _element_rows(leaf, pg_collection):
    """rows_of for build_index: the full-matrix row of each local element (coords), from the TP shard
    and, on ZeRO-1, this rank's flat range of the param (params holding several spheres only)."""
    def rows_of(model_param, tensor):
        return _local_rows(model_param, tree.tp_group_of(model_param, pg_collection), _flat_range(leaf, model_param),
                           tensor.device)

    return rows_of


def qkv_splits_of(model_chunks, spheres, param_names) -> dict:
    """split_qkv: each fused ``linear_qkv`` sphere -> its rows per part per query group (Megatron's
    own ``_get_qkv_split_shapes``, the split its Muon Newton-Schulz uses)."""
    from megatron.core.optimizer.emerging_optimizers import _get_qkv_split_shapes

    split = _get_qkv_split_shapes(model_chunks[0].config)
    out = {}
    for p in spheres:
        name = param_names[p]
        if not name.endswith("linear_qkv.weight"):
            continue
        if p.dim() != 2 or p.shape[0] % sum(split) != 0:
            raise ValueError(f"hyperball_split_qkv: '{name}' (shape {tuple(p.shape)}) is not whole query groups "
                             f"of {split} rows (Q, K, V); allowed: hyperball_split_qkv False for this model")
        out[p] = split
    return out


def _check_same_count_over_tp(index) -> None:
    """Ranks that sum partials must agree on the sphere list; never train apart silently."""
    for tp_group in {id(r.tp_group): r.tp_group for r in index.reductions}.values():
        if group_size(tp_group) <= 1:
            continue
        mine = sum(1 for r in index.reductions if r.tp_group is tp_group)
        hi = torch.tensor([mine], dtype=torch.float64, device=index.device)
        lo = hi.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=tp_group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=tp_group)
        if hi.item() != lo.item():
            raise RuntimeError(
                f"hyperball: TP ranks hold different numbers of sphere matrices ({lo.item():.0f} vs "
                f"{hi.item():.0f}); their norms cannot be summed. This layout is not supported."
            )


def gated_fc1(model_chunks, param_names) -> frozenset:
    """The SwiGLU fc1 weights (dense and expert) of a model with ``gated_linear_unit``: their rows are
    [gate; up] and MD's row gains follow that order at every TP size (``coords.param_blocks``)."""
    if not getattr(model_chunks[0].config, "gated_linear_unit", False):
        return frozenset()
    return frozenset(p for p, name in param_names.items() if re.search(r"(^|\.)linear_fc1\.weight\d*$", name))


def gain_layout(leaf, sphere_set, pg_collection, gated=frozenset()):
    """The MD hook's layout for a leaf: each local sphere tensor's blocks of the full matrix
    (``mcore.coords``), from its TP shard and, on ZeRO-1, this rank's flat range of it; ``gated``
    fc1 weights in [gate; up] order. Computed once here; a handful of integers per tensor."""
    blocks = {}
    for model_param, main in tree.main_params(leaf).items():
        if model_param not in sphere_set:
            continue
        tp_group = tree.tp_group_of(model_param, pg_collection)
        blocks[id(main.tensor)] = param_blocks(model_param, group_size(tp_group), group_rank(tp_group),
                                               _flat_range(leaf, model_param), gated=model_param in gated)

    def layout(index, p, k):
        return blocks[id(p)]

    return layout


def _install_adamh(leaf, config, hb, sphere_set, pg_collection, param_names, md: bool = False,
                   qkv_splits=None, gated=frozenset()) -> None:
    if getattr(leaf, "is_stub_optimizer", False) or not hasattr(leaf, "optimizer"):
        return
    if not config.decoupled_weight_decay:
        raise ValueError(f"optimizer '{config.optimizer}' supports decoupled weight decay only "
                         "(OptimizerConfig.decoupled_weight_decay=True)")
    index = _sphere_index_for(leaf, sphere_set, pg_collection, param_names, qkv_splits)
    groups = leaf.optimizer.param_groups
    for group in groups:
        group["sphere"] = any(index.sphere_of(p) is not None for p in group["params"])
        if group["sphere"]:
            group["weight_decay"] = 0.0  # wd_mult is 0 for spheres; Megatron's scheduler keeps it so
    md_kwargs = dict(gains=hb.gains, gain_parametrization=hb.gain_parametrization, gain_lr=hb.gain_lr,
                     allow_missing_gains=hb.allow_missing_gains,
                     gain_layout=gain_layout(leaf, sphere_set, pg_collection, gated)) if md else {}
    leaf.optimizer = (AdamMD if md else AdamH).over_param_groups(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        radius=hb.radius,
        update_norm=hb.update_norm,
        sphere_index=index,
        prepare_spheres=False,
        **md_kwargs,
    )


def _check_known_name(name: str) -> None:
    """An optimizer name neither Megatron nor this plugin knows: say which names exist."""
    from megatron.core.optimizer.emerging_optimizers import _EMERGING_OPTIMIZERS

    known = {"adam", "sgd", *_EMERGING_OPTIMIZERS, *names.HYPERBALL_OPTIMIZERS, "adam_hyperball"}
    if name not in known and name.removeprefix("dist_") not in _EMERGING_OPTIMIZERS:
        raise ValueError(
            f"OptimizerConfig.optimizer={name!r} is not a known optimizer; allowed: "
            f"{', '.join(sorted(known))}"
        )


def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True,
                           pg_collection=None, dump_param_to_param_group_map=None):
    """Megatron's ``get_megatron_optimizer``, plus 'adamh' / 'muonh' (aliases adam_hyperball,
    muon_hyperball) and 'adammd' / 'muonmd'. See the module doc for how each is built."""
    original = megatron_get_megatron_optimizer
    name = names.hyperball_name(config.optimizer.removeprefix("dist_"))
    if name is None:
        _check_known_name(config.optimizer)
        return original(config, model_chunks, config_overrides, use_gloo_process_groups,
                        pg_collection, dump_param_to_param_group_map)
    hb = hyperball_options(config)
    info = names.OPTIMIZERS[name]
    if hb.output_layer and name != "adamh":
        raise ValueError(f"OptimizerConfig.hyperball_output_layer=True is for adamh; with {name} the output "
                         f"layer takes Adam (MD: embedding and output layer take no gains, seed 004); "
                         f"allowed with {name}: False")
    param_names = named_params(model_chunks)
    spheres = [p for p, n in param_names.items() if is_sphere_param(n, p, output_layer=hb.output_layer)]
    sphere_set = set(spheres)
    rows = [param_names[p] for p in spheres if sphere_mode(p) == "row"]
    if rows and (info.md or hb.update_norm == "shape"):
        raise ValueError(f"'{rows[0]}' is tagged for row spheres (router_sphere 'row'), which optimizer "
                         f"'{name}' with update norm '{hb.update_norm}' does not support; allowed: adamh / muonh "
                         f"with hyperball_update_norm 'exact' (or router_sphere frobenius / none)")
    qkv_splits = {}
    if hb.split_qkv:
        if info.md or (info.muon and (hb.update_norm == "shape" or not config.muon_split_qkv)):
            why = ("gains are per fused matrix" if info.md else
                   "update norm 'shape' (MuonH's shape factor is the fused matrix's, not each part's)"
                   if hb.update_norm == "shape" else
                   "muon_split_qkv False (Newton-Schulz must orthogonalize Q, K, V apart, as their spheres are)")
            raise ValueError(f"OptimizerConfig.hyperball_split_qkv=True with optimizer '{name}': {why}; allowed: "
                             f"adamh, or muonh with hyperball_update_norm 'exact' and muon_split_qkv True")
        qkv_splits = qkv_splits_of(model_chunks, spheres, param_names)
    _check_no_weight_decay_on_spheres(config, config_overrides, spheres, param_names)
    if info.muon:
        _check_muon_layout(config, model_chunks)
    prepare_model_spheres(spheres, param_names, hb.radius, pg_collection, qkv_splits)
    keys = sphere_keys(model_chunks)  # checkpointed hook state (radius, gains) by whole-model name
    gated = gated_fc1(model_chunks, param_names) if info.md else frozenset()

    overrides = dict(get_standard_config_overrides(config) if config_overrides is None else config_overrides)
    on_sphere = ParamWithNamePredicate(name="hyperball_sphere", fn=lambda p, _n: p in sphere_set)
    overrides[ParamKey(with_name_predicate=on_sphere)] = {"wd_mult": 0.0}

    if not info.muon:
        adam_config = dataclasses.replace(config, optimizer="adam")
        opt = original(adam_config, model_chunks, overrides, use_gloo_process_groups, pg_collection,
                       dump_param_to_param_group_map)
        for leaf in tree.leaves(opt):
            _install_adamh(leaf, config, hb, sphere_set, pg_collection, keys, md=info.md, qkv_splits=qkv_splits,
                           gated=gated)
        return opt

    registered = "muonmd" if info.md else "muonh"
    muon_config = dataclasses.replace(
        config, optimizer=f"dist_{registered}" if config.optimizer.startswith("dist_") else registered)
    opt = original(muon_config, model_chunks, overrides, use_gloo_process_groups, pg_collection,
                   dump_param_to_param_group_map)
    for leaf in tree.leaves(opt):
        muon = tree.inner(leaf)
        if isinstance(muon, TensorParallelMuonH):
            muon.set_sphere_index(_sphere_index_for(leaf, sphere_set, pg_collection, keys, qkv_splits))
            if info.md:
                muon.md_hook.layout = gain_layout(leaf, sphere_set, pg_collection, gated)
    return opt
