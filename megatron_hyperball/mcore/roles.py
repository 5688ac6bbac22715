"""What each parameter of a Megatron GPT is: one ordered table, read by the sphere routing, the
per-group learning rates and the metrics.

A role says whether the hyperball optimizers put the parameter on a sphere, which per-group lr
key of the config applies to it (``embedding_lr``, ``output_lr``, ``scalar_lr``), and under which
type the metrics report it. The first matching row wins.

The sphere rule agrees with Megatron's own Muon routing (``is_managed_by_layer_wise_optimizer``:
2-D and not tagged ``is_embedding_or_output_parameter``), so the sphere set, Megatron's
layer-wise buffers and its Adam fallback never disagree. Megatron tags word embeddings and the
output layer; a learned position embedding is untagged, so ``tag_position_embeddings`` tags it.

A 2-D parameter tagged ``hyperball_sphere = 'none'`` (``tag_moe_spheres``: the shared expert's
``(1, h)`` gate always, the router with ``router_sphere: none``) is on no sphere and leaves
Megatron's layer-wise matrix set (patch ``layer_wise_untagged_matrices``), so it takes Adam under
every sphere optimizer. ``'row'`` marks a router whose rows are each their own sphere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

__all__ = ["Role", "ROLES", "MATRIX_TYPES", "SPHERE_ATTR", "role_of", "is_sphere_param", "sphere_mode",
           "tag_position_embeddings", "tag_moe_spheres", "named_params"]

#: Param attribute naming a matrix's sphere mode when it is not the default 'frobenius'.
SPHERE_ATTR = "hyperball_sphere"


@dataclass(frozen=True)
class Role:
    name: str
    pattern: Optional[re.Pattern]   # on the parameter's name; None: decided by shape / Megatron's tags
    sphere: bool                    # on a sphere under adamh / muonh
    lr_key: Optional[str] = None    # optimizer.<lr_key> sets its peak lr
    metric: Optional[str] = None    # reported as hyperball/<metric>/<type> with type = metric


def _re(s: str) -> re.Pattern:
    return re.compile(s)


ROLES: tuple[Role, ...] = (
    Role("scalar", None, False, "scalar_lr"),  # 1-D: norm gains, biases
    Role("embedding", _re(r"(^|\.)embedding\.(word|position)_embeddings\.weight$"), False, "embedding_lr",
         "embedding"),
    Role("output", _re(r"(^|\.)output_layer\.weight$"), False, "output_lr", "output"),
    Role("router", _re(r"\.router\.weight$"), True, None, "router"),
    Role("shared_expert_gate", _re(r"\.shared_experts\.gate_weight$"), False),
    Role("expert_fc1", _re(r"\.experts\..*linear_fc1\.weight\d*$"), True, None, "expert_fc1"),
    Role("expert_fc2", _re(r"\.experts\..*linear_fc2\.weight\d*$"), True, None, "expert_fc2"),
    Role("qkv", _re(r"\.(linear_qkv|linear_q_proj|linear_kv_down_proj|linear_kv_up_proj|"
                    r"linear_q_down_proj|linear_q_up_proj)\.weight$"), True, None, "qkv"),
    Role("proj", _re(r"\.self_attention\.linear_proj\.weight$"), True, None, "proj"),
    Role("fc1", _re(r"\.linear_fc1\.weight$"), True, None, "fc1"),  # dense MLP and shared experts
    Role("fc2", _re(r"\.linear_fc2\.weight$"), True, None, "fc2"),
    Role("matrix", None, True),  # any other 2-D weight Megatron's Muon would orthogonalize
)
_BY_NAME = {r.name: r for r in ROLES}

#: Metric types, in logging order.
MATRIX_TYPES = ("qkv", "proj", "fc1", "fc2", "router", "expert_fc1", "expert_fc2", "output", "embedding")


def role_of(name: str, param: torch.Tensor) -> Role:
    """The role of a parameter from its Megatron name, shape and Megatron's tags."""
    if param.dim() < 2:
        return _BY_NAME["scalar"]
    for role in ROLES:
        if role.pattern is not None and role.pattern.search(name):
            return role
    if getattr(param, "is_embedding_or_output_parameter", False):
        return _BY_NAME["output" if name.endswith("output_layer.weight") else "embedding"]
    return _BY_NAME["matrix"]


def is_sphere_param(name: str, param: torch.nn.Parameter, *, output_layer: bool = False) -> bool:
    """On a sphere under the hyperball optimizers (the output layer only when asked, and untied)."""
    if param.dim() != 2 or not param.requires_grad or sphere_mode(param) == "none":
        return False
    role = role_of(name, param)
    if role.name == "output" and not getattr(param, "shared_embedding", False):
        return output_layer
    return role.sphere and not getattr(param, "is_embedding_or_output_parameter", False)


def sphere_mode(param: torch.Tensor) -> str:
    """'frobenius' (one sphere, the default), 'row' (each row its own sphere) or 'none' (off)."""
    return getattr(param, SPHERE_ATTR, "frobenius")


def tag_moe_spheres(model: torch.nn.Module, router_sphere: str) -> None:
    """Tag the MoE matrices whose sphere is not the default, before DDP (it reads the layer-wise
    tags): every shared-expert gate 'none'; every router ``router_sphere`` (frobenius | row | none)."""
    from megatron_hyperball.names import ROUTER_SPHERE_MODES

    if router_sphere not in ROUTER_SPHERE_MODES:
        raise ValueError(f"router_sphere={router_sphere!r}; allowed: {', '.join(ROUTER_SPHERE_MODES)}")
    for name, p in model.named_parameters():
        role = role_of(name, p).name
        if role == "shared_expert_gate":
            setattr(p, SPHERE_ATTR, "none")
        elif role == "router" and router_sphere != "frobenius":
            setattr(p, SPHERE_ATTR, router_sphere)


def tag_position_embeddings(model: torch.nn.Module) -> None:
    """Mark learned position embeddings as embeddings (Adam, not the sphere); call before DDP."""
    for name, p in model.named_parameters():
        if name.endswith("position_embeddings.weight"):
            p.is_embedding_or_output_parameter = True


_LOCAL_EXPERT = re.compile(r"^experts\.(?:local_experts\.(\d+)\.(.*)|(.*\.weight)(\d+))$")


def _global_expert_name(rel: str, indices: list[int]) -> str:
    """'experts.local_experts.{i}.X' / 'experts.linear_fc1.weight{i}' (i local) with i global."""
    m = _LOCAL_EXPERT.match(rel)
    if m is None:
        return rel
    if m.group(1) is not None:
        return f"experts.local_experts.{indices[int(m.group(1))]}.{m.group(2)}"
    return f"experts.{m.group(3)}{indices[int(m.group(4))]}"


def named_params(model_chunks: Iterable[torch.nn.Module]) -> dict[torch.nn.Parameter, str]:
    """param -> unique name, in model order (the same on every rank of a parallel group).

    Expert parameters carry their *global* expert index (Megatron names them by local index, so
    under expert parallelism two ranks' different experts would share a name, and with it their
    checkpointed sphere state)."""
    names: dict[torch.nn.Parameter, str] = {}
    for i, chunk in enumerate(model_chunks):
        experts = {f"{n}.": list(m.local_expert_indices) for n, m in chunk.named_modules()
                   if n and isinstance(getattr(m, "local_expert_indices", None), (list, tuple))}
        for name, p in chunk.named_parameters():
            for prefix, indices in experts.items():
                if name.startswith(prefix):
                    name = prefix + _global_expert_name(name[len(prefix):], indices)
                    break
            names.setdefault(p, f"{i}.{name}" if i else name)
    return names
