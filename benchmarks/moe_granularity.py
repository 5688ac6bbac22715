"""HyperP's SqrtGate claim at toy scale: MoE output RMS vs granularity, softmax gates vs SqrtGate.

    nice -n 10 python benchmarks/moe_granularity.py run       # the 6 runs, one after the other; resumable
    python benchmarks/moe_granularity.py report               # table (stdout + runs/.../table.md) and PNG

Six runs of ``configs/quickstart_moe.yaml`` through the real entry (``torchrun --nproc-per-node 2
scripts/pretrain_gpt.py``, 2 CPU ranks, EP = 2, MuonH, Depth-muP, global aux loss 0.1): top-k
k = 2, 4, 8 at equal active and equal total expert parameters, each with Megatron's standard top-k
softmax gates (``sqrt_gate false``: the k gates sum to 1) and with SqrtGate (``sqrt_gate true``: the
squared gates sum to 1). Granularity, precisely (h = 128, dense MLP width 384, 4 layers):

    expert ffn size   f_e = 384 / k          (48 .. 192: k * f_e = 384 active hidden units per token)
    expert count      E   = 4 k              (8, 16, 32: E / k = 4, so total / active = 4 at every k,
                                              and the total E * f_e = 1536 hidden units is fixed too)
    no shared expert  (shared_expert_size null: the routed gates are the only thing that differs)

Everything else is the quickstart's (same data, seed, lr 0.03, batch 16 x 128 bytes); only the
number of steps is cut (``--steps``) to fit a loaded 2-core CPU. A run is skipped when its
``result.json`` exists. The numbers come from each run's TensorBoard files: ``indicators/mlp_rms/*``
(RMS of alpha * MoE output, alpha = 1/sqrt(2L) Depth-muP, at ``logging.metrics_interval``) and
``lm loss validation`` (the end-of-training evaluation).

A confound the table separates: with the default ``optimizer.radius: init`` each expert matrix keeps its
initial Frobenius norm, and Megatron initialises with a fixed std (0.02, fc2 0.02/sqrt(2L)), not a
fan-in-scaled one, so ||fc2|| = 0.02/sqrt(2L) sqrt(h f_e) (1.108 at f_e = 192, measured) and an
expert's output RMS scales as sqrt(f_e) ~ 1/sqrt(k) before any gate. The column ``RMS x sqrt(k/2)``
removes that factor (relative to k = 2), leaving the gates' share: sqrt(sum_i g_i^2), which is 1 for
SqrtGate and 1/sqrt(k) for uniform softmax gates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "moe_granularity"
TOPKS = (2, 8, 4)  # the extremes first: a cut-short sweep still brackets the trend
GATES = ("softmax", "sqrtgate")
ACTIVE = 384  # hidden units per token (the dense quickstart MLP width)
TOTAL_OVER_ACTIVE = 4  # E / k


ONLY: set[str] = set()  # --only: run / report just these names


def runs():
    for k in TOPKS:
        for gate in GATES:
            if not ONLY or f"k{k}_{gate}" in ONLY:
                yield f"k{k}_{gate}", k, gate


def overrides(k: int, gate: str, steps: int, out: Path) -> list[str]:
    return [
        f"model.moe.topk={k}",
        f"model.moe.num_experts={TOTAL_OVER_ACTIVE * k}",
        f"model.moe.ffn_hidden_size={ACTIVE // k}",
        "model.moe.shared_expert_size=null",
        f"model.moe.sqrt_gate={'true' if gate == 'sqrtgate' else 'false'}",
        f"schedule.train_iters={steps}",
        "schedule.eval_interval=100000",  # only the end-of-training evaluation
        "schedule.eval_iters=8",  # 128 held-out sequences
        "checkpoint.save=null",
        "logging.log_interval=5",
        "logging.metrics_interval=5",
        f"logging.tensorboard_dir={out / 'tensorboard'}",
        "logging.wandb.mode=disabled",
    ]


def run_all(steps: int) -> None:
    for name, k, gate in runs():
        out = OUT / name
        if (out / "result.json").exists():
            print(f"[moe_granularity] {name}: done, skipped", flush=True)
            continue
        out.mkdir(parents=True, exist_ok=True)
        cmd = [str(ROOT / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", "2",
               "scripts/pretrain_gpt.py", "--config", "configs/quickstart_moe.yaml", *overrides(k, gate, steps, out)]
        print(f"[moe_granularity] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        with open(out / "train.log", "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.time() - t0
        print(f"[moe_granularity] {name}: rc {rc}, {wall:.0f} s", flush=True)
        if rc != 0:
            sys.exit(rc)
        (out / "result.json").write_text(json.dumps({"name": name, "topk": k, "gate": gate, "steps": steps,
                                                     "wall_s": round(wall, 1), "cmd": cmd}, indent=1))


def tb_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of a run's TensorBoard files (the dashboard's reader)."""
    from megatron_hyperball.dashboard import read_scalars

    return read_scalars(tb_dir)


