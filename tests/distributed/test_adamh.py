"""AdamH on Megatron's DDP + ZeRO-1 DistributedOptimizer, against a float64 single-process reference.

Every rank is fed the same synthetic full gradients (``helpers.feed_synthetic_grads``) and only the
optimizer runs, so DP = 1, 2, 4, TP = 2, PP = 2 and their products must all equal the reference to
fp32 rounding.

Run: torchrun --nproc-per-node N -m pytest tests/distributed/test_adamh.py  (N in WORLD_SIZES)
"""

import pytest
import torch
import torch.distributed as dist

from megatron_hyperball.mcore.tree import describe, sphere_counts
from tests.distributed.helpers import (
    AllReduceCounter,
    adamh_reference,
    all_max,
    assert_rel_close,
    build,
    fed_steps,
    full_params,
    global_names,
    initial,
    is_sphere,
)

WORLD_SIZES = (1, 2, 4)
STEPS, LR = 5, 0.02


def layout(dp, tp=1, pp=1):
    return pytest.param(dp, tp, pp, id=f"dp{dp}-tp{tp}-pp{pp}", marks=pytest.mark.world_size(dp * tp * pp))


@pytest.mark.parametrize("dp,tp,pp", [
    layout(1), layout(2), layout(1, tp=2), layout(1, pp=2), layout(4), layout(2, tp=2), layout(2, pp=2),
])
def test_adamh_zero1_matches_float64_reference(parallel, dp, tp, pp):
    parallel(tp=tp, pp=pp)
    ddp, optimizer, scheduler = build("adamh", lr=LR, steps=STEPS)
    ok = fed_steps(ddp, optimizer, scheduler, range(STEPS))
    params = full_params(ddp)  # the whole model on every rank (TP and PP gathered)

    if pp > 1:  # each stage really holds only its own layers
        assert len(global_names(ddp)) < len(params)
    assert all(ok)
    assert describe(optimizer) == ["DistributedOptimizer > AdamH (megatron_hyperball)"]
    ref = adamh_reference({n: tuple(t.shape) for n, t in params.items()}, STEPS, LR)
    assert_rel_close(params, ref, 1e-6, f"AdamH dp{dp} tp{tp} pp{pp}")
    for name, t in params.items():  # every sphere still has its initial radius
        if is_sphere(name):
            r0 = initial(name, t.shape).double().norm().item()
            assert abs(t.double().norm().item() / r0 - 1) < 1e-6, name


@pytest.mark.world_size(4)
def test_dp4_has_empty_shards(parallel):
    """DP = 4 really exercises ranks whose slice of a sphere is empty."""
    parallel()
    _, optimizer, _ = build("adamh", lr=LR, steps=STEPS)
    total, local = sphere_counts(optimizer)
    fewest = -all_max(-local)
    assert total == 8
    assert fewest < total


@pytest.mark.world_size(4)
def test_sphere_norms_cost_one_all_reduce_per_group(parallel):
    """DP = 2 x TP = 2: AdamH's step does exactly one more all-reduce than Megatron Adam's on the
    DP group and one on the TP group, and none elsewhere."""
    from megatron.core import parallel_state

    parallel(tp=2)
    counts = {}
    for name in ("adam", "adamh"):
        counter = AllReduceCounter()
        ddp, optimizer, scheduler = build(name, lr=LR, steps=2)
        fed_steps(ddp, optimizer, scheduler, range(2), counter=counter, count_step=1)  # one full step
        counts[name] = dict(counter.counts)
    adam, adamh = counts["adam"], counts["adamh"]
    extra = {g: adamh.get(g, 0) - adam.get(g, 0) for g in set(adam) | set(adamh)}
    extra = {g: n for g, n in extra.items() if n}
    dp_ranks = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
    tp_ranks = dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
    assert extra == {str(dp_ranks): 1, str(tp_ranks): 1}, (adam, adamh)
    if dist.get_rank() == 0:  # rank 0 is in DP group [0, 2] and TP group [0, 1]
        assert extra == {"[0, 2]": 1, "[0, 1]": 1}, (adam, adamh)


@pytest.mark.world_size(2)
def test_non_finite_step_changes_nothing(parallel):
    """bf16 params, fp32 main params, loss scale 1: a NaN gradient at step 2 goes through Megatron's
    found-inf path, which skips the step; the weights and the optimizer state are untouched, so the
    run equals one that never saw step 2 (bitwise)."""
    results = {}
    for case, steps, nan_step in (("with_nan", [0, 1, 2, 3], 2), ("without", [0, 1, 3], -1)):
        parallel()  # a fresh parallel state and seed for each run
        ddp, optimizer, scheduler = build("adamh", lr=LR, steps=4, bf16=True, loss_scale=1.0)
        ok = fed_steps(ddp, optimizer, scheduler, steps, nan_step=nan_step)
        results[case] = ok, full_params(ddp)
    assert results["with_nan"][0] == [True, True, False, True]
    a, b = results["with_nan"][1], results["without"][1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
