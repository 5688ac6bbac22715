"""Step-time benchmark: Megatron's Adam vs AdamH and AdamMD, Megatron's Muon vs MuonH and MuonMD, same
process, same run.

    python benchmarks/step_time.py --preset tiny            # CPU (gloo + compat layer), 1 rank
    python benchmarks/step_time.py --preset 218m --device cuda   # one GPU (nccl), bf16

For each optimizer it builds a fresh Megatron GPTModel (local spec) + DDP + optimizer through
``get_megatron_optimizer``, runs warm-up steps, then times ``optimizer.step()`` and the whole
training step (forward, backward, grad sync, step) over the timed steps, and prints a table of
medians and the ratio of each hyperball / magnitude-direction optimizer to its Megatron base. The
Adam group runs on the ZeRO-1 DistributedOptimizer, the Muon group on Megatron's layer-wise
optimizer (bf16, as Megatron supports it); AdamMD / MuonMD use their defaults (row_col gains,
softplus). Nothing is asserted: it prints numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

PRESETS = {
    # tiny enough for 2 CPU cores
    "tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=128, micro_batch=4,
                 vocab_size=1024),
    # the GPU config: 218M params
    "218m": dict(num_layers=12, hidden_size=1024, num_attention_heads=16, seq_length=1024, micro_batch=8,
                 vocab_size=50304),
}
GROUPS = [("adam", "adamh", "adammd"), ("muon", "muonh", "muonmd")]  # the Megatron base first


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build_one(name, preset, args):
    """Model + DDP + optimizer + a fixed micro-batch for one optimizer name."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_hyperball.mcore.tree import describe
    from megatron_hyperball.mcore.builders import build_gpt, seed_all, wrap_ddp
    from megatron_hyperball.mcore.roles import tag_position_embeddings

    muon = "muon" in name
    bf16 = args.bf16 or muon
    seed_all(1234)
    model = build_gpt(preset["num_layers"], preset["hidden_size"], preset["num_attention_heads"],
                      preset["vocab_size"], preset["seq_length"], bf16=bf16,
                      position_embedding_type="rope")
    if args.device == "cuda":
        model.cuda()
    tag_position_embeddings(model)
    ddp = wrap_ddp(model, use_distributed_optimizer=True, layer_wise=muon)
    config = OptimizerConfig(
        optimizer=name, lr=1e-3, weight_decay=0.0 if name.endswith(("h", "md")) else 0.1, clip_grad=1.0,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=True, use_layer_wise_distributed_optimizer=muon,
        muon_nesterov=True,
    )
    optimizer = get_megatron_optimizer(config, [ddp])
    print(f"# {name}: " + "; ".join(describe(optimizer)))
    gen = torch.Generator().manual_seed(0)
    mb, seq, vocab = preset["micro_batch"], preset["seq_length"], preset["vocab_size"]
    tokens = torch.randint(0, vocab, (mb, seq + 1), generator=gen)
    tokens = tokens.to("cuda") if args.device == "cuda" else tokens
    inp, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos = torch.arange(seq, device=inp.device).unsqueeze(0).expand_as(inp)
    return ddp, optimizer, (inp, pos, labels)


def timed_step(setup, device):
    """(optimizer step seconds, whole step seconds) of one training step."""
    ddp, optimizer, (inp, pos, labels) = setup
    sync(device)
    t0 = time.perf_counter()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(inp, pos, None, labels=labels).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    sync(device)
    t1 = time.perf_counter()
    optimizer.step()
    sync(device)
    t2 = time.perf_counter()
    return t2 - t1, t2 - t0


def bench(names, preset, args):
    """All optimizers built side by side, their steps interleaved round by round, so a change of
    machine load hits every optimizer alike; medians of the timed rounds, in ms."""
    setups = {name: build_one(name, preset, args) for name in names}
    times = {name: ([], []) for name in names}
    for i in range(args.warmup + args.steps):
        for name in names:
            opt_s, step_s = timed_step(setups[name], args.device)
            if i >= args.warmup:
                times[name][0].append(opt_s)
                times[name][1].append(step_s)
    return {n: (statistics.median(o) * 1e3, statistics.median(s) * 1e3) for n, (o, s) in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="bf16 for the Adam group too (the Muon group always bf16)")
    ap.add_argument("--only", default=None, help="comma-separated optimizer names to run (default: all)")
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", world_size=1, rank=0)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        from megatron_hyperball.compat import enable_cpu

        enable_cpu()
    import megatron_hyperball  # noqa: F401  registers adamh / muonh / adammd / muonmd
    from megatron_hyperball.compat import backends
    from megatron_hyperball.mcore.builders import init_parallel

    init_parallel()
    preset = PRESETS[args.preset]
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {dev}; torch {torch.__version__}; preset {args.preset} {preset}; "
          f"backends {backends()}; {args.steps} timed steps after {args.warmup} warm-up, medians")
    only = None if args.only is None else set(args.only.split(","))
    groups = [(base, *[n for n in rest if only is None or n in only]) for base, *rest in GROUPS]
    groups = [g for g in groups if len(g) > 1]
    rows = {}
    for group in groups:
        rows.update(bench(group, preset, args))
    print("| optimizer | opt step ms | full step ms | opt step ratio | full step ratio |")
    print("|---|---:|---:|---:|---:|")
    for base, *others in groups:
        b = rows[base]
        print(f"| {base} (Megatron) | {b[0]:.2f} | {b[1]:.2f} | 1.00 | 1.00 |")
        for name in others:
            h = rows[name]
            print(f"| {name} | {h[0]:.2f} | {h[1]:.2f} | {h[0] / b[0]:.2f} | {h[1] / b[1]:.3f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
