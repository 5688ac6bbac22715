"""megatron-core 0.19's real DDP / optimizers / GPTModel / tensor parallelism /
dist-checkpointing on CPU with gloo, through ``megatron_hyperball.compat.enable_cpu``.

Every multi-rank check compares numbers against a reference run (a single process, or
TP=1), not just "it ran". Workers live in ``tests/workers/``.
"""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, run_torchrun

TRAIN_CASES = ["adam_distopt_fp32", "adam_ddp_fp32", "adam_distopt_bf16", "muon_layerwise_bf16"]
CKPT_VARIANTS = ["bf16:dp_reshardable", "fp32:fully_reshardable"]
HEADS, HEAD_DIM = 4, 16  # the workers' tiny GPT: hidden 64, 4 heads


# ---------------------------------------------------------------------------------------
# helpers


def split_qkv_bias(params):
    """Replace each fused QKV bias by its Q and V parts and return the K parts apart.

    The key bias has an identically zero gradient (softmax is invariant to it), so Adam
    turns its round-off-level gradient into full-size steps of arbitrary sign: it is
    compared by size, not value.
    """
    out, key_biases = {}, {}
    for name, t in params.items():
        if name.endswith("linear_qkv.bias"):
            groups = t.view(HEADS, 3, HEAD_DIM)
            out[name + "[q]"] = groups[:, 0].clone()
            out[name + "[v]"] = groups[:, 2].clone()
            key_biases[name] = groups[:, 1].clone()
        else:
            out[name] = t
    return out, key_biases


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def global_rel_err(pa, pb) -> float:
    num = sum(((pa[k] - pb[k]) ** 2).sum() for k in pa)
    den = sum((pa[k] ** 2).sum() for k in pa)
    return math.sqrt(float(num / den))


def assert_trains(losses, min_drop):
    assert all(math.isfinite(x) for x in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), f"loss not decreasing: {losses}"
    assert losses[0] - losses[-1] > min_drop, losses


# ---------------------------------------------------------------------------------------
# the CPU layer itself (single process)


def test_enable_cpu_is_explicit_idempotent_and_scoped(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        import torch, torch.distributed as dist
        real_current_device = torch.cuda.current_device
        import megatron_hyperball.compat as compat
        import megatron.core.optimizer.clip_grads as clip_grads
        assert not compat.is_enabled() and clip_grads.torch is torch, "patched on import"

        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        info = compat.enable_cpu()
        assert compat.is_enabled() and info["megatron_core"].startswith("0.19")
        assert compat.enable_cpu() == {{"already_enabled": True}}

        # Megatron's modules see a torch whose device is the CPU ...
        assert clip_grads.torch is not torch
        assert clip_grads.torch.zeros(2, device="cuda").device.type == "cpu"
        assert clip_grads.torch.cuda.current_device() == torch.device("cpu")
        # ... including modules imported afterwards ...
        late = "megatron.core.models.bert.bert_model"
        assert late not in sys.modules
        import importlib
        assert importlib.import_module(late).torch is not torch
        # ... while everyone else keeps the real torch.
        assert torch.cuda.current_device is real_current_device
        assert torch.zeros(1).type() == "torch.FloatTensor"
        if not torch.cuda.is_available():
            try:
                torch.zeros(1, device="cuda")
            except (RuntimeError, AssertionError):
                pass
            else:
                raise AssertionError("global torch was redirected")

        # The RNG tracker runs on the CPU generator: the data-parallel seed is the default
        # state, fork() switches to seed + 2718 + tp_rank and restores afterwards.
        from megatron.core import parallel_state, tensor_parallel
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            forked = torch.rand(3)
        default = torch.rand(3)
        assert torch.equal(forked, torch.rand(3, generator=torch.Generator().manual_seed(7 + 2718)))
        assert torch.equal(default, torch.rand(3, generator=torch.Generator().manual_seed(7)))

        b = compat.backends()
        assert b["adam"] in ("te_fused_adam", "apex_fused_adam", "torch_adamw"), b
        if not b["transformer_engine"] and not b["apex"]:
            assert b["adam"] == "torch_adamw" and b["adam_class"] == "torch.optim.adamw.AdamW", b
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]


# ---------------------------------------------------------------------------------------
# data parallel: DP=2 must follow the single-process run on the same global batches


@pytest.fixture(scope="module")
def dp_runs():
    return {dp: run_torchrun("train_gpt.py", dp, *TRAIN_CASES, timeout=400) for dp in (1, 2)}


@pytest.mark.parametrize(
    "case, inner",
    [("adam_distopt_fp32", ["DistributedOptimizer"]), ("adam_ddp_fp32", ["FP32Optimizer"])],
)
def test_fp32_dp2_matches_single_process(dp_runs, case, inner):
    one, two = dp_runs[1][case], dp_runs[2][case]
    assert one["dp"] == 1 and two["dp"] == 2
    assert two["inner_optimizers"] == inner
    assert two["replicas_identical"], "data-parallel replicas did not start from the same weights"
    assert all(two["ok"])
    assert_trains(two["losses"], min_drop=0.5)
    for l1, l2 in zip(one["losses"], two["losses"]):
        assert abs(l1 - l2) < 1e-5, (one["losses"], two["losses"])

    p1, k1 = split_qkv_bias(dp_runs[1]["tensors"][case])
    p2, k2 = split_qkv_bias(dp_runs[2]["tensors"][case])
    errors = {name: rel_err(p1[name], p2[name]) for name in p1}
    worst = max(errors, key=errors.get)
    # measured: whole model ~5e-7, worst tensor ~7e-6 (Adam amplifies round-off where
    # gradients are tiny); the fp32 reduction order is the only difference
    assert global_rel_err(p1, p2) < 1e-5
    assert errors[worst] < 3e-5, (worst, errors[worst])
    for name in k1:  # zero-gradient key bias: stays round-off small in both runs
        assert k1[name].abs().max() < 1e-4 and k2[name].abs().max() < 1e-4


