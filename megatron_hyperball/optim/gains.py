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

State per sphere tensor p, in ``optimizer.state[p]`` (float32; checkpointed with the optimizer):
``gain_{row,col,scalar}_raw``, ``..._exp_avg``, ``..._exp_avg_sq`` and ``gain_step``. On a shard
each rank keeps the full gain vectors (length m and n) and steps them identically from the
reduced sums, so they stay equal on every rank that holds part of the matrix.

Shards: by default a sphere tensor is the whole matrix (viewed as out x everything else). A
distributed adapter passes ``layout(index, param, k) -> (rows, cols)``: the full-matrix row and
column of every element of the local tensor (flattened, int64), or None for a whole matrix; the
partial sums then go through ``index_add_`` and the reduction adds up the ranks' columns.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch

from megatron_hyperball.names import DEFAULT_GAIN_LR, GAIN_MODES, GAIN_PARAMETRIZATIONS, check_gain_options  # noqa: F401
from megatron_hyperball.optim.hooks import SphereBatch, SphereHook

if TYPE_CHECKING:
    from megatron_hyperball.optim.sphere import SphereIndex

SOFTPLUS_ONE = math.log(math.expm1(1.0))  # softplus(raw) = 1; exactly 1.0 in float32 as well

Layout = Callable[["SphereIndex", torch.Tensor, int], Optional[tuple[torch.Tensor, torch.Tensor]]]


