"""MoE under the sphere optimizers: one sphere per expert matrix under expert parallelism, and the
router / shared-expert-gate modes, against the float64 single-process reference.

A 2-layer GPT whose MLPs are MoE layers (4 experts, top-2, allgather dispatcher, a shared expert
with Megatron's learned ``(1, h)`` gate), synthetic weights and gradients drawn by *global* name
(expert ``e`` of every layout gets the same numbers wherever it lives), only the optimizer runs:

- EP = 2 on 2 ranks (expert-DP 1, dense DP 2) and EP = 2 with expert-DP = 2 on 4 ranks;
- AdamH on Megatron's ZeRO-1 DistributedOptimizer (expert matrices sharded over the expert-DP
  group, their norms summed over it), MuonH on the layer-wise optimizer;
- router_sphere 'frobenius' (the router one sphere matrix, HyperP) and 'none' (Adam, off the
  layer-wise matrix set under MuonH); the shared-expert gate always takes Adam.

Every parameter must equal the reference (AdamH / MuonH per sphere matrix, AdamW with Megatron's
weight-decay rule for the rest) to fp32 rounding; sphere matrices keep their initial norm. Without
the ``layer_wise_untagged_matrices`` patch the MuonH 'none' case fails (router and gate 0.9 off:
Megatron's Adam never steps a matrix left in a layer-wise buffer).

Run: torchrun --nproc-per-node N -m pytest tests/distributed/test_moe_experts.py  (N in WORLD_SIZES)
"""

import re

import pytest
import torch
import torch.distributed as dist

from tests.distributed.helpers import SHAPE, all_max, assert_rel_close, global_names, grad, initial
from tests.reference import AdamHReference, MuonHReference, adamw_reference_step

WORLD_SIZES = (2, 4)
STEPS, LR, WD = 4, 0.02, 0.1
EXPERTS = 4
MOE = dict(num_moe_experts=EXPERTS, moe_router_topk=2, moe_token_dispatcher_type="allgather",
           moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True,
           moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, add_bias_linear=False)
MATRICES = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def is_sphere(name: str, router_sphere: str) -> bool:
    if name.endswith("router.weight"):
        return router_sphere == "frobenius"
    return name.endswith(MATRICES)


def is_router(name: str) -> bool:
    return name.endswith("router.weight")


class MuonHRowsReference:
    """MuonH with each row of the matrix its own unit sphere, float64: Newton-Schulz of the whole
    Nesterov momentum, then per row w_i <- N(w_i - lr N(u_i)) (row radius 1)."""

    def __init__(self, w0, lr, orth, momentum=0.95):
        self.w = w0 / w0.norm(dim=1, keepdim=True)
        self.lr, self.orth, self.mu = lr, orth, momentum
        self.buf = torch.zeros_like(self.w)

    def step(self, g):
        g = g.double()
        self.buf = self.mu * self.buf + (1 - self.mu) * g
        u = self.orth((1 - self.mu) * g + self.mu * self.buf).double()
        w = self.w - self.lr * u / u.norm(dim=1, keepdim=True)
        self.w = w / w.norm(dim=1, keepdim=True)


def moe_names(model):
    """{global name: param}: helpers.global_names, with local expert i renamed to its global index."""
    from megatron.core import parallel_state

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    per_rank = EXPERTS // parallel_state.get_expert_model_parallel_world_size()

    def rename(m):
        return f"local_experts.{ep_rank * per_rank + int(m.group(1))}."

    return {re.sub(r"local_experts\.(\d+)\.", rename, n): p for n, p in global_names(model).items()}


