"""torch_dist checkpoint round trip of model + DistributedOptimizer with dist_checkpointing.

Usage (under torchrun):
  ckpt_roundtrip.py OUT.json CKPT_ROOT save VARIANT [VARIANT ...]
      per variant: build (seed 1234), train steps 0-1, save the model's and the optimizer's
      sharded state dicts under CKPT_ROOT/VARIANT, train steps 2-3.
  ckpt_roundtrip.py OUT.json CKPT_ROOT load VARIANT [VARIANT ...]
      per variant: build from another seed (so a missed load shows), load the checkpoint,
      train steps 2-3.

VARIANT is ``<fp32|bf16>:<distrib_optim_sharding_type>``, e.g. ``bf16:dp_reshardable``
(megatron.training's default) or ``fp32:fully_reshardable``. Rank 0 writes, per
variant, the losses of steps 2-3, and (OUT.json.pt) the full parameters and its local
optimizer state at the checkpoint and the full parameters after step 3.
"""

import argparse
import os

from common import full_params, setup, teardown, token_batch, train_step, write_result

import torch
import torch.distributed as dist

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)
GLOBAL_BATCH = 4


def sharded_state_dict(model, optimizer, metadata, is_loading):
    """What megatron.training checkpoints: the unwrapped model's and the optimizer's."""
    state = {"model": model.sharded_state_dict(metadata=metadata)}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def local_optimizer_state(optimizer):
    """This rank's inner optimizer state (moments, step) and fp32 main params, in order."""
    out = {}
    for i, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for j, p in enumerate(group["params"]):
                out[f"{i}.{g}.{j}.param"] = p.detach().clone()
                for k, v in inner.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        out[f"{i}.{g}.{j}.{k}"] = v.detach().clone()
    return out


def run_variant(variant, phase, ckpt_dir):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_hyperball.megatron.model import build_gpt, init_parallel, unwrap, wrap_ddp

    dtype, sharding = variant.split(":")
    bf16 = dtype == "bf16"
    init_parallel(tp=1, seed=1234 if phase == "save" else 4321)
    ddp = wrap_ddp(build_gpt(**SHAPE, bf16=bf16), use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.01,
            adam_beta2=0.95,
            clip_grad=1.0,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=True,
        ),
        [ddp],
    )
    # The metadata megatron.training passes for a torch_dist checkpoint.
    metadata = {
        "distrib_optim_sharding_type": sharding,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }

    def step(s):
        tokens, labels = token_batch(s, GLOBAL_BATCH, SHAPE["seq_length"], SHAPE["vocab_size"])
        return train_step(ddp, optimizer, tokens, labels)["loss"]

    result = {"dp": parallel_state.get_data_parallel_world_size()}
    tensors = {}
    if phase == "save":
        result["losses_before_save"] = [step(s) for s in (0, 1)]
        tensors["at_checkpoint"] = full_params(ddp)
        tensors["optimizer_at_checkpoint"] = local_optimizer_state(optimizer)
        state = sharded_state_dict(unwrap(ddp), optimizer, metadata, is_loading=False)
        if dist.get_rank() == 0:
            os.makedirs(ckpt_dir, exist_ok=True)  # dist_checkpointing wants it to exist
        dist.barrier()
        dist_checkpointing.save(
            state, ckpt_dir, sharded_strategy=get_default_save_sharded_strategy("torch_dist")
        )
    else:
        before = full_params(ddp)
        state = sharded_state_dict(unwrap(ddp), optimizer, metadata, is_loading=True)
        loaded = dist_checkpointing.load(
            state, ckpt_dir, sharded_strategy=get_default_load_sharded_strategy(ckpt_dir)
        )
        unwrap(ddp).load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        tensors["at_checkpoint"] = full_params(ddp)
        tensors["optimizer_at_checkpoint"] = local_optimizer_state(optimizer)
        result["load_changed_params"] = any(
            not torch.equal(before[k], tensors["at_checkpoint"][k]) for k in before
        )
    result["losses_after"] = [step(s) for s in (2, 3)]
    tensors["final"] = full_params(ddp)
    return result, tensors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("ckpt_root")
    ap.add_argument("phase", choices=["save", "load"])
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()

    setup()
    results, tensors = {"phase": args.phase}, {}
    for variant in args.variants:
        ckpt_dir = os.path.join(args.ckpt_root, variant.replace(":", "-"))
        results[variant], tensors[variant] = run_variant(variant, args.phase, ckpt_dir)
    write_result(args.out, results, tensors=tensors)
    teardown()


if __name__ == "__main__":
    main()
