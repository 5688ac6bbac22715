"""Tensor parallelism on CPU/gloo: TP=2 must compute what TP=1 computes with the same weights.

Usage (under torchrun, 2 ranks): tp_equivalence.py OUT.json [--steps N]

Phase 1, TP=1 (so DP=2): build the model, record the full weights and the logits of a
fixed batch, then train N steps (ZeRO-1 Adam, fp32) and record losses and parameters.
Phase 2, TP=2 (DP=1), same process: build the model, copy the phase-1 weights into the
tensor-parallel shards (split along each parameter's ``partition_dim``), record the
gathered logits, train the same N steps on the same global batches, record the same.
"""

import argparse

from common import full_params, setup, teardown, token_batch, train_step, write_result

import torch
import torch.distributed as dist

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)
GLOBAL_BATCH = 4


def load_full_weights(model, full):
    """Copy full (TP=1) weights into this rank's tensor-parallel shards."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = full[name]
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                src = torch.chunk(src, tp, dim=p.partition_dim)[tp_rank]
            assert src.shape == p.shape, (name, tuple(src.shape), tuple(p.shape))
            p.copy_(src)


def gathered_logits(model, tokens):
    """Logits over the whole vocabulary (vocab-parallel output gathered over TP)."""
    from megatron.core import parallel_state

    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, pos, None).float().contiguous()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def run(tp, full_weights, steps):
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_hyperball.megatron.model import build_gpt, init_parallel, wrap_ddp

    init_parallel(tp=tp, seed=1234)
    model = build_gpt(**SHAPE, position_embedding_type="rope")
    if full_weights is not None:
        load_full_weights(model, full_weights)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    probe, _ = token_batch(1000, GLOBAL_BATCH, SHAPE["seq_length"], SHAPE["vocab_size"])
    logits = gathered_logits(model, probe)

    ddp = wrap_ddp(model, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, adam_beta2=0.95,
                        clip_grad=1.0, use_distributed_optimizer=True),
        [ddp],
    )
    losses = []
    for step in range(steps):
        tokens, labels = token_batch(step, GLOBAL_BATCH, SHAPE["seq_length"], SHAPE["vocab_size"])
        losses.append(train_step(ddp, optimizer, tokens, labels)["loss"])
    info = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "local_shapes": {n: list(w.shape) for n, w in weights.items()},
        "losses": losses,
    }
    return info, weights, logits, full_params(ddp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()

    setup()
    info1, full_weights, logits1, params1 = run(1, None, args.steps)
    info2, _, logits2, params2 = run(2, full_weights, args.steps)
    write_result(
        args.out,
        {"tp1": info1, "tp2": info2},
        tensors={"logits_tp1": logits1, "logits_tp2": logits2, "params_tp1": params1, "params_tp2": params2},
    )
    teardown()


if __name__ == "__main__":
    main()
