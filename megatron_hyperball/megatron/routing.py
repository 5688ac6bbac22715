"""Which parameters of a Megatron model live on a sphere (DESIGN.md §2, 'Which tensors').

Every 2-D weight of attention, MLP, MoE experts and the router goes on a sphere; embeddings,
norm gains and biases take plain Adam; the output layer only when asked (``output_layer=True``).

The rule is Megatron's own Muon routing (``is_managed_by_layer_wise_optimizer``: 2-D and not
tagged ``is_embedding_or_output_parameter``), so the sphere set, Megatron's layer-wise buffers
and its Adam fallback always agree. Megatron tags word embeddings and the output layer; a
learned position embedding is untagged, so ``tag_position_embeddings`` marks it for Adam.
"""

from __future__ import annotations

from typing import Iterable

import torch


def is_output_layer(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith("output_layer.weight")


def is_sphere_param(name: str, param: torch.nn.Parameter, *, output_layer: bool = False) -> bool:
    if param.dim() != 2 or not param.requires_grad:
        return False
    if is_output_layer(name, param) and not getattr(param, "shared_embedding", False):
        return output_layer
    return not getattr(param, "is_embedding_or_output_parameter", False)


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
