"""Run megatron-core's real CUDA-oriented code on CPU with the gloo backend.

``enable_cpu()`` is called once per process, after ``torch.distributed`` has been
initialised with the ``gloo`` backend and before any Megatron model, DDP wrapper or
optimizer is built. It is never run on import, and calling it again does nothing.

The idea: on a CPU-only run, *the CPU is the device*. megatron-core 0.19 assumes the
device is a CUDA GPU in a few kinds of places; each is redirected to the CPU so that
Megatron's own DDP, grad buffers, grad reduce-scatter / all-reduce, ZeRO-1
``DistributedOptimizer``, ``LayerWiseDistributedOptimizer``, ``GPTModel`` (local spec),
tensor parallelism and ``dist_checkpointing`` run unchanged. Nothing in Megatron is
mocked: the redirects only replace the device, never the algorithm.

What is redirected, and why
---------------------------

1. **A CPU view of ``torch`` for Megatron's modules** (``_CpuTorch``). Every loaded module
   under ``megatron.core`` / ``megatron.training`` whose global name ``torch`` is the torch
   module gets, as its ``torch``, a thin proxy that forwards everything to the real torch
   except:

   - tensor factories (``torch.tensor``, ``zeros``, ``empty``, ``ones``, ``full``,
     ``arange``, ``rand*``, ``*_like``, ...): a CUDA ``device=`` argument (``'cuda'``,
     ``'cuda:N'``, ``torch.device('cuda')`` or a bare device index) becomes ``'cpu'``.
     Megatron creates grad buffers, param buffers, loss-scale / found-inf / norm scalars,
     rotary ``inv_freq``, attention masks, all-gather outputs and checkpoint exchange
     buffers this way.
   - ``torch.cuda`` (``_CpuCuda``): ``current_device()`` returns ``torch.device('cpu')``
     (used as ``device=torch.cuda.current_device()`` all over DDP, tensor parallel layers
     and mappings, the distributed optimizer, rotary embeddings); ``current_stream()``,
     ``default_stream()``, ``Stream``, ``Event`` and ``stream(...)`` are no-op stand-ins
     (grad sync waits on the current stream and uses a communication stream; on CPU all
     work is synchronous, so there is nothing to order); ``synchronize()`` and
     ``empty_cache()`` do nothing; ``is_current_stream_capturing()`` is False; the RNG
     calls ``manual_seed``/``manual_seed_all``/``get_rng_state``/``set_rng_state``/
     ``random.*`` act on the CPU default generator, which is the generator CPU tensors
     draw from (see 3). Everything else, ``is_available()`` and ``device_count()``
     included, is the real ``torch.cuda``: no code is told a GPU exists.

   The proxy is scoped to Megatron's modules, so user code and other libraries see the
   unmodified torch. Megatron modules imported after ``enable_cpu()`` are covered by an
   import hook (``_MegatronImportHook``) that installs the proxy right after the module
   has executed. Why a proxy rather than a global patch of ``torch.zeros`` & co: the
   CUDA spots are spread over ~30 files and ~100 lines of Megatron; a proxy scoped to
   those files is the smallest change that covers all of them without altering torch
   for anyone else.

2. **Tensor methods in named functions** (``_CPU_TENSOR_METHOD_FUNCTIONS``). Some checks
   call methods on tensors rather than module functions, which the proxy cannot see:
   ``param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']`` /
   ``== 'torch.cuda.FloatTensor'`` (distributed optimizer's
   ``_build_model_and_main_param_groups`` and ``__init__``,
   ``Float16OptimizerWithFloat16Params.__init__``, ``clip_grad_by_total_norm_fp32``;
   CPU tensors would otherwise be rejected with a TypeError / AssertionError) and
   ``tensor.cuda()`` (distributed optimizer's ``get_parameter_state_dp_zero``, the grad
   scaler's ``load_state_dict``, ``broadcast_data``, ``check_param_hashes_across_dp_replicas``,
   the shared-embedding setup for pipeline parallelism, dist-checkpointing's
   exchange of loaded tensors). Only while one of these functions runs (process-wide for
   that duration), ``Tensor.type()`` with no argument reports a CPU tensor under its CUDA
   type name (same dtype, so the checks keep their meaning: "a float32 / half / bf16
   tensor on the device") and ``Tensor.cuda()`` returns the tensor unchanged. Outside
   those calls the methods are untouched.

3. **The CUDA RNG tracker** (``tensor_parallel.random``). ``model_parallel_cuda_manual_seed``
   and ``CudaRNGStatesTracker.add`` / ``fork`` keep running as written, with the CPU
   default generator as "the device generator": ``torch.cuda.manual_seed`` /
   ``get_rng_state`` come from the proxy (1) and the module helpers
   ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` are replaced with CPU versions.
   So ``model_parallel_cuda_manual_seed(seed)`` seeds the CPU generator with the same
   data-parallel seed on every rank (data-parallel replicas initialise identically, as
   they do on GPU), and ``get_cuda_rng_tracker().fork()`` switches the CPU generator
   to the tensor-parallel state for weight init and dropout. The tracker's warning
   "CPU RNG state changed within GPU RNG context" is dropped by a logging filter: on CPU
   the forked generator *is* the CPU generator, so the warning would fire on every fork.
   CUDA-graph-safe RNG (``use_cudagraphable_rng``) is not supported.

4. **ZeRO-1 checkpoints with torch's AdamW** (``DistributedOptimizer``). With neither
   Transformer Engine nor apex (always the case on CPU) Megatron's inner optimizer is
   ``torch.optim.AdamW``, which keeps a ``step`` tensor in every parameter's state, where
   TE/apex FusedAdam keep it in the param groups. Megatron 0.19 handles that in
   ``state_dict`` / ``load_state_dict`` (the step travels in the param groups) but three
   places miss it, so a torch_dist resume fails or silently resumes with a wrong step:

   - ``sharded_state_dict(is_loading=True)`` on a freshly built optimizer (the resume
     path) calls ``state_dict()``, which asserts every state has a step; before the first
     step the state is empty. Fix: when loading into an empty optimizer, allocate the state
     first with the optimizer's own ``init_state_fn`` (zero moments) plus ``step = 0``,
     the state torch's AdamW creates at its first step; the checkpoint overwrites it.
   - ``_set_main_param_and_optimizer_states`` copies every tensor of the parameter's
     state from the loaded parameter state, ``step`` included. The per-parameter step is
     not a sharded tensor in the checkpoint (it is a 0-d tensor taken from the *current*
     state while the sharded state dict is built), so the copy overwrites the step that
     ``load_state_dict`` has just restored from the param groups with the stale local one
     (``dp_reshardable``), or fails with ``KeyError: 'step'`` (``fully_reshardable``).
     Fix: the step is left as ``load_state_dict`` restored it.
   - ``load_state_dict`` gives every parameter state the *same* ``step`` tensor; torch's
     AdamW increments each state's step in place, so after a resume the shared step grows
     by the number of parameters per iteration and Adam's bias correction is wrong from
     the first step after the resume. Fix: each state gets its own copy of the step.

   All three apply only when Megatron found neither TE nor apex (``HAVE_APEX_OR_TE`` False).

5. **``megatron.training.initialize``**: ``initialize_megatron`` asserts
   ``torch.cuda.is_available()`` unless it is called with ``allow_no_cuda=True``; this
   layer does not lie about CUDA, so CPU runs through ``megatron.training`` must pass
   that flag (and seed with ``model_parallel_cuda_manual_seed`` themselves, because
   ``_set_random_seed`` only does so when ``torch.cuda.device_count() > 0``).

``enable_cpu()`` is for CPU runs: on a machine with a GPU it still sends Megatron's
work to the CPU, so do not call it for GPU training.

Known limits on CPU/gloo (not patched here): MoE needs the ``allgather`` token
dispatcher (gloo has no all-to-all); gloo refuses uneven ``all_gather``; fp16 with
dynamic loss scaling is untested; CUDA graphs, Transformer Engine, apex fused kernels
and NCCL user buffers are GPU-only. Megatron bugs that are not about the device are not
patched here either, e.g. (0.19.2) loading a ``dp_reshardable`` ZeRO-1 checkpoint into
an fp32 model fails ("a view of a leaf Variable that requires grad is being used in an
in-place operation": ``load_parameter_state_from_dp_reshardable`` lacks the
``@torch.no_grad()`` its siblings have) and Megatron's own Muon through the layer-wise
optimizer with ``bf16=False`` fails in ``ChainedOptimizer`` (config assert).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import inspect
import logging
import sys
import threading
import types
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch

__all__ = ["enable_cpu", "is_enabled", "backends"]

#: megatron-core versions these patches were written against and checked on.
SUPPORTED_MEGATRON_VERSIONS: Tuple[str, ...] = ("0.19",)

#: Megatron packages whose modules get the CPU view of torch.
_MEGATRON_PREFIXES: Tuple[str, ...] = ("megatron.core", "megatron.training")

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

_lock = threading.RLock()
_ENABLED = False
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# 1. CPU view of torch for Megatron modules
# --------------------------------------------------------------------------------------


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


def _is_megatron_module(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _MEGATRON_PREFIXES)


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
        if not _is_megatron_module(fullname):
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


# --------------------------------------------------------------------------------------
# 2. Tensor methods inside named Megatron functions
# --------------------------------------------------------------------------------------

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


def _rebind_everywhere(old: Callable, new: Callable) -> None:
    """Replace module-level references to ``old`` (``from x import f``) in Megatron modules."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not _is_megatron_module(name):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)


