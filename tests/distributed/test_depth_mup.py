"""Depth-muP block scaling on real Megatron GPTModels (CPU, gloo, world size 1).

For each case a plain model (Megatron's local layer spec) and a Depth-muP model
(``get_gpt_layer_spec_with_depth_mup``) are built with the same weights (state dict copied), in
float64 so that the comparisons measure the code and not fp32 rounding:

- same input: for every layer, the same input h through both layers' attention sub-block
  (``_forward_attention``), then the same input x through both MLP sub-blocks (``_forward_mlp``):
  increment_scaled == alpha * increment_plain;
- in a full forward of each model, forward hooks capture each layer's input, the hidden state after
  the attention residual add, the layer's output and the raw sub-block outputs (self_attention / mlp
  return (out, bias)): increment == alpha * (out + bias), alpha = 1 for the plain model; also in
  training mode with autograd;
- alpha None builds exactly the plain model, and the scaling does change the output.

Run: torchrun --nproc-per-node 1 -m pytest tests/distributed/test_depth_mup.py
"""

import math

import pytest
import torch

WORLD_SIZES = (1,)
pytestmark = pytest.mark.world_size(1)

VOCAB, SEQ, BATCH = 96, 12, 2
DTYPE = torch.float64
TOL = 1e-6  # float64 models: measured ~4e-16

CASES = {
    # dense, with biases (the bias is part of the scaled sub-block output), HyperP's alpha
    "dense_bias_sqrt2L": dict(scale="1/sqrt(2L)", num_layers=3, bias=True, moe=False),
    # MD's alpha, no biases
    "dense_1_over_L": dict(scale="1/L", num_layers=3, bias=False, moe=False),
    # MoE sub-block (mlp_bda also scales the MoE layer's output)
    "moe_number": dict(scale=0.3, num_layers=2, bias=False, moe=True),
}
EXPECTED_ALPHA = {"dense_bias_sqrt2L": 1 / math.sqrt(2 * 3), "dense_1_over_L": 1 / 3, "moe_number": 0.3}


def build(case, spec):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_hyperball.mcore.builders import seed_all

    kwargs = dict(
        num_layers=case["num_layers"], hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=case["bias"], init_method_std=0.2,
    )
    if case["moe"]:
        kwargs.update(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="allgather",
                      moe_ffn_hidden_size=48)
    seed_all(1234)
    model = GPTModel(config=TransformerConfig(**kwargs), transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="learned_absolute")
    return model.to(DTYPE).eval()  # float64: the comparisons measure the code, not fp32 rounding


def layer_increments(layer, h):
    """(attention increment, mid, MLP increment of the input x=mid) for input h."""
    mid, _ = layer._forward_attention(h, attention_mask=None)
    out = layer._forward_mlp(mid)
    return mid - h, mid, out - mid


def same_input(plain, scaled, alpha, gen):
    rows = []
    for i, (lp, ls) in enumerate(zip(plain.decoder.layers, scaled.decoder.layers)):
        h = torch.randn(SEQ, BATCH, plain.config.hidden_size, dtype=DTYPE, generator=gen)
        with torch.no_grad():
            att_p, mid_p, _ = layer_increments(lp, h)
            att_s, _, _ = layer_increments(ls, h)
            # the MLP sub-block, fed the same input on both sides
            mlp_p = lp._forward_mlp(mid_p) - mid_p
            mlp_s = ls._forward_mlp(mid_p) - mid_p
        rows.append({
            "layer": i,
            "attn_err": (att_s - alpha * att_p).abs().max().item(),
            "attn_max": att_p.abs().max().item(),
            "mlp_err": (mlp_s - alpha * mlp_p).abs().max().item(),
            "mlp_max": mlp_p.abs().max().item(),
        })
    return rows


def _sub_out(output):
    # a copy: in eval mode without grad, Megatron's bias-dropout-add works in place on `out`
    out, bias = output
    return (out + bias) if bias is not None else out.clone()


