"""Megatron GPT + DDP + (hyperball) optimizer on CPU/gloo, for the adapter tests.

Usage (under torchrun): hyperball_worker.py OUT.json --scenario fed|e2e|bad [options]

fed: every rank writes the same synthetic full gradient (sliced to its TP shard) into the DDP
     grad buffers and calls optimizer.step(): the optimizer alone, any DP/TP layout.
e2e: forward + backward + Megatron's grad sync + step on a fixed global batch.
bad: each invalid input in BAD_CASES; records the error each one raised.
Weights start from synthetic full tensors (tests/workers/synthetic.py), identical for every
layout, so TP=1 and TP=2 runs start equal. ``--optimizers a,b`` runs each from the same start
in one launch. Rank 0 writes the full fp32 params as 'OPT/NAME' (OUT.json.pt).
"""

import argparse
import collections

from common import full_params, setup, teardown, token_batch, train_step, write_result
from synthetic import SHAPE, full_grad, load_full_weights, local_slice

import torch
import torch.distributed as dist


def build(args, optimizer_name, **config_changes):
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_hyperball.megatron.model import build_gpt, seed_all, wrap_ddp
    from megatron_hyperball.megatron.options import HyperballOptimizerConfig
    from megatron_hyperball.megatron.routing import tag_position_embeddings

    seed_all(1234)
    model = build_gpt(**SHAPE, bf16=args.bf16)
    load_full_weights(model, zero=args.zero_param)
    tag_position_embeddings(model)
    ddp = wrap_ddp(model, use_distributed_optimizer=not args.no_dist_opt, layer_wise=args.layer_wise)
    fields = dict(
        optimizer=optimizer_name,
        lr=args.lr,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=not args.no_dist_opt,
        use_layer_wise_distributed_optimizer=args.layer_wise,
        muon_nesterov=True,
        muon_fp32_matmul_prec="highest",
        muon_tp_mode="duplicated",
        muon_split_qkv=False,
        hyperball_radius=args.radius,
        hyperball_update_norm=args.update_norm,
        loss_scale=args.loss_scale,
    )
    overrides = config_changes.pop("config_overrides", None)
    fields.update(config_changes)
    config = HyperballOptimizerConfig(**fields)
    optimizer = get_megatron_optimizer(config, [ddp], config_overrides=overrides)
    # Megatron's scheduler sets each group's lr and weight decay (wd * wd_mult), as in training
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr, max_lr=args.lr, min_lr=args.lr, lr_warmup_steps=0,
        lr_decay_steps=args.steps, lr_decay_style="constant", start_wd=config.weight_decay,
        end_wd=config.weight_decay, wd_incr_steps=args.steps, wd_incr_style="constant")
    return ddp, optimizer, scheduler


def layout_stats(optimizer):
    from megatron_hyperball.megatron.factory import leaf_optimizers

    total, local = 0, 0
    for leaf in leaf_optimizers(optimizer):
        layout = getattr(getattr(leaf, "optimizer", leaf), "_layout", None)
        if layout is not None:
            total += layout.num_spheres
            local += len(layout.index)
    return {"spheres": total, "local_spheres": local}


def fed_step(ddp, optimizer, step, nan=False):
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    for name, p in ddp.named_parameters():
        name = name.replace("module.", "")
        g = local_slice(full_grad(name, p, step, tp), p, tp, tp_rank)
        if nan and name.endswith("linear_fc1.weight"):
            g = g.clone()
            g.view(-1)[0] = float("nan")
        p.main_grad.copy_(g)
    ok, _, _ = optimizer.step()
    return bool(ok)


class AllReduceCounter:
    """Counts torch.distributed.all_reduce calls by the ranks of their group, while active."""

    def __init__(self):
        self.counts = collections.Counter()
        self.active = False
        self._orig = dist.all_reduce

        def counting(tensor, *a, **kw):
            if self.active:
                group = kw.get("group", a[1] if len(a) > 1 else None)
                self.counts[str(dist.get_process_group_ranks(group) if group is not None else "world")] += 1
            return self._orig(tensor, *a, **kw)

        dist.all_reduce = counting


def run_training(args, name, counter):
    from megatron_hyperball.megatron.factory import describe

    ddp, optimizer, scheduler = build(args, name)
    out = {"ok": [], "losses": [], "describe": describe(optimizer), **layout_stats(optimizer)}
    for step in range(args.steps):
        if step == args.skip_step:
            continue
        scheduler.step(increment=1)
        counter.active = step == args.steps - 1  # count the collectives of one full step
        if args.scenario == "fed":
            out["ok"].append(fed_step(ddp, optimizer, step, nan=(step == args.nan_step)))
        else:
            tokens, labels = token_batch(step, args.global_batch, SHAPE["seq_length"], SHAPE["vocab_size"])
            res = train_step(ddp, optimizer, tokens, labels)
            out["ok"].append(res["ok"])
            out["losses"].append(res["loss"])
        counter.active = False
    # counts of this rank, keyed by group: the test compares optimizers on the same layout
    out["all_reduce_counts"] = dict(counter.counts)
    counter.counts.clear()
    counts = torch.tensor([out["local_spheres"]], dtype=torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.MIN)
    out["min_local_spheres"] = counts.item()
    return out, full_params(ddp)