class MagnitudeDirectionHook(SphereHook):
    """W = diag(g_row) V diag(g_col) around the sphere step of V (module doc).

    ``betas`` / ``eps`` of the gains' Adam: None takes the param group's own ('betas', 'eps', as
    AdamH has), else (0.9, 0.95) / 1e-8. The gain lr is ``gain_lr`` times the group's schedule
    factor lr / initial_lr (torch schedulers) or lr / max_lr (Megatron's groups), if present.
    """

    def __init__(
        self,
        gains: str = "row_col",
        gain_parametrization: str = "softplus",
        gain_lr: float = DEFAULT_GAIN_LR,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        layout: Layout | None = None,
    ) -> None:
        check_gain_options(gains, gain_parametrization, gain_lr)
        if betas is not None and not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"MagnitudeDirection: gain betas={betas!r}; allowed: each in [0, 1)")
        if eps is not None and not (isinstance(eps, (int, float)) and 0.0 < eps < math.inf):
            raise ValueError(f"MagnitudeDirection: gain eps={eps!r}; allowed: a positive finite number")
        self.gains = gains
        self.parametrization = gain_parametrization
        self.gain_lr = float(gain_lr)
        self.betas, self.eps, self.layout = betas, eps, layout
        self.sides = {"row_col": ("row", "col"), "row": ("row",), "col": ("col",),
                      "scalar": ("scalar",), "none": ()}[gains]
        self._cols: torch.Tensor | None = None
        self._coords: list = []

    # -- gains --------------------------------------------------------------------------------
    def raw_init(self) -> float:
        return SOFTPLUS_ONE if self.parametrization == "softplus" else 1.0

    def gain(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(raw) if self.parametrization == "softplus" else raw

    def gain_derivative(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw) if self.parametrization == "softplus" else torch.ones_like(raw)

    def _state(self, opt, p: torch.Tensor, shape: tuple[int, int]) -> dict:
        state = opt.state[p]
        lengths = {"row": shape[0], "col": shape[1], "scalar": 1}
        for side in self.sides:
            if f"gain_{side}_raw" not in state:
                state[f"gain_{side}_raw"] = torch.full((lengths[side],), self.raw_init(),
                                                       dtype=torch.float32, device=p.device)
                state[f"gain_{side}_exp_avg"] = torch.zeros(lengths[side], dtype=torch.float32, device=p.device)
                state[f"gain_{side}_exp_avg_sq"] = torch.zeros(lengths[side], dtype=torch.float32, device=p.device)
        state.setdefault("gain_step", torch.tensor(0.0))
        return state

    def gain_vectors(self, state: dict, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_row, g_col) as full vectors of length m and n (ones where the mode has no gain)."""
        m, n = shape
        dev = state[f"gain_{self.sides[0]}_raw"].device
        if self.gains == "scalar":
            return self.gain(state["gain_scalar_raw"]).expand(m), torch.ones(n, device=dev)
        g_row = self.gain(state["gain_row_raw"]) if "row" in self.sides else torch.ones(m, device=dev)
        g_col = self.gain(state["gain_col_raw"]) if "col" in self.sides else torch.ones(n, device=dev)
        return g_row, g_col

    def _scale(self, g_row, g_col, coords, p: torch.Tensor) -> torch.Tensor:
        """g_row g_col^T on p's elements, shaped like p (the same products on a whole matrix or a shard)."""
        if coords is None:
            return (g_row[:, None] * g_col[None, :]).reshape(p.shape)
        rows, cols = coords
        return (g_row[rows] * g_col[cols]).reshape(p.shape)

    def _coords_of(self, batch: SphereBatch, p: torch.Tensor, k: int):
        return None if self.layout is None else self.layout(batch.index, p, k)

    # -- the hook -------------------------------------------------------------------------------
    def _widths(self, index: SphereIndex) -> list[int]:
        m_max = max((s[0] for s in index.shapes), default=0)
        n_max = max((s[1] for s in index.shapes), default=0)
        return [{"row": m_max, "col": n_max, "scalar": 1}[side] for side in self.sides]

    @torch.no_grad()
    def pre_update(self, batch: SphereBatch) -> None:
        self._cols, self._coords = None, []
        if not self.sides:
            return
        widths = self._widths(batch.index)
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        cols = torch.zeros(batch.index.num_spheres, sum(widths), dtype=torch.float32, device=batch.device)
        for i, (p, k) in enumerate(zip(batch.params, batch.ids)):
            shape = batch.index.shapes[k]
            state = self._state(batch.optimizer, p, shape)
            g_row, g_col = self.gain_vectors(state, shape)
            coords = self._coords_of(batch, p, k)
            self._coords.append(coords)
            scale = self._scale(g_row, g_col, coords, p)
            p.div_(scale)                                        # V = W / (g_row g_col^T)
            g = batch.grads[i]
            prod = (p.float() * g.float()).reshape(-1)           # P = V * G, local elements
            for side, off in zip(self.sides, offsets):
                if side == "scalar":
                    cols[k, off] += prod.sum()
                elif coords is None:
                    m, n = shape
                    p2 = prod.reshape(m, n)
                    part = (p2 * g_col[None, :]).sum(1) if side == "row" else (p2 * g_row[:, None]).sum(0)
                    cols[k, off: off + part.numel()] += part
                else:
                    rows, cs = coords
                    if side == "row":
                        cols[k, off: off + shape[0]].index_add_(0, rows, prod * g_col[cs])
                    else:
                        cols[k, off: off + shape[1]].index_add_(0, cs, prod * g_row[rows])
            batch.grads[i] = g * scale.to(g.dtype)               # G_V = G * (g_row g_col^T)
        self._cols = cols

    def partials(self, batch: SphereBatch) -> torch.Tensor | None:
        return self._cols

    def _gain_lr(self, group: dict) -> float:
        for key in ("initial_lr", "max_lr"):
            base = group.get(key)
            if base is not None and float(base) > 0:
                return self.gain_lr * float(group["lr"]) / float(base)
        return self.gain_lr

    @torch.no_grad()
    def post_update(self, batch: SphereBatch, sums: torch.Tensor | None) -> None:
        if not self.sides:
            return
        widths = self._widths(batch.index)
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        for i, (p, k, group) in enumerate(zip(batch.params, batch.ids, batch.groups)):
            shape = batch.index.shapes[k]
            state = self._state(batch.optimizer, p, shape)
            b1, b2 = self.betas if self.betas is not None else group.get("betas", (0.9, 0.95))
            eps = self.eps if self.eps is not None else group.get("eps", 1e-8)
            t = int(state["gain_step"]) + 1
            state["gain_step"] = torch.tensor(float(t))
            lr = self._gain_lr(group)
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            for side, off in zip(self.sides, offsets):
                raw = state[f"gain_{side}_raw"]
                m, v = state[f"gain_{side}_exp_avg"], state[f"gain_{side}_exp_avg_sq"]
                grad = sums[k, off: off + raw.numel()].to(raw) * self.gain_derivative(raw)
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                # raw -= lr m_hat / (sqrt(v_hat) + eps): no weight decay on gains
                raw.addcdiv_(m, (v / bc2).sqrt_().add_(eps), value=-lr / bc1)
            g_row, g_col = self.gain_vectors(state, shape)
            p.mul_(self._scale(g_row, g_col, self._coords[i], p))  # W = V' * (g_row' g_col'^T)
        self._cols, self._coords = None, []