def build(optimizer, router_sphere, hidden=SHAPE["hidden_size"], bucket_size=None):
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_hyperball.mcore.builders import build_gpt, seed_all, wrap_ddp
    from megatron_hyperball.mcore.options import HyperballOptimizerConfig
    from megatron_hyperball.mcore.roles import tag_moe_spheres, tag_position_embeddings

    seed_all(1234)
    model = build_gpt(**{**SHAPE, "hidden_size": hidden}, **MOE)
    with torch.no_grad():
        for name, p in moe_names(model).items():
            p.copy_(initial(name, p.shape))
    tag_position_embeddings(model)
    tag_moe_spheres(model, router_sphere)
    layer_wise = optimizer == "muonh"
    ddp = wrap_ddp(model, use_distributed_optimizer=True, layer_wise=layer_wise, bucket_size=bucket_size)
    config = HyperballOptimizerConfig(
        optimizer=optimizer, lr=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        clip_grad=0.0, bf16=False, params_dtype=torch.float32, use_distributed_optimizer=True,
        use_layer_wise_distributed_optimizer=layer_wise, muon_nesterov=True, muon_fp32_matmul_prec="highest",
        muon_tp_mode="duplicated", muon_split_qkv=False, hyperball_radius="init", hyperball_update_norm="exact")
    opt = get_megatron_optimizer(config, [ddp])
    scheduler = OptimizerParamScheduler(
        opt, init_lr=LR, max_lr=LR, min_lr=LR, lr_warmup_steps=0, lr_decay_steps=STEPS, lr_decay_style="constant",
        start_wd=WD, end_wd=WD, wd_incr_steps=STEPS, wd_incr_style="constant")
    return ddp, opt, scheduler


def run(optimizer, router_sphere, steps=STEPS, **kwargs):
    ddp, opt, scheduler = build(optimizer, router_sphere, **kwargs)
    names = moe_names(ddp)
    for step in range(steps):
        scheduler.step(increment=1)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        for name, p in names.items():
            p.main_grad.copy_(grad(name, p.shape, step))
        ok, _, _ = opt.step()
        assert ok
    local = {n: p.detach().float().clone() for n, p in names.items()}
    boxes = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, local)
    full = {}
    for box in boxes:
        for n, t in box.items():
            assert n not in full or torch.equal(full[n], t), n  # replicas agree bitwise
            full[n] = t
    return ddp, opt, full


def reference(shapes, optimizer, router_sphere, steps=STEPS):
    from megatron_hyperball.optim.newton_schulz import orthogonalize

    def orth(x):
        return orthogonalize(x.float(), fp32_matmul_prec="highest")

    out = {}
    for name, shape in shapes.items():
        w0 = initial(name, shape).double()
        if is_router(name) and router_sphere == "row":  # each row its own unit sphere
            if optimizer == "adamh":  # Adam is elementwise: AdamH on each (1, h) row, radius 1
                rows = [AdamHReference(w0[i:i + 1], LR, radius=1.0) for i in range(shape[0])]
                for t in range(steps):
                    g = grad(name, shape, t)
                    for i, ref in enumerate(rows):
                        ref.step(g[i:i + 1])
                out[name] = torch.cat([ref.w for ref in rows])
            else:
                ref = MuonHRowsReference(w0, LR, orth)
                for t in range(steps):
                    ref.step(grad(name, shape, t))
                out[name] = ref.w
        elif is_sphere(name, router_sphere):
            ref = AdamHReference(w0, LR) if optimizer == "adamh" else MuonHReference(w0, LR, orth)
            for t in range(steps):
                ref.step(grad(name, shape, t))
            out[name] = ref.w
        else:
            state = {"m": torch.zeros(shape, dtype=torch.float64), "v": torch.zeros(shape, dtype=torch.float64), "t": 0}
            w, decay = w0, (0.0 if len(shape) == 1 else WD)
            for t in range(steps):
                w = adamw_reference_step(state, w, grad(name, shape, t).double(), LR, (0.9, 0.95), 1e-8, decay)
            out[name] = w
    return out


