"""MuonMD: Muon with Magnitude-Direction decoupling (seed 004) = MuonH + MagnitudeDirectionHook.

    W = diag(g_row) V diag(g_col)                 the model's weight; V on the sphere, gains learned
    V = W / (g_row g_col^T);   G_V = G * (g_row g_col^T);   grad_g from sum V * G   (gains.py)
    V_next = R N(V - lr s NS5(M(G_V))),  s = sqrt(max(m/n, n/m))   (update_norm='shape', MD's recipe)
    V_next = R N(V - lr R N(NS5(M(G_V))))                           (update_norm='exact')
    raw gains: Adam (gain_betas, gain_eps: Muon has none of its own), lr gain_lr, no weight decay
    W = diag(g_row') V_next diag(g_col')

Newton-Schulz sees G_V, not G: it is not invariant to row/column scaling, so the split matters.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from megatron_hyperball.optim import newton_schulz
from megatron_hyperball.optim.gains import DEFAULT_GAIN_LR, Layout, MagnitudeDirectionHook
from megatron_hyperball.optim.hooks import SphereHook
from megatron_hyperball.optim.muon_h import MuonH
from megatron_hyperball.optim.sphere import SphereIndex


class MuonMD(MuonH):
    name = "MuonMD"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = newton_schulz.NS_STEPS,
        radius: str | float = "init",
        update_norm: str = "shape",
        weight_decay: float = 0.0,
        coefficient_type: str = newton_schulz.NS_COEFFICIENTS,
        fp32_matmul_prec: str = "medium",
        gains: str = "row_col",
        gain_parametrization: str = "softplus",
        gain_lr: float = DEFAULT_GAIN_LR,
        gain_betas: tuple[float, float] = (0.9, 0.95),
        gain_eps: float = 1e-8,
        *,
        gain_layout: Layout | None = None,
        allow_missing_gains: bool = False,
        sphere_index: SphereIndex | None = None,
        sphere_hooks: Sequence[SphereHook] = (),
        prepare_spheres: bool = True,
    ) -> None:
        self.md_hook = MagnitudeDirectionHook(
            gains, gain_parametrization, gain_lr, betas=tuple(gain_betas), eps=gain_eps, layout=gain_layout,
            allow_missing_gains=allow_missing_gains)
        super().__init__(
            params, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, radius=radius,
            update_norm=update_norm, weight_decay=weight_decay, coefficient_type=coefficient_type,
            fp32_matmul_prec=fp32_matmul_prec, sphere_index=sphere_index,
            sphere_hooks=[self.md_hook, *sphere_hooks], prepare_spheres=prepare_spheres,
        )

    def _check_group(self, i: int, group: dict) -> None:
        super()._check_group(i, group)
        self.md_hook.check_group(i, group, self.name)
