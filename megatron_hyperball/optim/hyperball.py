"""HyperballOptimizer: a base update per param group, wrapped in batched weight-update hooks.

    u, c   = base_update(G)                 the subclass: AdamH (Adam), MuonH (Muon); alone it
                                            would step W <- W - lr c s u  (s = shape_scale)
    W_next = R N(W - lr R N(u))             SphereRetraction, the innermost hook (hooks.py)

A subclass supplies ``base_update`` and ``shape_scale``; the hooks and the one reduction per
step are here. Param groups with ``sphere=False`` take the base update as is (AdamH: AdamW).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from megatron_hyperball.optim import sphere
from megatron_hyperball.optim.hooks import SphereBatch, SphereHook, SphereRetraction
from megatron_hyperball.optim.sphere import SphereIndex


class HyperballOptimizer(torch.optim.Optimizer):
    """Base class: param groups with ``sphere=True`` (the default) live on Frobenius spheres.

    Group options: ``lr``, ``radius`` ('init' | 'sqrt_max_dim' | number), ``update_norm``
    ('exact' | 'shape'), ``sphere`` (False: the group takes the plain base update, with
    ``weight_decay``). Sphere groups take no weight decay: on the sphere it is a first-order no-op.

    ``sphere_index``: None means every sphere tensor is a whole matrix on this process. A
    distributed adapter passes a ``SphereIndex`` that maps shards to spheres and sums partial
    sums over ranks (then ``prepare_spheres=False``: it has checked and scaled the full matrices).
    ``sphere_hooks``: extra ``SphereHook``s, outermost first; ``SphereRetraction`` goes inside them.
    """

    name = "Hyperball"

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        sphere_index: SphereIndex | None = None,
        sphere_hooks: Sequence[SphereHook] = (),
        prepare_spheres: bool = True,
    ) -> None:
        defaults.setdefault("sphere", True)
        defaults.setdefault("weight_decay", 0.0)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group)
        self._sphere_index = sphere_index
        self.sphere_hooks: list[SphereHook] = [*sphere_hooks, SphereRetraction()]
        if prepare_spheres:
            self.prepare_spheres()

    @classmethod
    def over_param_groups(cls, groups: list[dict], **kwargs: Any) -> "HyperballOptimizer":
        """Build over param-group dicts that already exist, keeping the dicts themselves.

        A distributed optimizer's fp32 shards are views of a flat buffer, which torch's
        ``add_param_group`` refuses as non-leaf tensors; the wrapper that made them (Megatron's
        ``DistributedOptimizer``) assigns ``param_groups`` directly, and so does this.
        """
        prepare = kwargs.pop("prepare_spheres", False)
        opt = cls([torch.zeros(1, requires_grad=True)], prepare_spheres=False, **kwargs)
        for i, group in enumerate(groups):
            for key, value in opt.defaults.items():
                group.setdefault(key, value)
            opt._check_group(i, group)
        opt.param_groups = groups
        opt.state.clear()
        if prepare:
            opt.prepare_spheres()
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
        if hasattr(self, "_sphere_index"):  # groups added after construction get the same checks
            self._check_group(len(self.param_groups) - 1, self.param_groups[-1])

    # -- spheres ---------------------------------------------------------------------------------
    def set_sphere_index(self, index: SphereIndex | None) -> None:
        """Install the shard-to-sphere index of a distributed adapter (None: whole matrices)."""
        self._sphere_index = index

    def sphere_index(self) -> SphereIndex:
        if self._sphere_index is not None:
            return self._sphere_index
        return sphere.whole_matrix_index([p for g in self.param_groups if g["sphere"] for p in g["params"]])

    def state_dict(self) -> dict:
        """torch's state dict, with each hook's per-sphere state in every param group (Megatron
        keeps param-group entries, not only per-element state, in its checkpoints)."""
        state = super().state_dict()
        index = self.sphere_index()
        hooks = [hook.state_dict(index) for hook in self.sphere_hooks]
        for group in state["param_groups"]:
            group["sphere_hooks"] = hooks
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        hooks = next((g["sphere_hooks"] for g in state_dict["param_groups"] if "sphere_hooks" in g), None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("sphere_hooks", None)
        # paired from the innermost (SphereRetraction) out: a checkpoint of an optimizer with fewer
        # hooks (AdamH's into AdamMD) gives the outer ones an empty state, which they judge
        hooks = list(hooks or [])
        index = self.sphere_index()
        for i, hook in enumerate(reversed(self.sphere_hooks)):
            hook.load_state_dict(index, hooks[len(hooks) - 1 - i] if i < len(hooks) else {})

    def prepare_spheres(self) -> None:
        """Every hook's ``prepare`` on the whole matrices this process holds."""
        for hook in self.sphere_hooks:
            hook.prepare(self)

    # -- the step ---------------------------------------------------------------------------------
    def base_update(
        self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], on_sphere: list[bool]
    ) -> tuple[list[torch.Tensor], float]:
        """The base optimizer on one group: step the params that are not on a sphere, and return
        (u, c) for those that are, where the base optimizer's own update is c * u (c: a per-step
        scalar kept out of the tensors, or one per sphere param; exact mode normalizes it away,
        shape mode uses it)."""
        raise NotImplementedError

    def shape_scale(self, shape: tuple[int, int]) -> float:
        """The factor s of update-norm mode 'shape' for a full matrix of this shape."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = self.sphere_index()
        batch = SphereBatch(self, index)
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            ks = [index.sphere_of(p) if group["sphere"] else None for p in params]
            work.append((group, params, ks))
            for p, k in zip(params, ks):
                if k is not None:
                    batch.params.append(p)
                    batch.grads.append(p.grad)
                    batch.ids.append(k)
                    batch.groups.append(group)
        for hook in self.sphere_hooks:
            hook.pre_update(batch)

        grads = iter(batch.grads)
        for group, params, ks in work:
            gs = [p.grad if k is None else next(grads) for p, k in zip(params, ks)]
            us, c = self.base_update(group, params, gs, [k is not None for k in ks])
            on = [k for k in ks if k is not None]
            cs = c if isinstance(c, (list, tuple)) else [c] * len(on)
            batch.updates += us
            batch.scales += [self.shape_scale(index.shapes[k]) * ci for k, ci in zip(on, cs)]
        if index.num_spheres == 0:
            return loss

        # one reduction for every sphere and every hook; every rank that shares a sphere takes
        # part, even with no local slice of it
        columns = [hook.partials(batch) for hook in self.sphere_hooks]
        given = [c for c in columns if c is not None]
        partials = given[0] if len(given) == 1 else torch.cat(given, dim=1)
        index.all_reduce_(partials)
        parts = iter(partials.split([c.shape[1] for c in given], dim=1))
        sums = [None if c is None else next(parts) for c in columns]
        for hook, s in zip(reversed(self.sphere_hooks), reversed(sums)):
            hook.post_update(batch, s)
        return loss
