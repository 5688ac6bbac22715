"""Per-matrix-type weight norms and relative updates, logged through Megatron's writers.

Every ``metrics_interval`` iterations (and only then) Megatron's ``optimizer.step()`` is
bracketed: the optimizer's fp32 main copy of each weight matrix is copied just before the step
and compared with what the step leaves. Per matrix type the mean Frobenius norm ``||W||`` (after
the step) and the mean relative update ``||W_after - W_before|| / ||W_before||`` over all
matrices of that type are written, at the iteration number Megatron's own ``training_log``
uses, to Megatron's TensorBoard writer and W&B writer (which live on the last rank) under

    hyperball/weight_norm/<type>      hyperball/rel_update/<type>

with ``<type>`` one of ``roles.MATRIX_TYPES`` (a type without matrices in the model is not
written). On other iterations the step runs untouched (one integer comparison).

Norms are of whole matrices, from the fp32 main parameters the optimizer updates (not the bf16
model copy, whose rounding would swamp a relative update of 1e-3): with ZeRO-1 each
data-parallel rank holds a slice of each matrix, with the layer-wise optimizer one rank holds
the whole matrix, without a distributed optimizer every rank holds it. Each rank sums squares
over the elements it holds and ``mcore.reduce`` adds them up over the data-parallel group
(expert data-parallel for experts) and then TP, a copy held whole by several ranks counted once.
Each matrix enters the means once, and the per-type sums go through one all-reduce over all
ranks, which also gathers pipeline stages and expert-parallel ranks. Cost on a logging step: a
copy of this rank's fp32 main matrices, a few norms, three small all-reduces.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_hyperball.mcore import tree
from megatron_hyperball.mcore.reduce import Reduction, all_reduce_partials_, group_rank
from megatron_hyperball.mcore.roles import MATRIX_TYPES, role_of

__all__ = ["MATRIX_TYPES", "metric_names", "HyperballMetrics", "install"]


def metric_names(types: Iterable[str] = MATRIX_TYPES) -> list[str]:
    """The metric names written for ``types``."""
    return [f"hyperball/{m}/{t}" for t in types for m in ("weight_norm", "rel_update")]


class HyperballMetrics:
    """Brackets ``optimizer.step()`` on logging iterations; see the module doc."""

    def __init__(self, model_chunks, interval: int, optimizer=None):
        self.interval = int(interval)
        self.optimizer = optimizer
        self.params, self.kinds = [], []
        seen = set()
        for chunk in model_chunks:
            for name, p in chunk.named_parameters():
                kind = role_of(name, p).metric
                if kind is None or id(p) in seen:
                    continue
                seen.add(id(p))
                self.params.append(p)
                self.kinds.append(kind)
        # every rank must agree on the type list (pipeline stages hold different layers)
        present = torch.tensor([float(t in self.kinds) for t in MATRIX_TYPES], device=self._device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(present, op=dist.ReduceOp.MAX)
        self.types = [t for t, flag in zip(MATRIX_TYPES, present.tolist()) if flag > 0]
        self._before: Optional[list] = None
        self.last: dict[str, float] = {}

    def _device(self) -> torch.device:
        for p in self.params:
            return p.device
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    @staticmethod
    def next_iteration() -> int:
        """The iteration number ``training_log`` will use for the step about to run."""
        from megatron.training import get_args

        return int(getattr(get_args(), "curr_iteration", 0)) + 1

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    def _local(self) -> tuple[list[Optional[torch.Tensor]], list[Reduction]]:
        """This rank's fp32 main tensor of each matrix (None: it holds none) and how its partial
        sums add up to the whole matrix."""
        mains = tree.main_params(self.optimizer) if self.optimizer is not None else {}
        tensors, reductions = [], []
        for p in self.params:
            main = mains.get(p)
            if self.optimizer is None:  # the model params: every data-parallel rank holds them
                tensor, replicated = p, True
            else:
                tensor, replicated = (None, False) if main is None else (main.tensor, main.replicated_over_dp)
            tensors.append(tensor)
            reductions.append(Reduction(tree.dp_group_of(p), tree.tp_group_of(p), replicated_over_dp=replicated,
                                        replicated_over_tp=not getattr(p, "tensor_model_parallel", False)))
        return tensors, reductions

    @torch.no_grad()
    def before_step(self) -> None:
        self._before = [None if t is None else t.detach().clone() for t in self._local()[0]]

    @torch.no_grad()
    def after_step(self, iteration: int) -> dict[str, float]:
        before, self._before = self._before, None
        if before is None:
            return {}
        device = self._device()
        after, reductions = self._local()
        # per matrix: ||W_after||^2, ||dW||^2, ||W_before||^2 of this rank's elements, summed to the whole
        sq = torch.zeros(len(self.params), 3, dtype=torch.float64, device=device)
        for i, (new, old) in enumerate(zip(after, before)):
            if new is None or old is None or new.numel() == 0:
                continue
            new32, old32 = new.detach().float(), old.float()
            sq[i, 0] = new32.pow(2).sum()
            sq[i, 1] = (new32 - old32).pow(2).sum()
            sq[i, 2] = old32.pow(2).sum()
        del before
        all_reduce_partials_(sq, reductions)
        norms = sq.clamp_min(0).sqrt()
        # per type: [sum ||W||, sum ||dW||/||W||, count], each matrix once, then one world all-reduce
        stats = torch.zeros(len(self.types), 3, dtype=torch.float64, device=device)
        index = {t: k for k, t in enumerate(self.types)}
        for i, (kind, r) in enumerate(zip(self.kinds, reductions)):
            if group_rank(r.dp_group) != 0 or group_rank(r.tp_group) != 0:
                continue
            k = index[kind]
            stats[k, 0] += norms[i, 0]
            stats[k, 1] += norms[i, 1] / norms[i, 2].clamp_min(1e-30)
            stats[k, 2] += 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        values: dict[str, float] = {}
        for t, (w, rel, c) in zip(self.types, stats.tolist()):
            if c <= 0:
                continue
            values[f"hyperball/weight_norm/{t}"] = w / c
            values[f"hyperball/rel_update/{t}"] = rel / c
        self.last = values
        self.write(values, iteration)
        return values

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
