"""Magnitude-Direction decoupling (MD; Hägele, Kosson et al., seed 004) as a SphereHook.

The model holds the fused weight W; the optimizer keeps learnable gains and splits every step:

    W = diag(g_row) V diag(g_col),   g = softplus(raw) ('direct': g = raw),  raw initialised so g = 1
    V      = W / (g_row g_col^T)                                 recover the direction (pre_update)
    P      = V * G
    grad_g_row[i] = sum_j P[i,j] g_col[j]                        gain gradients: local partial sums,
    grad_g_col[j] = sum_i P[i,j] g_row[i]                        reduced as extra columns (partials)
    G_V    = G * (g_row g_col^T)                                 direction gradient (replaces batch.grads)
    V'     = sphere step of V with G_V                           base optimizer + SphereRetraction
    raw'   = Adam(raw, grad_g * dg/draw)                         own lr, no weight decay (post_update)
    W      = V' * (g_row' g_col'^T)                              reassemble (post_update)

dg/draw is sigmoid(raw) for softplus, 1 for 'direct'. Gain modes: ``row_col`` (both), ``row``,
``col``, ``scalar`` (one gain per matrix, grad = sum P), ``none`` (the hook does nothing: AdamH/MuonH).
The gains' Adam takes ``betas`` / ``eps`` (AdamMD: its own; MuonMD: gain_betas / gain_eps) and lr
``gain_lr`` times the schedule factor lr / initial_lr (torch schedulers) or lr / max_lr
(Megatron's param groups) of the matrix's param group.

State: the gains are per *sphere*, not per local tensor, and live in the hook: full vectors
(length m and n) for every sphere the ``SphereIndex`` numbers, padded side by side into one
(num_spheres, width) tensor per quantity (raw, exp_avg, exp_avg_sq) and stepped together from the
reduced sums. Every rank that numbers a sphere (a ZeRO-1 rank whose slice is empty included)
steps the same numbers, so the gains are identical on all of them and checkpoint like the held
radius: in the hook's ``state_dict`` (keyed by ``index.key(k)``), which travels in the param
groups. A sphere takes part in a step when some rank has its gradient: a count column says so,
and an lr column carries the group's gain lr (sum / count after the reduction).

Shards: by default a sphere tensor is the whole matrix (viewed as out x everything else). A
distributed adapter passes ``layout(index, param, k) -> blocks``: the rectangles of the full matrix
the local tensor holds, each contiguous and row-major in it (objects with ``row, col, rows, cols,
offset``, as ``mcore.coords.local_blocks`` makes), or None for a whole matrix.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from megatron_hyperball.names import DEFAULT_GAIN_LR, GAIN_MODES, GAIN_PARAMETRIZATIONS, check_gain_options  # noqa: F401
from megatron_hyperball.optim.hooks import SphereBatch, SphereHook

if TYPE_CHECKING:
    from megatron_hyperball.optim.sphere import SphereIndex

SOFTPLUS_ONE = math.log(math.expm1(1.0))  # softplus(raw) = 1; exactly 1.0 in float32 as well

Layout = Callable[["SphereIndex", torch.Tensor, int], Optional[Sequence[Any]]]

#: the option that lets a checkpoint without gains load (gains start at 1)
ALLOW_MISSING = "md_allow_missing_gains"
_QUANTITIES = ("raw", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class _Whole:
    """The whole m x n matrix as one block (the same fields as ``mcore.coords.Block``)."""

    rows: int
    cols: int
    row: int = 0
    col: int = 0
    offset: int = 0


class MagnitudeDirectionHook(SphereHook):
    """W = diag(g_row) V diag(g_col) around the sphere step of V (module doc)."""

    def __init__(
        self,
        gains: str = "row_col",
        gain_parametrization: str = "softplus",
        gain_lr: float = DEFAULT_GAIN_LR,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        layout: Layout | None = None,
        allow_missing_gains: bool = False,
    ) -> None:
        check_gain_options(gains, gain_parametrization, gain_lr)
        if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"MagnitudeDirection: gain betas={betas!r}; allowed: each in [0, 1)")
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0.0 < eps < math.inf):
            raise ValueError(f"MagnitudeDirection: gain eps={eps!r}; allowed: a positive finite number")
        self.gains = gains
        self.parametrization = gain_parametrization
        self.gain_lr = float(gain_lr)
        self.betas, self.eps, self.layout = (float(betas[0]), float(betas[1])), float(eps), layout
        self.allow_missing_gains = bool(allow_missing_gains)
        self.sides = {"row_col": ("row", "col"), "row": ("row",), "col": ("col",),
                      "scalar": ("scalar",), "none": ()}[gains]
        # per sphere, padded side by side: (num_spheres, width), float32; steps: (num_spheres,) float64
        self.raw = self.exp_avg = self.exp_avg_sq = self.steps = None
        self._built_for: tuple | None = None   # (keys, shapes) the tensors above belong to
        self._offsets: dict[str, int] = {}
        self._width = 0
        self._loaded: dict[str, dict] = {}      # checkpointed per-sphere state not yet placed
        self._cols: torch.Tensor | None = None
        self._blocks: list = []

    # -- gains --------------------------------------------------------------------------------
    def raw_init(self) -> float:
        return SOFTPLUS_ONE if self.parametrization == "softplus" else 1.0

    def gain(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(raw) if self.parametrization == "softplus" else raw

    def gain_derivative(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw) if self.parametrization == "softplus" else torch.ones_like(raw)

    def _lengths(self, shape: tuple[int, int]) -> dict[str, int]:
        return {"row": shape[0], "col": shape[1], "scalar": 1}

    def _vectors(self, gains: torch.Tensor, k: int, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_row, g_col) of sphere k as full vectors of length m and n (ones where the mode has none)."""
        m, n = shape
        row = gains[k]
        if self.gains == "scalar":
            o = self._offsets["scalar"]
            return row[o: o + 1].expand(m), torch.ones(n, dtype=row.dtype, device=row.device)
        g_row = row[self._offsets["row"]: self._offsets["row"] + m] if "row" in self.sides else \
            torch.ones(m, dtype=row.dtype, device=row.device)
        g_col = row[self._offsets["col"]: self._offsets["col"] + n] if "col" in self.sides else \
            torch.ones(n, dtype=row.dtype, device=row.device)
        return g_row, g_col

    def gain_values(self, index: SphereIndex) -> dict[str, dict[str, torch.Tensor]]:
        """{sphere key: {side: g}}: the current gain vectors (for metrics and tests)."""
        if not self.sides or self.raw is None:
            return {}
        gains = self.gain(self.raw)
        out = {}
        for k in range(index.num_spheres):
            m, n = index.shapes[k]
            lengths = self._lengths((m, n))
            out[index.key(k)] = {s: gains[k, self._offsets[s]: self._offsets[s] + lengths[s]].clone()
                                 for s in self.sides}
        return out

    # -- state: built per index, carried over by sphere key ---------------------------------------
    def _per_sphere(self) -> dict[str, dict]:
        """{key: {'step': t, '<side>_<quantity>': vector}} of the built state (copies)."""
        if self.raw is None:
            return {}
        keys, shapes = self._built_for
        out = {}
        for k, (key, shape) in enumerate(zip(keys, shapes)):
            lengths = self._lengths(shape)
            entry = {"step": float(self.steps[k])}
            for side in self.sides:
                o, n = self._offsets[side], lengths[side]
                for q in _QUANTITIES:
                    entry[f"{side}_{q}"] = getattr(self, q)[k, o: o + n].detach().clone()
            out[key] = entry
        return out

    def _ensure(self, index: SphereIndex, device: torch.device) -> None:
        keys = tuple(index.key(k) for k in range(index.num_spheres))
        shapes = tuple(tuple(s) for s in index.shapes)
        if self._built_for == (keys, shapes):
            return
        carried = {**self._loaded, **self._per_sphere()}  # state of an earlier index, by key
        m_max = max((s[0] for s in shapes), default=0)
        n_max = max((s[1] for s in shapes), default=0)
        widths = {"row": m_max, "col": n_max, "scalar": 1}
        self._offsets, o = {}, 0
        for side in self.sides:
            self._offsets[side], o = o, o + widths[side]
        self._width = o
        num = len(keys)
        self.raw = torch.full((num, o), self.raw_init(), dtype=torch.float32, device=device)
        self.exp_avg = torch.zeros(num, o, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(num, o, dtype=torch.float32, device=device)
        steps = [0.0] * num
        for k, (key, shape) in enumerate(zip(keys, shapes)):
            entry = carried.get(key)
            if entry is None:
                continue
            lengths = self._lengths(shape)
            steps[k] = float(entry.get("step", 0.0))
            for side in self.sides:
                o, n = self._offsets[side], lengths[side]
                for q in _QUANTITIES:
                    getattr(self, q)[k, o: o + n] = entry[f"{side}_{q}"].to(device=device, dtype=torch.float32)
        self.steps = torch.tensor(steps, dtype=torch.float64, device=device)
        self._built_for = (keys, shapes)
        self._loaded = {key: v for key, v in self._loaded.items() if key not in keys}

    def state_dict(self, index: SphereIndex) -> dict:
        if not self.sides:
            return {}
        return {"md_gains": {**self._loaded, **self._per_sphere()}}

    def load_state_dict(self, index: SphereIndex, state: dict) -> None:
        """Restore the gains; a checkpoint without them (e.g. from AdamH / MuonH) is refused unless
        ``allow_missing_gains`` (then every gain starts at 1, with a warning)."""
        if not self.sides:
            return
        saved = state.get("md_gains")
        keys = [index.key(k) for k in range(index.num_spheres)]
        if saved is None:
            missing = keys
            saved = {}
        else:  # an MD optimizer that never stepped saves none at all: nothing is missing then
            missing = [key for key in keys if key not in saved] if saved else []
        for key, entry in saved.items():
            lacks = [side for side in self.sides if f"{side}_raw" not in entry]
            if lacks:
                missing.append(f"{key} ({'/'.join(lacks)} gains)")
        if missing:
            what = (f"this checkpoint has no magnitude-direction gains for {len(missing)} matrices "
                    f"(e.g. {', '.join(map(str, missing[:3]))}); it was saved by an optimizer without "
                    f"gains='{self.gains}' (AdamH / MuonH, or another gain mode)")
            if not self.allow_missing_gains:
                raise ValueError(f"{what}. To start those gains at 1 (W = V) and continue, set "
                                 f"OptimizerConfig.{ALLOW_MISSING}=True (--md-allow-missing-gains, "
                                 f"optimizer.allow_missing_gains: true); allowed: False (refuse), True.")
            warnings.warn(f"{what}; {ALLOW_MISSING}=True: those gains start at 1 (W = V).", stacklevel=2)
        for key, entry in saved.items():
            shape = None
            if key in keys:
                shape = index.shapes[keys.index(key)]
            for side in self.sides:
                vec = entry.get(f"{side}_raw")
                if shape is not None and vec is not None and vec.numel() != self._lengths(shape)[side]:
                    raise ValueError(f"checkpointed {side} gains of '{key}' have length {vec.numel()}, "
                                     f"the matrix has {self._lengths(shape)[side]}: not this model")
        self._loaded = {key: {q: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                              for q, v in entry.items() if q == "step" or q.split("_")[0] in self.sides}
                        for key, entry in saved.items()
                        if all(f"{side}_raw" in entry for side in self.sides)}
        self.raw = self.exp_avg = self.exp_avg_sq = self.steps = None  # rebuilt from _loaded by key
        self._built_for = None

    # -- the hook -------------------------------------------------------------------------------
    def check_group(self, i: int, group: dict, name: str) -> None:
        """A param group may say ``gains``: only this optimizer's mode, and only on a sphere."""
        if "gains" not in group:
            return
        mode = group["gains"]
        if not group.get("sphere", True) and mode != "none":
            raise ValueError(f"{name}: param group {i} asks for gains={mode!r} but is not on a sphere "
                             f"(sphere=False); gains need a sphere matrix W = diag(g_row) V diag(g_col) "
                             f"(allowed on this group: gains='none', or sphere=True)")
        if group.get("sphere", True) and mode != self.gains:
            raise ValueError(f"{name}: param group {i} asks for gains={mode!r}; one gain mode per optimizer "
                             f"(allowed: {self.gains!r}, the optimizer's gains option)")

    def _blocks_of(self, batch: SphereBatch, p: torch.Tensor, k: int):
        blocks = None if self.layout is None else self.layout(batch.index, p, k)
        if blocks is None:
            m, n = batch.index.shapes[k]
            if p.numel() != m * n:
                raise ValueError(f"MagnitudeDirection: a local tensor of {p.numel()} elements is part of a "
                                 f"{m} x {n} sphere but no layout says where it sits")
            return [_Whole(m, n)]
        return blocks

    def _group_gain_lr(self, group: dict) -> float:
        for key in ("initial_lr", "max_lr"):
            base = group.get(key)
            if base is not None and float(base) > 0:
                return self.gain_lr * float(group["lr"]) / float(base)
        return self.gain_lr

    @torch.no_grad()
    def pre_update(self, batch: SphereBatch) -> None:
        self._cols, self._blocks = None, []
        if not self.sides:
            return
        index = batch.index
        self._ensure(index, batch.device)
        off, w = self._offsets, self._width
        cols = torch.zeros(index.num_spheres, w + 2, dtype=torch.float32, device=batch.device)
        gains = self.gain(self.raw)
        for i, (p, k) in enumerate(zip(batch.params, batch.ids)):
            shape = index.shapes[k]
            g_row, g_col = self._vectors(gains, k, shape)
            blocks = self._blocks_of(batch, p, k)
            self._blocks.append(blocks)
            flat_p, g = p.view(-1), batch.grads[i]
            flat_g = g.reshape(-1)
            g_v = torch.empty_like(flat_g)
            for b in blocks:
                n_el = b.rows * b.cols
                v = flat_p[b.offset: b.offset + n_el].view(b.rows, b.cols)
                gb = flat_g[b.offset: b.offset + n_el].view(b.rows, b.cols)
                gr, gc = g_row[b.row: b.row + b.rows], g_col[b.col: b.col + b.cols]
                # broadcast passes, not a materialized g_row g_col^T: 1.6x faster on CPU (1024^2, measured)
                v.div_(gr[:, None]).div_(gc[None, :])                # V = W / (g_row g_col^T)
                prod = v.float() * gb.float()                        # P = V * G
                if self.gains == "scalar":
                    cols[k, off["scalar"]] += prod.sum()
                if "row" in self.sides:                              # sum_j P_ij g_col_j
                    cols[k, off["row"] + b.row: off["row"] + b.row + b.rows] += prod @ gc
                if "col" in self.sides:                              # sum_i P_ij g_row_i
                    cols[k, off["col"] + b.col: off["col"] + b.col + b.cols] += gr @ prod
                gvb = g_v[b.offset: b.offset + n_el].view(b.rows, b.cols)
                torch.mul(gb, gr[:, None].to(gb.dtype), out=gvb).mul_(gc[None, :].to(gb.dtype))
            batch.grads[i] = g_v.view_as(g)                          # G_V = G * (g_row g_col^T)
        if batch.ids:  # take part in this step (count), at the group's gain lr
            ids = torch.tensor(batch.ids, device=batch.device)
            lrs = torch.tensor([self._group_gain_lr(group) for group in batch.groups],
                               dtype=torch.float32, device=batch.device)
            cols[:, w].index_add_(0, ids, torch.ones_like(lrs))
            cols[:, w + 1].index_add_(0, ids, lrs)
        self._cols = cols

    def partials(self, batch: SphereBatch) -> torch.Tensor | None:
        return self._cols

    @torch.no_grad()
    def post_update(self, batch: SphereBatch, sums: torch.Tensor | None) -> None:
        if not self.sides:
            return
        w = self._width
        count, lr_sum = sums[:, w], sums[:, w + 1]
        active = count > 0
        lr = torch.where(active, lr_sum / count.clamp_min(1.0), torch.zeros_like(lr_sum))
        b1, b2 = self.betas
        # every sphere's raw gains take Adam together (padding columns have zero gradient: no move)
        self.steps += active.to(torch.float64)
        t = self.steps.clamp_min(1.0)
        bc1, bc2 = (1 - b1**t).float(), (1 - b2**t).float()
        grad = sums[:, :w].to(self.raw) * self.gain_derivative(self.raw)
        m = self.exp_avg.lerp(grad, 1 - b1)
        v = (self.exp_avg_sq * b2).addcmul_(grad, grad, value=1 - b2)
        # raw -= lr m_hat / (sqrt(v_hat) + eps): no weight decay on gains
        raw = self.raw - (lr / bc1)[:, None] * m / ((v / bc2[:, None]).sqrt_().add_(self.eps))
        act = active[:, None]
        self.raw = torch.where(act, raw, self.raw)
        self.exp_avg = torch.where(act, m, self.exp_avg)
        self.exp_avg_sq = torch.where(act, v, self.exp_avg_sq)

        gains = self.gain(self.raw)
        for p, k, blocks in zip(batch.params, batch.ids, self._blocks):
            g_row, g_col = self._vectors(gains, k, batch.index.shapes[k])
            flat_p = p.view(-1)
            for b in blocks:
                n_el = b.rows * b.cols
                # W = V' * (g_row' g_col'^T)
                flat_p[b.offset: b.offset + n_el].view(b.rows, b.cols).mul_(
                    g_row[b.row: b.row + b.rows, None]).mul_(g_col[None, b.col: b.col + b.cols])
        self._cols, self._blocks = None, []
