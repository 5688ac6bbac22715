"""Depth-muP: alpha from the YAML value, the scaled bias-dropout-add, the layer spec.

The comparison on real GPTModels runs under torchrun (gloo, one CPU process):
tests/distributed/test_depth_mup.py.
"""

import math
import warnings

import pytest
import torch

from megatron_hyperball.models.depth_mup import (
    apply_depth_mup,
    get_gpt_layer_spec_with_depth_mup,
    have_transformer_engine,
    resolve_block_output_scale,
    scaled_bias_dropout_add,
)


@pytest.mark.parametrize("value,layers,alpha", [
    ("1/sqrt(2L)", 8, 0.25), ("1/sqrt(2L)", 3, 1 / math.sqrt(6)), (" 1 / SQRT(2l) ", 2, 0.5),
    ("1/L", 4, 0.25), ("1/L", 3, 1 / 3), (0.3, None, 0.3), ("0.125", 0, 0.125), (2, 5, 2.0),
    ("none", 4, None), (None, 4, None), ("off", None, None), (False, 3, None),
])
def test_resolve_block_output_scale(value, layers, alpha):
    assert resolve_block_output_scale(value, layers) == alpha


@pytest.mark.parametrize("value,layers", [
    ("1/L", 0), ("1/sqrt(2L)", None), ("1/L", -2), ("1/sqrt(L)", 4), ("abc", 2), (-1, 2), (0, 2),
    (float("inf"), 2), (True, 2), ([1], 2),
])
def test_resolve_block_output_scale_rejects(value, layers):
    with pytest.raises(ValueError, match="block_output_scale"):
        resolve_block_output_scale(value, layers)


def test_scaled_bias_dropout_add_numbers():
    g = torch.Generator().manual_seed(0)
    x, b, r = (torch.randn(5, 2, 8, generator=g) for _ in range(3))
    b = b[0, 0]
    for training in (False, True):
        fn = scaled_bias_dropout_add(0.25)(training, False)
        assert torch.equal(fn((x, b), r, 0.0), r + 0.25 * (x + b))
        assert torch.equal(fn((x, None), r, 0.0), r + 0.25 * x)
    # x in bf16, fp32 residual: scaled in the residual's precision
    xb = x.bfloat16()
    out = scaled_bias_dropout_add(0.3)(False, False)((xb, None), r, 0.0)
    assert out.dtype == torch.float32 and torch.equal(out, r + 0.3 * xb.float())
    # dropout acts on the scaled output: zeroed elements leave the residual as is
    torch.manual_seed(3)
    out = scaled_bias_dropout_add(0.5)(True, False)((x, None), r, 0.5)
    dropped = (out == r)
    assert 0 < dropped.float().mean().item() < 1
    assert torch.allclose(out[~dropped], (r + 0.5 * x / 0.5)[~dropped], rtol=0, atol=1e-6)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            scaled_bias_dropout_add(bad)


def test_spec_replaces_only_the_bdas():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    plain = get_gpt_layer_local_spec(num_experts=4)
    spec = get_gpt_layer_spec_with_depth_mup(0.5, use_te=False, num_experts=4)
    assert spec.submodules.self_attn_bda.alpha == 0.5 and spec.submodules.mlp_bda.alpha == 0.5
    for field in ("input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp"):
        assert repr(getattr(spec.submodules, field)) == repr(getattr(plain.submodules, field))
    assert get_gpt_layer_spec_with_depth_mup(None, use_te=False).submodules.mlp_bda is get_bias_dropout_add
    # applying to a spec leaves the input alone; blocks and lists are handled layer by layer
    scaled = apply_depth_mup(plain, 0.2)
    assert plain.submodules.mlp_bda is get_bias_dropout_add and scaled.submodules.mlp_bda.alpha == 0.2
    block = apply_depth_mup(TransformerBlockSubmodules(layer_specs=[plain, plain], layer_norm=None), 0.1)
    assert [s.submodules.self_attn_bda.alpha for s in block.layer_specs] == [0.1, 0.1]
    assert [s.submodules.mlp_bda.alpha for s in apply_depth_mup([plain], 0.7)] == [0.7]
    with pytest.raises(TypeError):
        apply_depth_mup(object(), 0.5)


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine is installed")
def test_te_request_falls_back_to_local():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = get_gpt_layer_spec_with_depth_mup(0.5, use_te=True, normalization="RMSNorm")
    assert any("Transformer Engine is not importable" in str(w.message) for w in caught)
    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert spec.submodules.self_attention == local.submodules.self_attention
    assert spec.submodules.input_layernorm == local.submodules.input_layernorm
    auto = get_gpt_layer_spec_with_depth_mup(0.5, normalization="RMSNorm")  # use_te None: local here
    assert auto.submodules.self_attention == local.submodules.self_attention
