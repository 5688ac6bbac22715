"""Run ``megatron.training``'s loop (``pretrain``) from the pip wheel, and on CPU with gloo.

``enable_training_fixes()`` is called by the entry script on every machine (GPU or CPU) before
``megatron.training.training.pretrain``; it fixes what the megatron-core wheel lacks for the
trainer (see :data:`WHEEL_PATCHES`).

``enable_cpu_training()`` is called once per process by the entry script on CPU, after
``megatron_hyperball.compat.enable_cpu()`` and before ``megatron.training.training.pretrain``.
``enable_cpu()`` already gives every ``megatron.training`` module the CPU view of ``torch``
(``device='cuda'`` factories -> CPU, no-op streams, CPU RNG); the patches in :data:`PATCHES`
cover what that view cannot: an explicit CUDA requirement, decisions taken on
``torch.cuda.device_count()`` and on the GPU architecture, the warm-up compilation of GPU
fusions, and ``Module.cuda()``. Each one is listed with what it changes, where in Megatron, and
why. None of them changes an algorithm: the same Megatron functions run, on the CPU. The flags
the entry adds on CPU (gloo, fusions off) are listed in ``pretrain.entry.megatron_argv``.

Checked against megatron-core 0.19.2 (:data:`SUPPORTED_MEGATRON_VERSIONS`); each patch checks
that the function it wraps exists and raises a clear error if it does not.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import types
import warnings
from typing import Any, Callable, Dict, List

import torch

__all__ = ["enable_training_fixes", "enable_cpu_training", "is_enabled", "PATCHES", "WHEEL_PATCHES",
           "SUPPORTED_MEGATRON_VERSIONS"]

SUPPORTED_MEGATRON_VERSIONS = ("0.19",)

#: (what, where in Megatron, why) of the patches applied on every machine.
WHEEL_PATCHES: List[Dict[str, str]] = [
    {
        "what": "compile_helpers() does not run make when the prebuilt helpers_cpp extension imports",
        "where": "megatron.training.initialize._compile_dependencies -> "
                 "megatron.core.datasets.utils.compile_helpers",
        "why": "initialize_megatron() runs `make -C megatron/core/datasets` on rank 0 to build the C++ "
               "dataset helpers. The megatron-core wheel ships them prebuilt "
               "(helpers_cpp.cpython-*.so) but no Makefile, so make fails and compile_helpers() calls "
               "sys.exit(1). When the extension imports there is nothing to build; otherwise the "
               "original runs.",
    },
]

#: (what, where in Megatron, why) of every CPU patch, for the README and the error messages.
PATCHES: List[Dict[str, str]] = [
    {
        "what": "initialize_megatron(allow_no_cuda=True)",
        "where": "megatron.training.training.pretrain -> megatron.training.initialize.initialize_megatron",
        "why": "pretrain() calls initialize_megatron() without allow_no_cuda, which asserts "
               "torch.cuda.is_available(); Megatron's own escape hatch for CPU use is that flag.",
    },
    {
        "what": "torch.cuda.device_count() reads 1 and torch.cuda.set_device() is a no-op inside "
                "megatron.training.initialize",
        "where": "megatron.training.initialize._initialize_distributed, _set_random_seed",
        "why": "with device_count() == 0, _initialize_distributed skips "
               "mpu.initialize_model_parallel (no TP/PP/DP groups) and _set_random_seed skips "
               "tensor_parallel.model_parallel_cuda_manual_seed (no RNG tracker, so data-parallel "
               "replicas would not initialise identically). On CPU each process owns one device, the "
               "CPU: counting it lets both run exactly as written (the seed goes to the CPU generator "
               "through compat.cpu).",
    },
    {
        "what": "set_jit_fusion_options() skips the warm-up of the fused kernels",
        "where": "megatron.training.training.pretrain -> "
                 "megatron.training.initialize.set_jit_fusion_options -> _warmup_jit_function",
        "why": "with torch >= 2.2 set_jit_fusion_options only warms up the torch.compile'd bias-SwiGLU/GeLU "
               "and bias-dropout-add fusions, i.e. compiles them for this shape ahead of the first step "
               "(about 25 s with Inductor on a CPU). The CPU entry turns those fusions off "
               "(--no-bias-swiglu-fusion, --no-bias-gelu-fusion, --no-bias-dropout-fusion), so nothing "
               "would use the compiled kernels.",
    },
    {
        "what": "get_device_arch_version() is 0 (no GPU architecture) in validate_args",
        "where": "megatron.training.arguments.validate_args (tensor / context parallelism, FSDP and "
                 "GTP checks) -> megatron.training.utils.get_device_arch_version",
        "why": "validate_args reads the GPU's compute capability when TP or CP > 1 "
               "(torch.cuda.get_device_properties('cuda:0'), which raises without CUDA). The checks "
               "only choose CUDA stream settings; 0 takes the pre-Blackwell branch, whose "
               "CUDA_DEVICE_MAX_CONNECTIONS=1 requirement the entry sets (inert on CPU).",
    },
    {
        "what": "Module.cuda(cpu device) returns the module unchanged inside get_model",
        "where": "megatron.training.training.get_model ('GPU allocation': "
                 "model_module.cuda(torch.cuda.current_device()))",
        "why": "compat.cpu makes torch.cuda.current_device() the CPU device; Module.cuda() with a CPU "
               "device raises. The model is built on the CPU already, which is where it must stay.",
    },
]

_lock = threading.Lock()
_ENABLED = False
_FIXED = False


def is_enabled() -> bool:
    return _ENABLED


def _require(module: types.ModuleType, name: str) -> Any:
    if not hasattr(module, name):
        raise RuntimeError(f"megatron_hyperball.compat.training: {module.__name__}.{name} not found; this "
                           f"megatron-core version is not supported by the CPU training layer "
                           f"(written for {SUPPORTED_MEGATRON_VERSIONS})")
    return getattr(module, name)


def _mark(fn: Callable) -> Callable:
    fn.__megatron_hyperball_cpu_training__ = True
    return fn


def _marked(fn: Any) -> bool:
    return getattr(fn, "__megatron_hyperball_cpu_training__", False)


# 0. the wheel's prebuilt dataset helpers -----------------------------------------------------------
def _patch_compile_helpers() -> None:
    utils = importlib.import_module("megatron.core.datasets.utils")
    original = _require(utils, "compile_helpers")
    if _marked(original):
        return

    @functools.wraps(original)
    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return original()
        return None

    utils.compile_helpers = _mark(compile_helpers)


def _check_version() -> str:
    from megatron.core import package_info

    version = package_info.__version__
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_MEGATRON_VERSIONS):
        warnings.warn(f"megatron_hyperball.compat.training was written for megatron-core "
                      f"{SUPPORTED_MEGATRON_VERSIONS}, found {version}; its patches may be incomplete",
                      stacklevel=3)
    return version


def enable_training_fixes() -> Dict[str, Any]:
    """Apply :data:`WHEEL_PATCHES` (idempotent; on GPU and CPU alike)."""
    global _FIXED
    with _lock:
        if not _FIXED:
            _patch_compile_helpers()
            _FIXED = True
    return {"megatron_core": _check_version(), "patches": [p["what"] for p in WHEEL_PATCHES]}


# 1. initialize_megatron(allow_no_cuda=True) ----------------------------------------------------------
def _patch_initialize_megatron() -> None:
    training = importlib.import_module("megatron.training.training")
    initialize = importlib.import_module("megatron.training.initialize")
    original = _require(initialize, "initialize_megatron")
    if _marked(original):
        return

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    _mark(initialize_megatron)
    initialize.initialize_megatron = initialize_megatron
    if _require(training, "initialize_megatron") is original:
        training.initialize_megatron = initialize_megatron


# 2. one (CPU) device per process inside megatron.training.initialize ------------------------------------
class _OneDeviceCuda(types.ModuleType):
    """``torch.cuda`` as ``megatron.training.initialize`` sees it on CPU: one device, the CPU."""

    def __init__(self, base):
        super().__init__("torch.cuda")
        self.__dict__["_base"] = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device) -> None:
        pass


class _OneDeviceTorch(types.ModuleType):
    def __init__(self, base):
        super().__init__("torch")
        self.__dict__["_base"] = base
        self.__dict__["cuda"] = _OneDeviceCuda(base.cuda)

    def __getattr__(self, name):
        return getattr(self._base, name)


def _patch_initialize_device_count() -> None:
    initialize = importlib.import_module("megatron.training.initialize")
    for name in ("_initialize_distributed", "_set_random_seed"):
        _require(initialize, name)
    base = initialize.torch
    if isinstance(base, _OneDeviceTorch):
        return
    initialize.torch = _OneDeviceTorch(base)


# 3. no fused-kernel warm-up -------------------------------------------------------------------------------
def _patch_jit_warmup() -> None:
    training = importlib.import_module("megatron.training.training")
    initialize = importlib.import_module("megatron.training.initialize")
    original = _require(initialize, "set_jit_fusion_options")
    _require(initialize, "_warmup_jit_function")
    if _marked(getattr(training, "set_jit_fusion_options", None)):
        return
    from megatron.core.utils import is_torch_min_version

    if not is_torch_min_version("2.2.0a0"):
        return  # older torch also sets TorchScript fuser flags here: leave it alone

    @functools.wraps(original)
    def set_jit_fusion_options(tp_size=None):
        return None

    _mark(set_jit_fusion_options)
    initialize.set_jit_fusion_options = set_jit_fusion_options
    if _require(training, "set_jit_fusion_options") is original:
        training.set_jit_fusion_options = set_jit_fusion_options


# 4. no GPU architecture in validate_args ------------------------------------------------------------
def _no_gpu_arch() -> int:
    return 0


def _patch_device_arch() -> None:
    arguments = importlib.import_module("megatron.training.arguments")
    original = _require(arguments, "get_device_arch_version")
    if _marked(original):
        return
    arguments.get_device_arch_version = _mark(functools.wraps(original)(lambda: _no_gpu_arch()))


# 5. Module.cuda() inside get_model ----------------------------------------------------------------------
_ORIG_MODULE_CUDA = torch.nn.Module.cuda
_scope_depth = 0
_scope_lock = threading.RLock()


def _module_cuda_on_cpu(self, device=None):
    dev = device if isinstance(device, torch.device) else (torch.device(device) if isinstance(device, str) else None)
    if dev is not None and dev.type == "cpu":
        return self
    return _ORIG_MODULE_CUDA(self, device)


@contextlib.contextmanager
def _modules_stay_on_cpu():
    global _scope_depth
    with _scope_lock:
        if _scope_depth == 0:
            torch.nn.Module.cuda = _module_cuda_on_cpu
        _scope_depth += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                torch.nn.Module.cuda = _ORIG_MODULE_CUDA


def _patch_get_model() -> None:
    training = importlib.import_module("megatron.training.training")
    original = _require(training, "get_model")
    if _marked(original):
        return

    @functools.wraps(original)
    def get_model(*args, **kwargs):
        with _modules_stay_on_cpu():
            return original(*args, **kwargs)

    training.get_model = _mark(get_model)


def enable_cpu_training() -> Dict[str, Any]:
    """Apply :data:`WHEEL_PATCHES` and :data:`PATCHES` (idempotent). Needs ``compat.enable_cpu()`` first."""
    global _ENABLED
    from megatron_hyperball.compat import cpu

    if not cpu.is_enabled():
        raise RuntimeError("enable_cpu_training(): call megatron_hyperball.compat.enable_cpu() first")
    enable_training_fixes()
    with _lock:
        if _ENABLED:
            return {"already_enabled": True}
        version = _check_version()
        _patch_initialize_megatron()
        _patch_initialize_device_count()
        _patch_jit_warmup()
        _patch_device_arch()
        _patch_get_model()
        _ENABLED = True
        return {"megatron_core": version, "patches": [p["what"] for p in PATCHES]}
