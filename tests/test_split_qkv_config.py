"""optimizer.split_qkv: the YAML key, its flag, the optimizer config field, and the refusals."""

import argparse

import pytest

from megatron_hyperball.mcore.args import add_plugin_args, optimizer_config_from_args
from megatron_hyperball.mcore.options import hyperball_options
from megatron_hyperball.pretrain.megatron_args import to_megatron_args
from tests.test_config import cfg_of, error_of, flags


def test_key_flag_and_config_field():
    assert cfg_of().optimizer.split_qkv is False
    assert "--hyperball-split-qkv" not in flags(to_megatron_args(cfg_of()))
    for name in ("adamh", "muonh"):
        f = flags(to_megatron_args(cfg_of(f"optimizer.name={name}", "optimizer.split_qkv=true")))
        assert f["--hyperball-split-qkv"] is True
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", choices=["adam", "muon"], default="adam")
    add_plugin_args(parser)
    args = parser.parse_args(["--optimizer", "adamh", "--hyperball-split-qkv"])
    for key, value in dict(lr=1e-3, min_lr=1e-4, weight_decay=0.0, muon_split_qkv=True).items():
        setattr(args, key, value)
    config, _ = optimizer_config_from_args(args)
    assert config.hyperball_split_qkv is True and hyperball_options(config).split_qkv is True
    assert parser.parse_args([]).hyperball_split_qkv is False


@pytest.mark.parametrize("overrides,text", [
    (["optimizer.name=adamw"], "true with optimizer 'adamw'; allowed: false, or true with adamh, or with muonh"),
    (["optimizer.name=muon"], "true with optimizer 'muon'; allowed: false"),
    (["optimizer.name=adammd"], "true with optimizer 'adammd'; allowed: false"),
    (["optimizer.name=muonmd"], "true with optimizer 'muonmd'; allowed: false"),
    (["optimizer.name=muonh", "optimizer.update_norm=shape"], "with update_norm 'shape'"),
], ids=["adamw", "muon", "adammd", "muonmd", "muonh-shape"])
def test_refused_naming_key_and_allowed_values(overrides, text):
    err = error_of(*overrides, "optimizer.split_qkv=true")
    messages = [m for p, m in err.problems if p == "optimizer.split_qkv"]
    assert any(text in m for m in messages), err.problems
    assert "  optimizer.split_qkv: " in str(err)


def test_adamh_shape_is_accepted():
    # AdamH's shape factor is 1 for every matrix, so each part's factor is the fused one's
    assert cfg_of("optimizer.update_norm=shape", "optimizer.split_qkv=true").optimizer.split_qkv is True
