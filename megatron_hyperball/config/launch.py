"""The checks between a valid config and the launch that runs it, before any process group exists.

- the number of processes: tp * pp must divide it, the global batch must split over the
  data-parallel ranks, ep must fit the data-parallel size;
- values this release accepts in the schema but cannot run yet (row-normalised router,
  fp32 on Megatron's layer-wise optimizer in the failing combinations of megatron-core 0.19.2);
- on a machine without CUDA: what the CPU path (gloo) cannot do; with CUDA: the packages the
  GPU-only choices need (Transformer Engine, grouped GEMM);
- with ``files=True`` (the entry): what the config needs from the file system
  (:mod:`megatron_hyperball.config.preflight`).

``cpu`` may be a callable: it is called (e.g. to import torch and ask for CUDA) only when the
config has a choice whose validity depends on it. Problems are (key path, message) pairs, reported
like the schema's in one ``ConfigError``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Callable, Sequence, Union

from megatron_hyperball.config.load import load_config, split_argv
from megatron_hyperball.config.schema import ConfigError, HyperballConfig

CpuFlag = Union[bool, Callable[[], bool]]

__all__ = ["launch_problems", "config_for_launch", "report_once_per_node"]


def report_once_per_node(message: str) -> None:
    """A refusal, printed on stderr by local rank 0 only (one copy per node, not one per rank).

    The other local ranks of a torchrun launch then wait (up to 10 s) for torchrun to stop them:
    when one of them exited first, torchrun stopped local rank 0 before it had printed (2 of 6
    refusals in one suite run on the loaded 2-core VM lost their message that way)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(10)


def _layout_problems(cfg: HyperballConfig, world_size: int) -> list[tuple[str, str]]:
    par, sch = cfg.parallelism, cfg.schedule
    mp = par.tp * par.pp
    if world_size % mp:
        return [("parallelism", f"tp * pp = {mp} does not divide the number of processes {world_size}; "
                                f"allowed: launch a multiple of {mp} processes, or tp * pp dividing {world_size}")]
    p = []
    dp = world_size // mp
    if sch.global_batch_size % (sch.micro_batch_size * dp):
        p.append(("schedule.global_batch_size",
                  f"{sch.global_batch_size} is not divisible by schedule.micro_batch_size * data-parallel size "
                  f"= {sch.micro_batch_size} * {dp} (dp = {world_size} processes / (tp * pp = {mp})); allowed: "
                  f"a multiple of {sch.micro_batch_size * dp}"))
    if cfg.model.moe is not None and dp % par.ep and (dp * par.tp) % par.ep:
        p.append(("parallelism.ep", f"{par.ep} does not divide the data-parallel size {dp}; allowed: a divisor of it"))
    return p


def _not_implemented(cfg: HyperballConfig) -> list[tuple[str, str]]:
    p = []
    moe = cfg.model.moe
    opt = cfg.optimizer
    if moe is not None and moe.router_sphere == "row" and (opt.md or not opt.sphere or opt.update_norm == "shape"):
        # row spheres: AdamH / MuonH in exact mode only (the MD gains and the shape factor assume one
        # sphere per matrix)
        why = (f"optimizer '{opt.name}'" + (" with optimizer.update_norm 'shape'" if opt.update_norm == "shape" else ""))
        p.append(("model.moe.router_sphere", f"'row' (each expert's routing vector on its own unit sphere) is "
                                             f"not available with {why}; allowed: frobenius, none (row: with "
                                             f"adamh / muonh and update_norm exact)"))
    # megatron-core 0.19.2's layer-wise optimizer in fp32 (checked on CPU): Muon fails when the
    # optimizer is built (ChainedOptimizer's config assert); MuonH trains but its first checkpoint
    # save fails (the fp32 members are FP32Optimizers, whose sharded state dict has no 'optimizer'
    # key, which LayerWiseDistributedOptimizer.sharded_state_dict reads)
    if cfg.precision == "fp32" and opt.muon_family and cfg.parallelism.distributed_optimizer:
        if opt.name == "muon":
            p.append(("precision", "fp32 with optimizer 'muon' on Megatron's layer-wise optimizer fails in "
                                   "megatron-core 0.19.2; allowed: bf16"))
        elif cfg.checkpoint.save is not None:
            p.append(("precision", f"fp32 with optimizer '{opt.name}' on the layer-wise optimizer cannot save "
                                   "checkpoints yet (megatron-core 0.19.2); allowed: bf16, or no checkpoint.save"))
    return p


