"""Megatron-LM's own training script, unmodified, with the plugin: the drop-in launcher.

    torchrun --nproc-per-node 8 -m megatron_hyperball.run pretrain_gpt.py <Megatron flags> \\
        --optimizer adamh --hyperball-radius init          # or muonh, adammd, muonmd

Every rank runs :func:`main`, which

0. refuses (status 2, before anything is imported) a flag combination megatron-core 0.19.2 is
   known to fail on later (:func:`known_failure`: fp32 MuonH on the layer-wise optimizer with
   ``--save``, as the YAML entry does);
1. imports ``megatron_hyperball`` (registers ``adamh`` / ``muonh`` with Megatron's optimizer
   factory) and installs the ``training`` patches (``patches.apply_training``): the plugin's flags
   are chained onto Megatron's parser whatever ``extra_args_provider`` the script passes (patch
   ``parse_args_plugin_flags``, with :func:`mcore.args.add_launcher_args`), AdamH stays on the
   ZeRO-1 ``DistributedOptimizer`` and MuonH goes to the layer-wise optimizer (with the
   shard-aligned layout get_model gives it, also when the script builds the model through 0.19's
   config-container builder: patch ``builder_layer_wise_layout``), the built optimizer is checked
   and printed (``[hyperball] optimizer: ...``), ``--block-output-scale`` reaches the ``GPTModel``
   the script builds (patch ``gpt_model_block_output_scale``), an MoE ``GPTModel`` gets the YAML
   entry's router / shared-expert-gate tags (``--hyperball-router-sphere``) and global_aux_loss
   weight x dp (patch ``dropin_moe_model``);
2. on a machine without CUDA, first switches the CPU layer on (``compat.enable_cpu()`` before any
   process group or model exists, then the ``cpu`` patches) and puts the CPU flags the YAML entry
   uses (:data:`CPU_FLAGS`: gloo, the local layer spec, GPU fusions off) in front of the user's,
   each one unless the user gave that flag;
3. runs the script as ``__main__`` (``runpy.run_path``) with ``sys.argv`` = the script and the
   flags, and its folder first on ``sys.path`` (as ``python pretrain_gpt.py`` would).

Nothing else changes: the flags are Megatron's (validate_args, checkpoints, logging), and a
refused flag is Megatron's argparse usage error (status 2), e.g. ``--hyperball-radiuss`` or
``--hyperball-radius -1``.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, Sequence

from megatron_hyperball.config.launch import report_once_per_node

__all__ = ["main", "cpu_flags", "known_failure", "CPU_FLAGS", "USAGE", "EXIT_USAGE"]

EXIT_USAGE = 2

USAGE = """\
usage: torchrun [torchrun options] -m megatron_hyperball.run SCRIPT [Megatron flags] [plugin flags]

  SCRIPT   a Megatron-LM training script, unmodified (e.g. Megatron-LM's pretrain_gpt.py)

plugin flags (on Megatron's own parser):
  --optimizer adamh|muonh|adammd|muonmd   AdamH / AdamMD on Megatron's ZeRO-1 DistributedOptimizer
                                   (with --use-distributed-optimizer), MuonH / MuonMD on its
                                   layer-wise optimizer
  --hyperball-radius init|sqrt_max_dim|<positive number>
  --hyperball-update-norm exact|shape
  --hyperball-output-layer         adamh: the untied output layer on a sphere too
  --hyperball-embedding-lr / --hyperball-output-lr / --hyperball-scalar-lr <positive number>
  --hyperball-metrics-interval N   hyperball/weight_norm/* and hyperball/rel_update/* every N steps
  --hyperball-split-qkv            Q, K, V of the fused linear_qkv each on its own sphere
  --md-gains row_col|row|col|scalar|none   adammd / muonmd gains (default row_col)
  --md-gain-parametrization softplus|direct   --md-gain-lr <positive number> (default 1e-3)
  --md-allow-missing-gains         load a checkpoint without gains (gains start at 1)
  --block-output-scale 1/sqrt(2L)|1/L|<positive number>|none   Depth-muP (default none)
  --hyperball-router-sphere frobenius|row|none   MoE router under a sphere optimizer (default
                                   frobenius); the shared-expert gate takes Adam

Without CUDA the CPU layer is switched on and these Megatron flags are added unless given:
  {cpu}
"""

#: Megatron flags for a run on the CPU (gloo), as the YAML entry adds them
#: (``pretrain.megatron_args.megatron_argv``): each group is added unless its first flag was given.
CPU_FLAGS: tuple[tuple[str, ...], ...] = (
    ("--distributed-backend", "gloo"),
    ("--transformer-impl", "local"),        # Transformer Engine is GPU-only
    ("--no-gradient-accumulation-fusion",),  # needs TE / apex kernels
    ("--no-persist-layer-norm",),           # the local spec's torch norms have no persistent kernel
    ("--no-rope-fusion",),                  # Megatron's fused RoPE comes from Transformer Engine
    ("--no-bias-swiglu-fusion",),           # torch.compile fusions of GPU kernels
    ("--no-bias-gelu-fusion",),
    ("--no-bias-dropout-fusion",),
    ("--no-masked-softmax-fusion",),
)


def cpu_flags(user_flags: Sequence[str]) -> list[str]:
    """:data:`CPU_FLAGS` minus those the user gave (``--flag value`` or ``--flag=value``)."""
    given = {a.split("=", 1)[0] for a in user_flags if a.startswith("--")}
    out: list[str] = []
    for group in CPU_FLAGS:
        if group[0] not in given:
            out.extend(group)
    return out


def _last_value(flags: Sequence[str], name: str) -> Optional[str]:
    """The value of the last ``name value`` / ``name=value`` in ``flags`` (argparse: the last one wins)."""
    value = None
    for i, a in enumerate(flags):
        if a == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def known_failure(flags: Sequence[str]) -> Optional[str]:
    """A flag combination megatron-core 0.19.2 is known to fail on, as Megatron's parser would say it
    (the YAML entry refuses the same in ``config.launch``); None when there is none.

    fp32 MuonH / MuonMD on the layer-wise optimizer trains, but its first checkpoint save fails: the fp32
    members are FP32Optimizers, whose sharded state dict lacks the 'optimizer' key that
    LayerWiseDistributedOptimizer.sharded_state_dict reads."""
    optimizer = _last_value(flags, "--optimizer")
    if optimizer not in ("muonh", "muon_hyperball", "muonmd"):
        return None
    if "--use-distributed-optimizer" in flags and "--bf16" not in flags and "--fp16" not in flags \
            and _last_value(flags, "--save") is not None:
        return (f"--optimizer {optimizer} in fp32 on Megatron's layer-wise optimizer (--use-distributed-optimizer) "
                f"cannot save checkpoints with megatron-core 0.19.2; allowed: add --bf16, or leave out --save")
    return None


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _usage() -> str:
    return USAGE.format(cpu=" ".join(" ".join(g) for g in CPU_FLAGS))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    script, flags = argv[0], argv[1:]
    if script.startswith("-") or not os.path.isfile(script):
        report_once_per_node(f"{_usage()}\nmegatron_hyperball.run: error: {script!r} is not a file; the first "
                             f"argument is the training script (e.g. Megatron-LM's pretrain_gpt.py)")
        return EXIT_USAGE
    problem = known_failure(flags)
    if problem is not None:
        report_once_per_node(f"megatron_hyperball.run: error: {problem}")
        return EXIT_USAGE

    import torch

    import megatron_hyperball  # noqa: F401  (adamh / muonh registered, core patches)
    from megatron_hyperball import patches
    from megatron_hyperball.mcore.args import add_launcher_args
    from megatron_hyperball.patches import training as training_patches

    cpu = not torch.cuda.is_available()
    if cpu:
        from megatron_hyperball import compat

        compat.enable_cpu()  # before torch.distributed and any Megatron model exist (pretrain creates both)
    patches.apply_training(cpu=cpu)
    if add_launcher_args not in training_patches.EXTRA_ARGS_PROVIDERS:
        training_patches.EXTRA_ARGS_PROVIDERS.append(add_launcher_args)

    added = cpu_flags(flags) if cpu else []
    if _rank0():
        where = "CPU (gloo)" if cpu else "CUDA"
        print(f"[hyperball] drop-in: {script} on {where}" + (f"; added: {' '.join(added)}" if added else ""),
              flush=True)
    _run_script(script, added + flags)
    return 0


def _run_script(script: str, flags: list[str]) -> None:
    """``python SCRIPT FLAGS`` in this process: __main__, sys.argv, its folder first on sys.path."""
    path = os.path.abspath(script)
    saved_argv = sys.argv
    sys.argv = [script, *flags]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved_argv
        _flush_tensorboard()


def _flush_tensorboard() -> None:
    """Megatron flushes its TensorBoard writer when the loop ends but not after the final
    evaluation; the writer's thread would otherwise drop what is pending at exit."""
    try:
        from megatron.training.global_vars import get_tensorboard_writer

        writer = get_tensorboard_writer()
    except Exception:  # args never set (e.g. an argparse error)
        return
    if writer is not None:
        writer.flush()


if __name__ == "__main__":
    sys.exit(main())
