"""A CPU view of ``torch`` for megatron-core's modules: on a CPU-only run, the CPU is the device.

Every loaded module under ``megatron.core`` / ``megatron.training`` whose global ``torch`` is the
torch module gets a thin proxy that forwards everything to the real torch except: tensor
factories (a CUDA ``device=`` becomes 'cpu': grad/param buffers, loss-scale and norm scalars,
rotary and mask buffers, all-gather outputs, checkpoint exchange buffers) and ``torch.cuda``
(``current_device()`` is the CPU; streams, events, ``synchronize`` and ``empty_cache`` are no-ops,
since CPU work is synchronous; the RNG calls act on the CPU generator). ``is_available()`` and
``device_count()`` stay the real ones: no code is told a GPU exists. Modules imported later are
covered by an import hook. A proxy scoped to Megatron's ~30 files is the smallest change that
covers their ~100 CUDA-only lines without altering torch for anyone else.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import sys
import types
from typing import Any, Callable, Tuple

import torch

from megatron_hyperball.compat._common import is_megatron_module



def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec to 'cpu'; leave every other value as it is."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.split(":")[0] == "cuda" else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # a bare index means a CUDA ordinal
    return device


_FACTORIES: Tuple[str, ...] = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace",
    "logspace", "eye", "rand", "randn", "randint", "randperm", "empty_strided",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "tril_indices", "triu_indices", "scalar_tensor",
)


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, events are always done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, end_event) -> float:
        return 0.0


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous, nothing to order."""

    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def query(self) -> bool:
        return True

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_STREAM = _NullStream()


class _CpuCudaRandom(types.ModuleType):
    """``torch.cuda.random`` acting on the CPU default generator."""

    def __init__(self):
        super().__init__("torch.cuda.random")

    def __getattr__(self, name):
        return getattr(torch.cuda.random, name)

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as Megatron's modules see it after ``enable_cpu()``."""

    Stream = _NullStream
    Event = _NullEvent

    def __init__(self):
        super().__init__("torch.cuda")
        self.random = _CpuCudaRandom()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NULL_STREAM

    default_stream = current_stream

    @staticmethod
    def stream(stream: Any = None):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def is_current_stream_capturing() -> bool:
        return False

    # the RNG calls torch.cuda re-exports from torch.cuda.random: the same CPU versions
    manual_seed = staticmethod(_CpuCudaRandom.manual_seed)
    manual_seed_all = staticmethod(_CpuCudaRandom.manual_seed_all)
    get_rng_state = staticmethod(_CpuCudaRandom.get_rng_state)
    set_rng_state = staticmethod(_CpuCudaRandom.set_rng_state)


class _CpuTorch(types.ModuleType):
    """``torch`` as Megatron's modules see it after ``enable_cpu()`` (see module doc, 1)."""

    def __init__(self):
        super().__init__("torch")
        self.__dict__["cuda"] = _CpuCuda()
        for name in _FACTORIES:
            if hasattr(torch, name):
                self.__dict__[name] = _cpu_factory(getattr(torch, name))

    def __getattr__(self, name):
        # Only reached for names not overridden above: forward to the real torch.
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<megatron_hyperball CPU view of module 'torch'>"


_CPU_TORCH = _CpuTorch()


def _install_torch_view(module: types.ModuleType) -> bool:
    """Give ``module`` the CPU view of torch if its global ``torch`` is the torch module."""
    if module is None or getattr(module, "torch", None) is not torch:
        return False
    module.torch = _CPU_TORCH
    return True


class _PatchingLoader(importlib.abc.Loader):
    """Wraps a loader; after the module has executed, gives it the CPU view of torch."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _install_torch_view(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Installs the CPU view of torch in Megatron modules imported after ``enable_cpu()``."""

    def find_spec(self, fullname, path, target=None):
        if not is_megatron_module(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None




def install() -> int:
    """Give every loaded Megatron module, and every one imported later, the CPU view of torch;
    returns how many loaded modules got it."""
    count = sum(1 for name, mod in list(sys.modules.items())
                if is_megatron_module(name) and _install_torch_view(mod))
    if not any(isinstance(f, _MegatronImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronImportHook())
    return count
