"""SqrtGate: refused configurations, the layer-spec swap, the routing math (single process, no
process group).

The checks on Megatron's real MoELayer (allgather dispatcher, CPU layer, float64 references for
gates, output and router gradient, aux loss, EP = 2) run under torchrun:
tests/distributed/test_sqrt_gate.py.
"""

import dataclasses
import functools
import types

import pytest
import torch

from megatron_hyperball.models import (
    SqrtGateMoELayer,
    SqrtGateRouter,
    apply_sqrt_gate,
    check_sqrt_gate_router_config,
    sqrt_gates,
)

E = 4


def config(**kw):
    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                num_moe_experts=E, moe_router_topk=2, moe_ffn_hidden_size=24,
                moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0, init_method_std=0.2)
    base.update(kw)
    return TransformerConfig(**base)


STUB_PG = types.SimpleNamespace(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)


# -- refused combinations: ValueError naming the Megatron field and the allowed value --------------
@pytest.mark.parametrize("kw,field,allowed", [
    (dict(moe_router_score_function="sigmoid"), "moe_router_score_function", "'softmax'"),
    (dict(moe_router_score_function="sqrtsoftplus"), "moe_router_score_function", "'softmax'"),
    (dict(moe_router_pre_softmax=True), "moe_router_pre_softmax", "False"),
    (dict(moe_router_pre_softmax=True, moe_router_topk_scaling_factor=2.5),
     "moe_router_topk_scaling_factor", "None or 1.0"),
    (dict(moe_router_load_balancing_type="sinkhorn"), "moe_router_load_balancing_type", "'aux_loss'"),
])
def test_router_refuses_gates_not_summing_to_one(kw, field, allowed):
    cfg = config(**kw)
    with pytest.raises(ValueError, match=field) as err:
        SqrtGateRouter(cfg, pg_collection=STUB_PG)
    assert allowed in str(err.value)


@pytest.mark.parametrize("kw,field", [
    (dict(moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True), "moe_shared_expert_gate"),
    (dict(moe_shared_expert_intermediate_size=48, moe_shared_expert_overlap=True,
          moe_token_dispatcher_type="alltoall"), "moe_shared_expert_overlap"),
])
def test_layer_refuses_learned_gate_and_overlap(kw, field):
    cfg = config(**kw)
    with pytest.raises(ValueError, match=field) as err:
        SqrtGateMoELayer(cfg, submodules=None)
    assert "False" in str(err.value)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_shared_fraction(p):
    with pytest.raises(ValueError, match="shared_expert_fraction"):
        SqrtGateMoELayer(config(), submodules=None, shared_expert_fraction=p)
    with pytest.raises(ValueError, match="shared_expert_fraction"):
        apply_sqrt_gate([], p)


@pytest.mark.parametrize("kw", [
    {}, dict(moe_router_topk_scaling_factor=1.0), dict(moe_router_num_groups=2, moe_router_group_topk=1),
    dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1),
    dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=[0.1, 0.1]),
])
def test_allowed_configs(kw):
    check_sqrt_gate_router_config(config(**kw))


# -- the gates -------------------------------------------------------------------------------------
def test_sqrt_gates_zero_entries_have_zero_gradient():
    probs = torch.tensor([[0.7, 0.0, 0.3, 0.0]], requires_grad=True)
    out = sqrt_gates(probs)
    out.sum().backward()
    assert torch.allclose(out, torch.tensor([[0.7 ** 0.5, 0.0, 0.3 ** 0.5, 0.0]]))
    assert torch.isfinite(probs.grad).all() and probs.grad[0, 1] == 0 and probs.grad[0, 3] == 0


@pytest.mark.parametrize("topk", [2, 3, 4])
def test_routing_is_sqrt_of_topk_softmax(topk):
    router = SqrtGateRouter(config(moe_router_topk=topk), pg_collection=STUB_PG)
    g = torch.Generator().manual_seed(topk)
    logits = (3 * torch.randn(6, 5, E, generator=g)).requires_grad_(True)  # [s, b, E]
    probs, routing_map = router.routing(logits)
    l64 = logits.detach().double().reshape(-1, E)
    top = l64.topk(topk, -1).indices
    ref = torch.zeros_like(l64).scatter(1, top, torch.softmax(l64.gather(1, top), -1).sqrt())
    assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, top, True))
    assert (probs.double() - ref).abs().max() < 1e-6
    assert (probs.double().pow(2).sum(-1) - 1).abs().max() < 1e-6
    probs.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() > 0


