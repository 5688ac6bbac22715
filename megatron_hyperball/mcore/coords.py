"""Where a rank's local tensor of a matrix sits in the full matrix: the one place that knows.

A rank holds part of a weight matrix W (viewed as out x everything-else, ``sphere.matrix_shape``)
because tensor parallelism splits it along ``partition_dim`` (rank t holds the t-th equal chunk,
as Megatron's TP gather concatenates them; fused QKV is therefore in Megatron's own TP-concatenated
row order, which does not depend on the TP size) and because ZeRO-1 gives the rank a flat slice ``[start, end)`` of its
TP shard's row-major elements (possibly empty, cutting rows anywhere).

Such a local tensor is a run of at most three rectangles of the full matrix, each stored
contiguously and row-major in the local tensor: a partial first row, whole rows, a partial last
row. :func:`local_blocks` returns them (no per-element memory: what the gains hook uses);
:func:`element_coords` expands them to the full-matrix (row, col) of every local element (for
code that wants per-element indices, e.g. per-row router spheres).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Block", "local_blocks", "element_coords", "param_blocks"]


@dataclass(frozen=True)
class Block:
    """Rows [row, row + rows) x cols [col, col + cols) of the full matrix, stored row-major at
    local flat elements [offset, offset + rows * cols)."""

    row: int
    col: int
    rows: int
    cols: int
    offset: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def local_blocks(
    full_shape: Sequence[int],
    local_shape: Optional[Sequence[int]] = None,
    partition_dim: Optional[int] = None,
    tp_rank: int = 0,
    flat_range: Optional[tuple[int, int]] = None,
) -> list[Block]:
    """The full-matrix rectangles of a local tensor, in local order.

    full_shape:    the whole (TP-gathered) tensor's shape, any rank >= 1; the matrix is
                   (full_shape[0], prod(full_shape[1:])).
    local_shape:   this rank's TP shard's shape (None: not TP-split, the full shape).
    partition_dim: the TP split dimension (0: rows, column-parallel; 1: columns, row-parallel);
                   None when not split. Splits along dim >= 2 are not contiguous in the matrix
                   view and are refused.
    tp_rank:       which chunk along ``partition_dim`` this rank holds.
    flat_range:    (start, end) of the TP shard's flattened elements this rank holds (ZeRO-1's
                   ``param_range_map['param']``); None: all of them.
    """
    full = [int(s) for s in full_shape] or [1]
    local = list(full) if local_shape is None else ([int(s) for s in local_shape] or [1])
    rest = math.prod(full[2:]) if len(full) > 2 else 1
    row_off = col_off = 0
    m_loc = local[0]
    n_loc = math.prod(local[1:]) if len(local) > 1 else 1
    if partition_dim is not None and local != full:
        if partition_dim == 0:
            row_off = tp_rank * local[0]
        elif partition_dim == 1:
            col_off = tp_rank * local[1] * rest
        else:
            raise NotImplementedError(
                f"a tensor split along dim {partition_dim} (shape {tuple(local)} of {tuple(full)}) is not "
                f"contiguous in the out x rest matrix view; only dims 0 and 1 are supported")
    start, end = (0, m_loc * n_loc) if flat_range is None else (int(flat_range[0]), int(flat_range[1]))
    if not 0 <= start <= end <= m_loc * n_loc:
        raise ValueError(f"flat_range {flat_range} outside a local tensor of {m_loc * n_loc} elements")
    blocks: list[Block] = []
    if start == end:
        return blocks
    r_s, c_s = divmod(start, n_loc)
    r_e, c_e = divmod(end, n_loc)
    offset = 0

    def add(r, c, nr, nc):
        nonlocal offset
        blocks.append(Block(row_off + r, col_off + c, nr, nc, offset))
        offset += nr * nc

    if r_s == r_e:                     # inside one row
        add(r_s, c_s, 1, c_e - c_s)
        return blocks
    if c_s > 0:                        # a partial first row
        add(r_s, c_s, 1, n_loc - c_s)
        r_s += 1
    if r_e > r_s:                      # whole rows
        add(r_s, 0, r_e - r_s, n_loc)
    if c_e > 0:                        # a partial last row
        add(r_e, 0, 1, c_e)
    return blocks


def element_coords(*args, device=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols): int64 full-matrix row and column of every local element, in local flat
    order; same arguments as :func:`local_blocks`."""
    rows, cols = [], []
    for b in local_blocks(*args, **kwargs):
        r = torch.arange(b.row, b.row + b.rows, device=device)
        c = torch.arange(b.col, b.col + b.cols, device=device)
        rows.append(r.repeat_interleave(b.cols))
        cols.append(c.repeat(b.rows))
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    return torch.cat(rows), torch.cat(cols)


def param_blocks(model_param: torch.nn.Parameter, tp_size: int, tp_rank: int,
                 flat_range: Optional[tuple[int, int]] = None, gated: bool = False) -> list[Block]:
    """:func:`local_blocks` of a Megatron model parameter (its ``tensor_model_parallel`` /
    ``partition_dim`` attributes) and, under ZeRO-1, this rank's ``flat_range`` of it.

    ``gated``: a gated-linear-unit fc1 (SwiGLU), whose TP shard t is [gate rows of t; up rows of t].
    Its rows are placed in the TP-independent order [all gate rows; all up rows] (Megatron's own
    checkpoint order for it, ``apply_swiglu_sharded_factory``), so per-row state such as MD's row
    gains means the same rows at any TP size; the TP-gathered order would interleave the halves by
    rank and a checkpoint resumed at another TP size would permute them."""
    local = list(model_param.shape)
    full = list(local)
    dim = None
    if tp_size > 1 and getattr(model_param, "tensor_model_parallel", False):
        dim = int(model_param.partition_dim)
        full[dim] *= tp_size
    if not (gated and dim == 0):
        return local_blocks(full, local, dim, tp_rank, flat_range)
    if local[0] % 2:
        raise ValueError(f"a gated fc1 shard of shape {tuple(local)} has an odd number of rows (not [gate; up])")
    half_local, half_full = [local[0] // 2, *local[1:]], [full[0] // 2, *full[1:]]
    n_half = math.prod(half_local)
    start, end = (0, 2 * n_half) if flat_range is None else (int(flat_range[0]), int(flat_range[1]))
    blocks: list[Block] = []
    for part in (0, 1):  # gate rows, then up rows: the local halves, at rows part * (m / 2) of the full order
        lo, hi = max(start - part * n_half, 0), min(end - part * n_half, n_half)
        if lo >= hi:
            continue
        for b in local_blocks(half_full, half_local, 0, tp_rank, (lo, hi)):
            blocks.append(Block(b.row + part * half_full[0], b.col, b.rows, b.cols,
                                b.offset + max(part * n_half - start, 0)))
    return blocks
