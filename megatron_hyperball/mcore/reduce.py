"""Partial sums of sharded matrices -> full sums: over data parallelism, then tensor parallelism.

A rank holds part of a matrix because ZeRO-1 gives it a flat slice (possibly empty) and because
TP splits rows or columns. Any additive quantity of the whole matrix (||W||^2, <W,u>, ||u||^2,
row sums of gain gradients) is the sum of the ranks' partials over the matrix's DP shard group,
then over its TP group. A copy that several ranks hold whole (a TP-replicated router, a matrix
every DP rank holds without ZeRO-1) must count once: only rank 0 of that group contributes.
Rows that share their groups travel together: one all-reduce per group per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["group_size", "group_rank", "Reduction", "all_reduce_partials_"]


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class Reduction:
    """How one matrix's partial sums add up: the groups, and over which one it is a replica."""

    dp_group: object = None
    tp_group: object = None
    replicated_over_dp: bool = False
    replicated_over_tp: bool = False


def all_reduce_partials_(partials: torch.Tensor, reductions: list[Reduction]) -> None:
    """In place: row i of ``partials`` becomes the full sum of matrix i (see module doc).

    Every rank of a group must call with the same rows for that group, in the same order,
    including rows whose local part is empty (zeros)."""
    sets: dict[tuple[int, int], tuple[Reduction, list[int]]] = {}
    for i, r in enumerate(reductions):
        sets.setdefault((id(r.dp_group), id(r.tp_group)), (r, []))[1].append(i)
    for r, rows in sets.values():
        dp, tp = group_size(r.dp_group) > 1, group_size(r.tp_group) > 1
        if not (dp or tp):
            continue
        whole = len(rows) == partials.shape[0]
        part = partials if whole else partials[rows]
        drop = [k for k, i in enumerate(rows)
                if (dp and reductions[i].replicated_over_dp and group_rank(r.dp_group) != 0)
                or (tp and reductions[i].replicated_over_tp and group_rank(r.tp_group) != 0)]
        if drop:
            part[drop] = 0
        for group in (r.dp_group, r.tp_group):
            if group_size(group) > 1:
                dist.all_reduce(part, group=group)
        if not whole:
            partials[rows] = part
