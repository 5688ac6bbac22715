"""MuonH: Muon on the sphere (Wen et al., "Hyperball"; HyperP).

    B = mu B + (1 - mu) G                       momentum (EMA form, as emerging-optimizers' Muon)
    M = G + mu (B - G)  (nesterov)  or  B
    u = NS5(M)                                  Newton-Schulz, quintic coefficients: base update
    W_next = R N(W - lr R N(u))                 (update_norm='exact')       sphere hook
    W_next = R N(W - lr s u),  s = sqrt(max(m/n, n/m))   (update_norm='shape', MD's Muon scaling)

Every parameter must be a matrix; give embeddings, norms and biases to Adam.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

from megatron_hyperball.optim import newton_schulz
from megatron_hyperball.optim.hooks import SphereHook
from megatron_hyperball.optim.hyperball import HyperballOptimizer
from megatron_hyperball.optim.sphere import SphereIndex


class MuonH(HyperballOptimizer):
    name = "MuonH"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = newton_schulz.NS_STEPS,
        radius: str | float = "init",
        update_norm: str = "exact",
        weight_decay: float = 0.0,
        coefficient_type: str = newton_schulz.NS_COEFFICIENTS,
        fp32_matmul_prec: str = "medium",
        *,
        sphere_index: SphereIndex | None = None,
        sphere_hooks: Sequence[SphereHook] = (),
        prepare_spheres: bool = True,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MuonH: momentum={momentum!r} must be in [0, 1)")
        if int(ns_steps) != ns_steps or ns_steps < 1:
            raise ValueError(f"MuonH: ns_steps={ns_steps!r} must be a positive integer")
        self.nesterov = nesterov
        self.ns_steps = int(ns_steps)
        self.coefficient_type = coefficient_type
        self.fp32_matmul_prec = fp32_matmul_prec
        defaults = dict(
            lr=lr, momentum=momentum, radius=radius, update_norm=update_norm,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults, sphere_index=sphere_index, sphere_hooks=sphere_hooks,
                         prepare_spheres=prepare_spheres)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.dim() != 2:
                    raise ValueError(
                        f"MuonH: parameter {pi} of param group {gi} has shape {tuple(p.shape)}; "
                        f"Muon orthogonalizes matrices only (2-D). Give it to Adam/AdamH."
                    )
                if not group["sphere"]:
                    raise ValueError(f"MuonH: param group {gi} has sphere=False; MuonH holds spheres only")

    @torch.no_grad()
    def _init_group(self, group: dict, skip_non_grad_params: bool = True) -> None:
        """Create state for a group's params (Megatron's checkpoint init calls this)."""
        for p in group["params"]:
            if skip_non_grad_params and p.grad is None:
                continue
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    def momentum_direction(
        self, p: torch.Tensor, group: dict, state: dict, grad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """M from the gradient (p.grad unless given): updates the momentum buffer in place."""
        g = p.grad if grad is None else grad
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        mu = group["momentum"]
        buf.lerp_(g, 1 - mu)
        return g.lerp(buf, mu) if self.nesterov else buf.clone()

    def orthogonalize(self, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return newton_schulz.orthogonalize(
            m, self.ns_steps, self.coefficient_type, self.fp32_matmul_prec
        ).to(p.dtype)

    def base_update(
        self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], on_sphere: list[bool]
    ) -> tuple[list[torch.Tensor], float]:
        # NS returns a transposed view for tall matrices; one copy here keeps the sphere
        # reductions and the update on contiguous memory
        us = [self.orthogonalize(p, self.momentum_direction(p, group, self.state[p], g)).contiguous()
              for p, g in zip(params, grads)]
        plain = [i for i, s in enumerate(on_sphere) if not s]
        if plain:  # a matrix the sphere index leaves out: plain Muon, W -= lr u
            plain_p = [params[i] for i in plain]
            if group["weight_decay"] != 0:
                torch._foreach_mul_(plain_p, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(plain_p, [us[i] for i in plain], alpha=-group["lr"])
        return [u for u, s in zip(us, on_sphere) if s], 1.0

    def shape_scale(self, shape: tuple[int, int]) -> float:
        m, n = shape
        return math.sqrt(max(m / n, n / m))