def checkpoint_run(args, name):
    """Train steps [0, resume_at), save (torch_dist) ... or load, then train [resume_at, steps)."""
    import os

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )

    from megatron_hyperball.megatron.model import unwrap

    ddp, optimizer, scheduler = build(args, name)
    metadata = {  # what megatron.training passes for a torch_dist checkpoint
        "distrib_optim_sharding_type": "dp_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }

    def state(is_loading):
        sd = {"model": unwrap(ddp).sharded_state_dict(metadata=metadata)}
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=metadata)
        return sd

    def train(steps):
        losses = []
        for step in steps:
            scheduler.step(increment=1)
            tokens, labels = token_batch(step, args.global_batch, SHAPE["seq_length"], SHAPE["vocab_size"])
            losses.append(train_step(ddp, optimizer, tokens, labels)["loss"])
        return losses

    out = {}
    if args.phase == "load":
        with torch.no_grad():  # start elsewhere, so a load that missed something shows
            for p in ddp.parameters():
                p.mul_(1.5)
        loaded = dist_checkpointing.load(state(True), args.ckpt_dir,
                                         sharded_strategy=get_default_load_sharded_strategy(args.ckpt_dir))
        unwrap(ddp).load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.num_steps = args.resume_at
    else:
        out["losses_before"] = train(range(args.resume_at))
        if args.phase == "save":
            if dist.get_rank() == 0:
                os.makedirs(args.ckpt_dir, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save(state(False), args.ckpt_dir,
                                    sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    out["losses_after"] = train(range(args.resume_at, args.steps))
    return out, full_params(ddp)


def bad_cases(args):
    """Each invalid input: the error it raised (type and message), or None if it raised none."""
    from megatron.core.optimizer import ParamKey

    cases = {
        "typo": dict(name="adamhh"),
        "radius": dict(name="adamh", hyperball_radius="unit"),
        "update_norm": dict(name="muonh", hyperball_update_norm="rms", use_layer_wise_distributed_optimizer=True),
        "weight_decay": dict(name="adamh", config_overrides={ParamKey(name="*linear_fc1.weight"): {"wd_mult": 1.0}}),
        "muonh_on_zero1": dict(name="muonh"),
    }
    if args.zero_param:
        cases = {"zero_norm": dict(name="adamh")}
    found = {}
    for case, changes in cases.items():
        changes = dict(changes)
        name = changes.pop("name")
        try:
            build(args, name, **changes)
            found[case] = None
        except Exception as e:  # noqa: BLE001 - the test inspects what was raised
            found[case] = f"{type(e).__name__}: {e}"
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--scenario", default="fed", choices=["fed", "e2e", "bad", "ckpt"])
    ap.add_argument("--phase", default="straight", choices=["straight", "save", "load"],
                    help="ckpt: straight through, train+save+continue, or load+continue")
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--resume-at", type=int, default=2)
    ap.add_argument("--optimizers", default="adamh")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--clip-grad", type=float, default=0.0)
    ap.add_argument("--radius", default="init")
    ap.add_argument("--update-norm", default="exact")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--layer-wise", action="store_true")
    ap.add_argument("--no-dist-opt", action="store_true")
    ap.add_argument("--loss-scale", type=float, default=None)
    ap.add_argument("--nan-step", type=int, default=-1, help="fed: put a NaN in one grad at this step")
    ap.add_argument("--skip-step", type=int, default=-1, help="leave this step index out entirely")
    ap.add_argument("--zero-param", default=None, help="zero this param before building the optimizer")
    ap.add_argument("--global-batch", type=int, default=4)
    args = ap.parse_args()

    setup(tp=args.tp)
    counter = AllReduceCounter()
    if args.scenario == "bad":
        write_result(args.out, {"errors": bad_cases(args)})
        teardown()
        return
    result, tensors = {}, {}
    for name in args.optimizers.split(","):
        if args.scenario == "ckpt":
            result[name], params = checkpoint_run(args, name)
        else:
            result[name], params = run_training(args, name, counter)
        tensors.update({f"{name}/{k}": v for k, v in params.items()})
    write_result(args.out, result, tensors=tensors)
    teardown()


if __name__ == "__main__":
    main()
