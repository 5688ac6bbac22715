"""Which parameters of a Megatron model live on a sphere (DESIGN.md §2, 'Which tensors').

Every 2-D weight of attention, MLP, MoE experts and the router goes on a sphere; embeddings,
norm gains and biases take plain Adam; the output layer only when asked (``output_layer=True``).
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
    if getattr(param, "is_embedding_or_output_parameter", False) or "embedding" in name:
        return False
    return True


def named_params(model_chunks: Iterable[torch.nn.Module]) -> dict[torch.nn.Parameter, str]:
    """param -> unique name, in model order (the same on every rank of a parallel group)."""
    names: dict[torch.nn.Parameter, str] = {}
    for i, chunk in enumerate(model_chunks):
        for name, p in chunk.named_parameters():
            names.setdefault(p, f"{i}.{name}" if i else name)
    return names
