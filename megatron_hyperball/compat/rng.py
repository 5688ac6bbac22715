"""Megatron's CUDA RNG tracker on the CPU generator.

``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add`` / ``fork`` run as written,
with the CPU default generator as "the device generator": data-parallel replicas initialise
identically and ``fork()`` switches to the tensor-parallel state for weight init and dropout, as
on GPU. The tracker's "CPU RNG state changed within GPU RNG context" warning is dropped: on CPU
the forked generator is the CPU generator. CUDA-graph-safe RNG is not supported.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

from megatron_hyperball.compat._common import rebind_everywhere as _rebind_everywhere



def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states do not exist on CPU")
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states do not exist on CPU")
    torch.set_rng_state(new_state)


class _DropForkCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def install() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker"):
        if not hasattr(random, name):
            raise RuntimeError(
                f"megatron_hyperball.compat: tensor_parallel.random.{name} not found; this "
                f"megatron-core version is not supported by the CPU layer"
            )
    old_get, old_set = random._get_cuda_rng_state, random._set_cuda_rng_state
    random._get_cuda_rng_state = _get_cpu_rng_state
    random._set_cuda_rng_state = _set_cpu_rng_state
    _rebind_everywhere(old_get, _get_cpu_rng_state)
    _rebind_everywhere(old_set, _set_cpu_rng_state)
    logging.getLogger(random.__name__).addFilter(_DropForkCpuRngWarning())


