"""Train a tiny GPTModel with Megatron's DDP and optimizers on CPU/gloo, several setups.

Usage (under torchrun): train_gpt.py OUT.json CASE [CASE ...]  [--steps N] [--global-batch B]

CASE is one of ``CASES`` below. Each case re-initialises Megatron's parallel state and
seed, builds the model, wraps it in DDP, builds the optimizer with
``get_megatron_optimizer`` and trains ``--steps`` steps on the same global batches
whatever the data-parallel size. Rank 0 writes, per case, losses, grad norms, the
optimizer class and whether the data-parallel replicas started identical, and
(OUT.json.pt) the full fp32 parameters after the last step.
"""

import argparse

from common import full_params, setup, teardown, token_batch, train_step, write_result

import torch
import torch.distributed as dist

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)

CASES = {
    # ZeRO-1 DistributedOptimizer around Megatron's Adam (torch AdamW without TE/apex).
    "adam_distopt_fp32": dict(optimizer="adam", distributed=True, layer_wise=False, bf16=False),
    "adam_distopt_bf16": dict(optimizer="adam", distributed=True, layer_wise=False, bf16=True),
    # LayerWiseDistributedOptimizer (Muon for matrices, DistOpt Adam for the rest).
    "muon_layerwise_bf16": dict(optimizer="muon", distributed=False, layer_wise=True, bf16=True),
    # Plain DDP (all-reduce) + Float16/FP32 optimizer wrappers.
    "adam_ddp_fp32": dict(optimizer="adam", distributed=False, layer_wise=False, bf16=False),
}


def run_case(name, num_steps, global_batch, lr):
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_hyperball.megatron.model import build_gpt, init_parallel, wrap_ddp

    case = CASES[name]
    init_parallel(tp=1, seed=1234)
    model = build_gpt(**SHAPE, bf16=case["bf16"])
    ddp = wrap_ddp(model, use_distributed_optimizer=case["distributed"], layer_wise=case["layer_wise"])

    # Data-parallel replicas must start from identical weights.
    vec = torch.cat([p.detach().float().reshape(-1) for p in ddp.parameters()])
    stats = torch.stack([vec.sum(), vec.square().sum()])
    dp_group = parallel_state.get_data_parallel_group()
    gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(dp_group))]
    dist.all_gather(gathered, stats, group=dp_group)

    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=case["optimizer"],
            lr=lr,
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=1.0,
            bf16=case["bf16"],
            params_dtype=torch.bfloat16 if case["bf16"] else torch.float32,
            use_distributed_optimizer=case["distributed"],
            use_layer_wise_distributed_optimizer=case["layer_wise"],
        ),
        [ddp],
    )
    steps = []
    for step in range(num_steps):
        tokens, labels = token_batch(step, global_batch, SHAPE["seq_length"], SHAPE["vocab_size"])
        steps.append(train_step(ddp, optimizer, tokens, labels))
    result = {
        "dp": parallel_state.get_data_parallel_world_size(),
        "optimizer": type(optimizer).__name__,
        "inner_optimizers": sorted(
            {type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])}
        ),
        "replicas_identical": all(torch.equal(g, gathered[0]) for g in gathered),
        "losses": [s["loss"] for s in steps],
        "grad_norms": [s["grad_norm"] for s in steps],
        "ok": [s["ok"] for s in steps],
    }
    return result, full_params(ddp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("cases", nargs="+", choices=sorted(CASES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    setup()
    results, tensors = {"world_size": dist.get_world_size()}, {}
    for name in args.cases:
        results[name], tensors[name] = run_case(name, args.steps, args.global_batch, args.lr)
    write_result(args.out, results, tensors=tensors)
    teardown()


if __name__ == "__main__":
    main()
