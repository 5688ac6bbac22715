"""SqrtGate on Megatron's real MoELayer (CPU, gloo, allgather dispatcher, TP = 1).

The layer is built from Megatron's local GPT layer spec passed through ``apply_sqrt_gate`` (so
``SqrtGateMoELayer`` + ``SqrtGateRouter`` + Megatron's ``SequentialMLP`` experts and
``SharedExpertMLP``), in float32. Every number is checked against an independent float64
computation from the layer's weights and the input:

- gates: top-k of x W_r^T, softmax over those k logits, sqrt; the squared gates sum to 1;
- output: sum_k sqrt(g_k) expert_k(x), and sqrt(1-p) (that) + sqrt(p) shared(x) with a shared
  expert (expert_k = fc2(gelu(fc1 x)));
- router-weight gradient of <out, R> against float64 autograd of the same formula; with
  Megatron's micro-batch aux loss on, the gradient also carries E*c/(k T^2) sum_i count_i sum_t
  softmax_ti (the aux loss acts through the sqrt).

World size 2 runs the same forward with expert parallelism 2 (each rank holds 2 of 4 experts).

Run: torchrun --nproc-per-node 1 -m pytest tests/distributed/test_sqrt_gate.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

WORLD_SIZES = (1, 2)

HIDDEN, FFN, SHARED_FFN, EXPERTS = 32, 24, 40, 4
SEQ, BATCH = 8, 3
FWD_TOL = 1e-5   # fp32 layer vs float64 reference (measured ~1e-7)
GRAD_RTOL = 1e-4  # relative to the largest gradient entry


def make_config(topk, shared=False, aux=None, **extra):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False, init_method_std=0.2,
        num_moe_experts=EXPERTS, moe_router_topk=topk, moe_token_dispatcher_type="allgather",
        moe_ffn_hidden_size=FFN, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=torch.distributed.get_world_size(),
    )
    if shared:
        kwargs.update(moe_shared_expert_intermediate_size=SHARED_FFN)
    if aux is not None:
        kwargs.update(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=aux)
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def build(config, p=0.5, seed=1234):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_hyperball.mcore.builders import seed_all
    from megatron_hyperball.models import SqrtGateMoELayer, SqrtGateRouter, apply_sqrt_gate

    spec = apply_sqrt_gate(get_gpt_layer_local_spec(num_experts=EXPERTS), p=p)
    seed_all(seed)
    layer = spec.submodules.mlp(config=config, layer_number=1)
    layer.set_layer_number(1)
    assert isinstance(layer, SqrtGateMoELayer) and isinstance(layer.router, SqrtGateRouter)
    return layer


def gathered_expert_weights(layer):
    """{global expert index: (fc1 weight, fc2 weight)} for all experts, gathered over EP ranks."""
    local = {}
    for i, e in enumerate(layer.local_expert_indices):
        mlp = layer.experts.local_experts[i]
        local[e] = (mlp.linear_fc1.weight.detach().double(), mlp.linear_fc2.weight.detach().double())
    world = torch.distributed.get_world_size()
    if world == 1:
        return local
    boxes = [None] * world
    torch.distributed.all_gather_object(boxes, local)
    out = {}
    for box in boxes:
        out.update(box)
    return out


def mlp64(x, fc1, fc2):
    return F.gelu(x @ fc1.T) @ fc2.T


def reference(layer, x, w_router, p):
    """float64: (gates [T, E] dense, top-k index [T, k], output [s, b, h])."""
    k = layer.config.moe_router_topk
    X = x.reshape(-1, HIDDEN).double()
    logits = X @ w_router.T
    top = logits.topk(k, dim=-1).indices
    g = torch.softmax(logits.gather(1, top), dim=-1)
    gates = torch.zeros_like(logits).scatter(1, top, g.sqrt())
    experts = gathered_expert_weights(layer)
    routed = sum(gates[:, e:e + 1] * mlp64(X, *experts[e]) for e in range(EXPERTS))
    out = routed
    if layer.shared_experts is not None:
        sh = layer.shared_experts
        shared = mlp64(X, sh.linear_fc1.weight.detach().double(), sh.linear_fc2.weight.detach().double())
        out = math.sqrt(1 - p) * routed + math.sqrt(p) * shared
    return gates, top, out.reshape(x.shape), logits


def aux_reference(logits, top, coeff, k):
    T = logits.shape[0]
    scores = torch.softmax(logits, dim=-1)
    counts = torch.zeros(EXPERTS, dtype=torch.float64).scatter_add(
        0, top.reshape(-1), torch.ones(top.numel(), dtype=torch.float64))
    return coeff * EXPERTS / (k * T * T) * (scores.sum(0) * counts).sum()


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    r = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    return x, r


CASES = {
    "top2": dict(topk=2),
    "top4": dict(topk=4),
    "top2_shared": dict(topk=2, shared=True, p=0.5),
    "top4_shared_p0.3": dict(topk=4, shared=True, p=0.3),
    "top2_group_limited": dict(topk=2, extra=dict(moe_router_num_groups=2, moe_router_group_topk=1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gates_output_and_router_grad(parallel, name):
    case = CASES[name]
    parallel(ep=torch.distributed.get_world_size())
    p = case.get("p", 0.5)
    layer = build(make_config(case["topk"], case.get("shared", False), **case.get("extra", {})), p=p)
    layer.train()
    x, r = inputs(7)
    x = x.requires_grad_(True)

    # the router alone: squared gates sum to 1 and equal the float64 softmax over the top-k logits
    with torch.no_grad():
        probs, routing_map = layer.router(x)
    w64 = layer.router.weight.detach().double().requires_grad_(True)
    gates, top, ref_out, logits64 = reference(layer, x.detach(), w64, p)
    assert probs.shape == (SEQ * BATCH, EXPERTS)
    sq_sum_err = (probs.double().pow(2).sum(-1) - 1).abs().max().item()
    assert sq_sum_err < 1e-6, sq_sum_err
    assert int(routing_map.sum(-1).min()) == int(routing_map.sum(-1).max()) == case["topk"]
    if "moe_router_num_groups" not in case.get("extra", {}):
        ref_map = torch.zeros_like(routing_map).scatter(1, top, True)
        assert torch.equal(routing_map, ref_map)
        gate_err = (probs.double() - gates.detach()).abs().max().item()
    else:  # group-limited: Megatron picks the experts; the gates are sqrt(softmax) over those logits
        sel = routing_map.nonzero()[:, 1].view(-1, case["topk"])
        g = torch.softmax(logits64.detach().gather(1, sel), -1).sqrt()
        gate_err = (probs.double() - torch.zeros_like(gates).scatter(1, sel, g)).abs().max().item()
    assert gate_err < 1e-6, gate_err

    # the layer: forward against the float64 formula, backward to the router weight
    out, bias = layer(x)
    assert bias is None
    if "moe_router_num_groups" in case.get("extra", {}):
        # the routed selection differs from a plain top-k: the gate check above is the test
        print(f"\n[sqrt_gate {name}] sq_sum_err={sq_sum_err:.2e} gate_err={gate_err:.2e}")
        return
    fwd_err = (out.double() - ref_out.detach()).abs().max().item()
    assert fwd_err < FWD_TOL, (name, fwd_err, ref_out.abs().max().item())
    (out * r).sum().backward()
    grad = layer.router.weight.grad
    (ref_out * r.double()).sum().backward()
    ref_grad = w64.grad
    assert grad is not None and grad.abs().max() > 0
    grad_err = (grad.double() - ref_grad).abs().max().item() / ref_grad.abs().max().item()
    assert grad_err < GRAD_RTOL, (name, grad_err)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    print(f"\n[sqrt_gate {name} world={torch.distributed.get_world_size()}] sq_sum_err={sq_sum_err:.2e} "
          f"gate_err={gate_err:.2e} fwd_err={fwd_err:.2e} (max |y| {ref_out.abs().max().item():.2f}) "
          f"router_grad_rel_err={grad_err:.2e}")


@pytest.mark.world_size(1)
def test_aux_loss_reaches_router_through_sqrt(parallel):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    parallel()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    coeff, k = 50.0, 2  # large, so that the aux term is a sizeable part of the router gradient
    layer = build(make_config(k, shared=True, aux=coeff))
    layer.train()
    x, r = inputs(11)
    out, _ = layer(x)
    w64 = layer.router.weight.detach().double().requires_grad_(True)
    _, top, ref_out, logits64 = reference(layer, x, w64, 0.5)
    fwd_err = (out.double() - ref_out.detach()).abs().max().item()
    assert fwd_err < FWD_TOL
    (out * r).sum().backward()
    ((ref_out * r.double()).sum() + aux_reference(logits64, top, coeff, k)).backward()
    grad_err = ((layer.router.weight.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).item()
    assert grad_err < GRAD_RTOL, grad_err
    # and the aux term is not negligible in this test
    w_main = layer.router.weight.detach().double().requires_grad_(True)
    _, _, ref_main, _ = reference(layer, x, w_main, 0.5)
    (ref_main * r.double()).sum().backward()
    aux_share = ((w_main.grad - w64.grad).abs().max() / w64.grad.abs().max()).item()
    assert aux_share > 0.05, aux_share
    print(f"\n[sqrt_gate aux_loss] fwd_err={fwd_err:.2e} router_grad_rel_err={grad_err:.2e} aux_share={aux_share:.2f}")


@pytest.mark.world_size(1)
def test_capacity_dropping_keeps_megatron_semantics(parallel):
    """Dropped (token, expert) pairs lose their gate; the kept ones are sqrt of the pre-drop softmax."""
    parallel()
    layer = build(make_config(2, moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs"))
    x, _ = inputs(3)
    with torch.no_grad():
        probs, routing_map = layer.router(x)
        _, top, _, _ = reference(layer, x, layer.router.weight.detach().double(), 0.5)
        X = x.reshape(-1, HIDDEN).double()
        logits = X @ layer.router.weight.double().T
        full = torch.zeros_like(logits).scatter(1, top, torch.softmax(logits.gather(1, top), -1).sqrt())
    assert routing_map.sum() < 2 * SEQ * BATCH  # some pairs were dropped
    assert (probs.double().pow(2).sum(-1) <= 1 + 1e-6).all()
    kept = routing_map
    assert (probs[~kept] == 0).all()
    assert (probs.double()[kept] - full[kept]).abs().max() < 1e-6
    out, _ = layer(x)
    assert torch.isfinite(out).all()


@pytest.mark.world_size(1)
def test_no_shared_expert_and_p_edges(parallel):
    """Without a shared expert p does nothing; p=0 keeps the routed output alone, p=1 the shared."""
    parallel()
    x, _ = inputs(5)
    outs = {}
    for p in (0.0, 0.5, 1.0):
        layer = build(make_config(2, shared=True), p=p)
        with torch.no_grad():
            outs[p] = layer(x)[0]
            _, _, ref, _ = reference(layer, x, layer.router.weight.detach().double(), p)
        assert (outs[p].double() - ref).abs().max() < FWD_TOL
    a = build(make_config(2), p=0.1)
    b = build(make_config(2), p=0.9)
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])
