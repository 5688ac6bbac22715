"""Compatibility layer: run megatron-core on CPU with gloo; detect Transformer Engine / apex.

Nothing is patched on import. Call :func:`enable_cpu` explicitly (after
``torch.distributed`` is initialised with gloo, before building the model); see
``megatron_hyperball/compat/cpu.py`` for the list of redirected CUDA-only spots.
"""

from megatron_hyperball.compat.cpu import backends, enable_cpu, is_enabled

__all__ = ["enable_cpu", "is_enabled", "backends"]
