"""AdamH: Adam on the sphere (Wen et al., "Hyperball"; HyperP).

    m = b1 m + (1 - b1) G,   v = b2 v + (1 - b2) G^2          base update (Adam)
    u = m_hat / (sqrt(v_hat) + eps)
    W_next = R N(W - lr R N(u))      (update_norm='exact')     sphere hook
    W_next = R N(W - lr u)           (update_norm='shape': Adam's update as is)

Groups with ``sphere=False`` take plain AdamW (decoupled weight decay) with the same moments,
so one optimizer can hold a whole model: matrices on spheres, embeddings/norms/biases on Adam.
State keys match torch.optim.AdamW ('step', 'exp_avg', 'exp_avg_sq'), which is what
Megatron's distributed optimizer checkpoints; each group also counts its 'step'.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

from megatron_hyperball.optim.hooks import SphereHook
from megatron_hyperball.optim.hyperball import HyperballOptimizer
from megatron_hyperball.optim.sphere import SphereIndex


class AdamH(HyperballOptimizer):
    name = "AdamH"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        radius: str | float = "init",
        update_norm: str = "exact",
        weight_decay: float = 0.0,
        *,
        sphere_index: SphereIndex | None = None,
        sphere_hooks: Sequence[SphereHook] = (),
        prepare_spheres: bool = True,
    ) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamH: betas={betas!r} must each be in [0, 1)")
        if not (isinstance(eps, (int, float)) and 0.0 < eps < math.inf):
            # eps = 0: one exactly-zero gradient element gives 0/0 in u, and the sphere step
            # spreads that NaN over the whole matrix through ||u||
            raise ValueError(f"AdamH: eps={eps!r}; allowed: a positive finite number (e.g. 1e-8)")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, radius=radius, update_norm=update_norm,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults, sphere_index=sphere_index, sphere_hooks=sphere_hooks,
                         prepare_spheres=prepare_spheres)

    def base_update(
        self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], on_sphere: list[bool]
    ) -> tuple[list[torch.Tensor], list[float]]:
        # Each param counts its own steps (state 'step', as torch's AdamW), so one whose first
        # gradient arrives late gets its own bias correction; the group counts the group's steps
        # (as TE's FusedAdam), which is what Megatron's checkpoint keeps.
        group["step"] = int(group.get("step", 0)) + 1
        b1, b2 = group["betas"]
        by_step: dict[int, list[int]] = {}
        step_tensors: dict[int, torch.Tensor] = {}  # one per distinct count: replaced, never incremented in place
        for i, p in enumerate(params):
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            t = int(state.get("step", 0)) + 1
            if t not in step_tensors:
                step_tensors[t] = torch.tensor(float(t))
            state["step"] = step_tensors[t]
            by_step.setdefault(t, []).append(i)
        us: list[torch.Tensor | None] = [None] * len(params)
        cs: list[float] = [1.0] * len(params)
        for t, idx in by_step.items():  # one bucket in a steady run
            ms = [self.state[params[i]]["exp_avg"] for i in idx]
            vs = [self.state[params[i]]["exp_avg_sq"] for i in idx]
            gs = [grads[i] for i in idx]
            # multi-tensor kernels: m = b1 m + (1-b1) G;  v = b2 v + (1-b2) G^2
            torch._foreach_lerp_(ms, gs, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
            # m_hat / (sqrt(v_hat) + eps) = c * m / (sqrt(v) + eps sqrt(bc2)),  c = sqrt(bc2) / bc1:
            # the bias corrections become one scalar, as in torch's Adam, and save two passes
            bc2_sqrt = math.sqrt(1 - b2**t)
            c = bc2_sqrt / (1 - b1**t)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, group["eps"] * bc2_sqrt)
            plain = [k for k, i in enumerate(idx) if not on_sphere[i]]
            if plain:  # AdamW: decoupled weight decay, then W -= lr c m / denom
                plain_p = [params[idx[k]] for k in plain]
                if group["weight_decay"] != 0:
                    torch._foreach_mul_(plain_p, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_addcdiv_(plain_p, [ms[k] for k in plain], [denom[k] for k in plain],
                                        value=-group["lr"] * c)
            sphere = [k for k, i in enumerate(idx) if on_sphere[i]]
            if sphere:
                for k, u in zip(sphere, torch._foreach_div([ms[k] for k in sphere], [denom[k] for k in sphere])):
                    us[idx[k]], cs[idx[k]] = u, c
        keep = [i for i, s in enumerate(on_sphere) if s]
        return [us[i] for i in keep], [cs[i] for i in keep]

    def shape_scale(self, shape: tuple[int, int]) -> float:
        return 1.0  # update-norm "shape": Adam's update as is (MD's convention)
