"""Megatron end to end: DP sizes through forward/backward, collective counts, found-inf, bad input."""

import pytest
import torch

from tests.conftest import run_torchrun
from tests.test_megatron_adamh import by_optimizer, is_sphere


def rel_diff(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def e2e():
    return {dp: run_torchrun("hyperball_worker.py", dp, "--scenario", "e2e",
                             "--optimizers", "adam,adamh", "--steps", 5, "--lr", 0.02, "--clip-grad", 1.0)
            for dp in (1, 2)}


def test_end_to_end_dp2_vs_dp1_within_megatron_adam_spread(e2e):
    """Through forward, backward and grad sync, DP = 2 differs from DP = 1 by reduction order
    only: AdamH's spread stays within a small multiple of Megatron Adam's own spread."""
    spread = {}
    for opt in ("adam", "adamh"):
        one, two = (by_optimizer(e2e[dp]["tensors"], opt) for dp in (1, 2))
        spread[opt] = max(rel_diff(two[n], one[n]) for n in one if is_sphere(n))
        losses = e2e[1][opt]["losses"]
        assert losses[-1] < losses[0]  # it trains
        assert all(e2e[dp][opt]["ok"] for dp in (1, 2))
    assert spread["adam"] > 0  # the two layouts really reduce in a different order
    assert spread["adamh"] <= max(4 * spread["adam"], 1e-5), spread


def test_sphere_norms_cost_one_all_reduce_per_group():
    """DP = 2 x TP = 2: AdamH's step does exactly one more all-reduce than Megatron Adam's on the
    DP group and one on the TP group, and none elsewhere."""
    run = run_torchrun("hyperball_worker.py", 4, "--scenario", "fed",
                   "--optimizers", "adam,adamh", "--steps", 2, "--tp", 2)
    adam, adamh = run["adam"]["all_reduce_counts"], run["adamh"]["all_reduce_counts"]
    extra = {g: adamh.get(g, 0) - adam.get(g, 0) for g in set(adam) | set(adamh)}
    extra = {g: n for g, n in extra.items() if n}
    # rank 0 is in DP group [0, 2] and TP group [0, 1]
    assert extra == {"[0, 2]": 1, "[0, 1]": 1}, (adam, adamh)


def test_non_finite_step_changes_nothing():
    """bf16 params, fp32 main params, loss scale 1: a NaN gradient at step 2 goes through
    Megatron's found-inf path, which skips the step; the weights and the optimizer state are
    untouched, so the run equals one that never saw step 2 (bitwise)."""
    common = ("--scenario", "fed", "--optimizers", "adamh", "--steps", 4, "--loss-scale", 1.0, "--bf16")
    with_nan = run_torchrun("hyperball_worker.py", 2, *common, "--nan-step", 2)
    without = run_torchrun("hyperball_worker.py", 2, *common, "--skip-step", 2)
    assert with_nan["adamh"]["ok"] == [True, True, False, True]
    a, b = with_nan["tensors"], without["tensors"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_input_raises_before_any_step():
    errors = run_torchrun("hyperball_worker.py", 2, "--scenario", "bad")["errors"]
    assert errors["typo"].startswith("ValueError: OptimizerConfig.optimizer='adamhh' is not a known optimizer")
    assert "adam_hyperball, adamh" in errors["typo"] and "muon_hyperball, muonh" in errors["typo"]
    assert "hyperball_radius='unit'" in errors["radius"] and "allowed: init, sqrt_max_dim" in errors["radius"]
    assert "hyperball_update_norm='rms'" in errors["update_norm"] and "allowed: exact, shape" in errors["update_norm"]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in errors["weight_decay"]
    assert "allowed: wd_mult=0.0" in errors["weight_decay"]
    assert "use_layer_wise_distributed_optimizer=True" in errors["muonh_on_zero1"]
    zero = run_torchrun("hyperball_worker.py", 1, "--scenario", "bad",
                    "--zero-param", "decoder.layers.1.self_attention.linear_proj.weight")["errors"]
    assert "decoder.layers.1.self_attention.linear_proj.weight" in zero["zero_norm"]
    assert "Frobenius norm 0.0" in zero["zero_norm"]


@pytest.mark.parametrize("optimizer,extra", [
    ("adamh", ()),  # fp32: needs patches' no_grad fix of Megatron's dp_reshardable load
    ("muonh", ("--layer-wise", "--bf16")),
])
def test_checkpoint_resume_is_bitwise(tmp_path, optimizer, extra):
    """Train 2 steps, save with Megatron's torch_dist checkpointing, train 2 more; a new process
    loads and trains the same 2: identical losses and parameters, bitwise."""
    common = ("--scenario", "ckpt", "--optimizers", optimizer, "--steps", 4, "--resume-at", 2,
              "--ckpt-dir", tmp_path / "ckpt", *extra)
    saved = run_torchrun("hyperball_worker.py", 2, *common, "--phase", "save")
    resumed = run_torchrun("hyperball_worker.py", 2, *common, "--phase", "load")
    assert resumed[optimizer]["losses_after"] == saved[optimizer]["losses_after"]
    a, b = saved["tensors"], resumed["tensors"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
