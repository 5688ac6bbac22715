"""Sphere layouts for Megatron's sharded parameters: partial norms summed over the right groups.

A rank holds part of a matrix because of data parallelism (ZeRO-1 gives it a flat 1-D slice,
possibly empty) and tensor parallelism (rows or columns). The full ||W||^2, <W,u>, ||u||^2 of
every sphere are sums of local partials: over the data-parallel shard group of the parameter,
then over its TP group if it is TP-partitioned. A TP-replicated matrix (e.g. the router) is
counted once: only TP rank 0 contributes. All spheres of one (dp, tp) pair of groups travel in
one fp32 vector: one all-reduce per group per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_hyperball.optim.sphere import SphereLayout, matrix_shape


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass
class ReduceSet:
    """Spheres that share their groups: rows of the partials, the groups to sum over."""

    rows: list[int]
    dp_group: object = None
    tp_group: object = None
    tp_replicated_rows: list[int] = field(default_factory=list)


@dataclass
class MegatronSphereLayout(SphereLayout):
    reduce_sets: list[ReduceSet] = field(default_factory=list)

    def all_reduce_(self, partials: torch.Tensor) -> None:
        for rs in self.reduce_sets:
            whole = len(rs.rows) == partials.shape[0]
            part = partials if whole else partials[rs.rows]
            if rs.tp_replicated_rows and group_size(rs.tp_group) > 1 and group_rank(rs.tp_group) != 0:
                pos = [rs.rows.index(r) for r in rs.tp_replicated_rows] if not whole else rs.tp_replicated_rows
                part[pos] = 0
            for group in (rs.dp_group, rs.tp_group):
                if group_size(group) > 1:
                    dist.all_reduce(part, group=group)
            if not whole:
                partials[rs.rows] = part


def full_shape(param: torch.nn.Parameter, tp_group) -> tuple[int, int]:
    """(m, n) of the whole matrix a TP shard belongs to."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= group_size(tp_group)
    return matrix_shape(shape)


def build_layout(
    spheres: list[torch.nn.Parameter],
    local: dict[torch.nn.Parameter, torch.Tensor],
    groups_of: callable,
    device: torch.device,
) -> MegatronSphereLayout:
    """Number ``spheres`` (model params, in an order every rank of the groups shares).

    ``local`` maps a sphere's model param to the tensor this rank's optimizer updates (absent
    when this rank's slice is empty); ``groups_of(param) -> (dp_group, tp_group)``.
    """
    index, shapes = {}, []
    sets: dict[tuple[int, int], ReduceSet] = {}
    for k, p in enumerate(spheres):
        dp_group, tp_group = groups_of(p)
        shapes.append(full_shape(p, tp_group))
        if p in local:
            index[id(local[p])] = k
        rs = sets.setdefault((id(dp_group), id(tp_group)), ReduceSet([], dp_group, tp_group))
        rs.rows.append(k)
        if not getattr(p, "tensor_model_parallel", False):
            rs.tp_replicated_rows.append(k)
    return MegatronSphereLayout(index=index, shapes=shapes, device=device, reduce_sets=list(sets.values()))
