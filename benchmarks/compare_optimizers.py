"""Loss curves of AdamW, AdamH and MuonH on the embedded corpus, through the real entry.

    python benchmarks/compare_optimizers.py [--steps 600] [--nproc 2] [--plot-only]

Runs ``scripts/pretrain_gpt.py`` with ``configs/quickstart.yaml`` once per optimizer (same model,
data, batch, schedule and seed; only the optimizer and its lr differ), then reads Megatron's
TensorBoard scalars ('lm loss', 'lm loss validation') and writes ``benchmarks/loss_curves.png``
and a markdown table of the losses. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name -> overrides; lrs: MuonH/AdamH = the quickstart's 0.03, AdamW a common 3e-3
    "adamw": ["optimizer.name=adamw", "optimizer.lr=0.003", "optimizer.weight_decay=0.1"],
    "adamh": ["optimizer.name=adamh", "optimizer.lr=0.03"],
    "muonh": ["optimizer.name=muonh", "optimizer.lr=0.03"],
}


def run(name, overrides, args):
    out = ROOT / "runs" / f"cmp_{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(ROOT / "scripts" / "pretrain_gpt.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"checkpoint.save={out}/ckpt", f"logging.tensorboard_dir={out}/tb", f"logging.wandb.name=cmp_{name}",
           f"schedule.train_iters={args.steps}", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def scalars(name, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(ROOT / "runs" / f"cmp_{name}" / "tb"))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--plot-only", action="store_true", help="plot existing runs/cmp_* runs")
    args = ap.parse_args()
    if not args.plot_only:
        for name, overrides in RUNS.items():
            run(name, overrides, args)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    print("| optimizer | lr | train loss (last logged) | validation loss: first eval | last eval |")
    print("|---|---:|---:|---:|---:|")
    for name, overrides in RUNS.items():
        train, val = scalars(name, "lm loss"), scalars(name, "lm loss validation")
        ax_train.plot(*zip(*train), label=name)
        ax_val.plot(*zip(*val), marker=".", label=name)
        lr = next(o.split("=")[1] for o in overrides if o.startswith("optimizer.lr="))
        print(f"| {name} | {lr} | {train[-1][1]:.3f} (step {train[-1][0]}) | {val[0][1]:.3f} (step {val[0][0]}) "
              f"| {val[-1][1]:.3f} (step {val[-1][0]}) |")
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss (held-out stdlib files)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.set_ylim(top=3.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("quickstart GPT (4 layers, h128, byte tokens) on 2 CPU ranks, Megatron training loop")
    fig.tight_layout()
    png = ROOT / "benchmarks" / "loss_curves.png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
