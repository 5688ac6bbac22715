"""Shared machinery of the hyperball optimizers: option checks, sphere bookkeeping, the batched step.

A subclass supplies ``direction(p, group, state) -> u`` (the base optimizer's update, e.g. Adam's
m_hat / (sqrt(v_hat) + eps)) and ``shape_scale(shape)`` (the factor s of update-norm mode
'shape'); this class turns the directions of every sphere into one batched retraction.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from megatron_hyperball.optim import sphere
from megatron_hyperball.optim.sphere import SphereLayout


class HyperballOptimizer(torch.optim.Optimizer):
    """Base class: param groups with ``sphere=True`` (the default) live on Frobenius spheres.

    Group options: ``lr``, ``radius`` ('init' | 'sqrt_max_dim' | number), ``update_norm``
    ('exact' | 'shape'), ``sphere`` (False: the group takes the plain base update, with
    ``weight_decay``). Sphere groups take no weight decay: on the sphere it is a first-order no-op.

    ``layout``: None means every sphere tensor is a whole matrix on this process. A distributed
    adapter passes a ``SphereLayout`` that maps shards to spheres and sums partial norms over
    ranks (then ``prepare_spheres=False``: it has checked and scaled the full matrices itself).
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        layout: SphereLayout | None = None,
        prepare_spheres: bool = True,
    ) -> None:
        defaults.setdefault("sphere", True)
        defaults.setdefault("weight_decay", 0.0)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group)
        self._layout = layout
        if prepare_spheres:
            self._prepare_whole_matrices()

    name = "Hyperball"

    @classmethod
    def over_param_groups(cls, groups: list[dict], **kwargs: Any) -> "HyperballOptimizer":
        """Build over param-group dicts that already exist, keeping the dicts themselves.

        A distributed optimizer's fp32 shards are views of a flat buffer, which torch's
        ``add_param_group`` refuses as non-leaf tensors; the wrapper that made them (Megatron's
        ``DistributedOptimizer``) assigns ``param_groups`` directly, and so does this.
        """
        placeholder = torch.zeros(1, requires_grad=True)
        kwargs.setdefault("prepare_spheres", False)
        opt = cls([placeholder], **kwargs)
        for i, group in enumerate(groups):
            for key, value in opt.defaults.items():
                group.setdefault(key, value)
            opt._check_group(i, group)
        opt.param_groups = groups
        opt.state.clear()
        return opt

    # -- options ---------------------------------------------------------------------------------
    def _check_group(self, i: int, group: dict) -> None:
        group["radius"] = sphere.check_radius(group["radius"])
        group["update_norm"] = sphere.check_update_norm(group["update_norm"])
        if not (isinstance(group["lr"], (int, float, torch.Tensor)) and float(group["lr"]) >= 0):
            raise ValueError(f"{self.name}: param group {i}: lr={group['lr']!r} must be a number >= 0")
        if group["sphere"] and group["weight_decay"] != 0:
            raise ValueError(
                f"{self.name}: param group {i} is a sphere group but asks for "
                f"weight_decay={group['weight_decay']}; weight decay is a first-order no-op on the "
                f"sphere, so sphere groups take none (allowed: weight_decay=0). Put parameters that "
                f"need weight decay in a group with sphere=False."
            )

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_layout"):  # groups added after construction get the same checks
            self._check_group(len(self.param_groups) - 1, self.param_groups[-1])

    # -- spheres ---------------------------------------------------------------------------------
    def set_layout(self, layout: SphereLayout | None) -> None:
        """Install the shard-to-sphere map of a distributed adapter (None: whole matrices)."""
        self._layout = layout

    def _sphere_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g["sphere"] for p in g["params"]]

    def layout(self) -> SphereLayout:
        if self._layout is not None:
            return self._layout
        return sphere.whole_matrix_layout(self._sphere_params())

    @torch.no_grad()
    def _prepare_whole_matrices(self) -> None:
        """Refuse zero matrices; move a matrix onto a fixed-radius sphere before the first step."""
        for gi, group in enumerate(self.param_groups):
            if not group["sphere"]:
                continue
            for pi, p in enumerate(group["params"]):
                norm = p.detach().float().norm().item()
                if not math.isfinite(norm) or norm == 0.0:
                    raise ValueError(
                        f"{self.name}: parameter {pi} of param group {gi} (shape {tuple(p.shape)}) has "
                        f"Frobenius norm {norm}; a sphere needs a finite nonzero matrix. Initialise it "
                        f"(e.g. normal init) or put it in a group with sphere=False."
                    )
                r = sphere.fixed_radius(group["radius"], sphere.matrix_shape(p.shape))
                if r is not None:
                    p.mul_(r / norm)

    # -- the step ---------------------------------------------------------------------------------
    def direction(self, p: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        """The base optimizer's update u for p (a fresh tensor the step may overwrite)."""
        raise NotImplementedError

    def directions(self, params: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """u for each param of a group; subclasses may batch this (multi-tensor kernels)."""
        return [self.direction(p, group, self.state[p]) for p in params]

    def shape_scale(self, shape: tuple[int, int]) -> float:
        """The factor s of update-norm mode 'shape' for a full matrix of this shape."""
        raise NotImplementedError

    def plain_update_(self, params: list[torch.Tensor], updates: list[torch.Tensor], group: dict) -> None:
        """Non-sphere params: decoupled weight decay, then p -= lr * u."""
        if group["weight_decay"] != 0:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, updates, alpha=-group["lr"])

    def update_group(
        self, params: list[torch.Tensor], group: dict, on_sphere: list[bool]
    ) -> tuple[list[torch.Tensor], float]:
        """Step the group's non-sphere params; return (u, c) for its sphere params, where the base
        update is c * u (a subclass may keep a per-step scalar out of the tensors: exact mode
        normalizes it away, shape mode multiplies it into s)."""
        us = self.directions(params, group)
        plain = [(p, u) for p, u, s in zip(params, us, on_sphere) if not s]
        if plain:
            self.plain_update_([p for p, _ in plain], [u for _, u in plain], group)
        return [u for u, s in zip(us, on_sphere) if s], 1.0

    def begin_step(self) -> None:
        """Hook before any direction is computed (e.g. step counters)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.begin_step()
        layout = self.layout()
        weights, updates, ids = [], [], []
        n = layout.num_spheres
        lr = torch.zeros(n, dtype=torch.float64)
        radius = torch.full((n,), float("nan"), dtype=torch.float64)
        scale = torch.full((n,), float("nan"), dtype=torch.float64)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            ks = [layout.sphere_of(p) if group["sphere"] else None for p in params]
            us, c = self.update_group(params, group, [k is not None for k in ks])
            sphere_params = [(p, k) for p, k in zip(params, ks) if k is not None]
            for (p, k), u in zip(sphere_params, us):
                shape = layout.shapes[k]
                weights.append(p)
                updates.append(u)
                ids.append(k)
                lr[k] = float(group["lr"])
                r = sphere.fixed_radius(group["radius"], shape)
                if r is not None:
                    radius[k] = r
                if group["update_norm"] == "shape":
                    scale[k] = self.shape_scale(shape) * c
        if n == 0:
            return loss
        # every rank of a sphere group must take part in the reduction, even with no local slice
        partials = sphere.sphere_partials(layout, weights, updates)
        layout.all_reduce_(partials)
        dev = partials.device
        a, b = sphere.hyperball_coefficients(partials, lr.to(dev), radius.to(dev), scale.to(dev))
        sphere.apply_hyperball_(weights, updates, ids, a, b)
        return loss