@pytest.mark.parametrize(
    "case, inner, param_tol",
    [
        ("adam_distopt_bf16", ["DistributedOptimizer"], 1e-2),
        ("muon_layerwise_bf16", ["DistributedOptimizer", "LayerWiseDistributedOptimizer"], 3e-2),
    ],
)
def test_bf16_dp2_matches_single_process(dp_runs, case, inner, param_tol):
    """bf16 activations differ with the micro-batch split, so the match is to bf16 accuracy."""
    one, two = dp_runs[1][case], dp_runs[2][case]
    assert two["inner_optimizers"] == inner
    assert two["replicas_identical"]
    assert_trains(two["losses"], min_drop=0.5)
    for l1, l2 in zip(one["losses"], two["losses"]):
        assert abs(l1 - l2) < 5e-3, (one["losses"], two["losses"])
    p1, _ = split_qkv_bias(dp_runs[1]["tensors"][case])
    p2, _ = split_qkv_bias(dp_runs[2]["tensors"][case])
    assert global_rel_err(p1, p2) < param_tol


# ---------------------------------------------------------------------------------------
# torch_dist checkpoint round trip (model + ZeRO-1 optimizer), resumed in a new process


@pytest.fixture(scope="module")
def ckpt_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    saved = run_torchrun("ckpt_roundtrip.py", 2, root, "save", *CKPT_VARIANTS, timeout=400)
    loaded = run_torchrun("ckpt_roundtrip.py", 2, root, "load", *CKPT_VARIANTS, timeout=400)
    return root, saved, loaded


@pytest.mark.parametrize("variant", CKPT_VARIANTS)
def test_checkpoint_roundtrip_is_bitwise(ckpt_runs, variant):
    root, saved, loaded = ckpt_runs
    ckpt_dir = Path(root) / variant.replace(":", "-")
    meta = json.loads((ckpt_dir / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    files = list(ckpt_dir.glob("*.distcp"))
    # dp_reshardable: every rank writes its own optimizer shard; fully_reshardable gathers
    # the optimizer state on DP rank 0 (and the model tensors are DP-replicated).
    assert len(files) == (2 if variant.endswith("dp_reshardable") else 1), files

    s, l = saved[variant], loaded[variant]
    assert s["dp"] == l["dp"] == 2
    assert l["load_changed_params"], "the resumed run started from the checkpoint's weights anyway?"
    st, lt = saved["tensors"][variant], loaded["tensors"][variant]
    for what in ("at_checkpoint", "optimizer_at_checkpoint", "final"):
        assert st[what].keys() == lt[what].keys()
        differ = [k for k in st[what] if not torch.equal(st[what][k], lt[what][k])]
        assert not differ, f"{what}: {differ[:5]}"
    assert any(k.endswith("exp_avg_sq") for k in st["optimizer_at_checkpoint"])
    assert s["losses_after"] == l["losses_after"]
    assert all(math.isfinite(x) for x in s["losses_before_save"] + s["losses_after"])


# ---------------------------------------------------------------------------------------
# tensor parallelism: TP=2 with TP=1's weights computes TP=1's logits and training


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def tp_run(request):
    """2 ranks: TP=1 x DP=2 vs TP=2 x DP=1; 4 ranks: TP=1 x DP=4 vs TP=2 x DP=2."""
    return request.param, run_torchrun("tp_equivalence.py", request.param, timeout=400)


def test_tp2_matches_tp1(tp_run):
    nproc, run = tp_run
    tp1, tp2, t = run["tp1"], run["tp2"], run["tensors"]
    assert (tp1["tp"], tp1["dp"], tp2["tp"], tp2["dp"]) == (1, nproc, 2, nproc // 2)
    shapes = tp2["local_shapes"]  # really sharded: column-parallel rows, row-parallel columns
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == [96, 64]
    assert shapes["decoder.layers.0.self_attention.linear_proj.weight"] == [64, 32]
    assert shapes["output_layer.weight"] == [64, 64]

    logits1, logits2 = t["logits_tp1"], t["logits_tp2"]
    assert logits1.shape == logits2.shape == (4, 32, 128)
    assert (logits1 - logits2).abs().max() <= 1e-5 * max(1.0, logits1.abs().max().item())

    assert_trains(tp2["losses"], min_drop=0.3)
    for l1, l2 in zip(tp1["losses"], tp2["losses"]):
        assert abs(l1 - l2) < 1e-5
    p1, _ = split_qkv_bias(t["params_tp1"])
    p2, _ = split_qkv_bias(t["params_tp2"])
    errors = {name: rel_err(p1[name], p2[name]) for name in p1}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])
