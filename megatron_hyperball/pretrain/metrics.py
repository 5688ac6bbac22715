"""Per-matrix-type weight norms and relative updates, logged through Megatron's writers.

Every ``metrics_interval`` iterations (and only then) Megatron's ``optimizer.step()`` is
bracketed: the optimizer's fp32 main copy of each weight matrix is copied just before the step
and compared with what the step leaves. Per matrix type the mean Frobenius norm ``||W||`` (after
the step) and the mean relative update ``||W_after - W_before|| / ||W_before||`` over all
matrices of that type are written, at the iteration number Megatron's own ``training_log``
uses, to Megatron's TensorBoard writer and W&B writer (which live on the last rank) under

    hyperball/weight_norm/<type>      hyperball/rel_update/<type>

with ``<type>`` one of :data:`MATRIX_TYPES` (a type without matrices in the model is not
written). On other iterations the step runs untouched (one integer comparison).

Norms are of whole matrices, from the fp32 main parameters the optimizer updates (not the bf16
model copy, whose rounding would swamp a relative update of 1e-3): with ZeRO-1 each
data-parallel rank holds a slice of each matrix, with the layer-wise optimizer one rank holds
the whole matrix, without a distributed optimizer every rank holds it. Each rank sums squares
over the elements it holds and the sums go through one all-reduce over the data-parallel group
(expert data-parallel for experts), normalised by how many copies were summed; a tensor-parallel
shard's squares are then summed over its TP group (a TP-replicated matrix counts once). Each
matrix enters the means once, and the per-type sums go through one all-reduce over all ranks,
which also gathers pipeline stages and expert-parallel ranks. Cost on a logging step: a copy of
this rank's fp32 main matrices, a few norms, three small all-reduces.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["MATRIX_TYPES", "metric_names", "matrix_type", "HyperballMetrics", "install"]

#: Matrix types, in logging order.
MATRIX_TYPES = ("qkv", "proj", "fc1", "fc2", "router", "expert_fc1", "expert_fc2", "output", "embedding")

_RULES = (
    ("embedding", re.compile(r"(^|\.)embedding\.(word|position)_embeddings\.weight$")),
    ("output", re.compile(r"(^|\.)output_layer\.weight$")),
    ("router", re.compile(r"\.router\.weight$")),
    ("expert_fc1", re.compile(r"\.experts\..*linear_fc1\.weight\d*$")),
    ("expert_fc2", re.compile(r"\.experts\..*linear_fc2\.weight\d*$")),
    ("qkv", re.compile(r"\.(linear_qkv|linear_q_proj|linear_kv_down_proj|linear_kv_up_proj|"
                       r"linear_q_down_proj|linear_q_up_proj)\.weight$")),
    ("proj", re.compile(r"\.self_attention\.linear_proj\.weight$")),
    # dense MLP and shared experts
    ("fc1", re.compile(r"\.linear_fc1\.weight$")),
    ("fc2", re.compile(r"\.linear_fc2\.weight$")),
)


def matrix_type(name: str, param: torch.Tensor) -> Optional[str]:
    """The type of a 2-D parameter from its Megatron name ('qkv', 'fc1', ...), else None."""
    if param.dim() != 2:
        return None
    for kind, pattern in _RULES:
        if pattern.search(name):
            return kind
    return None


def metric_names(types: Iterable[str] = MATRIX_TYPES) -> list[str]:
    """The metric names written for ``types``."""
    return [f"hyperball/{m}/{t}" for t in types for m in ("weight_norm", "rel_update")]


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class _Tracked:
    __slots__ = ("param", "kind", "tp_group", "dp_group", "owner", "replicated_over_tp")

    def __init__(self, param, kind, tp_group, dp_group, owner, replicated_over_tp):
        self.param = param
        self.kind = kind
        self.tp_group = tp_group
        self.dp_group = dp_group
        self.owner = owner
        self.replicated_over_tp = replicated_over_tp


def _leaves(optimizer):
    subs = getattr(optimizer, "chained_optimizers", None)
    if subs is None:
        yield optimizer
        return
    for sub in subs:
        yield from _leaves(sub)


def _main_tensors(optimizer) -> dict:
    """model param -> the fp32 tensor the optimizer updates for it on this rank (a ZeRO-1 shard,
    a layer-wise owner's whole fp32 copy, or the param itself); absent where this rank holds none."""
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params

    mapping = {}
    if optimizer is None:
        return mapping
    for leaf in _leaves(optimizer):
        if getattr(leaf, "is_stub_optimizer", False):
            continue
        if isinstance(leaf, DistributedOptimizer):
            pairs = [zip(m, s) for m, s in zip(leaf.model_float16_groups, leaf.shard_fp32_from_float16_groups)]
            pairs += [zip(m, s) for m, s in zip(leaf.model_fp32_groups, leaf.shard_fp32_groups)]
        elif isinstance(leaf, Float16OptimizerWithFloat16Params):
            pairs = [zip(m, s) for m, s in zip(leaf.float16_groups, leaf.fp32_from_float16_groups)]
            pairs += [((p, p) for p in group) for group in leaf.fp32_from_fp32_groups]
        else:  # FP32Optimizer or a raw torch optimizer: the model params themselves
            inner = getattr(leaf, "optimizer", leaf)
            pairs = [((p, p) for p in group["params"]) for group in inner.param_groups]
        for it in pairs:
            mapping.update(it)
    return mapping


class HyperballMetrics:
    """Brackets ``optimizer.step()`` on logging iterations; see the module doc."""

    def __init__(self, model_chunks, interval: int, optimizer=None):
        from megatron.core import parallel_state as ps

        self.interval = int(interval)
        self.optimizer = optimizer
        self.tracked: list[_Tracked] = []
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        expt_dp_rank = ps.get_expert_data_parallel_rank()
        expt_dp_group = ps.get_expert_data_parallel_group(check_initialized=False) or dp_group
        tp_group = ps.get_tensor_model_parallel_group()
        expt_tp_group = ps.get_expert_tensor_parallel_group(check_initialized=False) or tp_group
        seen = set()
        for chunk in model_chunks:
            for name, p in chunk.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                kind = matrix_type(name, p)
                if kind is None:
                    continue
                expert = not getattr(p, "allreduce", True)
                group = expt_tp_group if expert else tp_group
                owner = (expt_dp_rank if expert else dp_rank) == 0 and _group_rank(group) == 0
                replicated = not getattr(p, "tensor_model_parallel", False)
                self.tracked.append(_Tracked(p, kind, group, expt_dp_group if expert else dp_group, owner,
                                             replicated))
        self.types = [t for t in MATRIX_TYPES if any(tr.kind == t for tr in self.tracked)]
        # every rank must agree on the type list (pipeline stages hold different layers)
        present = torch.tensor([float(t in self.types) for t in MATRIX_TYPES], device=self._device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(present, op=dist.ReduceOp.MAX)
        self.types = [t for t, flag in zip(MATRIX_TYPES, present.tolist()) if flag > 0]
        self._before: Optional[list] = None
        self.last: dict[str, float] = {}

    def _device(self) -> torch.device:
        for tr in self.tracked:
            return tr.param.device
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    @staticmethod
    def next_iteration() -> int:
        """The iteration number ``training_log`` will use for the step about to run."""
        from megatron.training import get_args

        return int(getattr(get_args(), "curr_iteration", 0)) + 1

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    def _local(self) -> list[Optional[torch.Tensor]]:
        mains = _main_tensors(self.optimizer)
        if not mains:  # no optimizer given: the model params (every data-parallel rank holds them)
            return [tr.param for tr in self.tracked]
        return [mains.get(tr.param) for tr in self.tracked]

    @torch.no_grad()
    def before_step(self) -> None:
        self._before = [None if t is None else t.detach().clone() for t in self._local()]

    @torch.no_grad()
    def after_step(self, iteration: int) -> dict[str, float]:
        before, self._before = self._before, None
        if before is None:
            return {}
        device = self._device()
        n = len(self.tracked)
        # per matrix: ||W_after||^2, ||dW||^2, ||W_before||^2 of this rank's elements, and their count
        sq = torch.zeros(n, 4, dtype=torch.float64, device=device)
        for i, (new, old) in enumerate(zip(self._local(), before)):
            if new is None or old is None or new.numel() == 0:
                continue
            new32, old32 = new.detach().float(), old.float()
            sq[i, 0] = new32.pow(2).sum()
            sq[i, 1] = (new32 - old32).pow(2).sum()
            sq[i, 2] = old32.pow(2).sum()
            sq[i, 3] = new.numel()
        del before
        # data parallel: ZeRO-1 shards / layer-wise owners sum to the whole (TP-local) matrix; a copy
        # held by every rank is counted dp times, so divide by (elements held) / (elements in it)
        self._reduce(sq, lambda tr: tr.dp_group, replicated=None)
        numel = torch.tensor([float(tr.param.numel()) for tr in self.tracked], dtype=torch.float64, device=device)
        copies = (sq[:, 3] / numel).clamp_min(1.0)
        sq[:, :3] /= copies.unsqueeze(1)
        # tensor parallel: partial squares of a split matrix add up; a replicated one counts once
        self._reduce(sq, lambda tr: tr.tp_group, replicated=lambda tr: tr.replicated_over_tp)
        norms = sq[:, :3].clamp_min(0).sqrt()
        # per type: [sum ||W||, sum ||dW||/||W||, count], each matrix once, then one world all-reduce
        stats = torch.zeros(len(self.types), 3, dtype=torch.float64, device=device)
        index = {t: k for k, t in enumerate(self.types)}
        for i, tr in enumerate(self.tracked):
            if not tr.owner:
                continue
            k = index[tr.kind]
            stats[k, 0] += norms[i, 0]
            stats[k, 1] += norms[i, 1] / norms[i, 2].clamp_min(1e-30)
            stats[k, 2] += 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        values: dict[str, float] = {}
        for t, (w, r, c) in zip(self.types, stats.tolist()):
            if c <= 0:
                continue
            values[f"hyperball/weight_norm/{t}"] = w / c
            values[f"hyperball/rel_update/{t}"] = r / c
        self.last = values
        self.write(values, iteration)
        return values

    def _reduce(self, sq: torch.Tensor, group_of, replicated) -> None:
        """Sum rows of ``sq`` over each tracked matrix's group (in place)."""
        by_group: dict[int, tuple[object, list[int]]] = {}
        for i, tr in enumerate(self.tracked):
            group = group_of(tr)
            if _group_size(group) > 1:
                by_group.setdefault(id(group), (group, []))[1].append(i)
        for group, rows in by_group.values():
            idx = torch.tensor(rows, device=sq.device)
            part = sq.index_select(0, idx)
            if replicated is not None and _group_rank(group) != 0:
                mask = torch.tensor([replicated(self.tracked[i]) for i in rows], device=sq.device)
                part[mask] = 0
            dist.all_reduce(part, group=group)
            sq.index_copy_(0, idx, part)

    @staticmethod
    def write(values: dict[str, float], iteration: int) -> None:
        """To Megatron's TensorBoard and W&B writers (present on the last rank only)."""
        from megatron.training import get_tensorboard_writer, get_wandb_writer

        tb = get_tensorboard_writer()
        wandb_writer = get_wandb_writer()
        if tb is not None:
            for key, value in values.items():
                tb.add_scalar(key, value, iteration)
        if wandb_writer is not None and values:
            wandb_writer.log(dict(values), iteration)

    def wrap(self, optimizer) -> None:
        """Make ``optimizer.step()`` measure on logging iterations."""
        inner_step = optimizer.step

        def step(*args, **kwargs):
            iteration = self.next_iteration()
            if not self.due(iteration):
                return inner_step(*args, **kwargs)
            self.before_step()
            result = inner_step(*args, **kwargs)
            self.after_step(iteration)
            return result

        step.__wrapped__ = inner_step
        optimizer.step = step
        optimizer.hyperball_metrics = self


def install(optimizer, model_chunks, interval: int) -> HyperballMetrics:
    """Attach :class:`HyperballMetrics` to a built Megatron optimizer; returns it."""
    metrics = HyperballMetrics(model_chunks, interval, optimizer)
    metrics.wrap(optimizer)
    return metrics
