"""AdamH / MuonH through Megatron's training step: forward, backward, grad sync (data parallel or
Megatron's pipeline schedule), checkpoint resume, and bad inputs.

Data-parallel size 1 on two ranks is the pipeline-parallel layout (PP = 2, DP = 1), stepped by
Megatron's ``get_forward_backward_func()`` schedule over gloo point-to-point.

Run: torchrun --nproc-per-node 2 -m pytest tests/distributed/test_training.py
"""

import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed.helpers import (
    build,
    build_hyperball,
    full_params,
    is_sphere,
    rel_err,
    schedule_step,
    sharded_state,
    token_batch,
    train_step,
)

WORLD_SIZES = (2,)
pytestmark = pytest.mark.world_size(2)

STEPS, LR, GLOBAL_BATCH = 5, 0.02, 4


def train(ddp, optimizer, scheduler, steps, step_fn=train_step):
    out = {"losses": [], "ok": []}
    for step in steps:
        scheduler.step(increment=1)
        tokens, labels = token_batch(step, GLOBAL_BATCH)
        result = step_fn(ddp, optimizer, tokens, labels)
        out["losses"].append(result["loss"])
        out["ok"].append(result["ok"])
    return out


@pytest.fixture(scope="module")
def e2e(distributed):
    """adam and adamh, 5 steps on the same global batches (clip-grad 1): DP = 2 by forward/backward
    and DP grad sync; DP = 1 as PP = 2 through Megatron's pipeline schedule."""
    from megatron_hyperball.mcore.builders import destroy_parallel, init_parallel

    runs = {}
    for opt in ("adam", "adamh"):
        for layout, pp, step_fn in (("dp2", 1, train_step), ("pp2", 2, schedule_step)):
            init_parallel(pp=pp)
            ddp, optimizer, scheduler = build(opt, lr=LR, steps=STEPS, clip_grad=1.0)
            run = train(ddp, optimizer, scheduler, range(STEPS), step_fn)
            run["params"] = full_params(ddp)
            runs[opt, layout] = run
            destroy_parallel()
    return runs


def test_end_to_end_dp2_vs_dp1_within_megatron_adam_spread(e2e):
    """Through forward, backward and grad sync, DP = 2 differs from DP = 1 by reduction order only:
    AdamH's spread stays within a small multiple of Megatron Adam's own spread."""
    spread = {}
    for opt in ("adam", "adamh"):
        one, two = e2e[opt, "pp2"]["params"], e2e[opt, "dp2"]["params"]
        spread[opt] = max(rel_err(two[n], one[n]) for n in one if is_sphere(n))
        losses = e2e[opt, "pp2"]["losses"]
        assert losses[-1] < losses[0]  # it trains
        assert all(e2e[opt, layout]["ok"] for layout in ("dp2", "pp2"))
    assert spread["adam"] > 0  # the two layouts really reduce in a different order
    assert spread["adamh"] <= max(4 * spread["adam"], 1e-5), spread


def test_pipeline_schedule_loss_matches_pp1(e2e):
    """PP = 2 through Megatron's 1F1B schedule (gloo point-to-point) computes PP = 1's losses: the
    first step's (same weights) to fp32 rounding, later ones to the rounding that the two layouts'
    different reduction orders leave after lr 0.02 steps (measured: 4e-6 relative at most)."""
    for opt in ("adam", "adamh"):
        pp1, pp2 = e2e[opt, "dp2"]["losses"], e2e[opt, "pp2"]["losses"]
        assert all(math.isfinite(x) for x in pp2), pp2
        assert abs(pp1[0] - pp2[0]) <= 1e-6 * abs(pp1[0]), (opt, pp1, pp2)
        for a, b in zip(pp1, pp2):
            assert abs(a - b) <= 1e-5 * abs(a), (opt, pp1, pp2)


