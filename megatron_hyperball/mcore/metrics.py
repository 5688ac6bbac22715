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
Each matrix enters the means once, and the per-type sums go through one all-gather over all
ranks, which also gathers pipeline stages and expert-parallel ranks. Cost on a logging step: a
copy of this rank's fp32 main matrices, a few norms, the partial-sum all-reduce of each
(DP, TP) group pair and one small all-gather.

Magnitude-direction optimizers (AdamMD / MuonMD: W = diag(g_row) V diag(g_col), the gains in the
optimizer's ``md_hook``) add, per matrix type with gains,

    hyperball/direction_norm/<type>        mean ||V|| after the step (stays at the sphere radius)
    hyperball/direction_rel_update/<type>  mean ||V_after - V_before|| / ||V_before|| (the lr, seed 004)
    hyperball/gain_mean/<type>             mean of every gain entry (row, column or scalar gains)
    hyperball/gain_min/<type>, hyperball/gain_max/<type>

V on this rank's elements is W / (g_row g_col^T) with the gains before / after the step, placed by
the hook's layout (``mcore.coords`` blocks); its squared sums ride in the same partial-sum rows as
W's. Every rank that numbers a sphere holds its full gain vectors (identical values), so the gain
sums are replicas (counted once per DP / TP group, the layer-wise owner alone), and min / max are
taken over the all-gathered per-type rows. The step right after a checkpoint load, before the
hook has placed the loaded gains, reports no direction metrics.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_hyperball.mcore import tree
from megatron_hyperball.mcore.reduce import Reduction, all_reduce_partials_, group_rank
from megatron_hyperball.mcore.roles import MATRIX_TYPES, role_of
from megatron_hyperball.mcore.sphere_index import sphere_keys

__all__ = ["MATRIX_TYPES", "MD_METRICS", "metric_names", "HyperballMetrics", "install"]

#: Metrics of the magnitude-direction optimizers, per matrix type with gains.
MD_METRICS = ("direction_norm", "direction_rel_update", "gain_mean", "gain_min", "gain_max")


def metric_names(types: Iterable[str] = MATRIX_TYPES, md_types: Iterable[str] = ()) -> list[str]:
    """The metric names written for ``types`` (and, with gains, ``md_types``)."""
    return ([f"hyperball/{m}/{t}" for t in types for m in ("weight_norm", "rel_update")]
            + [f"hyperball/{m}/{t}" for t in md_types for m in MD_METRICS])


class _Gains:
    """Where one matrix's gains live: the MD hook of a leaf, its sphere index and number."""

    def __init__(self, hook, index, k: int, replicated_over_dp: bool):
        self.hook, self.index, self.k = hook, index, k
        self.replicated_over_dp = replicated_over_dp  # every DP rank of the group holds them (not layer-wise)

    def values(self, snapshot: dict) -> Optional[dict]:
        """{side: gains} of this matrix in ``snapshot`` (:func:`_gain_snapshot`); None when its hook
        holds no placed gains (before its first step after a load)."""
        return snapshot.get(id(self.hook), {}).get(self.index.key(self.k))

    def vectors(self, snapshot: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(g_row, g_col) full float32 vectors (ones where the mode has none), or None."""
        values = self.values(snapshot)
        if values is None:
            return None
        m, n = self.index.shapes[self.k]
        one = next(iter(values.values()))
        if "scalar" in values:
            return values["scalar"].float().expand(m), torch.ones(n, dtype=torch.float32, device=one.device)
        g_row = values["row"].float() if "row" in values else torch.ones(m, dtype=torch.float32, device=one.device)
        g_col = values["col"].float() if "col" in values else torch.ones(n, dtype=torch.float32, device=one.device)
        return g_row, g_col

    def entries(self, snapshot: dict) -> torch.Tensor:
        """Every gain value of the matrix, flat."""
        values = self.values(snapshot)
        return torch.cat([v.reshape(-1).float() for v in values.values()]) if values else torch.zeros(0)

    def blocks(self, tensor: torch.Tensor):
        """The full-matrix rectangles of this rank's local tensor (the hook's layout)."""
        layout = self.hook.layout
        blocks = None if layout is None else layout(self.index, tensor, self.k)
        if blocks is None:
            m, n = self.index.shapes[self.k]
            return [_Block(0, 0, m, n, 0)]
        return blocks


class _Block:
    def __init__(self, row, col, rows, cols, offset):
        self.row, self.col, self.rows, self.cols, self.offset = row, col, rows, cols, offset


def _gain_snapshot(gains: Iterable[Optional[_Gains]]) -> dict:
    """{id(hook): {sphere key: {side: gains}}}: the current gains of every hook, read once."""
    out = {}
    for g in gains:
        if g is not None and id(g.hook) not in out:
            out[id(g.hook)] = g.hook.gain_values(g.index)
    return out


def _md_gains(optimizer, param_names: dict) -> dict:
    """model param -> :class:`_Gains` for every matrix an MD hook on this rank numbers."""
    if optimizer is None:
        return {}
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    layer_wise = {id(leaf) for node in tree.nodes(optimizer) if isinstance(node, LayerWiseDistributedOptimizer)
                  for leaf in tree.leaves(node)}
    by_key = {}
    for leaf in tree.leaves(optimizer):
        torch_opt = tree.inner(leaf)
        hook = getattr(torch_opt, "md_hook", None)
        index = getattr(torch_opt, "sphere_index", None)
        index = index() if callable(index) else index
        if hook is None or not getattr(hook, "sides", ()) or index is None:
            continue
        for k in range(index.num_spheres):
            by_key[index.key(k)] = _Gains(hook, index, k, replicated_over_dp=id(leaf) not in layer_wise)
    return {p: by_key[name] for p, name in param_names.items() if name in by_key}


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
        # magnitude-direction gains of each matrix (None: plain sphere / Adam matrix)
        md = _md_gains(optimizer, sphere_keys(model_chunks))  # the sphere index's keys
        self.gains: list[Optional[_Gains]] = [md.get(p) for p in self.params]
        present_md = [float(any(g is not None for g, k in zip(self.gains, self.kinds) if k == t))
                      for t in MATRIX_TYPES]
        # every rank must agree on the type lists (pipeline stages hold different layers)
        present = torch.tensor([float(t in self.kinds) for t in MATRIX_TYPES] + present_md, device=self._device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(present, op=dist.ReduceOp.MAX)
        flags = present.tolist()
        self.types = [t for t, flag in zip(MATRIX_TYPES, flags) if flag > 0]
        self.md_types = [t for t, flag in zip(MATRIX_TYPES, flags[len(MATRIX_TYPES):]) if flag > 0]
        self._before: Optional[list] = None
        self._gains_before: Optional[list] = None
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
        snapshot = _gain_snapshot(self.gains)
        self._gains_before = [None if g is None else g.vectors(snapshot) for g in self.gains]

    @staticmethod
    def _direction_sq(g: _Gains, new: torch.Tensor, old: torch.Tensor, after, before) -> torch.Tensor:
        """[||V_after||^2, ||dV||^2, ||V_before||^2] over this rank's elements: V = W / (g_row g_col^T)."""
        out = torch.zeros(3, dtype=torch.float64, device=new.device)
        flat_new, flat_old = new.detach().reshape(-1), old.reshape(-1)
        for b in g.blocks(new):
            n_el = b.rows * b.cols
            if n_el == 0:
                continue
            rows, cols = slice(b.row, b.row + b.rows), slice(b.col, b.col + b.cols)
            v_new = flat_new[b.offset: b.offset + n_el].view(b.rows, b.cols).double() / torch.outer(
                after[0][rows], after[1][cols]).double()
            v_old = flat_old[b.offset: b.offset + n_el].view(b.rows, b.cols).double() / torch.outer(
                before[0][rows], before[1][cols]).double()
            out += torch.stack([v_new.pow(2).sum(), (v_new - v_old).pow(2).sum(), v_old.pow(2).sum()])
        return out

    @torch.no_grad()
    def after_step(self, iteration: int) -> dict[str, float]:
        before, self._before = self._before, None
        gains_before, self._gains_before = self._gains_before, None
        if before is None:
            return {}
        device = self._device()
        after, reductions = self._local()
        n = len(self.params)
        # rows 0..n-1, per matrix: ||W_after||^2, ||dW||^2, ||W_before||^2, ||V_after||^2, ||dV||^2,
        # ||V_before||^2, measured (1 when V's were) of this rank's elements, summed to the whole matrix;
        # rows n..2n-1: [sum g, count g, min g, max g] of its gains, held whole by one rank per group
        sq = torch.zeros(2 * n, 7, dtype=torch.float64, device=device)
        gain_reductions = []
        snapshot = _gain_snapshot(self.gains)
        for i, (new, old, g, r) in enumerate(zip(after, before, self.gains, reductions)):
            gain_reductions.append(Reduction(r.dp_group, r.tp_group, replicated_over_dp=bool(
                g is not None and g.replicated_over_dp), replicated_over_tp=True))
            if g is not None:
                entries = g.entries(snapshot)
                if entries.numel():
                    sq[n + i, :4] = torch.stack([entries.double().sum(), torch.tensor(float(entries.numel())),
                                                 entries.min().double(), entries.max().double()])
            if new is None or old is None or new.numel() == 0:
                continue
            new32, old32 = new.detach().float(), old.float()
            sq[i, 0] = new32.pow(2).sum()
            sq[i, 1] = (new32 - old32).pow(2).sum()
            sq[i, 2] = old32.pow(2).sum()
            vectors = g.vectors(snapshot) if g is not None else None
            if vectors is not None and gains_before[i] is not None:
                sq[i, 3:6] = self._direction_sq(g, new, old, vectors, gains_before[i])
                sq[i, 6] = 1.0
        del before
        all_reduce_partials_(sq, reductions + gain_reductions)
        norms = sq[:n, :6].clamp_min(0).sqrt()
        # per type: [sum ||W||, sum ||dW||/||W||, count, sum ||V||, sum ||dV||/||V||, count V,
        # sum g, count g, -min g, max g], each matrix once, then one all-gather over the world
        stats = torch.zeros(len(self.types), 10, dtype=torch.float64, device=device)
        stats[:, 8:] = -math.inf
        index = {t: k for k, t in enumerate(self.types)}
        for i, (kind, r) in enumerate(zip(self.kinds, reductions)):
            if group_rank(r.dp_group) != 0 or group_rank(r.tp_group) != 0:
                continue
            k = index[kind]
            stats[k, 0] += norms[i, 0]
            stats[k, 1] += norms[i, 1] / norms[i, 2].clamp_min(1e-30)
            stats[k, 2] += 1
            # after the reduction every rank of the groups has the sums, the owner of the gains or not
            if sq[i, 6] > 0:
                stats[k, 3] += norms[i, 3]
                stats[k, 4] += norms[i, 4] / norms[i, 5].clamp_min(1e-30)
                stats[k, 5] += 1
            g_sum, g_count, g_min, g_max = sq[n + i, :4].tolist()
            if g_count > 0:
                stats[k, 6] += g_sum
                stats[k, 7] += g_count
                stats[k, 8] = max(stats[k, 8].item(), -g_min)
                stats[k, 9] = max(stats[k, 9].item(), g_max)
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, stats)
            every = torch.stack(gathered)
            stats = torch.cat([every[..., :8].sum(0), every[..., 8:].amax(0)], dim=-1)
        values: dict[str, float] = {}
        for t, (w, rel, c, v, vrel, vc, gs, gc, neg_min, gmax) in zip(self.types, stats.tolist()):
            if c <= 0:
                continue
            values[f"hyperball/weight_norm/{t}"] = w / c
            values[f"hyperball/rel_update/{t}"] = rel / c
            if vc > 0:
                values[f"hyperball/direction_norm/{t}"] = v / vc
                values[f"hyperball/direction_rel_update/{t}"] = vrel / vc
            if gc > 0:
                values[f"hyperball/gain_mean/{t}"] = gs / gc
                values[f"hyperball/gain_min/{t}"] = -neg_min
                values[f"hyperball/gain_max/{t}"] = gmax
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
