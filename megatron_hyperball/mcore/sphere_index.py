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

__all__ = ["MegatronSphereIndex", "full_shape", "build_index", "sphere_keys"]


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


def sphere_keys(model_chunks) -> dict:
    """param -> its name in the *whole* model, the key of its checkpointed hook state (held radius,
    MD gains): wrapper ``module.`` prefixes dropped (fp32 and bf16 runs agree), a pipeline stage's
    local ``layers.i`` renamed to Megatron's global ``layer_number - 1``, and a SequentialMLP's
    ``local_experts.i`` to the global expert index (ep_rank * num_local_experts + i). The layer-wise
    optimizer merges every rank's hook state by this key, so keys must not repeat across stages
    or expert-parallel ranks."""
    import re

    keys = {}
    for chunk in model_chunks:
        renames = {}  # module path -> the same path with the global index
        for path, module in chunk.named_modules():
            m = re.search(r"(^|\.)layers\.(\d+)$", path)
            if m and hasattr(module, "layer_number"):
                renames[path] = f"{path[:m.start(2)]}{int(module.layer_number) - 1}"
            if hasattr(module, "local_experts") and hasattr(module, "num_local_experts") and hasattr(module, "ep_group"):
                offset = module.ep_group.rank() * module.num_local_experts if module.ep_group is not None else 0
                for i in range(len(module.local_experts)):
                    renames[f"{path}.local_experts.{i}" if path else f"local_experts.{i}"] = (
                        f"{path}.local_experts.{offset + i}" if path else f"local_experts.{offset + i}")
        for name, p in chunk.named_parameters():
            new = name
            # longest module paths first, so an expert inside a layer is renamed before its layer
            for path in sorted((q for q in renames if name.startswith(q + ".")), key=len, reverse=True):
                new = renames[path] + new[len(path):] if new.startswith(path + ".") else new
            # the layer's prefix may already carry the expert rename: apply layer renames on the result
            keys.setdefault(p, re.sub(r"^(module\.)+", "", new))
    return keys