@pytest.mark.parametrize("router_sphere", ["frobenius", "none", "row"])
@pytest.mark.parametrize("optimizer", ["adamh", "muonh"])
def test_expert_spheres_match_float64_reference(parallel, optimizer, router_sphere):
    from megatron.core import parallel_state

    from megatron_hyperball.mcore.roles import is_sphere_param, named_params
    from megatron_hyperball.mcore.tree import describe, sphere_counts

    world = dist.get_world_size()
    parallel(ep=2)
    expert_dp = parallel_state.get_expert_data_parallel_world_size()
    assert (parallel_state.get_data_parallel_world_size(), expert_dp) == (world, world // 2)
    steps = 20 if router_sphere == "row" else STEPS  # row: every row at radius 1 over 20 steps
    ddp, opt, full = run(optimizer, router_sphere, steps)
    experts = [n for n in full if ".experts.local_experts." in n]
    assert len(experts) == SHAPE["num_layers"] * EXPERTS * 2  # every expert's fc1 and fc2 came back
    # the tags decide: gate never, router only in frobenius mode
    for name, p in moe_names(ddp).items():
        if name.endswith(("shared_experts.gate_weight", "router.weight")):
            assert is_sphere_param(name, p) == (is_sphere(name, router_sphere) or router_sphere == "row"
                                                and is_router(name)), name
    # sphere keys (checkpointed hook state) name experts by global index: no two EP ranks share one
    mine = sorted(n for n in named_params([ddp]).values() if ".local_experts." in n)
    boxes = [None] * world
    dist.all_gather_object(boxes, mine)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_ranks = [None] * world
    dist.all_gather_object(ep_ranks, ep_rank)
    for r in range(world):
        if ep_ranks[r] != ep_rank:
            assert not set(boxes[r]) & set(mine), (r, mine)
    assert len({n for box in boxes for n in box}) == SHAPE["num_layers"] * EXPERTS * 2
    lines = describe(opt)
    if optimizer == "adamh" and expert_dp > 1:  # ZeRO-1 really cuts expert matrices over expert-DP
        total, local = sphere_counts(opt)
        assert -all_max(-local) < total, (total, local)
    assert any(("AdamH" if optimizer == "adamh" else "TensorParallelMuonH") in line for line in lines), lines

    ref = reference({n: tuple(t.shape) for n, t in full.items()}, optimizer, router_sphere, steps)
    tol = 1e-6 if optimizer == "adamh" else 1e-5  # MuonH: fp32 Newton-Schulz, 5 iterations
    assert_rel_close(full, ref, tol, f"{optimizer} ep2 expert-dp{expert_dp} router {router_sphere}")
    for name, t in full.items():
        if t.dim() != 2:
            continue
        if is_router(name) and router_sphere == "row":
            row_err = (t.double().norm(dim=1) - 1).abs().max().item()
            assert row_err < 1e-6, (name, row_err)  # every expert's routing vector on its unit sphere
            continue
        r0 = initial(name, t.shape).double().norm().item()
        drift = abs(t.double().norm().item() / r0 - 1)
        if is_sphere(name, router_sphere):
            assert drift < 1e-6, (name, drift)  # one sphere per matrix, each expert its own
        elif name.endswith(("router.weight", "gate_weight")):
            assert drift > 1e-4, (name, drift)  # Adam moves the norm: really off the sphere
    if dist.get_rank() == 0:
        worst = max(((full[n].double() - ref[n]).norm() / ref[n].norm()).item() for n in experts)
        print(f"\n[moe {optimizer} world={world} ep=2 expert_dp={expert_dp} router={router_sphere}] "
              f"worst expert rel err {worst:.2e}")


@pytest.mark.world_size(2)
def test_row_router_cut_mid_row_by_zero1(parallel):
    """AdamH on ZeRO-1 with every parameter its own bucket and h = 80: the 4 x 80 router (padded to
    384 elements, 192 per rank) is cut inside row 2, so that row's sums come from two ranks. Every
    row stays at radius 1 and equals the float64 per-row reference over 20 steps."""
    from megatron.core.optimizer import DistributedOptimizer

    from megatron_hyperball.mcore.tree import leaves

    parallel()  # DP = 2, EP = 1
    steps = 20
    ddp, opt, full = run("adamh", "row", steps, hidden=80, bucket_size=1)
    cuts = []
    for leaf in leaves(opt):
        if isinstance(leaf, DistributedOptimizer):
            for name, p in moe_names(ddp).items():
                if is_router(name) and p in leaf.model_param_gbuf_map:
                    r = leaf._get_model_param_range_map(p)["param"]
                    cuts += [r.start % p.shape[1], r.end % p.shape[1]]
    boxes = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, cuts)
    assert any(c for box in boxes for c in box), boxes  # some rank's slice starts or ends inside a row
    ref = reference({n: tuple(t.shape) for n, t in full.items()}, "adamh", "row", steps)
    assert_rel_close(full, ref, 1e-6, "adamh row router cut by ZeRO-1")
    for name, t in full.items():
        if is_router(name):
            assert (t.double().norm(dim=1) - 1).abs().max().item() < 1e-6, name