def _patch_tensor_method_functions() -> List[str]:
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


# --------------------------------------------------------------------------------------
# 3. CUDA RNG tracker on the CPU generator
# --------------------------------------------------------------------------------------


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


def _patch_rng() -> None:
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


# --------------------------------------------------------------------------------------
# 4. Loading into a fresh DistributedOptimizer without TE/apex
# --------------------------------------------------------------------------------------


def _allocate_fresh_torch_adam_state(dist_opt) -> None:
    """Give an empty inner torch optimizer the state its first step would create."""
    inner = dist_opt.optimizer
    if len(inner.state) > 0 or getattr(dist_opt, "init_state_fn", None) is None:
        return
    dist_opt.init_state_fn(inner, dist_opt.config)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if state and "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)


def _patch_torch_adam_checkpointing() -> List[str]:
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if getattr(distrib, "HAVE_APEX_OR_TE", True):
        return []  # TE/apex FusedAdam keep 'step' in the param groups: nothing to do
    cls = distrib.DistributedOptimizer
    names = ("sharded_state_dict", "_set_main_param_and_optimizer_states", "load_state_dict")
    originals = {name: vars(cls).get(name) for name in names}
    for name, fn in originals.items():
        if fn is None:
            raise RuntimeError(
                f"megatron_hyperball.compat: DistributedOptimizer.{name} not found; this "
                f"megatron-core version is not supported by the CPU layer"
            )
    if getattr(originals["sharded_state_dict"], "__megatron_hyperball_cpu__", False):
        return []
    hybrid = getattr(distrib, "HybridDeviceOptimizer", ())
    ssd, set_states = originals["sharded_state_dict"], originals["_set_main_param_and_optimizer_states"]
    load = originals["load_state_dict"]
    ssd_signature = inspect.signature(ssd)

    def plain_torch_optimizer(self) -> bool:
        return (
            not self.ddp_config.use_megatron_fsdp
            and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            and isinstance(self.optimizer, torch.optim.Optimizer)
            and not isinstance(self.optimizer, hybrid)
        )

    @functools.wraps(ssd)
    def sharded_state_dict(self, *args, **kwargs):
        loading = ssd_signature.bind(self, *args, **kwargs).arguments.get("is_loading", False)
        if loading and plain_torch_optimizer(self):
            _allocate_fresh_torch_adam_state(self)
        return ssd(self, *args, **kwargs)

    @functools.wraps(set_states)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if plain_torch_optimizer(self):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if isinstance(step, torch.Tensor):
                tensors = dict(tensors, step=step)  # copy_ onto itself: keep the restored step
        return set_states(self, model_param, tensors)

    @functools.wraps(load)
    def load_state_dict(self, state_dict):
        result = load(self, state_dict)
        if plain_torch_optimizer(self):
            for state in self.optimizer.state.values():
                step = state.get("step")
                if isinstance(step, torch.Tensor):
                    state["step"] = step.detach().clone()  # one step counter per parameter
        return result

    for fn in (sharded_state_dict, _set_main_param_and_optimizer_states, load_state_dict):
        fn.__megatron_hyperball_cpu__ = True
        setattr(cls, fn.__name__, fn)
    return [f"megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.{n}" for n in names]


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def _megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def is_enabled() -> bool:
    """Whether ``enable_cpu()`` has run in this process."""
    return _ENABLED


