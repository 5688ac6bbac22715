"""AdamMD on Megatron's DDP + ZeRO-1 DistributedOptimizer, against a float64 reference of seed 004.

Every rank is fed the same synthetic full gradients (``helpers.feed_synthetic_grads``) and only the
optimizer runs, so DP = 1, 2, 4 (flat slices that cut rows anywhere, empty slices at DP = 4),
TP = 2 (column- and row-parallel matrices, fused QKV) and DP 2 x TP 2 must all equal the
float64 whole-model reference (``helpers.MDReference``) to fp32 rounding, weights and gains.

Run: torchrun --nproc-per-node N -m pytest tests/distributed/test_adammd.py  (N in WORLD_SIZES)
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megatron_hyperball.mcore.tree import describe, inner, leaves
from tests.distributed.helpers import (
    all_max,
    assert_gains_close,
    assert_rel_close,
    build,
    fed_steps,
    full_params,
    is_sphere,
    layout,
    local_optimizer_state,
    md_gains_by_name,
    md_reference,
    one_step_all_reduces,
    load_torch_dist,
    save_torch_dist,
)

WORLD_SIZES = (1, 2, 4)
STEPS, LR, GAIN_LR = 12, 0.02, 0.02  # a gain lr that moves the gains (|g - 1| ~ 0.1 after 12 steps)
PATH = "DistributedOptimizer > AdamMD (megatron_hyperball)"


def build_md(name="adammd", steps=STEPS, **kw):
    return build(name, lr=LR, steps=steps, **{"md_gain_lr": GAIN_LR, **kw})


def partial_rows(optimizer) -> bool:
    """Whether this rank holds a sphere slice that starts or ends inside a row."""
    for leaf in leaves(optimizer):
        opt = inner(leaf)
        hook_layout = getattr(getattr(opt, "md_hook", None), "layout", None)
        if hook_layout is None:
            continue
        index = opt.sphere_index()
        for group in opt.param_groups:
            for p in group["params"]:
                k = index.sphere_of(p)
                if k is not None and any(b.rows == 1 and b.cols < index.shapes[k][1] for b in hook_layout(index, p, k)):
                    return True
    return False


@pytest.mark.parametrize("update_norm", ["exact", "shape"])
@pytest.mark.parametrize("dp,tp", [layout(1), layout(2), layout(4), layout(1, tp=2), layout(2, tp=2)])
def test_adammd_matches_float64_reference(parallel, dp, tp, update_norm):
    parallel(tp=tp)
    ddp, optimizer, scheduler = build_md(hyperball_update_norm=update_norm)
    assert describe(optimizer) == [PATH]
    cut = all_max(float(partial_rows(optimizer)))
    ok = fed_steps(ddp, optimizer, scheduler, range(STEPS))
    params = full_params(ddp)
    assert all(ok)
    if dp > 1 and tp == 1:  # the ZeRO-1 slices really cut rows (at DP 2 x TP 2 they happen to align)
        assert cut == 1.0
    ref, ref_gains = md_reference({n: tuple(t.shape) for n, t in params.items()}, STEPS, LR, GAIN_LR,
                                  update_norm=update_norm)
    assert_rel_close(params, ref, 2e-6, f"AdamMD dp{dp} tp{tp} {update_norm}")
    assert_gains_close(md_gains_by_name(optimizer), ref_gains, params, 1e-4)


@pytest.mark.world_size(4)
def test_gain_sums_add_bytes_not_all_reduces(parallel):
    """DP 2 x TP 2: AdamMD's step makes exactly AdamH's all-reduces, per group (the gain-gradient
    sums travel in the sphere scalars' vector)."""
    parallel(tp=2)
    counts = {name: one_step_all_reduces(build_md, name) for name in ("adamh", "adammd")}
    print(f"rank {dist.get_rank()}: all-reduces of one step by group ranks: {counts}")
    assert counts["adammd"] == counts["adamh"], counts
    assert sum(counts["adammd"].values()) > 0


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.world_size(2)
@pytest.mark.parametrize("bf16,sharding", [(False, "dp_reshardable"), (True, "dp_reshardable"),
                                           (False, "fully_reshardable")],
                         ids=["fp32", "bf16", "fp32-fully_reshardable"])
def test_checkpoint_resume_is_bitwise(parallel, shared_tmp_path, bf16, sharding):
    """ZeRO-1, DP = 2: 3 steps, torch_dist save (Megatron's default dp_reshardable optimizer
    format, and fully_reshardable), 3 more; a fresh build (weights moved away) loads it and steps
    the same 3: parameters, optimizer state and gains equal, bitwise."""
    steps, at = 6, 3
    parallel()
    ddp, opt, sched = build_md(steps=steps, bf16=bf16)
    fed_steps(ddp, opt, sched, range(at))
    save_torch_dist(ddp, opt, shared_tmp_path / "ckpt", sharding)
    fed_steps(ddp, opt, sched, range(at, steps))
    want = full_params(ddp), local_optimizer_state(opt), md_gains_by_name(opt)

    parallel(seed=4321)
    ddp, opt, sched = build_md(steps=steps, bf16=bf16)
    load_torch_dist(ddp, opt, shared_tmp_path / "ckpt", sharding)
    sched.num_steps = at
    fed_steps(ddp, opt, sched, range(at, steps))
    got = full_params(ddp), local_optimizer_state(opt), md_gains_by_name(opt)
    for w, g in zip(want[:2], got[:2]):
        assert w.keys() == g.keys()
        for k in w:
            assert torch.equal(w[k], g[k]), k
    assert want[2].keys() == got[2].keys()
    for name in want[2]:
        for side in want[2][name]:
            assert torch.equal(want[2][name][side], got[2][name][side]), (name, side)


@pytest.mark.world_size(2)
def test_checkpoint_without_gains_needs_the_option(parallel, shared_tmp_path):
    """An AdamH checkpoint loaded by AdamMD: refused, naming md_allow_missing_gains; with it the
    gains start at 1 (W = V: the loaded weights as they are) and it steps."""
    parallel()
    ddp, opt, sched = build("adamh", lr=LR, steps=4)
    fed_steps(ddp, opt, sched, range(2))
    save_torch_dist(ddp, opt, shared_tmp_path / "adamh")
    saved = full_params(ddp)

    parallel()
    ddp, opt, _ = build_md(steps=4)
    with pytest.raises(ValueError, match=r"no magnitude-direction gains.*md_allow_missing_gains=True"):
        load_torch_dist(ddp, opt, shared_tmp_path / "adamh")

    parallel()
    ddp, opt, sched = build_md(steps=4, md_allow_missing_gains=True)
    with pytest.warns(UserWarning, match="md_allow_missing_gains=True: those gains start at 1"):
        load_torch_dist(ddp, opt, shared_tmp_path / "adamh")
    loaded = full_params(ddp)
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    sched.num_steps = 2
    assert all(fed_steps(ddp, opt, sched, range(2, 4)))
    gains = md_gains_by_name(opt)
    assert gains and all((g[s] - 1).abs().max() > 0 for g in gains.values() for s in g)


# -- DP 2 -> DP 1: the DP = 1 leg runs in a one-rank torchrun started by rank 0 -------------------
RESHARD = os.environ.get("HB_MD_RESHARD_DIR")


@pytest.mark.world_size(2)
def test_dp2_checkpoint_resumes_on_dp1(parallel, shared_tmp_path):
    """Save at DP = 2 after 3 steps; a one-rank run (DP = 1) loads it and steps 3 more: it equals
    the uninterrupted DP = 2 run to fp32 rounding (weights, gains). And the reverse: the one-rank
    run saves at DP = 1 after 3 steps, DP = 2 loads it and steps 3 more, equal to its own
    uninterrupted DP = 1 run."""
    steps, at = 6, 3
    parallel()
    ddp, opt, sched = build_md(steps=steps)
    fed_steps(ddp, opt, sched, range(at))
    save_torch_dist(ddp, opt, shared_tmp_path / "dp2")
    fed_steps(ddp, opt, sched, range(at, steps))
    want, want_gains = full_params(ddp), md_gains_by_name(opt)
    if dist.get_rank() == 0:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
        env["HB_MD_RESHARD_DIR"] = str(shared_tmp_path)
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "pytest",
             "-q", "-x", "-p", "no:cacheprovider", "--disable-warnings", f"{__file__}::test_dp1_leg"],
            env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dist.barrier()
    got = torch.load(shared_tmp_path / "dp1.pt")
    assert_rel_close(got["params"], want, 1e-6, "DP2 -> DP1 resume vs uninterrupted DP2")
    for name, g in want_gains.items():
        for side in g:
            assert torch.allclose(got["gains"][name][side], g[side], rtol=0, atol=1e-6), (name, side)

    parallel()  # DP 1 -> DP 2
    ddp, opt, sched = build_md(steps=steps)
    load_torch_dist(ddp, opt, shared_tmp_path / "dp1ckpt")
    sched.num_steps = at
    fed_steps(ddp, opt, sched, range(at, steps))
    uninterrupted = torch.load(shared_tmp_path / "dp1_uninterrupted.pt")
    assert_rel_close(full_params(ddp), uninterrupted["params"], 1e-6, "DP1 -> DP2 resume vs uninterrupted DP1")
    for name, g in md_gains_by_name(opt).items():
        for side in g:
            assert torch.allclose(g[side], uninterrupted["gains"][name][side], rtol=0, atol=1e-6), (name, side)