def collect() -> dict[str, dict]:
    res = {}
    for name, k, gate in runs():
        out = OUT / name
        if not (out / "result.json").exists():
            continue
        r = json.loads((out / "result.json").read_text())
        s = tb_scalars(out / "tensorboard")
        rms = s.get("indicators/mlp_rms/mean", {})
        steps = sorted(rms)
        last = steps[-3:]  # the final RMS: mean of the last three logged points (less noise)
        r.update(rms=rms, rms_first=rms[steps[0]] if steps else None,
                 rms_final=sum(rms[t] for t in last) / len(last) if last else None,
                 attn_rms_final=s.get("indicators/attn_rms/mean", {}).get(steps[-1]) if steps else None,
                 maxvio_final=s.get("moe/maxvio/mean", {}).get(steps[-1]) if steps else None,
                 val=max(s.get("lm loss validation", {}).items(), default=(None, None))[1])
        res[name] = r
    return res


def table(res: dict[str, dict]) -> str:
    lines = ["| k | E | f_e | gates | MoE out RMS, first log (step 5) | MoE out RMS, final | attn out RMS, final | "
             "MaxVio, final | val loss | wall | final RMS x sqrt(k/2) |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, k, gate in sorted(runs(), key=lambda r: (r[2], r[1])):
        r = res.get(name)
        if r is None:
            lines.append(f"| {k} | {TOTAL_OVER_ACTIVE * k} | {ACTIVE // k} | {gate} | missing | | | | | | |")
            continue
        f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {k} | {TOTAL_OVER_ACTIVE * k} | {ACTIVE // k} | {gate} | {f(r['rms_first'], '.3e')} | "
                     f"{f(r['rms_final'], '.3e')} | {f(r['attn_rms_final'], '.3e')} | {f(r['maxvio_final'], '.2f')} | "
                     f"{f(r['val'], '.4f')} | {r['wall_s']:.0f} s | "
                     f"{f(r['rms_final'] and r['rms_final'] * (k / 2) ** 0.5, '.3e')} |")
    return "\n".join(lines)


def plot(res: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {2: "tab:blue", 4: "tab:orange", 8: "tab:red"}
    for name, k, gate in runs():
        r = res.get(name)
        if r is None or not r["rms"]:
            continue
        steps = sorted(r["rms"])
        a.plot(steps, [r["rms"][t] for t in steps], color=colors[k], ls="-" if gate == "sqrtgate" else "--",
               label=f"k={k} {gate}")
    a.set(xlabel="step", ylabel="RMS of alpha * MoE output (mean over layers)", yscale="log",
          title="MoE output RMS vs step (solid: SqrtGate, dashed: softmax)")
    a.legend(fontsize=8)
    gate_color = {"softmax": "tab:gray", "sqrtgate": "tab:green"}
    for gate, marker in (("softmax", "s--"), ("sqrtgate", "o-")):
        ks = [k for k in sorted(colors) if res.get(f"k{k}_{gate}") and res[f"k{k}_{gate}"]["rms_final"]]
        if not ks:
            continue
        b.plot(ks, [res[f"k{k}_{gate}"]["rms_final"] for k in ks], marker, color=gate_color[gate],
               label=f"{gate}, final (last 3 logs)")
        b.plot(ks, [res[f"k{k}_{gate}"]["rms_first"] for k in ks], marker, color=gate_color[gate], alpha=0.35,
               label=f"{gate}, step 5")
        vals = [(k, res[f"k{k}_{gate}"]["val"]) for k in ks if res[f"k{k}_{gate}"]["val"] is not None]
        c.plot([k for k, _ in vals], [v for _, v in vals], marker, color=gate_color[gate], label=gate)
    first = res.get(f"k{min(colors)}_sqrtgate")
    if first and first["rms_first"]:  # guides through SqrtGate's k=2 step-5 point
        k0, y0 = min(colors), first["rms_first"]
        for p, ls in ((0.5, ":"), (1.0, "-.")):
            b.plot([2, 8], [y0 * (k / k0) ** -p for k in (2, 8)], ls, color="black", lw=0.8, label=f"slope k^-{p:g}")
    b.set(xlabel="top-k (E = 4k, f_e = 384/k)", ylabel="RMS of alpha * MoE output", xscale="log", yscale="log",
          title="MoE output RMS vs granularity")
    b.set_xticks([2, 4, 8], ["2", "4", "8"])
    b.set_xticks([], minor=True)
    b.legend(fontsize=7)
    c.set(xlabel="top-k (E = 4k, f_e = 384/k)", ylabel="validation loss (end of training)", xscale="log",
          title="held-out loss vs granularity")
    c.set_xticks([2, 4, 8], ["2", "4", "8"])
    c.set_xticks([], minor=True)
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[moe_granularity] wrote {path}")


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("--steps", type=int, default=80, help="training steps per run (default 80)")
    ap.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "moe_granularity.png")
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default runs/moe_granularity)")
    ap.add_argument("--only", nargs="+", default=[], help="just these runs, e.g. k2_sqrtgate k8_sqrtgate")
    args = ap.parse_args()
    OUT = args.out.resolve()
    ONLY.update(args.only)
    if args.what == "run":
        run_all(args.steps)
        return
    res = collect()
    text = table(res)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text(text + "\n")
    plot(res, args.png)


if __name__ == "__main__":
    main()
