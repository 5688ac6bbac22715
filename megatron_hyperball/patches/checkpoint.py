"""Checkpoint fixes for megatron-core 0.19's ZeRO-1 ``DistributedOptimizer``.

Both hit ``megatron.training``'s default torch_dist resume (``dp_reshardable``). The torch-AdamW
fixes are needed wherever Megatron falls back to torch's AdamW (no Transformer Engine, no apex:
always on CPU, and on a pip-only GPU install), not only on CPU.
"""

from __future__ import annotations

import functools
import inspect

import torch

from megatron_hyperball.patches import Patch, register, replace

VERSIONS = ("0.19.",)


def _distrib():
    from megatron.core.optimizer import distrib_optimizer

    return distrib_optimizer


def _install_no_grad_load() -> None:
    cls = _distrib().DistributedOptimizer
    fn = cls.load_parameter_state_from_dp_reshardable
    replace(cls, "load_parameter_state_from_dp_reshardable", functools.wraps(fn)(torch.no_grad()(fn)))


register(Patch(
    name="dp_reshardable_load_no_grad",
    target="megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_parameter_state_from_dp_reshardable",
    versions=VERSIONS,
    why="It lacks the @torch.no_grad() its siblings have. With fp32 params the main-param shards are views of "
        "the model params (which require grad), so loading a dp_reshardable checkpoint fails with 'a view of a "
        "leaf Variable that requires grad is being used in an in-place operation'. Run it under no_grad.",
    install=_install_no_grad_load,
))


def _uses_torch_adamw() -> bool:
    return not getattr(_distrib(), "HAVE_APEX_OR_TE", True)


def _allocate_fresh_state(dist_opt) -> None:
    """Give an empty inner torch optimizer the state its first step would create (step 0)."""
    inner = dist_opt.optimizer
    if len(inner.state) > 0 or getattr(dist_opt, "init_state_fn", None) is None:
        return
    dist_opt.init_state_fn(inner, dist_opt.config)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if state and "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)


def _install_torch_adamw_state() -> None:
    distrib = _distrib()
    cls = distrib.DistributedOptimizer
    hybrid = getattr(distrib, "HybridDeviceOptimizer", ())
    ssd, set_states, load = cls.sharded_state_dict, cls._set_main_param_and_optimizer_states, cls.load_state_dict
    ssd_signature = inspect.signature(ssd)

    def plain_torch_optimizer(self) -> bool:
        return (not self.ddp_config.use_megatron_fsdp
                and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
                and isinstance(self.optimizer, torch.optim.Optimizer)
                and not isinstance(self.optimizer, hybrid))

    @functools.wraps(ssd)
    def sharded_state_dict(self, *args, **kwargs):
        loading = ssd_signature.bind(self, *args, **kwargs).arguments.get("is_loading", False)
        if loading and plain_torch_optimizer(self):
            _allocate_fresh_state(self)
        return ssd(self, *args, **kwargs)

    @functools.wraps(set_states)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if plain_torch_optimizer(self):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if isinstance(step, torch.Tensor):
                tensors = dict(tensors, step=step)  # copy_ onto itself: keep the restored step
        return set_states(self, model_param, tensors)

    @functools.wraps(load)
    def load_state_dict(self, state_dict):
        result = load(self, state_dict)
        if plain_torch_optimizer(self):
            for state in self.optimizer.state.values():
                step = state.get("step")
                if isinstance(step, torch.Tensor):
                    state["step"] = step.detach().clone()  # one step counter per parameter
        return result

    for fn in (sharded_state_dict, _set_main_param_and_optimizer_states, load_state_dict):
        replace(cls, fn.__name__, fn)


register(Patch(
    name="torch_adamw_checkpoint_state",
    target="megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
           "{sharded_state_dict,_set_main_param_and_optimizer_states,load_state_dict}",
    versions=VERSIONS,
    why="torch's AdamW keeps a 'step' tensor in every parameter's state (TE/apex FusedAdam keep it in the "
        "param groups), and three places miss that, so a torch_dist resume fails or resumes with a wrong step: "
        "(1) sharded_state_dict(is_loading=True) on a fresh optimizer asserts every state has a step: allocate "
        "the state the first step would create; (2) _set_main_param_and_optimizer_states overwrites the step "
        "load_state_dict restored with the stale local one (dp_reshardable) or raises KeyError 'step' "
        "(fully_reshardable): keep the restored step; (3) load_state_dict gives every state the same step "
        "tensor, which AdamW increments in place once per parameter: give each its own copy.",
    install=_install_torch_adamw_state,
    needed=_uses_torch_adamw,
))
