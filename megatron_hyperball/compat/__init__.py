"""The CPU device layer: megatron-core's real CUDA-oriented code on CPU with gloo; TE/apex detection.

Nothing happens on import. ``enable_cpu()`` (once per process, after
``torch.distributed.init_process_group('gloo')``, before any Megatron model, DDP wrapper or
optimizer is built) makes the CPU the device for Megatron's own DDP, ZeRO-1 and layer-wise
optimizers, GPTModel, tensor parallelism and dist_checkpointing: it replaces the device, never
the algorithm. Four parts, one file each:

- ``torch_view``: Megatron's modules see a torch whose CUDA device factories and streams are the CPU's.
- ``tensor_methods``: ``Tensor.type()`` / ``.cuda()`` device checks inside named Megatron functions.
- ``rng``: Megatron's CUDA RNG tracker on the CPU generator.
- ``allocator``: freed tensor memory stays in the heap (glibc), as in CUDA's caching allocator.

What ``megatron.training``'s loop needs on top (allow_no_cuda, one device, no fused-kernel
warm-up, ...) is the ``cpu`` group of ``megatron_hyperball.patches``. Known limits on gloo: MoE
needs the ``allgather`` dispatcher (no all-to-all); uneven ``all_gather`` is refused; CUDA graphs,
Transformer Engine, apex and NCCL user buffers are GPU-only. Do not call it for GPU training.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any, Dict, Tuple

import torch

from megatron_hyperball.compat import allocator, rng, tensor_methods, torch_view
from megatron_hyperball.compat._common import lock

__all__ = ["enable_cpu", "is_enabled", "backends"]

#: megatron-core versions the CPU layer was written against and checked on.
SUPPORTED_MEGATRON_VERSIONS: Tuple[str, ...] = ("0.19",)

#: Modules imported eagerly by enable_cpu() so that they are patched before use.
_EAGER_MODULES: Tuple[str, ...] = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.distributed",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.layer_wise_optimizer",
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

_ENABLED = False
_log = logging.getLogger(__name__)


def is_enabled() -> bool:
    """Whether ``enable_cpu()`` has run in this process."""
    return _ENABLED


def enable_cpu() -> Dict[str, Any]:
    """Make megatron-core's CUDA code paths run on CPU (idempotent; never called on import).

    Returns a summary of what was redirected. The ``core`` patches (``import megatron_hyperball``)
    are applied too, so the torch-AdamW checkpoint fixes are in place on CPU as on GPU."""
    global _ENABLED
    with lock:
        if _ENABLED:
            return {"already_enabled": True}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            if "gloo" not in str(backend):
                raise RuntimeError(f"megatron_hyperball.compat.enable_cpu() needs the gloo backend, the default "
                                   f"process group uses {backend!r}")
        from megatron.core import package_info

        version = package_info.__version__
        if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_MEGATRON_VERSIONS):
            warnings.warn(f"megatron_hyperball.compat.enable_cpu() was written for megatron-core "
                          f"{SUPPORTED_MEGATRON_VERSIONS}, found {version}; the CPU layer may be incomplete",
                          stacklevel=2)
        for name in _EAGER_MODULES:
            importlib.import_module(name)
        modules = torch_view.install()
        functions = tensor_methods.install()
        rng.install()
        heap_reuse = allocator.keep_freed_memory()
        _ENABLED = True
        _log.debug("enable_cpu: %d modules, %d functions", modules, len(functions))
        return {"megatron_core": version, "modules_with_cpu_torch": modules,
                "functions_with_cpu_tensor_methods": functions, "heap_keeps_freed_memory": heap_reuse}


def backends() -> Dict[str, Any]:
    """Which optional GPU backends are importable and which Adam megatron-core will use.

    megatron.core.optimizer picks, at import: Transformer Engine's ``FusedAdam`` if
    ``transformer_engine.pytorch.optimizers`` imports, else apex's ``FusedAdam``, else
    ``torch.optim.AdamW``. This reports both what is importable and the class Megatron
    actually bound (``megatron.core.optimizer.Adam``).
    """

    def importable(module: str) -> bool:
        try:
            importlib.import_module(module)
            return True
        except Exception:  # ImportError, or a broken build raising something else
            return False

    te = importable("transformer_engine.pytorch")
    apex = importable("apex")
    apex_fused_adam = apex and importable("apex.optimizers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "falling back to Torch optimizers" warning
        megatron_optimizer = importlib.import_module("megatron.core.optimizer")
    adam_cls = getattr(megatron_optimizer, "Adam")
    qualname = f"{adam_cls.__module__}.{adam_cls.__qualname__}"
    if qualname.startswith("transformer_engine"):
        kernel = "te_fused_adam"
    elif qualname.startswith("apex"):
        kernel = "apex_fused_adam"
    else:
        kernel = "torch_adamw"
    return {
        "transformer_engine": te,
        "apex": apex,
        "apex_fused_adam": apex_fused_adam,
        "adam": kernel,
        "adam_class": qualname,
        "using_pytorch_optimizer": bool(getattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", False)),
        "cuda_available": torch.cuda.is_available(),
        "cpu_layer_enabled": _ENABLED,
    }
