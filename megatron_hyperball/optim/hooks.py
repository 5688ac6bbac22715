"""Weight-update hooks of the hyperball optimizers: the sphere step, and the contract for more.

emerging-optimizers gives its orthogonalized optimizers two per-tensor hooks around the update,
and builds MuonHyperball from them (scale u to R N(u) before, pull W back to radius R after):

    pre_weight_update_fn_inplace(W, u);   W <- W - lr u;   post_weight_update_fn_inplace(W)

Here the hooks take every sphere tensor of a step at once (a ``SphereBatch``), because a sharded
matrix needs its norms summed over ranks, and one reduction per step must serve all spheres:

    pre_update(batch)             outermost hook first; may change batch.grads (and the weights)
    u, c = base update            the optimizer, per param group (Adam, Muon, ...)
    partials(batch) -> columns    each hook's (num_spheres, k) local sums, side by side
    index.all_reduce_(columns)    one reduction for all spheres and hooks
    post_update(batch, sums)      innermost hook first, each with its own columns, full sums

The innermost hook is always ``SphereRetraction`` (W_next = R N(W - lr R N(u)), sphere.py); the
optimizer appends it after the hooks it is given. A magnitude-direction hook (AdamMD / MuonMD:
W = diag(g_row) V diag(g_col)) sits outside it: pre_update turns W into V and G into G_V and
computes its gain-gradient partials, partials returns them as its columns, and post_update
steps the gains with the full sums and writes W = diag(g_row) V_next diag(g_col) back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from megatron_hyperball.optim import sphere
from megatron_hyperball.optim.sphere import SphereIndex

if TYPE_CHECKING:
    from megatron_hyperball.optim.hyperball import HyperballOptimizer


@dataclass
class SphereBatch:
    """The local sphere tensors of one step, in step order, and what the step knows about them.

    The optimizer fills ``params``, ``grads``, ``ids`` and ``groups`` before ``pre_update``, and
    ``updates`` and ``scales`` after the base update: without the sphere, the base optimizer
    would step ``W <- W - lr * scale * u``. A hook may replace ``grads[i]`` (the base update
    reads it from here) and change ``params[i]`` in place; hook state that must be checkpointed
    belongs in ``optimizer.state[p]``.
    """

    optimizer: HyperballOptimizer
    index: SphereIndex
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    updates: list[torch.Tensor] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.params[0].device if self.params else self.index.device


class SphereHook:
    """A batched weight-update hook; every method is optional (the defaults do nothing)."""

    def prepare(self, opt: HyperballOptimizer) -> None:
        """Once, at construction, on whole matrices (a distributed adapter that prepares the full
        matrices itself passes ``prepare_spheres=False`` and this is skipped)."""

    def pre_update(self, batch: SphereBatch) -> None:
        """Before the base update: may replace ``batch.grads[i]`` and change the weights in place."""

    def partials(self, batch: SphereBatch) -> torch.Tensor | None:
        """A float32 (index.num_spheres, k) tensor of local partial sums on ``batch.device``, to be
        summed over ranks with everyone else's in one reduction; None for no columns."""
        return None

    def post_update(self, batch: SphereBatch, sums: torch.Tensor | None) -> None:
        """After the reduction, with this hook's columns summed over ranks (None if it gave none)."""

    def state_dict(self, index: SphereIndex) -> dict:
        """Small per-sphere state to checkpoint (plain numbers keyed by ``index.key(k)``); it travels
        in the optimizer's param groups, which Megatron saves per model-parallel rank."""
        return {}

    def load_state_dict(self, index: SphereIndex, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


class SphereRetraction(SphereHook):
    """The sphere step: W_next = a W - b u per sphere, from [||W||^2, <W,u>, ||u||^2] (sphere.py).

    Exact mode: W_next = R N(W - lr R N(u)). Shape mode: W_next = R N(W - lr s u), with s the
    batch's scale (the base optimizer's own step size: AdamH's 1, MuonH's sqrt(max(m/n, n/m))).

    Radius 'init': R is ||W|| at the first step the sphere takes, then held: re-reading ||W||
    every step lets fp32 rounding walk it like sqrt(steps) (1.5e-6 after 10,000 steps; held:
    2.9e-7 over 10,000, not growing). R is checkpointed (``state_dict``), so a resumed run holds the same R.
    """

    def __init__(self) -> None:
        self.init_radius: torch.Tensor | None = None  # per sphere, float64; NaN: not taken yet
        self._loaded: dict[str, float] = {}

    def state_dict(self, index: SphereIndex) -> dict:
        held = {} if self.init_radius is None else {
            index.key(k): r for k, r in enumerate(self.init_radius.tolist()) if r == r}
        return {"init_radius": {**self._loaded, **held}}

    def load_state_dict(self, index: SphereIndex, state: dict) -> None:
        self._loaded = dict(state.get("init_radius", {}))
        self.init_radius = None  # rebuilt from _loaded by key at the next step

    @torch.no_grad()
    def prepare(self, opt: HyperballOptimizer) -> None:
        """Refuse zero matrices; move a matrix onto a fixed-radius sphere before the first step."""
        for gi, group in enumerate(opt.param_groups):
            if not group["sphere"]:
                continue
            for pi, p in enumerate(group["params"]):
                norm = p.detach().float().norm().item()
                if not math.isfinite(norm) or norm == 0.0:
                    raise ValueError(
                        f"{opt.name}: parameter {pi} of param group {gi} (shape {tuple(p.shape)}) has "
                        f"Frobenius norm {norm}; a sphere needs a finite nonzero matrix. Initialise it "
                        f"(e.g. normal init) or put it in a group with sphere=False."
                    )
                r = sphere.fixed_radius(group["radius"], sphere.matrix_shape(p.shape))
                if r is not None:
                    p.mul_(r / norm)

    def partials(self, batch: SphereBatch) -> torch.Tensor:
        return sphere.sphere_partials(
            batch.params, batch.updates, batch.ids, batch.index.num_spheres, batch.device,
            [batch.index.element_spheres(p) for p in batch.params],
        )

    def post_update(self, batch: SphereBatch, sums: torch.Tensor) -> None:
        n = batch.index.num_spheres
        lr, radius, scale = [0.0] * n, [math.nan] * n, [math.nan] * n
        for p, group, s in zip(batch.params, batch.groups, batch.scales):
            for k in batch.index.spheres_of(p):  # one, or each row of a row-sphere tensor
                lr[k] = float(group["lr"])
                r = batch.index.radii.get(k, sphere.fixed_radius(group["radius"], batch.index.shapes[k]))
                if r is not None:
                    radius[k] = r
                if group["update_norm"] == "shape":
                    scale[k] = s
        dev = sums.device
        radius = torch.tensor(radius, dtype=torch.float64, device=dev)
        w_norm = sums[:, 0].double().sqrt()
        if self.init_radius is None or self.init_radius.shape[0] != n:
            held = [self._loaded.get(batch.index.key(k), math.nan) for k in range(n)]
            self.init_radius = torch.tensor(held, dtype=torch.float64, device=dev)
        # a sphere's R is taken at the first step it takes part in (zero sums: not this step)
        self.init_radius = torch.where(torch.isnan(self.init_radius) & (w_norm > 0), w_norm, self.init_radius)
        radius = torch.where(torch.isnan(radius), self.init_radius, radius)
        a, b = sphere.sphere_coefficients(
            sums,
            torch.tensor(lr, dtype=torch.float64, device=dev),
            radius,
            torch.tensor(scale, dtype=torch.float64, device=dev),
        )
        sphere.apply_sphere_step_(batch.params, batch.updates, batch.ids, a, b,
                                  [batch.index.element_spheres(p) for p in batch.params])