def in_model(model, alpha, tokens, pos, train=False):
    model.train(train)
    caps = {}
    handles = []
    for i, layer in enumerate(model.decoder.layers):
        def pre(mod, args, kwargs, i=i):
            caps[(i, "in")] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()

        def mid(mod, args, i=i):
            caps[(i, "mid")] = args[0].clone()

        def post(mod, args, kwargs, output, i=i):
            caps[(i, "out")] = (output[0] if isinstance(output, tuple) else output).clone()

        handles += [
            layer.register_forward_pre_hook(pre, with_kwargs=True),
            layer.pre_mlp_layernorm.register_forward_pre_hook(mid),
            layer.register_forward_hook(post, with_kwargs=True),
            layer.self_attention.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__((i, "attn"), _sub_out(o))),
            layer.mlp.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__((i, "mlp"), _sub_out(o))),
        ]
    with torch.set_grad_enabled(train):
        logits = model(tokens, pos, None).detach()
    for h in handles:
        h.remove()
    model.eval()
    rows = []
    for i in range(len(model.decoder.layers)):
        attn_inc = caps[(i, "mid")] - caps[(i, "in")]
        mlp_inc = caps[(i, "out")] - caps[(i, "mid")]
        rows.append({
            "layer": i,
            "attn_err": (attn_inc - alpha * caps[(i, "attn")]).abs().max().item(),
            "mlp_err": (mlp_inc - alpha * caps[(i, "mlp")]).abs().max().item(),
            "attn_max": caps[(i, "attn")].abs().max().item(),
            "mlp_max": caps[(i, "mlp")].abs().max().item(),
        })
    return rows, logits


def run_case(case):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_hyperball.models.depth_mup import get_gpt_layer_spec_with_depth_mup, resolve_block_output_scale

    alpha = resolve_block_output_scale(case["scale"], case["num_layers"])
    spec_kwargs = dict(num_experts=4 if case["moe"] else None)
    plain = build(case, get_gpt_layer_local_spec(**spec_kwargs))
    scaled = build(case, get_gpt_layer_spec_with_depth_mup(alpha, use_te=False, **spec_kwargs))
    off = build(case, get_gpt_layer_spec_with_depth_mup(None, use_te=False, **spec_kwargs))
    if case["bias"]:  # Megatron initialises biases to 0; make them count
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for n, p in plain.named_parameters():
                if n.endswith(".bias"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    state = plain.state_dict()
    scaled.load_state_dict(state)
    off.load_state_dict(state)
    same_weights = all(torch.equal(a, b) for a, b in zip(plain.parameters(), scaled.parameters()))

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    plain_rows, plain_logits = in_model(plain, 1.0, tokens, pos)
    scaled_rows, scaled_logits = in_model(scaled, alpha, tokens, pos)
    # training mode with autograd (Megatron's out-of-place bias-dropout-add path; dropout is 0)
    train_rows, _ = in_model(scaled, alpha, tokens, pos, train=True)
    with torch.no_grad():
        off_logits = off(tokens, pos, None)
    bda = scaled.decoder.layers[0].self_attn_bda
    return {
        "alpha": alpha,
        "bda_alpha": getattr(bda, "alpha", None),
        "same_weights": same_weights,
        "same_input": same_input(plain, scaled, alpha, gen),
        "in_model_plain": plain_rows,
        "in_model_scaled": scaled_rows,
        "in_model_scaled_train": train_rows,
        "bias_max": max((p.abs().max().item() for n, p in scaled.named_parameters() if n.endswith(".bias")),
                        default=0.0),
        "off": (off_logits - plain_logits).abs().max().item(),
        "scaled_vs_plain": (scaled_logits - plain_logits).abs().max().item(),
        "is_moe": type(scaled.decoder.layers[0].mlp).__name__,
    }


@pytest.fixture(scope="module")
def results(distributed):

    from megatron_hyperball.mcore.builders import destroy_parallel, init_parallel

    init_parallel(tp=1)
    out = {name: run_case(case) for name, case in CASES.items()}
    destroy_parallel()
    return out


@pytest.mark.parametrize("case", list(EXPECTED_ALPHA))
def test_residual_increments_scaled_by_alpha(results, case):
    r = results[case]
    assert r["alpha"] == pytest.approx(EXPECTED_ALPHA[case], rel=1e-15)
    assert r["bda_alpha"] == r["alpha"] and r["same_weights"]
    # same input through both models' sub-blocks: increment_scaled == alpha * increment_plain
    for row in r["same_input"]:
        assert row["attn_err"] < TOL and row["mlp_err"] < TOL, row
        assert row["attn_max"] > 0.1 and row["mlp_max"] > 0.1, row  # nontrivial increments
    # inside full forwards: increment == alpha * sub-block output (alpha = 1 in the plain model)
    for key in ("in_model_plain", "in_model_scaled", "in_model_scaled_train"):
        for row in r[key]:
            assert row["attn_err"] < TOL and row["mlp_err"] < TOL, (key, row)
    assert r["off"] == 0.0                  # alpha None builds exactly the plain model
    assert r["scaled_vs_plain"] > 0.1       # and the scaling does change the output


def test_cases_cover_bias_and_moe(results):
    assert results["dense_bias_sqrt2L"]["bias_max"] > 0.1   # nonzero biases go through the scale
    assert results["moe_number"]["is_moe"] == "MoELayer"
    assert results["dense_1_over_L"]["is_moe"] == "MLP"
    assert len(results["dense_1_over_L"]["same_input"]) == 3