@pytest.mark.world_size(1)
@pytest.mark.skipif(RESHARD is None, reason="the DP = 1 leg of test_dp2_checkpoint_resumes_on_dp1")
def test_dp1_leg(parallel):
    from pathlib import Path

    steps, at = 6, 3
    parallel()
    ddp, opt, sched = build_md(steps=steps)
    load_torch_dist(ddp, opt, Path(RESHARD) / "dp2")
    sched.num_steps = at
    fed_steps(ddp, opt, sched, range(at, steps))
    torch.save({"params": full_params(ddp), "gains": md_gains_by_name(opt)}, Path(RESHARD) / "dp1.pt")

    parallel()  # the DP = 1 side of DP 1 -> DP 2: save after 3 steps, and the uninterrupted run
    ddp, opt, sched = build_md(steps=steps)
    fed_steps(ddp, opt, sched, range(at))
    save_torch_dist(ddp, opt, Path(RESHARD) / "dp1ckpt")
    fed_steps(ddp, opt, sched, range(at, steps))
    torch.save({"params": full_params(ddp), "gains": md_gains_by_name(opt)}, Path(RESHARD) / "dp1_uninterrupted.pt")


@pytest.mark.world_size(1)
def test_bad_md_options_refused_before_any_step(parallel):
    """Each refused while building the optimizer, naming the option and the allowed values."""
    parallel()
    cases = {
        "gains": (dict(md_gains="rows"), r"md_\*: gains='rows'; allowed: row_col, row, col, scalar, none"),
        "gain_lr": (dict(md_gain_lr=0.0), r"gain_lr=0.0; allowed: a positive finite number"),
        "parametrization": (dict(md_gain_parametrization="exp"), r"gain_parametrization='exp'; allowed: softplus, direct"),
        "allow_missing": (dict(md_allow_missing_gains="yes"), r"md_allow_missing_gains='yes'; allowed: True, False"),
        "output_layer": (dict(hyperball_output_layer=True), r"hyperball_output_layer=True is for adamh.*allowed with adammd: False"),
    }
    for case, (changes, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            build_md(**changes)


@pytest.mark.world_size(2)
def test_gain_lr_follows_megatrons_schedule(parallel):
    """Megatron's OptimizerParamScheduler (warm-up 2 steps from 0, linear decay to 0.1 lr): V's lr
    and the gains' lr both follow lr_t / max_lr (the gains' peak is gain_lr), DP = 2."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from tests.distributed.helpers import AdamHReference, MDReference, grad, initial

    parallel()
    ddp, optimizer, _ = build_md(min_lr=0.1 * LR)  # the groups carry max_lr = lr and this min_lr
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=0.1 * LR, lr_warmup_steps=2, lr_decay_steps=STEPS,
        lr_decay_style="linear", start_wd=0.0, end_wd=0.0, wd_incr_steps=STEPS, wd_incr_style="constant")
    factors = []
    for step in range(STEPS):
        # the lr this step runs at: what fed_steps' scheduler.step(1) sets, read off a sphere group
        fed_steps(ddp, optimizer, scheduler, [step])
        group = next(g for leaf in leaves(optimizer) for g in inner(leaf).param_groups if g.get("sphere"))
        factors.append(group["lr"] / group["max_lr"])
    assert factors[0] == 0.5 and min(factors) < 0.3  # warm-up, then decay: the factor really moves
    params, gains = full_params(ddp), md_gains_by_name(optimizer)
    for name in gains:
        shape = tuple(params[name].shape)
        w0 = initial(name, shape).double()
        ref = MDReference(w0, AdamHReference(w0, LR), GAIN_LR)
        for t, f in enumerate(factors):
            ref.step(grad(name, shape, t), lr_factor=f)
        assert ((params[name].double() - ref.w).norm() / ref.w.norm()).item() < 2e-6, name
        for side, key in (("row", "r"), ("col", "c")):
            want = ref.gains()[key]
            assert ((gains[name][side].double() - want).norm() / (want - 1).norm()).item() < 1e-4, (name, side)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_adammd_non_sharded_wrappers(parallel, bf16):
    """Without ZeRO-1 (Megatron's FP32Optimizer / Float16OptimizerWithFloat16Params over all-reduced
    gradients, DP = 2): whole matrices per rank, the same float64 reference (bf16: to bf16 rounding
    of the model weights, checked against the fp32 main params' reference)."""
    parallel()
    ddp, optimizer, scheduler = build_md(distributed=False, bf16=bf16)
    wrapper = "Float16OptimizerWithFloat16Params" if bf16 else "FP32Optimizer"
    assert describe(optimizer) == [f"{wrapper} > AdamMD (megatron_hyperball)"]
    assert all(fed_steps(ddp, optimizer, scheduler, range(STEPS)))
    params = full_params(ddp)
    ref, _ = md_reference({n: tuple(t.shape) for n, t in params.items()}, STEPS, LR, GAIN_LR)
    spheres = {n: params[n] for n in params if is_sphere(n)}
    assert_rel_close(spheres, {n: ref[n] for n in spheres}, 4e-3 if bf16 else 2e-6, f"AdamMD non-sharded bf16={bf16}")


def md_state(optimizer) -> dict:
    """{sphere key: {'step': t, '<side>_raw' / '_exp_avg' / '_exp_avg_sq': vector}} of every MD leaf here."""
    out = {}
    for leaf in leaves(optimizer):
        opt = inner(leaf)
        hook = getattr(opt, "md_hook", None)
        if hook is not None:
            out.update(hook.state_dict(opt.sphere_index())["md_gains"])
    return out


@pytest.mark.world_size(2)
def test_non_finite_step_changes_nothing_gains_included(parallel):
    """bf16 params, loss scale 1: a NaN gradient at step 2 goes through Megatron's found-inf path,
    which skips the step before the gain hook runs; weights, Adam state and the gains (values,
    moments, step counts) equal a run that never saw step 2, bitwise."""
    results = {}
    for case, steps, nan_step in (("with_nan", [0, 1, 2, 3], 2), ("without", [0, 1, 3], -1)):
        parallel()
        ddp, optimizer, scheduler = build_md(steps=4, bf16=True, loss_scale=1.0)
        ok = fed_steps(ddp, optimizer, scheduler, steps, nan_step=nan_step)
        results[case] = ok, full_params(ddp), local_optimizer_state(optimizer), md_state(optimizer)
    assert results["with_nan"][0] == [True, True, False, True]
    for part in (1, 2):  # weights; per-element Adam state
        a, b = results["with_nan"][part], results["without"][part]
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), k
    gains_a, gains_b = results["with_nan"][3], results["without"][3]
    assert gains_a.keys() == gains_b.keys() and gains_a
    for key, entry in gains_a.items():
        assert entry["step"] == gains_b[key]["step"] == 3.0, (key, entry["step"], gains_b[key]["step"])
        for q, value in entry.items():
            if q != "step":
                assert torch.equal(value, gains_b[key][q]), (key, q)
        assert entry["row_exp_avg"].abs().max() > 0, key  # the gains did take steps
