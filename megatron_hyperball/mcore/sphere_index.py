"""Sphere indexes for Megatron's sharded parameters: which sphere each local tensor is, and how its
partial sums become full sums (``mcore.reduce``: over the DP shard group, then TP, replicas once).

Every rank numbers all spheres its groups share, its slice possibly empty, so the reduced
vectors line up; all spheres of one (dp, tp) pair travel in one all-reduce per group per step.
A parameter tagged ``'row'`` (``mcore.roles``: a row-normalized router) is m spheres of shape
(1, n), radius 1, numbered consecutively; its local tensor's elements find their row through
``rows_of`` (ZeRO-1 cuts rows anywhere), and the row sums travel in the same all-reduce.
A fused QKV in ``qkv_splits`` (``split_qkv``) is one sphere per part (Q, K, V): Megatron interleaves
its rows per query group (each group: the Q rows, then K, then V), so a part is the union of its
row blocks over all groups and TP ranks; shape (num_groups * part rows, n), radius by the group's
mode on that shape, keys 'name[q]' / 'name[k]' / 'name[v]'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_hyperball.mcore.reduce import Reduction, all_reduce_partials_, group_size
from megatron_hyperball.mcore.roles import sphere_mode
from megatron_hyperball.optim.sphere import SphereIndex, matrix_shape

__all__ = ["MegatronSphereIndex", "full_shape", "build_index", "qkv_part_of_rows", "QKV_PARTS"]


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


#: names of the parts of a fused QKV, by number of parts (Megatron's split shapes; 4 with an output gate)
QKV_PARTS = {3: ("q", "k", "v"), 4: ("q", "gate", "k", "v")}


def qkv_part_of_rows(rows: torch.Tensor, split: list[int]) -> torch.Tensor:
    """The part (0 = Q, 1 = K, 2 = V, ...) of each full-matrix row of a fused QKV whose query groups
    each hold ``split`` rows per part, in order (Megatron's ``_get_qkv_split_shapes``)."""
    bounds = torch.tensor(split, dtype=torch.int64, device=rows.device).cumsum(0)
    return torch.bucketize(rows % int(bounds[-1]), bounds, right=True)


ROW_RADIUS = 1.0  # each row of a row-sphere matrix: a unit vector (seed 004's normalized router rows)


def build_index(spheres: list[torch.nn.Parameter], local: dict[torch.nn.Parameter, torch.Tensor],
                groups_of, device: torch.device, names: dict | None = None,
                rows_of=None, qkv_splits: dict | None = None) -> MegatronSphereIndex:
    """Number ``spheres`` (model params, in an order every rank of the groups shares).

    ``local`` maps a sphere's model param to the tensor this rank's optimizer updates (absent
    when this rank's slice is empty); ``groups_of(param) -> (dp_group, tp_group)``; ``names``:
    param -> its model name, the sphere's key in checkpointed hook state; ``rows_of(param, tensor)``:
    the full-matrix row (int64) of each element of a row-sphere param's local tensor (default: the
    tensor is the whole matrix); ``qkv_splits``: param -> its rows per part per query group, for a
    fused QKV whose parts are spheres of their own.
    """
    index, shapes, reductions, keys, several, radii = {}, [], [], [], {}, {}
    for p in spheres:
        dp_group, tp_group = groups_of(p)
        shape = full_shape(p, tp_group)
        reduction = Reduction(dp_group, tp_group, replicated_over_tp=not getattr(p, "tensor_model_parallel", False))
        name = names[p] if names is not None else None
        k = len(shapes)
        split = (qkv_splits or {}).get(p)
        if split is not None:
            m, n = shape
            groups, parts = m // sum(split), QKV_PARTS[len(split)]
            shapes += [(groups * rows, n) for rows in split]
            reductions += [reduction] * len(split)
            keys += [f"{name}[{part}]" for part in parts]
            if p in local:
                t = local[p]
                rows = (rows_of(p, t) if rows_of is not None
                        else torch.arange(m, device=t.device).repeat_interleave(n))
                index[id(t)] = k
                several[id(t)] = ((k + qkv_part_of_rows(rows, split)).to(device=t.device, dtype=torch.int64),
                                  list(range(k, k + len(split))))
            continue
        if sphere_mode(p) != "row":
            shapes.append(shape)
            reductions.append(reduction)
            keys.append(name)
            if p in local:
                index[id(local[p])] = k
            continue
        m, n = shape
        shapes += [(1, n)] * m
        reductions += [reduction] * m
        keys += [f"{name}[row {i}]" for i in range(m)]
        radii.update({k + i: ROW_RADIUS for i in range(m)})
        if p in local:
            t = local[p]
            rows = (rows_of(p, t) if rows_of is not None
                    else torch.arange(m, device=t.device).repeat_interleave(n))
            index[id(t)] = k
            several[id(t)] = ((k + rows).to(device=t.device, dtype=torch.int64), list(range(k, k + m)))
    return MegatronSphereIndex(index=index, shapes=shapes, device=device,
                               keys=keys if names is not None else None, reductions=reductions,
                               several=several, radii=radii)


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
