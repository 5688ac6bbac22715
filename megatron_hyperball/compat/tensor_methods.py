"""``Tensor.type()`` / ``Tensor.cuda()`` inside the named Megatron functions that check or move devices.

Checks like ``param.type() in ['torch.cuda.HalfTensor', ...]`` (distributed / float16 optimizers,
clip-grads) and calls like ``tensor.cuda()`` (grad scaler load, ``broadcast_data``, dist-checkpoint
exchange, shared embeddings) call methods, which the torch view cannot see. Only while one of
these functions runs, ``Tensor.type()`` reports a CPU tensor under the CUDA type name of the same
dtype (the checks keep their meaning: "a float32 / bf16 tensor on the device") and
``Tensor.cuda()`` returns the tensor unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, List, Tuple

import torch

from megatron_hyperball.compat._common import lock as _lock, rebind_everywhere as _rebind_everywhere


_ORIG_TENSOR_TYPE = torch.Tensor.type
_ORIG_TENSOR_CUDA = torch.Tensor.cuda
_tensor_scope_depth = 0


def _type_reporting_cuda(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        name = _ORIG_TENSOR_TYPE(self)  # e.g. 'torch.FloatTensor'
        return name.replace("torch.", "torch.cuda.", 1)
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _cuda_staying_on_cpu(self, device=None, non_blocking=False, memory_format=None):
    return self


@contextlib.contextmanager
def _cpu_tensors_as_device_tensors():
    """While active: ``Tensor.type()`` of a CPU tensor reports the CUDA type name of the
    same dtype and ``Tensor.cuda()`` returns the tensor unchanged. Process-wide for the
    duration (nesting and concurrent callers are counted; the last one out restores)."""
    global _tensor_scope_depth
    with _lock:
        if _tensor_scope_depth == 0:
            torch.Tensor.type = _type_reporting_cuda
            torch.Tensor.cuda = _cuda_staying_on_cpu
        _tensor_scope_depth += 1
    try:
        yield
    finally:
        with _lock:
            _tensor_scope_depth -= 1
            if _tensor_scope_depth == 0:
                torch.Tensor.type = _ORIG_TENSOR_TYPE
                torch.Tensor.cuda = _ORIG_TENSOR_CUDA


#: (module, "Class.method" or "function") run under _cpu_tensors_as_device_tensors().
_CPU_TENSOR_METHOD_FUNCTIONS: Tuple[Tuple[str, str], ...] = (
    # Tensor.type() == 'torch.cuda.*Tensor' checks
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    # Tensor.cuda() calls
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer.get_parameter_state_dp_zero"),
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler.load_state_dict"),
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    ("megatron.core.utils", "check_param_hashes_across_dp_replicas"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_gather_rounds"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast"),
)


def _scoped(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_as_device_tensors():
            return fn(*args, **kwargs)

    wrapper.__megatron_hyperball_cpu__ = True
    return wrapper


def install() -> List[str]:
    """Scope the named functions; returns their dotted names."""
    done = []
    for module_name, qualname in _CPU_TENSOR_METHOD_FUNCTIONS:
        module = importlib.import_module(module_name)
        owner: Any = module
        *path, attr = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        if attr not in vars(owner):
            raise RuntimeError(
                f"megatron_hyperball.compat: {module_name}.{qualname} not found; this "
                f"megatron-core version is not supported by the CPU layer"
            )
        raw = vars(owner)[attr]
        if isinstance(raw, (staticmethod, classmethod)):
            if getattr(raw.__func__, "__megatron_hyperball_cpu__", False):
                continue
            setattr(owner, attr, type(raw)(_scoped(raw.__func__)))
        else:
            if getattr(raw, "__megatron_hyperball_cpu__", False):
                continue
            new = _scoped(raw)
            setattr(owner, attr, new)
            if owner is module:
                _rebind_everywhere(raw, new)
        done.append(f"{module_name}.{qualname}")
    return done


