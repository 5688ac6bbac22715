"""split_qkv: Q, K and V of the fused linear_qkv each on its own sphere (HyperP's separate matrices).

Tiny GPT with grouped-query attention (4 heads of dim 16, hidden 64): with 2 query groups each
linear_qkv is 2 groups x (32 Q rows, 16 K rows, 16 V rows) x 64, so Q is 64 x 64, K and V 32 x 64,
their rows interleaved through the fused tensor; with 1 group it is 64 Q, 16 K, 16 V rows. Every rank is fed the same synthetic gradients; the result
must equal a float64 reference that runs AdamH / MuonH on Q, K and V as three separate matrices,
and each part must stay at its own radius.

Run: torchrun --nproc-per-node N -m pytest tests/distributed/test_split_qkv.py  (N in WORLD_SIZES)
"""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import helpers
from tests.distributed.helpers import (
    AdamHReference,
    assert_rel_close,
    build_hyperball,
    fed_steps,
    full_params,
    grad,
    initial,
    layout,
    model_reference,
    muonh_reference,
    MuonHReference,
)

WORLD_SIZES = (1, 2)
STEPS, LR = 5, 0.02
HEADS, HEAD_DIM = 4, 16


def split_of(groups: int) -> tuple[int, int, int]:
    """Q, K, V rows per query group."""
    return (HEADS // groups * HEAD_DIM, HEAD_DIM, HEAD_DIM)


def parts(w: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """Q, K, V of a fused QKV: each part's rows of every query group, in group order."""
    split = split_of(groups)
    return [t.reshape(-1, w.shape[1]) for t in w.view(groups, sum(split), -1).split(split, dim=1)]


def fuse(q, k, v, groups: int) -> torch.Tensor:
    return torch.cat([t.view(groups, -1, q.shape[1]) for t in (q, k, v)], dim=1).reshape(-1, q.shape[1])


def reference(params, optimizer, radius, groups):
    """The whole model in float64 (helpers), its QKVs replaced by Q, K, V stepped apart."""
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    from megatron_hyperball.optim.newton_schulz import orthogonalize

    if optimizer == "adamh":
        ref = model_reference(shapes, lambda w0: AdamHReference(w0, LR, radius=radius), STEPS, LR)
    else:
        assert radius == "init"
        ref = muonh_reference(shapes, STEPS, LR)

    for name, shape in shapes.items():
        if not name.endswith("linear_qkv.weight"):
            continue
        if optimizer == "adamh":
            refs = [AdamHReference(p.double(), LR, radius=radius) for p in parts(initial(name, shape), groups)]
        else:
            refs = [MuonHReference(p.double(), LR, lambda x: orthogonalize(x.float(), fp32_matmul_prec="highest"),
                                   momentum=0.95, nesterov=True, radius=radius) for p in parts(initial(name, shape), groups)]
        for t in range(STEPS):
            for r, g in zip(refs, parts(grad(name, shape, t), groups)):
                r.step(g)
        ref[name] = fuse(*[r.w for r in refs], groups)
    return ref


def run(optimizer, monkeypatch, radius="init", groups=2, bucket_size=None):
    import functools

    from megatron_hyperball.mcore import builders

    assert helpers.SHAPE["num_attention_heads"] == HEADS and helpers.SHAPE["hidden_size"] == HEADS * HEAD_DIM
    monkeypatch.setitem(helpers.SHAPE, "num_query_groups", groups)
    if bucket_size is not None:  # each parameter its own bucket: ZeRO-1 cuts every one of them in two
        monkeypatch.setattr(builders, "wrap_ddp", functools.partial(builders.wrap_ddp, bucket_size=bucket_size))
    ddp, opt, scheduler = build_hyperball(optimizer, lr=LR, steps=STEPS, hyperball_split_qkv=True,
                                          hyperball_radius=radius, muon_split_qkv=optimizer == "muonh")
    assert all(fed_steps(ddp, opt, scheduler, range(STEPS)))
    return ddp, opt, full_params(ddp)


def check(params, optimizer, radius, groups, what):
    ref = reference(params, optimizer, radius, groups)
    assert_rel_close(params, ref, 1e-6 if optimizer == "adamh" else 1e-5, what)
    qkvs = [n for n in params if n.endswith("linear_qkv.weight")]
    assert len(qkvs) == helpers.SHAPE["num_layers"]
    for name in qkvs:  # each part at its own radius; the fused norm is not held
        p0 = parts(initial(name, params[name].shape).double(), groups)
        for part, w0, w in zip("qkv", p0, parts(params[name].double(), groups)):
            r = w0.norm().item() if radius == "init" else max(w.shape) ** 0.5
            assert abs(w.norm().item() / r - 1) < 1e-6, (name, part, w.norm().item(), r)


def _qkv_cut_by_zero1(ddp, opt) -> bool:
    """Some rank's ZeRO-1 slice of some linear_qkv is neither empty nor whole (the cut is inside it)."""
    from megatron.core.optimizer import DistributedOptimizer

    from megatron_hyperball.mcore.tree import leaves

    cut = False
    for leaf in leaves(opt):
        if isinstance(leaf, DistributedOptimizer):
            for name, p in ddp.named_parameters():
                if name.endswith("linear_qkv.weight") and p in leaf.model_param_gbuf_map:
                    r = leaf._get_model_param_range_map(p)["param"]
                    cut |= 0 < r.size < p.numel()
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, cut)
    return any(flags)


@pytest.mark.parametrize("dp,tp,radius,groups,bucket_size", [
    pytest.param(1, 1, "init", 2, None, id="dp1", marks=pytest.mark.world_size(1)),
    pytest.param(2, 1, "init", 2, None, id="dp2", marks=pytest.mark.world_size(2)),
    # 96 x 64 QKV cut in two halves (no bucket padding): inside Q (row 48 of 64); K, V wholly on rank 1
    pytest.param(2, 1, "init", 1, 1, id="dp2-cut-inside-q", marks=pytest.mark.world_size(2)),
    # 128 x 64 QKV cut between the two query groups: every part's sums come from both ranks
    pytest.param(2, 1, "sqrt_max_dim", 2, 1, id="dp2-cut-sqrt_max_dim", marks=pytest.mark.world_size(2)),
    pytest.param(1, 2, "init", 2, None, id="tp2", marks=pytest.mark.world_size(2)),
])
def test_adamh_zero1_split_qkv(parallel, monkeypatch, dp, tp, radius, groups, bucket_size):
    parallel(tp=tp)
    ddp, opt, params = run("adamh", monkeypatch, radius, groups, bucket_size)
    if bucket_size is not None:  # the ZeRO-1 shard boundary really cuts inside a QKV
        assert _qkv_cut_by_zero1(ddp, opt)
    check(params, "adamh", radius, groups, f"AdamH split_qkv dp{dp} tp{tp} {radius} groups {groups}")


@pytest.mark.parametrize("dp,tp", [
    layout(1), layout(2),
    layout(1, tp=2),  # each TP rank holds one query group; Megatron's NS gathers each part over TP
])
def test_muonh_layer_wise_split_qkv(parallel, monkeypatch, dp, tp):
    parallel(tp=tp)
    _, _, params = run("muonh", monkeypatch)
    check(params, "muonh", "init", 2, f"MuonH split_qkv dp{dp} tp{tp}")


@pytest.mark.world_size(1)
def test_refusals(parallel, monkeypatch):
    """MuonH without Megatron's Newton-Schulz split, MuonH in shape mode and MD optimizers refuse it."""
    parallel()
    monkeypatch.setitem(helpers.SHAPE, "num_query_groups", 2)
    cases = [("muonh", dict(muon_split_qkv=False), "muon_split_qkv False"),
             ("muonh", dict(muon_split_qkv=True, hyperball_update_norm="shape"), "update norm 'shape'"),
             ("adammd", {}, "gains are per fused matrix")]
    for optimizer, changes, text in cases:
        with pytest.raises(ValueError, match="hyperball_split_qkv=True") as info:
            build_hyperball(optimizer, hyperball_split_qkv=True, **changes)
        assert text in str(info.value) and "allowed: adamh, or muonh" in str(info.value)
