"""Megatron GPT + DDP + (hyperball) optimizer on CPU/gloo, for the adapter tests.

Usage (under torchrun): hyperball_worker.py OUT.json --scenario fed|e2e [options]

fed: every rank writes the same synthetic full gradient (sliced to its TP shard) into the DDP
     grad buffers and calls optimizer.step(): the optimizer alone, any DP/TP layout.
e2e: forward + backward + Megatron's grad sync + step on a fixed global batch.
Weights start from synthetic full tensors (tests/workers/synthetic.py), identical for every
layout, so TP=1 and TP=2 runs start equal. Rank 0 writes the full fp32 params (OUT.json.pt).
"""

import argparse

from common import full_params, setup, teardown, token_batch, train_step, write_result
from synthetic import SHAPE, full_grad, load_full_weights, local_slice

import torch
import torch.distributed as dist


def build(args):
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_hyperball.megatron.model import build_gpt, wrap_ddp
    from megatron_hyperball.megatron.options import HyperballOptimizerConfig
    from megatron_hyperball.megatron.routing import tag_position_embeddings

    model = build_gpt(**SHAPE, bf16=args.bf16)
    load_full_weights(model, zero=args.zero_param)
    tag_position_embeddings(model)
    ddp = wrap_ddp(model, use_distributed_optimizer=not args.no_dist_opt, layer_wise=args.layer_wise)
    config = HyperballOptimizerConfig(
        optimizer=args.optimizer,
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
    optimizer = get_megatron_optimizer(config, [ddp])
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
        inner = getattr(leaf, "optimizer", leaf)
        layout = getattr(inner, "_layout", None)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--scenario", default="fed", choices=["fed", "e2e"])
    ap.add_argument("--optimizer", default="adamh")
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
    ap.add_argument("--zero-param", default=None, help="zero this param before building the optimizer")
    ap.add_argument("--global-batch", type=int, default=4)
    args = ap.parse_args()

    setup(tp=args.tp)
    ddp, optimizer, scheduler = build(args)
    result = {"ok": [], "losses": [], **layout_stats(optimizer)}
    for step in range(args.steps):
        scheduler.step(increment=1)
        if args.scenario == "fed":
            result["ok"].append(fed_step(ddp, optimizer, step, nan=(step == args.nan_step)))
        else:
            tokens, labels = token_batch(step, args.global_batch, SHAPE["seq_length"], SHAPE["vocab_size"])
            out = train_step(ddp, optimizer, tokens, labels)
            result["ok"].append(out["ok"])
            result["losses"].append(out["loss"])
    counts = torch.tensor([result["spheres"], result["local_spheres"]], dtype=torch.float64)
    mins = counts.clone()
    dist.all_reduce(mins, op=dist.ReduceOp.MIN)
    result["min_local_spheres"] = mins[1].item()
    write_result(args.out, result, tensors=full_params(ddp))
    teardown()


if __name__ == "__main__":
    main()
