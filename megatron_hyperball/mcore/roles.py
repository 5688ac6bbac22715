"""What each parameter of a Megatron GPT is: one ordered table, read by the sphere routing, the
per-group learning rates and the metrics.

A role says whether the hyperball optimizers put the parameter on a sphere, which per-group lr
key of the config applies to it (``embedding_lr``, ``output_lr``, ``scalar_lr``), and under which
type the metrics report it. The first matching row wins.

The sphere rule agrees with Megatron's own Muon routing (``is_managed_by_layer_wise_optimizer``:
2-D and not tagged ``is_embedding_or_output_parameter``), so the sphere set, Megatron's
layer-wise buffers and its Adam fallback never disagree. Megatron tags word embeddings and the
output layer; a learned position embedding is untagged, so ``tag_position_embeddings`` tags it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

__all__ = ["Role", "ROLES", "MATRIX_TYPES", "role_of", "is_sphere_param", "tag_position_embeddings",
           "named_params"]


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
    if param.dim() != 2 or not param.requires_grad:
        return False
    role = role_of(name, param)
    if role.name == "output" and not getattr(param, "shared_embedding", False):
        return output_layer
    return role.sphere and not getattr(param, "is_embedding_or_output_parameter", False)


def tag_position_embeddings(model: torch.nn.Module) -> None:
    """Mark learned position embeddings as embeddings (Adam, not the sphere); call before DDP."""
    for name, p in model.named_parameters():
        if name.endswith("position_embeddings.weight"):
            p.is_embedding_or_output_parameter = True


def named_params(model_chunks: Iterable[torch.nn.Module]) -> dict[torch.nn.Parameter, str]:
    """param -> unique name, in model order (the same on every rank of a parallel group)."""
    names: dict[torch.nn.Parameter, str] = {}
    for i, chunk in enumerate(model_chunks):
        for name, p in chunk.named_parameters():
            names.setdefault(p, f"{i}.{name}" if i else name)
    return names