# -- the layer spec --------------------------------------------------------------------------------
def _moe_entry(layer_spec):
    return layer_spec.submodules.mlp


def test_spec_swaps_only_router_and_layer_class():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    plain = get_gpt_layer_local_spec(num_experts=E)
    spec = apply_sqrt_gate(plain, p=0.3)
    old, new = _moe_entry(plain), _moe_entry(spec)
    assert old.func is MoELayer and old.keywords["submodules"].router is TopKRouter  # input untouched
    assert new.func is SqrtGateMoELayer and new.keywords["shared_expert_fraction"] == 0.3
    assert new.keywords["submodules"].router is SqrtGateRouter
    assert new.keywords["submodules"].experts is old.keywords["submodules"].experts
    assert new.keywords["submodules"].shared_experts is old.keywords["submodules"].shared_experts
    for f in dataclasses.fields(spec.submodules):
        if f.name != "mlp":
            assert getattr(spec.submodules, f.name) is getattr(plain.submodules, f.name), f.name
    # idempotent up to p; dense specs unchanged (same object)
    again = apply_sqrt_gate(spec, p=0.5)
    assert _moe_entry(again).func is SqrtGateMoELayer and _moe_entry(again).keywords["shared_expert_fraction"] == 0.5
    dense = get_gpt_layer_local_spec()
    assert apply_sqrt_gate(dense) is dense


def test_spec_block_with_dense_and_moe_layers_and_lists():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    cfg = config(num_layers=4, moe_layer_freq=[1, 0, 1, 0])
    layers = get_gpt_decoder_layer_specs(cfg, use_transformer_engine=False)
    block = TransformerBlockSubmodules(layer_specs=layers, layer_norm=None)
    out = apply_sqrt_gate(block)
    kinds = [getattr(_moe_entry(s), "func", None) for s in out.layer_specs]
    assert kinds[0] is SqrtGateMoELayer and kinds[2] is SqrtGateMoELayer
    assert out.layer_specs[1] is layers[1] and out.layer_specs[3] is layers[3]  # dense layers kept
    assert _moe_entry(layers[0]).func is MoELayer
    as_list = apply_sqrt_gate(list(layers))
    assert isinstance(as_list, list) and _moe_entry(as_list[2]).func is SqrtGateMoELayer


def test_spec_transformer_engine_style_and_modulespec_entries():
    """A TE spec's MoE entry is the same partial with TE experts: only the two classes change."""
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.router import InferenceTopKRouter, TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    te_experts, te_shared = object(), object()  # stand-ins for TEGroupedMLP / shared-expert builders
    entry = functools.partial(MoELayer, submodules=MoESubmodules(experts=te_experts, shared_experts=te_shared))
    layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(mlp=entry))
    new = apply_sqrt_gate(layer, 0.5).submodules.mlp
    assert new.func is SqrtGateMoELayer
    assert new.keywords["submodules"] == MoESubmodules(experts=te_experts, shared_experts=te_shared,
                                                       router=SqrtGateRouter)
    # ModuleSpec-style MoE entry
    ms = ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=te_experts), params={"x": 1})
    out = apply_sqrt_gate(ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(mlp=ms)))
    out_mlp = out.submodules.mlp
    assert out_mlp.module is SqrtGateMoELayer and out_mlp.submodules.router is SqrtGateRouter
    assert out_mlp.params == {"x": 1, "shared_expert_fraction": 0.5}
    # an inference router or an unknown MoELayer subclass is refused, not silently replaced
    inf = functools.partial(MoELayer, submodules=MoESubmodules(experts=te_experts, router=InferenceTopKRouter))
    with pytest.raises(TypeError, match="InferenceTopKRouter"):
        apply_sqrt_gate(ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(mlp=inf)))

    class OtherMoE(MoELayer):
        pass

    other = functools.partial(OtherMoE, submodules=MoESubmodules(experts=te_experts, router=TopKRouter))
    with pytest.raises(TypeError, match="OtherMoE"):
        apply_sqrt_gate(ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(mlp=other)))


def test_real_transformer_engine_spec():
    from megatron_hyperball.models.depth_mup import have_transformer_engine

    if not have_transformer_engine():
        pytest.skip("Transformer Engine is not installed")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    plain = get_gpt_layer_with_transformer_engine_spec(num_experts=E, moe_grouped_gemm=True)
    new = apply_sqrt_gate(plain).submodules.mlp
    assert new.func is SqrtGateMoELayer and new.keywords["submodules"].router is SqrtGateRouter
    assert new.keywords["submodules"].experts is plain.submodules.mlp.keywords["submodules"].experts
