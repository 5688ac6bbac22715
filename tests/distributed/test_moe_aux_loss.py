"""HyperP's aux loss through Megatron's ``global_aux_loss`` on a real MoELayer (CPU, gloo, DP = 2).

HyperP's load-balancing loss is the switch loss of the full softmax over the *global* batch:

    L = E / k * sum_i f_i P_i,   f_i = c_i / T,   P_i = (1/T) sum_t softmax(z_t)_i

with c_i the number of (token, top-k slot) pairs routed to expert i and T the number of tokens,
both over every data-parallel rank. Each rank feeds its own tokens; the test gathers every rank's
router logits and computes L in float64. Checked: the value Megatron reports (its per-rank
partials summed over the data-parallel group, as its MoE logging does) equals L; the router
gradient after the data-parallel average (as DDP does) is coeff * dL/dW / dp with Megatron's
coefficient, and coeff * dL/dW with the coefficient the entry gives it (``models.aux_loss``).

Run: torchrun --nproc-per-node 2 -m pytest tests/distributed/test_moe_aux_loss.py
"""

import pytest
import torch
import torch.distributed as dist

WORLD_SIZES = (2,)

HIDDEN, EXPERTS, TOPK, SEQ, BATCH = 16, 4, 2, 6, 2


def make_layer(coeff):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_hyperball.mcore.builders import seed_all

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=32, hidden_dropout=0.0,
        attention_dropout=0.0, add_bias_linear=False, init_method_std=0.5, num_moe_experts=EXPERTS,
        moe_router_topk=TOPK, moe_token_dispatcher_type="allgather", moe_ffn_hidden_size=8,
        moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=coeff)
    seed_all(1234)  # the same router weight on every data-parallel rank
    layer = get_gpt_layer_local_spec(num_experts=EXPERTS).submodules.mlp(config=config, layer_number=1)
    layer.set_layer_number(1)
    layer.train()
    return layer


def global_switch_loss(logits_all: torch.Tensor) -> torch.Tensor:
    """float64 HyperP / Switch loss over every token of every rank (differentiable in the logits)."""
    scores = torch.softmax(logits_all, dim=-1)
    T = logits_all.shape[0]
    top = scores.detach().topk(TOPK, dim=-1).indices
    counts = torch.zeros(EXPERTS, dtype=torch.float64).scatter_add(
        0, top.reshape(-1), torch.ones(top.numel(), dtype=torch.float64))
    f = counts / (TOPK * T)
    P = scores.sum(0) / T
    return EXPERTS * (f * P).sum()


def _aux_only(layer, x):
    """(the aux loss Megatron reports, summed over the group as its logging does; the router gradient
    of the aux loss alone, averaged over data-parallel ranks as DDP does)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    probs, _ = layer.router(x)
    (probs * 0).sum().backward()  # only the aux loss's gradient reaches the router weight
    grad = layer.router.weight.grad.detach().clone()
    dist.all_reduce(grad)
    grad /= dist.get_world_size()
    value = tracker.metrics["global_load_balancing_loss"].values[0].detach().clone().double()
    dist.all_reduce(value)
    return value.item(), grad.double()


@pytest.mark.parametrize("corrected", [False, True], ids=["megatron_coeff", "corrected_coeff"])
def test_global_aux_loss_value_and_gradient(parallel, corrected):
    from megatron_hyperball.models.aux_loss import megatron_aux_loss_coeff

    parallel()  # DP = 2
    world, coeff = dist.get_world_size(), 0.1
    given = megatron_aux_loss_coeff(coeff, "global_aux_loss", world) if corrected else coeff
    assert given == (coeff * world if corrected else coeff)
    layer = make_layer(given)
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own tokens
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    value, grad = _aux_only(layer, x)

    w = layer.router.weight.detach().double().requires_grad_(True)
    xs = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(xs, x)
    X = torch.cat([t.reshape(-1, HIDDEN) for t in xs]).double()
    L = global_switch_loss(X @ w.T)
    (coeff * L).backward()
    value_err = abs(value - L.item()) / L.item()
    ratio = ((grad * w.grad).sum() / w.grad.pow(2).sum()).item()  # grad = ratio * coeff dL/dW (+ err)
    grad_err = ((grad - w.grad).norm() / w.grad.norm()).item()
    print(f"\n[aux corrected={corrected}] L={L.item():.6f} megatron={value:.6f} value_err={value_err:.2e} "
          f"grad/(coeff dL/dW)={ratio:.6f} grad_err={grad_err:.2e}")
    assert value_err < 1e-6  # the reported value is HyperP's global loss either way
    if corrected:
        assert grad_err < 1e-5
    else:  # megatron-core 0.19: the step follows coeff * dL/dW / dp (what the correction undoes)
        assert abs(ratio - 1 / world) < 1e-6
