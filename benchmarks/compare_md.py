"""MuonH vs MuonMD vs AdamW on the embedded corpus: each optimizer's small lr sweep, same model and budget.

    python benchmarks/compare_md.py [--width 128] [--runs runs] [--out benchmarks/md_comparison.png]

Reads the LR-sweep runs of ``scripts/lr_sweep.py`` (``<runs>/sweep_cpu_<optimizer>/hidden_size<W>_lr<LR>/``:
``result.json`` with the final held-out loss, and the run's TensorBoard files) made by
``benchmarks/lr_sweep_cpu.sh`` (MuonH, AdamW) and, with the same settings, the MuonMD command in
``benchmarks/RESULTS.md``: ``configs/quickstart.yaml`` (4 layers, width W, 300 steps of 16 x 128 bytes,
2 CPU ranks) where only ``optimizer.name`` and ``optimizer.lr`` differ. Prints a markdown table (final
validation loss per lr, the best lr of each optimizer) and writes a PNG: loss vs lr, and the held-out
loss curves of each optimizer's best lr. Unfinished runs are listed as missing, never guessed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adamw", "muonh", "muonmd")


def results(runs: Path, optimizer: str, width: int) -> dict[float, dict]:
    """lr -> result.json of every finished run of ``optimizer`` at ``width``, from
    ``sweep_cpu_<optimizer>`` and any ``sweep_cpu_<optimizer>_*`` folder made with the same settings
    (the first folder's run wins for an lr in both)."""
    out = {}
    folders = [runs / f"sweep_cpu_{optimizer}", *sorted(runs.glob(f"sweep_cpu_{optimizer}_*/"))]
    for folder in folders:
        for path in sorted(folder.glob(f"hidden_size{width}_lr*/result.json")):
            r = json.loads(path.read_text())
            r["dir"] = path.parent
            out.setdefault(float(r["lr"]), r)
    return out


def curve(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    if tag not in ea.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def best(res: dict[float, dict]):
    finite = {lr: r for lr, r in res.items() if r.get("loss") is not None and math.isfinite(r["loss"])}
    if not finite:
        return None
    lr = min(finite, key=lambda k: finite[k]["loss"])
    return lr, finite[lr]


def table(all_res: dict[str, dict[float, dict]]) -> str:
    lines = ["| optimizer | lr: final held-out loss | best lr | best loss |", "|---|---|---:|---:|"]
    for name, res in all_res.items():
        cells = ", ".join(f"{lr:g}: " + ("diverged" if r.get("diverged") else f"{r['loss']:.3f}")
                          for lr, r in sorted(res.items()))
        b = best(res)
        if b is None:
            lines.append(f"| {name} | {cells or 'no finished run'} | - | - |")
            continue
        edge = " (edge of the grid)" if len(res) > 1 and b[0] in (min(res), max(res)) else ""
        lines.append(f"| {name} | {cells} | {b[0]:g}{edge} | {b[1]['loss']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "md_comparison.png")
    args = ap.parse_args()

    all_res = {name: results(args.runs, name, args.width) for name in OPTIMIZERS}
    print(table(all_res))
    for name, res in all_res.items():
        print(f"{name}: {len(res)} finished runs at width {args.width}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lr, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in all_res.items():
        if not res:
            continue
        lrs = sorted(lr for lr in res if res[lr].get("loss") is not None)
        ax_lr.plot(lrs, [res[lr]["loss"] for lr in lrs], marker="o", label=name)
        b = best(res)
        if b is not None:
            val = curve(b[1]["dir"], "lm loss validation")
            val = [(s, v) for s, v in val if s < 300] + [(300, b[1]["loss"])]  # TB's step 300 is the final eval
            ax_curve.plot(*zip(*val), marker=".", label=f"{name} (lr {b[0]:g})")
            print(f"{name} best lr {b[0]:g}: held-out loss " + ", ".join(f"{s}: {v:.3f}" for s, v in val[::4]))
    ax_lr.set_xscale("log")
    ax_lr.set_xlabel("lr (matrices; AdamW: all params)")
    ax_lr.set_ylabel("final held-out loss (step 300)")
    ax_lr.set_title(f"lr sweep, width {args.width}")
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("held-out loss")
    ax_curve.set_ylim(top=3.0)
    ax_curve.set_title("best lr of each")
    for ax in (ax_lr, ax_curve):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("quickstart GPT (4 layers, byte tokens), 300 steps on 2 CPU ranks, Megatron training loop")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
