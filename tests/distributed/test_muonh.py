"""MuonH through Megatron's emerging-optimizer registry on the layer-wise layout, vs float64 reference.

Every rank is fed the same synthetic full gradients; DP = 1 and 2 (layer-wise: whole matrices per
rank), TP = 2 (Megatron's TP-aware Newton-Schulz, norms summed over TP) and PP = 2 (each stage
steps its own layers) must equal the single-process reference that uses the same Newton-Schulz
in fp32.

Run: torchrun --nproc-per-node N -m pytest tests/distributed/test_muonh.py  (N in WORLD_SIZES)
"""

import pytest
from megatron.core import parallel_state

from megatron_hyperball.mcore.tree import describe
import torch

from tests.distributed.helpers import (
    assert_rel_close,
    local_optimizer_state,
    build_hyperball,
    fed_steps,
    full_params,
    global_names,
    muonh_reference,
)

WORLD_SIZES = (1, 2)
STEPS, LR = 5, 0.02


def fed_run(name, steps=STEPS):
    ddp, optimizer, scheduler = build_hyperball(name, lr=LR, steps=steps)
    ok = fed_steps(ddp, optimizer, scheduler, range(steps))
    params = full_params(ddp)  # the whole model on every rank (TP and PP gathered)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        assert len(global_names(ddp)) < len(params)  # each stage really holds only its own layers
    return ok, describe(optimizer), params


# the TP run asks for 'muon_hyperball', the name megatron-core 0.19.2 registers (and cannot build)
@pytest.mark.parametrize("dp,tp,pp,name", [
    pytest.param(1, 1, 1, "muonh", id="dp1", marks=pytest.mark.world_size(1)),
    pytest.param(2, 1, 1, "muonh", id="dp2", marks=pytest.mark.world_size(2)),
    pytest.param(1, 2, 1, "muon_hyperball", id="tp2", marks=pytest.mark.world_size(2)),
    pytest.param(1, 1, 2, "muonh", id="pp2", marks=pytest.mark.world_size(2)),
])
def test_muonh_layer_wise_matches_reference(parallel, dp, tp, pp, name):
    parallel(tp=tp, pp=pp)
    ok, lines, params = fed_run(name)
    assert all(ok)
    assert any("TensorParallelMuonH" in line for line in lines), lines
    ref = muonh_reference({n: tuple(t.shape) for n, t in params.items()}, STEPS, LR)
    # NS in fp32 of fp32 vs float64 momenta: agreement to fp32 rounding amplified by 5 NS steps
    assert_rel_close(params, ref, 1e-5, f"MuonH dp{dp} tp{tp} pp{pp}")


@pytest.mark.world_size(2)
def test_muonh_dp2_equals_dp1(parallel):
    """Layer-wise over two data-parallel ranks equals data-parallel size 1, here the PP = 2 layout of
    the same two ranks (DP = 1: every matrix stepped whole on the stage that holds it)."""
    parallel()
    _, _, dp2 = fed_run("muonh")
    parallel(pp=2)
    _, _, dp1 = fed_run("muonh")
    assert_rel_close(dp1, dp2, 1e-6, "MuonH DP1 vs DP2")


@pytest.mark.world_size(2)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_step_changes_nothing(parallel, bad):
    """bf16 MuonH on the layer-wise optimizer with a loss scale (Megatron's switch for found-inf in
    bf16): a non-finite gradient at step 2 is skipped; every parameter and every optimizer state
    (momentum, fp32 main params, Adam moments) equals a run that never saw step 2, bitwise.
    megatron-core 0.19.2 alone builds the layer-wise members without a grad scaler, and the step
    turned the matrix and its momentum into NaN (patch layer_wise_found_inf)."""
    results = {}
    for case, steps, nan_step in (("bad", [0, 1, 2, 3], 2), ("without", [0, 1, 3], -1)):
        parallel()
        ddp, optimizer, scheduler = build_hyperball("muonh", lr=LR, steps=4, bf16=True, loss_scale=1.0)
        ok = fed_steps(ddp, optimizer, scheduler, steps, nan_step=nan_step, bad=bad)
        results[case] = ok, full_params(ddp), local_optimizer_state(optimizer)
    assert results["bad"][0] == [True, True, False, True]
    for got, want in ((results["bad"][1], results["without"][1]), (results["bad"][2], results["without"][2])):
        assert got.keys() == want.keys()
        for k in got:
            assert torch.equal(got[k], want[k]), k
