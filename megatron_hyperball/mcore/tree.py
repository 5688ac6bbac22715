"""Megatron's optimizer tree, walked in one place.

``get_megatron_optimizer`` returns a tree: ``ChainedOptimizer`` / ``LayerWiseDistributedOptimizer``
nodes over leaf wrappers (``DistributedOptimizer`` = ZeRO-1, ``Float16OptimizerWithFloat16Params``,
``FP32Optimizer``) that each hold a torch optimizer (``leaf.optimizer``). The adapter, the metrics
and the entry's path check all ask the same questions of it: the leaves, the torch optimizer of a
leaf, which tensor the optimizer updates for a model parameter on this rank, which groups that
tensor is shared over. The answers live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core import parallel_state

__all__ = ["nodes", "leaves", "inner", "MainParam", "main_params", "tp_group_of", "dp_group_of",
           "describe", "check_path", "sphere_counts"]


def nodes(opt) -> Iterator:
    """Every node of the tree, depth first, the root included."""
    yield opt
    for sub in getattr(opt, "chained_optimizers", None) or ():
        yield from nodes(sub)


def leaves(opt) -> Iterator:
    """The wrappers (or raw torch optimizers) at the bottom of the tree."""
    for node in nodes(opt):
        if getattr(node, "chained_optimizers", None) is None:
            yield node


def inner(leaf) -> torch.optim.Optimizer:
    """The torch optimizer that does the arithmetic of a leaf."""
    return getattr(leaf, "optimizer", leaf)


def _is_stub(leaf) -> bool:
    return getattr(leaf, "is_stub_optimizer", False) or inner(leaf) is None


@dataclass
class MainParam:
    """The tensor an optimizer updates for one model parameter on this rank."""

    tensor: torch.Tensor       # fp32 main copy (a ZeRO-1 slice, a whole matrix) or the param itself
    sharded: bool              # a flat ZeRO-1 slice: partial sums add up over ``dp_group``
    dp_group: object = None    # ZeRO-1: the shard group; else None
    replicated_over_dp: bool = False  # every data-parallel rank holds this same whole tensor


def main_params(opt) -> dict[torch.nn.Parameter, MainParam]:
    """model param -> what this rank's optimizer updates for it (absent: this rank holds none:
    an empty ZeRO-1 slice, or a layer-wise matrix owned by another rank)."""
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    layer_wise = {id(leaf) for node in nodes(opt) if isinstance(node, LayerWiseDistributedOptimizer)
                  for leaf in leaves(node)}
    out: dict = {}
    for leaf in leaves(opt):
        if _is_stub(leaf):
            continue
        if isinstance(leaf, DistributedOptimizer):
            pairs = [*zip(leaf.model_float16_groups, leaf.shard_fp32_from_float16_groups),
                     *zip(leaf.model_fp32_groups, leaf.shard_fp32_groups)]
            for models, mains in pairs:
                for p, m in zip(models, mains):
                    out[p] = MainParam(m, True, leaf.data_parallel_group)
            continue
        replicated = id(leaf) not in layer_wise  # layer-wise: only the owner holds the matrix
        if isinstance(leaf, Float16OptimizerWithFloat16Params):
            pairs = [*zip(leaf.float16_groups, leaf.fp32_from_float16_groups),
                     *((g, g) for g in leaf.fp32_from_fp32_groups)]
        else:  # FP32Optimizer or a raw torch optimizer: the model params themselves
            pairs = [(g["params"], g["params"]) for g in inner(leaf).param_groups]
        for models, mains in pairs:
            for p, m in zip(models, mains):
                out[p] = MainParam(m, False, None, replicated)
    return out


def _is_expert(param) -> bool:
    return not getattr(param, "allreduce", True)


def tp_group_of(param, pg_collection=None):
    """The tensor-parallel group a parameter is split (or replicated) over."""
    expert = _is_expert(param)
    if pg_collection is not None and hasattr(pg_collection, "tp"):
        return getattr(pg_collection, "expt_tp", pg_collection.tp) if expert else pg_collection.tp
    if expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def dp_group_of(param):
    """The data-parallel group that holds replicas (or ZeRO-1 slices) of a parameter."""
    if _is_expert(param):
        group = parallel_state.get_expert_data_parallel_group(check_initialized=False)
        if group is not None:
            return group
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def describe(opt) -> list[str]:
    """One line per leaf: the wrappers from the root down to the torch optimizer and its package,
    e.g. 'DistributedOptimizer > AdamH (megatron_hyperball)' or 'LayerWiseDistributedOptimizer >
    Float16OptimizerWithFloat16Params > TensorParallelMuonH (megatron_hyperball)'."""
    lines = []

    def walk(node, path):
        subs = getattr(node, "chained_optimizers", None)
        if subs is None:
            torch_opt = inner(node)
            package = type(torch_opt).__module__.split(".")[0]
            wrapper = [] if torch_opt is node else [type(node).__name__]
            lines.append(" > ".join(path + wrapper + [f"{type(torch_opt).__name__} ({package})"]))
            return
        here = [] if type(node).__name__ == "ChainedOptimizer" else [type(node).__name__]
        for sub in subs:
            walk(sub, path + here)

    walk(opt, [])
    return lines


def check_path(opt, name: str, *, distributed: bool, layer_wise: bool) -> list[str]:
    """Raise unless optimizer ``name`` runs where it should; return :func:`describe`'s lines.

    With a distributed optimizer: adam / adamh on Megatron's ZeRO-1 ``DistributedOptimizer``,
    muon / muonh on ``LayerWiseDistributedOptimizer``. A hyperball optimizer must be present
    among the leaves (AdamH, TensorParallelMuonH, AdamMD or TensorParallelMuonMD).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    from megatron_hyperball import names

    lines = describe(opt)
    key = names.OPTIMIZER_ALIASES.get(name, name)
    info = names.OPTIMIZERS.get(key)
    muon = info.muon if info else "muon" in key
    inner_names = {type(inner(leaf)).__name__ for leaf in leaves(opt)}
    if distributed:
        if muon:
            ok = layer_wise and any(isinstance(n, LayerWiseDistributedOptimizer) for n in nodes(opt)) and any(
                "Muon" in n for n in inner_names)
            want = "LayerWiseDistributedOptimizer (Muon matrices)"
        else:
            ok = not layer_wise and all(isinstance(leaf, DistributedOptimizer) for leaf in leaves(opt))
            want = "ZeRO-1 DistributedOptimizer"
        if not ok:
            raise RuntimeError(f"optimizer '{name}' should run on Megatron's {want}, but got "
                               f"{type(opt).__name__}: {'; '.join(lines)}")
    if info is not None and info.sphere:
        want_inner = ("TensorParallelMuon" if info.muon else "Adam") + ("MD" if info.md else "H")
        if want_inner not in inner_names:
            raise RuntimeError(f"optimizer '{name}': no {want_inner} among the built optimizers "
                               f"({'; '.join(lines)})")
    return lines


def sphere_counts(opt) -> tuple[int, int]:
    """(spheres numbered by the hyperball leaves, spheres with a non-empty slice on this rank)."""
    total = local = 0
    for leaf in leaves(opt):
        index = getattr(inner(leaf), "sphere_index", None)
        index = index() if callable(index) else None
        if index is not None:
            total += index.num_spheres
            local += len(index.index)
    return total, local
