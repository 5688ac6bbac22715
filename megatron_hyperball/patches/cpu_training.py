"""``megatron.training``'s loop on a machine without CUDA (group ``cpu``).

``compat.enable_cpu()`` already gives Megatron's modules a CPU view of torch (device factories,
streams, RNG). These entries cover what that view cannot: an explicit CUDA requirement, decisions
taken on ``torch.cuda.device_count()`` and on the GPU architecture, the warm-up compilation of GPU
fusions, ``Module.cuda()`` (``get_model`` and the config-container model builder), and a user
script's ``tensor.cuda()`` in its forward step (the drop-in launcher). None changes an algorithm: the same Megatron functions run, on
the CPU. The flags the entry adds on CPU (gloo, fusions off) are in ``pretrain.megatron_args``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import types

import torch

from megatron_hyperball.patches import Patch, register, replace

VERSIONS = ("0.19.",)


def _training():
    return importlib.import_module("megatron.training.training")


def _initialize():
    return importlib.import_module("megatron.training.initialize")


def _install_allow_no_cuda() -> None:
    initialize = _initialize()
    original = initialize.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    replace(initialize, "initialize_megatron", initialize_megatron)
    if _training().initialize_megatron is original:
        replace(_training(), "initialize_megatron", initialize_megatron)


register(Patch(
    name="cpu_allow_no_cuda",
    target="megatron.training.initialize.initialize_megatron",
    versions=VERSIONS, group="cpu",
    why="pretrain() calls initialize_megatron() without allow_no_cuda, which asserts torch.cuda.is_available(); "
        "Megatron's own escape hatch for CPU use is that flag.",
    install=_install_allow_no_cuda,
))


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


def _install_one_device() -> None:
    initialize = _initialize()
    for name in ("_initialize_distributed", "_set_random_seed"):
        getattr(initialize, name)  # fail loudly if Megatron moved them
    replace(initialize, "torch", _OneDeviceTorch(initialize.torch))


register(Patch(
    name="cpu_one_device",
    target="megatron.training.initialize.torch (device_count() = 1, set_device no-op)",
    versions=VERSIONS, group="cpu",
    why="With device_count() == 0, _initialize_distributed skips mpu.initialize_model_parallel (no TP/PP/DP "
        "groups) and _set_random_seed skips model_parallel_cuda_manual_seed (data-parallel replicas would not "
        "initialise identically). On CPU each process owns one device, the CPU.",
    install=_install_one_device,
))


def _install_no_jit_warmup() -> None:
    from megatron.core.utils import is_torch_min_version

    initialize = _initialize()
    original = initialize.set_jit_fusion_options
    if not is_torch_min_version("2.2.0a0"):
        return  # older torch also sets TorchScript fuser flags here: leave it alone

    @functools.wraps(original)
    def set_jit_fusion_options(tp_size=None):
        return None

    replace(initialize, "set_jit_fusion_options", set_jit_fusion_options)
    if _training().set_jit_fusion_options is original:
        replace(_training(), "set_jit_fusion_options", set_jit_fusion_options)


register(Patch(
    name="cpu_no_jit_warmup",
    target="megatron.training.initialize.set_jit_fusion_options",
    versions=VERSIONS, group="cpu",
    why="With torch >= 2.2 it only warms up (compiles, ~25 s with Inductor on a CPU) the bias-SwiGLU/GeLU and "
        "bias-dropout-add fusions, which the CPU entry turns off.",
    install=_install_no_jit_warmup,
))


def _install_no_gpu_arch() -> None:
    arguments = importlib.import_module("megatron.training.arguments")
    original = arguments.get_device_arch_version
    replace(arguments, "get_device_arch_version", functools.wraps(original)(lambda: 0))


register(Patch(
    name="cpu_no_gpu_arch",
    target="megatron.training.arguments.get_device_arch_version",
    versions=VERSIONS, group="cpu",
    why="validate_args reads the GPU's compute capability when TP or CP > 1, which raises without CUDA. The "
        "checks only choose CUDA stream settings; 0 takes the pre-Blackwell branch.",
    install=_install_no_gpu_arch,
))

_ORIG_MODULE_CUDA = torch.nn.Module.cuda
_depth = 0
_lock = threading.RLock()


def _module_cuda_on_cpu(self, device=None):
    dev = device if isinstance(device, torch.device) else (torch.device(device) if isinstance(device, str) else None)
    if dev is not None and dev.type == "cpu":
        return self
    return _ORIG_MODULE_CUDA(self, device)


@contextlib.contextmanager
def _modules_stay_on_cpu():
    global _depth
    with _lock:
        if _depth == 0:
            torch.nn.Module.cuda = _module_cuda_on_cpu
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.nn.Module.cuda = _ORIG_MODULE_CUDA


def _install_get_model_on_cpu() -> None:
    training = _training()
    original = training.get_model

    @functools.wraps(original)
    def get_model(*args, **kwargs):
        with _modules_stay_on_cpu():
            return original(*args, **kwargs)

    replace(training, "get_model", get_model)


register(Patch(
    name="cpu_get_model",
    target="megatron.training.training.get_model (Module.cuda(cpu) is a no-op inside)",
    versions=VERSIONS, group="cpu",
    why="get_model calls model_module.cuda(torch.cuda.current_device()), which the CPU view makes the CPU "
        "device; Module.cuda() with a CPU device raises. The model is built on the CPU, where it must stay.",
    install=_install_get_model_on_cpu,
))


def _install_cpu_forward_step() -> None:
    import megatron.training as training_package
    from megatron.training import training as trainer

    from megatron_hyperball.compat.tensor_methods import _cpu_tensors_as_device_tensors

    original = trainer.pretrain

    def on_cpu(forward_step_func):
        @functools.wraps(forward_step_func)
        def forward_step(*args, **kwargs):
            with _cpu_tensors_as_device_tensors():
                return forward_step_func(*args, **kwargs)

        return forward_step

    @functools.wraps(original)
    def pretrain(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func, *args, **kwargs):
        return original(cfg_container, train_valid_test_dataset_provider, model_type, on_cpu(forward_step_func),
                        *args, **kwargs)

    replace(trainer, "pretrain", pretrain)
    if training_package.pretrain is original:
        replace(training_package, "pretrain", pretrain)


register(Patch(
    name="cpu_forward_step_tensor_cuda",
    target="megatron.training.training.pretrain (forward_step_func: Tensor.cuda() keeps CPU tensors)",
    versions=VERSIONS, group="cpu",
    why="A script's forward step moves its batch with tensor.cuda() (Megatron-LM's pretrain_gpt.get_batch: "
        "batch[key].cuda(non_blocking=True)), which raises without CUDA; the script is the user's and is not "
        "changed. While the forward step runs, the CPU layer's tensor-method scope (compat.tensor_methods) "
        "makes Tensor.cuda() return the CPU tensor, as in Megatron's own functions it covers.",
    install=_install_cpu_forward_step,
))


def _install_cpu_model_chunks() -> None:
    from megatron.training.models import dist_utils

    original = dist_utils.prepare_existing_model_chunks_for_distributed_training

    @functools.wraps(original)
    def prepare_existing_model_chunks_for_distributed_training(*args, **kwargs):
        with _modules_stay_on_cpu():
            return original(*args, **kwargs)

    replace(dist_utils, "prepare_existing_model_chunks_for_distributed_training",
            prepare_existing_model_chunks_for_distributed_training)


register(Patch(
    name="cpu_model_chunks",
    target="megatron.training.models.dist_utils.prepare_existing_model_chunks_for_distributed_training "
           "(Module.cuda(cpu) is a no-op inside)",
    versions=VERSIONS, group="cpu",
    why="Megatron-LM's pretrain_gpt.py (0.19) builds the model through the config container's builder "
        "(GPTModelBuilder.build_distributed_models), not get_model, and this function calls "
        "model_module.cuda(torch.cuda.current_device()), which the CPU view makes the CPU device; Module.cuda() "
        "with a CPU device raises. The model is built on the CPU, where it must stay (as patch cpu_get_model).",
    install=_install_cpu_model_chunks,
))