def _cpu_problems(cfg: HyperballConfig) -> list[tuple[str, str]]:
    p = []
    if cfg.model.transformer_impl == "transformer_engine":
        p.append(("model.transformer_impl", "'transformer_engine' needs CUDA, and this machine has none; "
                                            "allowed on CPU: auto, local"))
    if cfg.precision == "fp16":
        p.append(("precision", "fp16 (dynamic loss scaling) is not supported on CPU; allowed on CPU: bf16, fp32"))
    moe = cfg.model.moe
    if moe is not None and moe.token_dispatcher != "allgather":
        p.append(("model.moe.token_dispatcher", f"'{moe.token_dispatcher}' needs all-to-all, which gloo "
                                                f"lacks; allowed on CPU: allgather"))
    if moe is not None and moe.grouped_gemm:
        p.append(("model.moe.grouped_gemm", "true needs CUDA grouped-GEMM kernels; allowed on CPU: false"))
    if moe is not None and cfg.parallelism.tp > 1:
        # Megatron requires sequence parallelism for MoE with TP > 1, and the CPU path's torch norms lack it
        p.append(("parallelism.tp", f"{cfg.parallelism.tp} with model.moe: MoE with tensor parallelism needs "
                                    f"sequence parallelism, which the CPU path lacks; allowed on CPU: 1"))
    return p


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _gpu_problems(cfg: HyperballConfig) -> list[tuple[str, str]]:
    p = []
    if cfg.model.transformer_impl == "transformer_engine" and not _installed("transformer_engine"):
        p.append(("model.transformer_impl", "'transformer_engine', but Transformer Engine is not installed; "
                                            "allowed: auto, local (or install transformer_engine)"))
    moe = cfg.model.moe
    if moe is not None and moe.grouped_gemm and not (_installed("transformer_engine") or _installed("grouped_gemm")):
        p.append(("model.moe.grouped_gemm", "true needs Transformer Engine or the grouped_gemm package, and "
                                            "neither is installed; allowed: false"))
    return p


def _machine_problems(cfg: HyperballConfig, cpu: CpuFlag) -> list[tuple[str, str]]:
    if callable(cpu):
        if not (_cpu_problems(cfg) or _gpu_problems(cfg)):
            return []  # nothing depends on the machine: do not ask it
        cpu = cpu()
    return _cpu_problems(cfg) if cpu else _gpu_problems(cfg)


def launch_problems(cfg: HyperballConfig, world_size: int, *, cpu: CpuFlag) -> list[tuple[str, str]]:
    """Problems between ``cfg`` and a launch of ``world_size`` processes (on CPU when ``cpu``)."""
    return _layout_problems(cfg, world_size) + _not_implemented(cfg) + _machine_problems(cfg, cpu)


def config_for_launch(argv: Sequence[str], world_size: int, *, cpu: CpuFlag,
                      files: bool = False) -> tuple[HyperballConfig, list[str]]:
    """The validated config of ``--config PATH [overrides] [other]`` for this launch, and the other
    arguments; one ConfigError (naming the file) for every problem of the config or the launch
    (and with ``files``, of the files and folders it names: ``preflight.file_problems``)."""
    path, overrides, rest = split_argv(argv)
    if path is None:
        raise ConfigError([("", "no config file; usage: --config X.yaml [KEY=VALUE ...]")])
    cfg = load_config(path, overrides)
    problems = launch_problems(cfg, world_size, cpu=cpu)
    if files:
        from megatron_hyperball.config.preflight import file_problems

        problems += file_problems(cfg, rest)
    if problems:
        raise ConfigError(problems, path)
    return cfg, rest