@pytest.mark.parametrize("optimizer,bf16", [
    ("adamh", False),  # fp32 ZeRO-1: needs patches' no_grad fix of Megatron's dp_reshardable load
    ("muonh", True),   # bf16 layer-wise
])
def test_checkpoint_resume_is_bitwise(parallel, shared_tmp_path, optimizer, bf16):
    """Train 2 steps, save with Megatron's torch_dist checkpointing, train 2 more; a freshly built
    model and optimizer (another parallel state, weights moved away) load it and train the same 2:
    identical losses and parameters, bitwise."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )

    from megatron_hyperball.mcore.builders import unwrap

    ckpt_dir = shared_tmp_path / "ckpt"
    steps, resume_at = 4, 2

    def start():
        ddp, opt, scheduler = build_hyperball(optimizer, lr=LR, steps=steps, bf16=bf16)

        def state(is_loading):
            return sharded_state(ddp, opt, is_loading)

        return ddp, opt, scheduler, state

    parallel()
    ddp, opt, scheduler, state = start()
    train(ddp, opt, scheduler, range(resume_at))
    if dist.get_rank() == 0:
        ckpt_dir.mkdir()
    dist.barrier()
    dist_checkpointing.save(state(False), str(ckpt_dir),
                            sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    saved = train(ddp, opt, scheduler, range(resume_at, steps))
    saved_params = full_params(ddp)

    parallel(seed=4321)
    ddp, opt, scheduler, state = start()
    with torch.no_grad():  # start elsewhere, so a load that missed something shows
        for p in ddp.parameters():
            p.mul_(1.5)
    loaded = dist_checkpointing.load(state(True), str(ckpt_dir),
                                     sharded_strategy=get_default_load_sharded_strategy(str(ckpt_dir)))
    unwrap(ddp).load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    scheduler.num_steps = resume_at
    resumed = train(ddp, opt, scheduler, range(resume_at, steps))
    resumed_params = full_params(ddp)

    assert resumed["losses"] == saved["losses"]
    assert resumed_params.keys() == saved_params.keys()
    for k in saved_params:
        assert torch.equal(saved_params[k], resumed_params[k]), k


def test_bad_input_raises_before_any_step(parallel):
    from megatron.core.optimizer import ParamKey

    parallel()
    cases = {
        "typo": dict(optimizer="adamhh"),
        "radius": dict(optimizer="adamh", hyperball_radius="unit"),
        "update_norm": dict(optimizer="muonh", hyperball_update_norm="rms",
                            use_layer_wise_distributed_optimizer=True),
        "weight_decay": dict(optimizer="adamh",
                             config_overrides={ParamKey(name="*linear_fc1.weight"): {"wd_mult": 1.0}}),
        "muonh_on_zero1": dict(optimizer="muonh"),
        "zero_norm": dict(optimizer="adamh", zero_param="decoder.layers.1.self_attention.linear_proj.weight"),
    }
    errors = {}
    for case, changes in cases.items():
        with pytest.raises(Exception) as info:
            build(lr=LR, **changes)
        errors[case] = f"{info.type.__name__}: {info.value}"
    assert errors["typo"].startswith("ValueError: OptimizerConfig.optimizer='adamhh' is not a known optimizer")
    assert "adam_hyperball, adamh" in errors["typo"] and "muon_hyperball, muonh" in errors["typo"]
    assert "hyperball_radius='unit'" in errors["radius"] and "allowed: init, sqrt_max_dim" in errors["radius"]
    assert "hyperball_update_norm='rms'" in errors["update_norm"] and "allowed: exact, shape" in errors["update_norm"]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in errors["weight_decay"]
    assert "allowed: wd_mult=0.0" in errors["weight_decay"]
    assert "use_layer_wise_distributed_optimizer=True" in errors["muonh_on_zero1"]
    assert "decoder.layers.1.self_attention.linear_proj.weight" in errors["zero_norm"]
    assert "Frobenius norm 0.0" in errors["zero_norm"]
