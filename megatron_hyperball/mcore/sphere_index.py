"""Sphere indexes for Megatron's sharded parameters: which sphere each local tensor is, and how its
partial sums become full sums (``mcore.reduce``: over the DP shard group, then TP, replicas once).

Every rank numbers all spheres its groups share, its slice possibly empty, so the reduced
vectors line up; all spheres of one (dp, tp) pair travel in one all-reduce per group per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_hyperball.mcore.reduce import Reduction, all_reduce_partials_, group_size
from megatron_hyperball.optim.sphere import SphereIndex, matrix_shape

__all__ = ["MegatronSphereIndex", "full_shape", "build_index"]


@dataclass
class MegatronSphereIndex(SphereIndex):
    reductions: list[Reduction] = field(default_factory=list)

    def all_reduce_(self, partials: torch.Tensor) -> None:
        all_reduce_partials_(partials, self.reductions)


def full_shape(param: torch.nn.Parameter, tp_group) -> tuple[int, int]:
    """(m, n) of the whole matrix a TP shard belongs to."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= group_size(tp_group)
    return matrix_shape(shape)


def build_index(spheres: list[torch.nn.Parameter], local: dict[torch.nn.Parameter, torch.Tensor],
                groups_of, device: torch.device, names: dict | None = None) -> MegatronSphereIndex:
    """Number ``spheres`` (model params, in an order every rank of the groups shares).

    ``local`` maps a sphere's model param to the tensor this rank's optimizer updates (absent
    when this rank's slice is empty); ``groups_of(param) -> (dp_group, tp_group)``; ``names``:
    param -> its model name, the sphere's key in checkpointed hook state.
    """
    index, shapes, reductions = {}, [], []
    for k, p in enumerate(spheres):
        dp_group, tp_group = groups_of(p)
        shapes.append(full_shape(p, tp_group))
        if p in local:
            index[id(local[p])] = k
        reductions.append(Reduction(dp_group, tp_group,
                                    replicated_over_tp=not getattr(p, "tensor_model_parallel", False)))
    keys = [names[p] for p in spheres] if names is not None else None
    return MegatronSphereIndex(index=index, shapes=shapes, device=device, keys=keys, reductions=reductions)
