"""AdamH on Megatron's DDP + ZeRO-1 DistributedOptimizer, against a float64 single-process reference.

Every rank is fed the same synthetic full gradients (tests/workers/synthetic.py) and only the
optimizer runs, so DP = 1, 2, 4 and TP = 2 must all equal the reference to fp32 rounding.
"""

import pytest
import torch

from tests.conftest import run_torchrun
from tests.reference import AdamHReference, adamw_reference_step
from tests.workers.synthetic import grad, initial

STEPS, LR, WD = 5, 0.02, 0.1
SPHERES = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def is_sphere(name):
    return name.endswith(SPHERES)


def model_reference(shapes: dict, sphere_reference) -> dict:
    """float64 run of the whole model: ``sphere_reference(w0)`` on the sphere matrices (an object
    with .step(g) and .w), AdamW on the rest with Megatron's weight-decay rule (none on 1-D/bias)."""
    out = {}
    for name, shape in shapes.items():
        w0 = initial(name, shape).double()
        if is_sphere(name):
            ref = sphere_reference(w0)
            for t in range(STEPS):
                ref.step(grad(name, shape, t))
            out[name] = ref.w
        else:
            wd = 0.0 if (len(shape) == 1 or name.endswith("bias")) else WD
            state = {"m": torch.zeros(shape, dtype=torch.float64), "v": torch.zeros(shape, dtype=torch.float64), "t": 0}
            w = w0
            for t in range(STEPS):
                w = adamw_reference_step(state, w, grad(name, shape, t).double(), LR, (0.9, 0.95), 1e-8, wd)
            out[name] = w
    return out


def reference(shapes: dict) -> dict:
    return model_reference(shapes, lambda w0: AdamHReference(w0, LR))


def by_optimizer(tensors, name):
    return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}


def max_rel_err(params, ref):
    errs = {n: ((params[n].double() - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}
    return max(errs.values()), errs


@pytest.fixture(scope="module")
def fed_runs():
    runs = {}
    for dp, tp in [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]:
        runs[(dp, tp)] = run_torchrun("hyperball_worker.py", dp * tp, "--scenario", "fed", "--steps", STEPS, "--lr", LR, "--tp", tp)
    return runs


@pytest.mark.parametrize("dp,tp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_adamh_zero1_matches_float64_reference(fed_runs, dp, tp):
    run = fed_runs[(dp, tp)]["adamh"]
    assert all(run["ok"])
    assert run["describe"] == ["DistributedOptimizer > AdamH (megatron_hyperball)"]
    params = by_optimizer(fed_runs[(dp, tp)]["tensors"], "adamh")
    ref = reference({n: tuple(t.shape) for n, t in params.items()})
    err, errs = max_rel_err(params, ref)
    assert err <= 1e-6, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    for name, t in params.items():  # every sphere still has its initial radius
        if is_sphere(name):
            r0 = initial(name, t.shape).double().norm().item()
            assert abs(t.double().norm().item() / r0 - 1) < 1e-6


def test_dp4_has_empty_shards(fed_runs):
    """The DP = 4 run really exercised ranks whose slice of a sphere is empty."""
    run = fed_runs[(4, 1)]["adamh"]
    assert run["spheres"] == 8
    assert run["min_local_spheres"] < run["spheres"]
