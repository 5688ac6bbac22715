"""megatron-core 0.19's real DDP / optimizers / GPTModel / tensor and pipeline parallelism /
dist-checkpointing on CPU with gloo, through ``megatron_hyperball.compat.enable_cpu``.

Every check compares numbers against another layout of the same run, not just "it ran":
data-parallel size 2 against size 1 (the pipeline-parallel layout of the same two ranks, stepped
by Megatron's schedule), a checkpoint resumed by a freshly built model, TP = 2 against TP = 1.

Run: torchrun --nproc-per-node N -m pytest tests/distributed/test_megatron_cpu.py  (N in WORLD_SIZES)
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed.helpers import (
    SHAPE,
    assert_trains,
    full_params,
    gathered_logits,
    global_rel_err,
    load_full_weights,
    local_optimizer_state,
    rel_err,
    schedule_step,
    sharded_state,
    split_qkv_bias,
    token_batch,
    train_step,
)

WORLD_SIZES = (2, 4)
GLOBAL_BATCH = 4

TRAIN_CASES = {
    # ZeRO-1 DistributedOptimizer around Megatron's Adam (torch AdamW without TE/apex).
    "adam_distopt_fp32": dict(optimizer="adam", distributed=True, layer_wise=False, bf16=False),
    # Plain DDP (all-reduce) + FP32 optimizer wrapper.
    "adam_ddp_fp32": dict(optimizer="adam", distributed=False, layer_wise=False, bf16=False),
    "adam_distopt_bf16": dict(optimizer="adam", distributed=True, layer_wise=False, bf16=True),
    # LayerWiseDistributedOptimizer (Muon for matrices, DistOpt Adam for the rest).
    "muon_layerwise_bf16": dict(optimizer="muon", distributed=False, layer_wise=True, bf16=True),
}


def megatron_optimizer(ddp, case=None, bf16=False, **fields):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    case = case or dict(optimizer="adam", distributed=True, layer_wise=False, bf16=bf16)
    config = dict(
        optimizer=case["optimizer"], lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
        bf16=case["bf16"], params_dtype=torch.bfloat16 if case["bf16"] else torch.float32,
        use_distributed_optimizer=case["distributed"], use_layer_wise_distributed_optimizer=case["layer_wise"],
    )
    config.update(fields)
    return get_megatron_optimizer(OptimizerConfig(**config), [ddp])


# ---------------------------------------------------------------------------------------
# data parallel: DP = 2 must follow DP = 1 on the same global batches


@pytest.fixture(scope="module")
def dp_runs(distributed):
    """Per case, 3 steps: DP = 2 (Megatron's own init, seed 1234) and DP = 1 as PP = 2 (through
    Megatron's pipeline schedule) from DP = 2's initial weights."""
    from megatron.core import parallel_state

    from megatron_hyperball.mcore.builders import build_gpt, destroy_parallel, init_parallel, wrap_ddp

    runs = {}
    for name, case in TRAIN_CASES.items():
        start = None
        for dp, pp, step_fn in ((2, 1, train_step), (1, 2, schedule_step)):
            init_parallel(pp=pp, seed=1234)
            model = build_gpt(**SHAPE, bf16=case["bf16"])
            ddp = wrap_ddp(model, use_distributed_optimizer=case["distributed"], layer_wise=case["layer_wise"])
            if start is None:
                start = full_params(ddp)
            else:
                load_full_weights(ddp, start)
            # data-parallel replicas must start from identical weights
            vec = torch.cat([p.detach().float().reshape(-1) for p in ddp.parameters()])
            stats = torch.stack([vec.sum(), vec.square().sum()])
            dp_group = parallel_state.get_data_parallel_group()
            gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(dp_group))]
            dist.all_gather(gathered, stats, group=dp_group)
            optimizer = megatron_optimizer(ddp, case)
            steps = []
            for step in range(3):
                tokens, labels = token_batch(step, GLOBAL_BATCH)
                steps.append(step_fn(ddp, optimizer, tokens, labels))
            runs[name, dp] = {
                "dp": parallel_state.get_data_parallel_world_size(),
                "inner_optimizers": sorted(
                    {type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])}),
                "replicas_identical": all(torch.equal(g, gathered[0]) for g in gathered),
                "losses": [s["loss"] for s in steps],
                "ok": [s["ok"] for s in steps],
                "params": full_params(ddp),
            }
            destroy_parallel()
    return runs


@pytest.mark.world_size(2)
@pytest.mark.parametrize(
    "case, inner",
    [("adam_distopt_fp32", ["DistributedOptimizer"]), ("adam_ddp_fp32", ["FP32Optimizer"])],
)
def test_fp32_dp2_matches_dp1(dp_runs, case, inner):
    one, two = dp_runs[case, 1], dp_runs[case, 2]
    assert one["dp"] == 1 and two["dp"] == 2
    assert two["inner_optimizers"] == inner
    assert two["replicas_identical"], "data-parallel replicas did not start from the same weights"
    assert all(two["ok"]) and all(one["ok"])
    assert_trains(two["losses"], min_drop=0.5)
    for l1, l2 in zip(one["losses"], two["losses"]):
        assert abs(l1 - l2) < 1e-5, (one["losses"], two["losses"])

    p1, k1 = split_qkv_bias(one["params"])
    p2, k2 = split_qkv_bias(two["params"])
    errors = {name: rel_err(p2[name], p1[name]) for name in p1}
    worst = max(errors, key=errors.get)
    # measured: whole model ~5e-7, worst tensor ~7e-6 (Adam amplifies round-off where
    # gradients are tiny); the fp32 reduction order is the only difference
    assert global_rel_err(p1, p2) < 1e-5
    assert errors[worst] < 3e-5, (worst, errors[worst])
    for name in k1:  # zero-gradient key bias: stays round-off small in both runs
        assert k1[name].abs().max() < 1e-4 and k2[name].abs().max() < 1e-4


@pytest.mark.world_size(2)
@pytest.mark.parametrize(
    "case, inner, param_tol",
    [
        ("adam_distopt_bf16", ["DistributedOptimizer"], 1e-2),
        ("muon_layerwise_bf16", ["DistributedOptimizer", "LayerWiseDistributedOptimizer"], 3e-2),
    ],
)
def test_bf16_dp2_matches_dp1(dp_runs, case, inner, param_tol):
    """bf16 activations differ with the micro-batch split, so the match is to bf16 accuracy."""
    one, two = dp_runs[case, 1], dp_runs[case, 2]
    assert two["inner_optimizers"] == inner
    assert two["replicas_identical"]
    assert_trains(two["losses"], min_drop=0.5)
    for l1, l2 in zip(one["losses"], two["losses"]):
        assert abs(l1 - l2) < 5e-3, (one["losses"], two["losses"])
    p1, _ = split_qkv_bias(one["params"])
    p2, _ = split_qkv_bias(two["params"])
    assert global_rel_err(p1, p2) < param_tol


# ---------------------------------------------------------------------------------------
# torch_dist checkpoint round trip (model + ZeRO-1 optimizer), resumed by a fresh build


def _ckpt_run(variant, phase, ckpt_dir):
    """save: build (seed 1234), train steps 0-1, save, train 2-3. load: build from another seed (so
    a missed load shows), load, train 2-3. Returns the losses of 2-3 and the full params and this
    rank's optimizer state at the checkpoint and the full params after step 3."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )

    from megatron_hyperball.mcore.builders import build_gpt, destroy_parallel, init_parallel, unwrap, wrap_ddp

    dtype, sharding = variant.split(":")
    init_parallel(seed=1234 if phase == "save" else 4321)
    ddp = wrap_ddp(build_gpt(**SHAPE, bf16=dtype == "bf16"), use_distributed_optimizer=True)
    optimizer = megatron_optimizer(ddp, bf16=dtype == "bf16")

    def state(is_loading):
        return sharded_state(ddp, optimizer, is_loading, sharding)

    def step(s):
        tokens, labels = token_batch(s, GLOBAL_BATCH)
        return train_step(ddp, optimizer, tokens, labels)["loss"]

    out = {"dp": parallel_state.get_data_parallel_world_size()}
    if phase == "save":
        out["losses_before_save"] = [step(s) for s in (0, 1)]
        out["at_checkpoint"] = full_params(ddp)
        out["optimizer_at_checkpoint"] = local_optimizer_state(optimizer)
        if dist.get_rank() == 0:
            ckpt_dir.mkdir(parents=True)  # dist_checkpointing wants it to exist
        dist.barrier()
        dist_checkpointing.save(state(False), str(ckpt_dir),
                                sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    else:
        before = full_params(ddp)
        loaded = dist_checkpointing.load(state(True), str(ckpt_dir),
                                         sharded_strategy=get_default_load_sharded_strategy(str(ckpt_dir)))
        unwrap(ddp).load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        out["at_checkpoint"] = full_params(ddp)
        out["optimizer_at_checkpoint"] = local_optimizer_state(optimizer)
        out["load_changed_params"] = any(not torch.equal(before[k], out["at_checkpoint"][k]) for k in before)
    out["losses_after"] = [step(s) for s in (2, 3)]
    out["final"] = full_params(ddp)
    destroy_parallel()
    return out


@pytest.mark.world_size(2)
@pytest.mark.parametrize("variant", ["bf16:dp_reshardable", "fp32:fully_reshardable"])
def test_checkpoint_roundtrip_is_bitwise(shared_tmp_path, variant):
    ckpt_dir = shared_tmp_path / variant.replace(":", "-")
    saved = _ckpt_run(variant, "save", ckpt_dir)
    loaded = _ckpt_run(variant, "load", ckpt_dir)

    meta = json.loads((ckpt_dir / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    files = list(ckpt_dir.glob("*.distcp"))
    # dp_reshardable: every rank writes its own optimizer shard; fully_reshardable gathers
    # the optimizer state on DP rank 0 (and the model tensors are DP-replicated).
    assert len(files) == (2 if variant.endswith("dp_reshardable") else 1), files

    assert saved["dp"] == loaded["dp"] == 2
    assert loaded["load_changed_params"], "the resumed run started from the checkpoint's weights anyway?"
    for what in ("at_checkpoint", "optimizer_at_checkpoint", "final"):
        assert saved[what].keys() == loaded[what].keys()
        differ = [k for k in saved[what] if not torch.equal(saved[what][k], loaded[what][k])]
        assert not differ, f"{what}: {differ[:5]}"
    assert any(k.endswith("exp_avg_sq") for k in saved["optimizer_at_checkpoint"])
    assert saved["losses_after"] == loaded["losses_after"]
    assert all(math.isfinite(x) for x in saved["losses_before_save"] + saved["losses_after"])


# ---------------------------------------------------------------------------------------
# tensor parallelism: TP = 2 with TP = 1's weights computes TP = 1's logits and training


def _tp_run(tp, start):
    from megatron.core import parallel_state

    from megatron_hyperball.mcore.builders import build_gpt, destroy_parallel, init_parallel, wrap_ddp

    init_parallel(tp=tp, seed=1234)
    model = build_gpt(**SHAPE, position_embedding_type="rope")
    if start is not None:
        load_full_weights(model, start)
    local_shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    weights = full_params(model)
    probe, _ = token_batch(1000, GLOBAL_BATCH)
    logits = gathered_logits(model, probe)
    ddp = wrap_ddp(model, use_distributed_optimizer=True)
    optimizer = megatron_optimizer(ddp)
    losses = []
    for step in range(2):
        tokens, labels = token_batch(step, GLOBAL_BATCH)
        losses.append(train_step(ddp, optimizer, tokens, labels)["loss"])
    out = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "local_shapes": local_shapes, "weights": weights, "logits": logits, "losses": losses,
        "params": full_params(ddp),
    }
    destroy_parallel()
    return out


@pytest.mark.parametrize("nproc", [
    pytest.param(2, id="2ranks", marks=pytest.mark.world_size(2)),
    pytest.param(4, id="4ranks", marks=pytest.mark.world_size(4)),
])
def test_tp2_matches_tp1(distributed, nproc):
    """2 ranks: TP = 1 x DP = 2 vs TP = 2 x DP = 1; 4 ranks: TP = 1 x DP = 4 vs TP = 2 x DP = 2."""
    tp1 = _tp_run(1, None)
    tp2 = _tp_run(2, tp1["weights"])
    assert (tp1["tp"], tp1["dp"], tp2["tp"], tp2["dp"]) == (1, nproc, 2, nproc // 2)
    shapes = tp2["local_shapes"]  # really sharded: column-parallel rows, row-parallel columns
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == [96, 64]
    assert shapes["decoder.layers.0.self_attention.linear_proj.weight"] == [64, 32]
    assert shapes["output_layer.weight"] == [64, 64]

    logits1, logits2 = tp1["logits"], tp2["logits"]
    assert logits1.shape == logits2.shape == (4, 32, 128)
    assert (logits1 - logits2).abs().max() <= 1e-5 * max(1.0, logits1.abs().max().item())

    assert_trains(tp2["losses"], min_drop=0.3)
    for l1, l2 in zip(tp1["losses"], tp2["losses"]):
        assert abs(l1 - l2) < 1e-5
    p1, _ = split_qkv_bias(tp1["params"])
    p2, _ = split_qkv_bias(tp2["params"])
    errors = {name: rel_err(p2[name], p1[name]) for name in p1}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])
