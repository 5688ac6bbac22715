"""The per-matrix-type metrics (``mcore.metrics``) of AdamMD / MuonMD against a float64 computation
from the whole model: ||W||, ||dW||/||W||, ||V||, ||dV||/||V|| with V = W / (g_row g_col^T), and
the gains' mean / min / max, per matrix type.

The reference reads the gathered full parameters before and after one step and the gains by name
(``helpers.md_gains_by_name``), never the ZeRO-1 slices, TP shards or block layouts the metrics
add up. fp32, so the model params are the optimizer's main params.

Run: torchrun --nproc-per-node 2 -m pytest tests/distributed/test_md_metrics.py
"""

import math
import re

import pytest
import torch

from megatron_hyperball.mcore.metrics import HyperballMetrics, metric_names
from megatron_hyperball.mcore.roles import role_of
from tests.distributed.helpers import build, fed_steps, full_params, global_names, md_gains_by_name

WORLD_SIZES = (2,)
WARM, LR, GAIN_LR = 4, 0.02, 0.05  # a few steps first, so the gains are away from 1


def _key(name: str) -> str:
    return re.sub(r"^(module\.)+", "", name)


def expected(ddp, before, after, gains_before, gains_after) -> dict:
    """The metrics in float64 from whole matrices (module doc)."""
    kinds = {n: role_of(n, p).metric for n, p in global_names(ddp).items()}
    per = {}
    for name, kind in kinds.items():
        if kind is None:
            continue
        wb, wa = before[name].double(), after[name].double()
        row = per.setdefault(kind, {"w": [], "rel": [], "v": [], "vrel": [], "g": []})
        row["w"].append(wa.norm().item())
        row["rel"].append(((wa - wb).norm() / wb.norm()).item())
        if name not in gains_after:
            continue
        m, n = wa.shape

        def outer(g):
            if "scalar" in g:
                return g["scalar"].double() * torch.ones(m, n, dtype=torch.float64)
            r, c = g.get("row", torch.ones(m)), g.get("col", torch.ones(n))
            return r.double()[:, None] * c.double()[None, :]

        va, vb = wa / outer(gains_after[name]), wb / outer(gains_before[name])
        row["v"].append(va.norm().item())
        row["vrel"].append(((va - vb).norm() / vb.norm()).item())
        row["g"].append(torch.cat([g.reshape(-1).double() for g in gains_after[name].values()]))
    out = {}
    for kind, row in per.items():
        out[f"hyperball/weight_norm/{kind}"] = sum(row["w"]) / len(row["w"])
        out[f"hyperball/rel_update/{kind}"] = sum(row["rel"]) / len(row["rel"])
        if row["g"]:
            g = torch.cat(row["g"])
            out[f"hyperball/direction_norm/{kind}"] = sum(row["v"]) / len(row["v"])
            out[f"hyperball/direction_rel_update/{kind}"] = sum(row["vrel"]) / len(row["vrel"])
            out[f"hyperball/gain_mean/{kind}"] = g.mean().item()
            out[f"hyperball/gain_min/{kind}"] = g.min().item()
            out[f"hyperball/gain_max/{kind}"] = g.max().item()
    return out


@pytest.mark.parametrize("name,tp,gains", [
    ("adammd", 1, "row_col"),   # ZeRO-1 DP 2: slices cut rows
    ("adammd", 2, "row_col"),   # TP 2: column- and row-parallel shards, fused QKV
    ("muonmd", 1, "row_col"),   # layer-wise DP 2: one owner per matrix
    ("adammd", 1, "scalar"),
    ("adamh", 1, None),         # no gains: only weight_norm / rel_update
])
def test_metrics_match_whole_model_float64(parallel, name, tp, gains):
    parallel(tp=tp)
    md = {"md_gains": gains, "md_gain_lr": GAIN_LR} if gains else {}
    ddp, optimizer, scheduler = build(name, lr=LR, steps=WARM + 1, layer_wise=name.startswith("muon"), **md)
    metrics = HyperballMetrics([ddp], interval=1, optimizer=optimizer)
    fed_steps(ddp, optimizer, scheduler, range(WARM))
    before, gains_before = full_params(ddp), {_key(k): v for k, v in md_gains_by_name(optimizer).items()}
    metrics.before_step()
    fed_steps(ddp, optimizer, scheduler, [WARM])
    got = metrics.after_step(WARM + 1)
    after, gains_after = full_params(ddp), {_key(k): v for k, v in md_gains_by_name(optimizer).items()}
    # layer-wise: each rank holds its own matrices' gains; the reference needs all of them
    merged = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(merged, (gains_before, gains_after))
    gains_before = {k: v for b, _ in merged for k, v in b.items()}
    gains_after = {k: v for _, a in merged for k, v in a.items()}
    want = expected(ddp, before, after, gains_before, gains_after)

    assert set(got) == set(want), sorted(set(got) ^ set(want))
    assert set(got) == set(metric_names(metrics.types, metrics.md_types))
    assert bool(metrics.md_types) == bool(gains)
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-12), (key, got[key], value)
    if gains:
        assert got["hyperball/gain_max/fc1"] - got["hyperball/gain_min/fc1"] > 1e-3  # the gains moved
        # the direction stays on its sphere and moves by about lr while W's norm changes with the gains
        for kind in metrics.md_types:
            assert got[f"hyperball/direction_rel_update/{kind}"] == pytest.approx(LR, rel=0.2)