def enable_cpu() -> Dict[str, Any]:
    """Make megatron-core 0.19's CUDA code paths run on CPU.

    Call after ``torch.distributed.init_process_group('gloo', ...)`` (or without a process
    group at all for single-process use) and before building any Megatron model, DDP
    wrapper or optimizer. Idempotent; never called on import. Returns a summary of what
    was patched. What it redirects (details and reasons in the module docstring):

    1. In Megatron's modules only, ``torch`` is a CPU view: ``device='cuda'`` /
       ``device=torch.cuda.current_device()`` in tensor factories -> CPU (grad/param
       buffers, optimizer and clip-grad scalars, grad scaler, rotary and mask buffers,
       all-gather outputs, checkpoint exchange buffers); ``torch.cuda.current_stream`` /
       ``Stream`` / ``Event`` / ``stream()`` / ``synchronize`` / ``empty_cache`` -> no-ops
       (grad sync ordering); ``torch.cuda`` RNG calls -> the CPU generator.
    2. ``Tensor.type() == 'torch.cuda.*Tensor'`` checks and ``Tensor.cuda()`` calls inside
       the distributed / float16 optimizers, clip-grads, grad scaler, ``broadcast_data``,
       param-hash check, shared embeddings and dist-checkpoint exchange: CPU tensors pass
       as device tensors of the same dtype, only while those functions run.
    3. The CUDA RNG tracker (``model_parallel_cuda_manual_seed``,
       ``get_cuda_rng_tracker().fork()``) runs on the CPU generator.
    4. ZeRO-1 checkpoint load with torch's AdamW (no TE/apex): fresh-optimizer state,
       per-parameter ``step`` restored and not shared.
    """
    global _ENABLED
    with _lock:
        if _ENABLED:
            return {"already_enabled": True}

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            if "gloo" not in str(backend):
                raise RuntimeError(
                    f"megatron_hyperball.compat.enable_cpu() needs the gloo backend, "
                    f"the default process group uses {backend!r}"
                )

        version = _megatron_version()
        if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_MEGATRON_VERSIONS):
            warnings.warn(
                f"megatron_hyperball.compat.enable_cpu() was written for megatron-core "
                f"{SUPPORTED_MEGATRON_VERSIONS}, found {version}; the CPU layer may be incomplete",
                stacklevel=2,
            )

        for name in _EAGER_MODULES:
            importlib.import_module(name)

        # 1. CPU view of torch in every Megatron module, now and later.
        patched_modules = [
            name
            for name, mod in list(sys.modules.items())
            if _is_megatron_module(name) and _install_torch_view(mod)
        ]
        if not any(isinstance(f, _MegatronImportHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _MegatronImportHook())

        # 2. Tensor.type() / Tensor.cuda() inside named functions.
        patched_functions = _patch_tensor_method_functions()

        # 3. RNG tracker on the CPU generator.
        _patch_rng()

        # 4. ZeRO-1 checkpoints with torch's AdamW (no TE/apex).
        patched_functions += _patch_torch_adam_checkpointing()

        _ENABLED = True
        _log.debug("enable_cpu: %d modules, %d functions", len(patched_modules), len(patched_functions))
        return {
            "megatron_core": version,
            "modules_with_cpu_torch": len(patched_modules),
            "functions_with_cpu_tensor_methods": patched_functions,
        }


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
