"""MuonMD through Megatron's emerging-optimizer registry on the layer-wise layout, vs float64 seed 004.

Every rank is fed the same synthetic full gradients; DP = 1 and 2 (layer-wise: whole matrices per
rank, each rank stepping the gains of the matrices it owns) and TP = 2 (Megatron's TP-aware
Newton-Schulz; gain sums over TP in the sphere scalars' all-reduce) must equal the float64
reference (``helpers.MDReference`` around MuonH with the package's fp32 Newton-Schulz).

Run: torchrun --nproc-per-node N -m pytest tests/distributed/test_muonmd.py  (N in WORLD_SIZES)
"""

import pytest
import torch
import torch.distributed as dist

from megatron_hyperball.mcore.tree import describe
from tests.distributed.helpers import (
    assert_gains_close,
    assert_rel_close,
    build_hyperball,
    fed_steps,
    full_params,
    is_sphere,
    layout,
    load_torch_dist,
    local_optimizer_state,
    md_gains_by_name,
    md_reference,
    one_step_all_reduces,
    save_torch_dist,
)

WORLD_SIZES = (1, 2)
STEPS, LR, GAIN_LR = 10, 0.02, 0.02


def build_md(name="muonmd", steps=STEPS, **kw):
    return build_hyperball(name, lr=LR, steps=steps, md_gain_lr=GAIN_LR, **kw)


def all_gains(optimizer) -> dict:
    """Every rank's gains (layer-wise: each rank holds its own matrices'), merged."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, md_gains_by_name(optimizer))
    out = {}
    for part in parts:
        out.update(part)
    return out


@pytest.mark.parametrize("update_norm", ["shape", "exact"])
@pytest.mark.parametrize("dp,tp", [layout(1), layout(2), layout(1, tp=2)])
def test_muonmd_layer_wise_matches_reference(parallel, dp, tp, update_norm):
    parallel(tp=tp)
    ddp, optimizer, scheduler = build_md(hyperball_update_norm=update_norm)
    lines = describe(optimizer)
    assert any("TensorParallelMuonMD" in line for line in lines), lines
    ok = fed_steps(ddp, optimizer, scheduler, range(STEPS))
    params = full_params(ddp)
    assert all(ok)
    ref, ref_gains = md_reference({n: tuple(t.shape) for n, t in params.items()}, STEPS, LR, GAIN_LR,
                                  base="muon", update_norm=update_norm)
    # NS in fp32 of fp32 vs float64 momenta: agreement to fp32 rounding amplified by 5 NS steps
    assert_rel_close(params, ref, 1e-5, f"MuonMD dp{dp} tp{tp} {update_norm}")
    assert_gains_close(all_gains(optimizer), ref_gains, params, 1e-3)


@pytest.mark.world_size(2)
def test_gain_sums_add_bytes_not_all_reduces(parallel):
    """TP = 2, layer-wise: MuonMD's step makes exactly MuonH's all-reduces, per group."""
    parallel(tp=2)
    counts = {name: one_step_all_reduces(build_md, name) for name in ("muonh", "muonmd")}
    print(f"rank {dist.get_rank()}: all-reduces of one step by group ranks: {counts}")
    assert counts["muonmd"] == counts["muonh"], counts
    assert sum(counts["muonmd"].values()) > 0




@pytest.mark.world_size(2)
def test_checkpoint_resume_is_bitwise_bf16(parallel, shared_tmp_path):
    """bf16 layer-wise, DP = 2: 3 steps, torch_dist save, 3 more; a fresh build loads it and steps
    the same 3: parameters, optimizer state and every rank's gains equal, bitwise."""
    steps, at = 6, 3
    parallel()
    ddp, opt, sched = build_md(steps=steps, bf16=True)
    fed_steps(ddp, opt, sched, range(at))
    save_torch_dist(ddp, opt, shared_tmp_path / "ckpt")
    fed_steps(ddp, opt, sched, range(at, steps))
    want = full_params(ddp), local_optimizer_state(opt), all_gains(opt)

    parallel(seed=4321)
    ddp, opt, sched = build_md(steps=steps, bf16=True)
    load_torch_dist(ddp, opt, shared_tmp_path / "ckpt")
    sched.num_steps = at
    fed_steps(ddp, opt, sched, range(at, steps))
    got = full_params(ddp), local_optimizer_state(opt), all_gains(opt)
    for w, g in zip(want[:2], got[:2]):
        assert w.keys() == g.keys()
        for k in w:
            assert torch.equal(w[k], g[k]), k
    assert want[2].keys() == got[2].keys() and want[2]
    for name in want[2]:
        for side in want[2][name]:
            assert torch.equal(want[2][name][side], got[2][name][side]), (name, side)


@pytest.mark.world_size(2)
def test_muonh_checkpoint_needs_the_option(parallel, shared_tmp_path):
    """A MuonH checkpoint loaded by MuonMD: refused naming md_allow_missing_gains; accepted with it.
    (bf16: megatron-core 0.19.2's layer-wise torch_dist save of fp32 members fails, KeyError 'optimizer'.)"""
    parallel()
    ddp, opt, sched = build_md("muonh", steps=4, bf16=True)
    fed_steps(ddp, opt, sched, range(2))
    save_torch_dist(ddp, opt, shared_tmp_path / "muonh")

    parallel()
    ddp, opt, _ = build_md(steps=4, bf16=True)
    with pytest.raises(ValueError, match=r"no magnitude-direction gains.*md_allow_missing_gains=True"):
        load_torch_dist(ddp, opt, shared_tmp_path / "muonh")

    parallel()
    ddp, opt, sched = build_md(steps=4, bf16=True, md_allow_missing_gains=True)
    with pytest.warns(UserWarning, match="those gains start at 1"):
        load_torch_dist(ddp, opt, shared_tmp_path / "muonh")
    sched.num_steps = 2
    assert all(fed_steps(ddp, opt, sched, range(2, 4)))


@pytest.mark.world_size(2)
def test_hook_state_keys_are_whole_model_names(parallel):
    """PP = 2: each stage's spheres are keyed by their global names (stage 1's local layer 0 is
    decoder.layers.1), so the layer-wise optimizer's merge of every rank's hook state (gains, held
    radius) never mixes two matrices."""
    from megatron_hyperball.mcore.tree import inner, leaves
    from tests.distributed.helpers import global_names

    parallel(pp=2)
    ddp, optimizer, _ = build_md()
    mine = set()
    for leaf in leaves(optimizer):
        index = getattr(inner(leaf), "sphere_index", None)
        if callable(index):
            mine |= {index().key(k) for k in range(index().num_spheres)}
    assert mine == {n for n in global_names(ddp) if is_sphere(n)}
    parts = [None, None]
    dist.all_gather_object(parts, sorted(mine))
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 8
