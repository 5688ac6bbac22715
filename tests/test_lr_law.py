"""HyperP's lr transfer law against hand-written arithmetic."""

import math

import pytest

from megatron_hyperball.config import load_config
from megatron_hyperball.config.lr_law import lr_from_run, transfer_lr
from megatron_hyperball.pretrain.megatron_args import to_megatron_args


def test_brief_example():
    # eta0 = 1e-2, B = 2^20 (half of B0), depth 32 (4 x d0), T = 20.8e9 (2 x T0)
    r = transfer_lr(1e-2, 2**20, 32, 20.8e9)
    expected = 1e-2 * math.sqrt(0.5) * math.sqrt(0.25) * 2 ** -0.32
    assert r.lr == pytest.approx(expected, rel=1e-15)
    assert r.lr == pytest.approx(0.0028322097, rel=1e-8)  # 1e-2 * 0.70710678 * 0.5 * 0.80106988
    assert r.batch_factor == pytest.approx(0.7071067811865476, rel=1e-15)
    assert r.depth_factor == 0.5
    assert r.tokens_factor == pytest.approx(0.80106988, rel=1e-8)  # exp(-0.32 ln 2)
    assert (r.eta0, r.batch_tokens, r.depth, r.total_tokens) == (1e-2, 2**20, 32, 20.8e9)
    assert (r.B0, r.d0, r.T0, r.exponent) == (2**21, 8, 10.4e9, 0.32)


def test_base_scale_is_eta0():
    r = transfer_lr(0.0123, 2**21, 8, 10.4e9)
    assert (r.batch_factor, r.depth_factor, r.tokens_factor) == (1.0, 1.0, 1.0)
    assert r.lr == 0.0123


def test_configurable_constants():
    # exponent 0.25 (MD) and T = 16 T0: (16)^-0.25 = 0.5; B = 4 B0: 2; depth 2 with d0 8: 2
    r = transfer_lr(0.01, 4 * 1000, 2, 16 * 5e8, B0=1000, d0=8, T0=5e8, exponent=0.25)
    assert (r.batch_factor, r.depth_factor) == (2.0, 2.0)
    assert r.tokens_factor == pytest.approx(0.5, rel=1e-15)
    assert r.lr == pytest.approx(0.01 * 2 * 2 * 0.5, rel=1e-15)


def test_lr_from_run():
    # B = 256 * 2048 = 2^19 (B0/4: factor 1/2), depth 32 (factor 1/2), T = 10000 * 2^19
    r = lr_from_run(0.02, global_batch_size=256, seq_length=2048, num_layers=32, train_iters=10000)
    T = 10000 * 2**19
    assert r.batch_tokens == 2**19 and r.total_tokens == T
    assert r.lr == pytest.approx(0.02 * 0.5 * 0.5 * (T / 10.4e9) ** -0.32, rel=1e-15)


def test_summary_line():
    r = transfer_lr(1e-2, 2**20, 32, 20.8e9)
    s = r.summary()
    assert "\n" not in s
    assert s.startswith(f"lr law: lr = {r.lr:.6g} = eta0 0.01")
    for part in (f"sqrt(B/B0) {r.batch_factor:.6g}", "sqrt(d0/depth) 0.5", f"(T/T0)^-0.32 {r.tokens_factor:.6g}",
                 "depth=32", "d0=8"):
        assert part in s
    assert r.as_dict()["lr"] == r.lr


@pytest.mark.parametrize("kwargs", [dict(eta0=0), dict(eta0=-1), dict(depth=0), dict(batch_tokens=float("nan")),
                                    dict(total_tokens=-5)])
def test_rejects_nonpositive(kwargs):
    args = dict(eta0=0.01, batch_tokens=2**20, depth=8, total_tokens=1e9) | kwargs
    with pytest.raises(ValueError, match="lr law"):
        transfer_lr(**args)


def test_config_lr_law_block():
    raw = {
        "model": {"num_layers": 32, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 2048},
        "optimizer": {"name": "muonh", "lr_law": {"eta0": 0.01}},
        "schedule": {"train_iters": 10000, "global_batch_size": 512},
    }
    cfg = load_config(raw=raw)
    B = 512 * 2048  # 2^20
    expected = 0.01 * math.sqrt(B / 2**21) * math.sqrt(8 / 32) * (10000 * B / 10.4e9) ** -0.32
    assert cfg.resolved_lr() == pytest.approx(expected, rel=1e-15)
    assert cfg.resolved_min_lr() == pytest.approx(0.1 * expected, rel=1e-15)
    argv = to_megatron_args(cfg, transformer_impl="local")
    assert float(argv[argv.index("--lr") + 1]) == cfg.resolved_lr()  # exact round trip through the flag
    assert cfg.lr_summary().startswith(cfg.lr_law_result().summary())
    # every constant comes from YAML
    raw["optimizer"]["lr_law"] = {"eta0": 0.01, "B0": B, "d0": 32, "T0": 10000 * B, "exponent": 0.25}
    assert load_config(raw=raw).resolved_lr() == 0.01
    raw["optimizer"]["lr_law"]["T0"] = 10000 * B / 16
    assert load_config(raw=raw).resolved_lr() == pytest.approx(0.01 * 0.5, rel=1e-15)
