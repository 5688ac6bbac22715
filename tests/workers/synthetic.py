"""Synthetic full weights and gradients, the same for every DP/TP layout and for the references.

Each tensor is drawn from a generator seeded by its name (and step), at its full (TP-gathered)
shape; a TP rank takes its slice along ``partition_dim``. Used by the workers and, in the test
process, by the float64 references.
"""

import zlib

import torch

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)


def _gen(name: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + salt)


def full_shape(p, tp: int) -> list[int]:
    shape = list(p.shape)
    if tp > 1 and getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return shape


def initial(name: str, shape) -> torch.Tensor:
    """Matrices ~ N(0, 0.02^2); norm gains 1; biases 0."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=_gen(name, 0)) * 0.02


def grad(name: str, shape, step: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(name, step + 1)) * 0.01


def local_slice(full: torch.Tensor, p, tp: int, tp_rank: int) -> torch.Tensor:
    if tp > 1 and getattr(p, "tensor_model_parallel", False):
        return full.chunk(tp, dim=p.partition_dim)[tp_rank]
    return full


def full_grad(name: str, p, step: int, tp: int) -> torch.Tensor:
    return grad(name, full_shape(p, tp), step)


@torch.no_grad()
def load_full_weights(model, zero: str | None = None) -> None:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        name = name.replace("module.", "")
        w = local_slice(initial(name, full_shape(p, tp)), p, tp, tp_rank)
        p.copy_(torch.zeros_like(w) if name == zero else w)
