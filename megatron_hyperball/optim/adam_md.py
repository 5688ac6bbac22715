"""AdamMD: Adam with Magnitude-Direction decoupling (seed 004) = AdamH + MagnitudeDirectionHook.

    W = diag(g_row) V diag(g_col)                 the model's weight; V on the sphere, gains learned
    V = W / (g_row g_col^T);   G_V = G * (g_row g_col^T);   grad_g from sum V * G   (gains.py)
    V_next = R N(V - lr u(G_V))     (update_norm='shape', MD's recipe: Adam's update as is)
    V_next = R N(V - lr R N(u))     (update_norm='exact')
    raw gains: Adam with this optimizer's betas / eps, lr gain_lr, no weight decay
    W = diag(g_row') V_next diag(g_col')

Groups with ``sphere=False`` (embeddings, norms, biases) take plain AdamW and no gains (a group
asking for ``gains`` there is refused).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from megatron_hyperball.optim.adam_h import AdamH
from megatron_hyperball.optim.gains import DEFAULT_GAIN_LR, Layout, MagnitudeDirectionHook
from megatron_hyperball.optim.hooks import SphereHook
from megatron_hyperball.optim.sphere import SphereIndex


class AdamMD(AdamH):
    name = "AdamMD"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        radius: str | float = "init",
        update_norm: str = "shape",
        weight_decay: float = 0.0,
        gains: str = "row_col",
        gain_parametrization: str = "softplus",
        gain_lr: float = DEFAULT_GAIN_LR,
        *,
        gain_layout: Layout | None = None,
        allow_missing_gains: bool = False,
        sphere_index: SphereIndex | None = None,
        sphere_hooks: Sequence[SphereHook] = (),
        prepare_spheres: bool = True,
    ) -> None:
        # the gains' Adam takes this optimizer's betas / eps (the seed's "Adam" for gains)
        self.md_hook = MagnitudeDirectionHook(gains, gain_parametrization, gain_lr, betas=tuple(betas), eps=eps,
                                              layout=gain_layout, allow_missing_gains=allow_missing_gains)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, radius=radius, update_norm=update_norm,
            weight_decay=weight_decay, sphere_index=sphere_index,
            sphere_hooks=[self.md_hook, *sphere_hooks], prepare_spheres=prepare_spheres,
        )

    def _check_group(self, i: int, group: dict) -> None:
        super()._check_group(i, group)
        self.md_hook.check_group(i, group, self.name)
