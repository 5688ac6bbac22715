"""The YAML schema: validation errors, overrides, launch checks, Megatron arguments, resolved config."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from megatron_hyperball.config import (
    ConfigError,
    apply_overrides,
    config_from_argv,
    launch_problems,
    load_config,
    parse_override,
    resolved_config_yaml,
    save_resolved_config,
)
from megatron_hyperball.pretrain.megatron_args import to_megatron_args, wandb_environment
from tests.conftest import WORKERS

BASE = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32},
    "optimizer": {"name": "adamh", "lr": 0.02},
    "schedule": {"train_iters": 10, "global_batch_size": 8, "micro_batch_size": 2},
}


def cfg_of(*overrides, base=BASE):
    return load_config(raw=base, overrides=list(overrides))


def error_of(*overrides, base=BASE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        cfg_of(*overrides, base=base)
    return info.value


def flags(argv):
    """--flag value pairs (flags without a value map to True)."""
    out, i = {}, 0
    while i < len(argv):
        key = argv[i]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            vals = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                vals.append(argv[i])
                i += 1
            out[key] = vals[0] if len(vals) == 1 else vals
        else:
            out[key] = True
            i += 1
    return out


# -- valid configs ------------------------------------------------------------------------------------
def test_minimal_config_defaults():
    cfg = cfg_of()
    assert cfg.optimizer.name == "adamh"
    assert cfg.resolved_lr() == 0.02
    assert cfg.resolved_min_lr() == pytest.approx(0.002, rel=0, abs=1e-18)  # linear decay to 0.1 lr
    assert cfg.schedule.warmup_iters == 0                                    # HyperP: no warmup
    assert cfg.hyperp.block_output_scale == "1/sqrt(2L)"
    assert cfg.block_output_alpha() == 1 / math.sqrt(4)                      # 1/sqrt(2 * 2)
    assert cfg.model.resolved_ffn_hidden_size() == 128                       # int(4*64*2/3/64)*64
    assert cfg.parallelism.data_parallel_size(4) == 4
    assert cfg.data.data_path == "embedded"


@pytest.mark.parametrize("given,canonical", [
    ("adam", "adamw"), ("AdamW", "adamw"), ("adam_hyperball", "adamh"), ("MuonH", "muonh"),
    ("muon_hyperball", "muonh"), ("muon", "muon"),
])
def test_optimizer_aliases(given, canonical):
    assert cfg_of(f"optimizer.name={given}").optimizer.name == canonical


def test_block_output_scale_values():
    assert cfg_of("hyperp.block_output_scale=1/L", "model.num_layers=4").block_output_alpha() == 0.25
    assert cfg_of("hyperp.block_output_scale=0.3").block_output_alpha() == 0.3
    assert cfg_of("hyperp.block_output_scale=none").block_output_alpha() is None
    assert cfg_of("hyperp.block_output_scale=null").block_output_alpha() is None


# -- errors: key path and allowed values --------------------------------------------------------------
ERRORS = [
    # (overrides, key path, text the message must contain)
    (["foo=1"], "foo", "allowed keys of the top level: seed, precision, model"),
    (["optimizer.foo=1"], "optimizer.foo", "allowed keys of optimizer: name, lr, lr_law"),
    (["model.moe={num_experts: 4, bogus: 1}"], "model.moe.bogus", "allowed keys of model.moe: num_experts"),
    (["model.num_layers=abc"], "model.num_layers", "valid integer"),
    (["optimizer.lr=fast"], "optimizer.lr", "valid number"),
    (["model.hidden_size=66"], "model.hidden_size", "not divisible by model.num_attention_heads=4"),
    (["parallelism.tp=3"], "parallelism.tp", "does not divide model.num_attention_heads=4"),
    (["optimizer.sphere_weight_decay=0.1"], "optimizer.sphere_weight_decay", "allowed: 0"),
    (["optimizer.name=muonh", "optimizer.sphere_weight_decay=0.01"], "optimizer.sphere_weight_decay",
     "no-op on the sphere"),
    (["optimizer.radius=big"], "optimizer.radius", "allowed: init, sqrt_max_dim, <positive number>"),
    (["optimizer.radius=-1"], "optimizer.radius", "positive"),
    (["optimizer.update_norm=unit"], "optimizer.update_norm", "allowed: exact, shape"),
    (["optimizer.name=adamx"], "optimizer.name", "allowed: adamw, muon, adamh, muonh, adammd, muonmd, adam (= adamw)"),
    (["optimizer.name=adamw", "optimizer.radius=init"], "optimizer.radius", "allowed only with adamh, muonh"),
    (["optimizer.name=adamw", "optimizer.momentum=0.9"], "optimizer.momentum", "allowed only with muon, muonh"),
    (["optimizer.lr_law={eta0: 0.01}"], "optimizer.lr", "exactly one of optimizer.lr and optimizer.lr_law"),
    (["optimizer.lr=null"], "optimizer.lr", "(neither is set)"),
    (["hyperp.block_output_scale=1/sqrt(L)"], "hyperp.block_output_scale",
     "allowed: 1/sqrt(2L), 1/L, <positive number>, none"),
    (["hyperp.block_output_scale=-0.5"], "hyperp.block_output_scale", "positive"),
    (["model.num_layers=0"], "model.num_layers", "greater than or equal to 1"),
    (["model.num_layers=0"], "hyperp.block_output_scale", "needs model.num_layers >= 1"),
    (["model.normalization=rms"], "model.normalization", "allowed: 'RMSNorm', 'LayerNorm'"),
    (["model.position_embedding=alibi"], "model.position_embedding", "allowed: 'rope', 'learned_absolute', 'none'"),
    (["parallelism.ep=2"], "parallelism.ep", "without model.moe"),
    (["model.moe={num_experts: 2, topk: 3}"], "model.moe.topk", "> model.moe.num_experts=2"),
    (["model.moe={num_experts: 4, router_sphere: l2}"], "model.moe.router_sphere",
     "allowed: 'frobenius', 'row', 'none'"),
    (["optimizer.name=adamw", "model.moe={num_experts: 4, router_sphere: frobenius}"],
     "model.moe.router_sphere", "allowed with it: 'row', 'none'"),
    (["model.tokenizer=gpt2bpe"], "model.tokenizer.type", "allowed: 'byte'"),
    (["model.tokenizer.type=wordpiece"], "model.tokenizer.type", "'byte', 'null_tokenizer', 'gpt2bpe'"),
    (["data.split=949,50,1"], "data.split", "embedded"),
    (["checkpoint.save_interval=5"], "checkpoint.save_interval", "without checkpoint.save"),
    (["logging.wandb.mode=online"], "logging.wandb.project", "required"),
    (["schedule.global_batch_size=7"], "schedule.global_batch_size", "schedule.micro_batch_size=2"),
    (["optimizer.output_layer_on_sphere=true", "optimizer.name=muonh"], "optimizer.output_layer_on_sphere",
     "allowed only with adamh"),
    (["precision=fp8"], "precision", "'fp8' is not one of the allowed values; allowed: 'bf16', 'fp16', 'fp32'"),
    # strict types: no bool for a number, no float for a count, no number for a string; finite floats
    (["schedule.train_iters=10.0"], "schedule.train_iters", "valid integer (got 10.0); allowed: an integer >= 1"),
    (["schedule.train_iters=true"], "schedule.train_iters", "valid integer (got True)"),
    (["model.swiglu=1"], "model.swiglu", "valid boolean (got 1); allowed: true or false"),
    (["optimizer.weight_decay=true"], "optimizer.weight_decay", "valid number (got True); allowed: a finite number"),
    (["optimizer.lr=.inf"], "optimizer.lr", "finite number (got inf); allowed: a finite number > 0 or null"),
    (["optimizer.eps=.nan"], "optimizer.eps", "finite number (got nan)"),
    (["optimizer.lr_law={eta0: 0.01, exponent: .inf}", "optimizer.lr=null"], "optimizer.lr_law.exponent",
     "finite number"),
    (["checkpoint.save=123"], "checkpoint.save", "valid string (got 123); allowed: a string"),
    (["model.num_layers='4'"], "model.num_layers", "valid integer (got '4')"),
    (["optimizer.betas=[0.9, true]"], "optimizer.betas.1", "valid number (got True)"),
    (["seed=0"], "seed", "greater than or equal to 1"),
    (["seed=4294967295", "parallelism.pp=2", "model.num_layers=2"], "seed", "exceeds numpy's seed range"),
    # combinations Megatron refuses late
    (["model.hidden_size=72", "model.num_attention_heads=8"], "model.hidden_size",
     "head dimension 9, which is odd: RoPE"),
    (["schedule.decay_style=WSD"], "schedule.wsd_decay_iters", "required with schedule.decay_style 'WSD'"),
    (["schedule.decay_style=WSD", "schedule.wsd_decay_iters=11"], "schedule.wsd_decay_iters", "> the decay length"),
    (["schedule.wsd_decay_iters=2"], "schedule.wsd_decay_iters", "allowed only with 'WSD'"),
    (["data.data_path=[0.3, /a, /b, 0.7]"], "data.data_path", "mixes weights and prefixes"),
    (["data.data_path=[-1, /a]"], "data.data_path", "allowed: positive finite numbers"),
    (["data.data_path=[true]"], "data.data_path", "is not a prefix or a list of prefixes"),
    # magnitude-direction gains (AdamMD / MuonMD)
    (["optimizer.name=adammd", "optimizer.gains=rows"], "optimizer.gains",
     "gains='rows' is not a gain mode; allowed: row_col, row, col, scalar, none"),
    (["optimizer.name=muonmd", "optimizer.gain_parametrization=exp"], "optimizer.gain_parametrization",
     "allowed: softplus, direct"),
    (["optimizer.name=adammd", "optimizer.gain_lr=0"], "optimizer.gain_lr", "allowed: a finite number > 0"),
    (["optimizer.name=adammd", "optimizer.gain_lr=-1e-3"], "optimizer.gain_lr", "greater than 0"),
    (["optimizer.name=muonmd", "optimizer.gain_lr=fast"], "optimizer.gain_lr", "valid number (got 'fast')"),
    (["optimizer.name=muonmd", "optimizer.gain_lr=true"], "optimizer.gain_lr", "valid number (got True)"),
    (["optimizer.gains=row_col"], "optimizer.gains", "set for optimizer 'adamh', which has no gains; "
                                                     "allowed only with adammd, muonmd"),
    (["optimizer.name=muonh", "optimizer.gain_lr=0.001"], "optimizer.gain_lr", "allowed only with adammd, muonmd"),
    (["optimizer.name=adamw", "optimizer.allow_missing_gains=true"], "optimizer.allow_missing_gains",
     "allowed only with adammd, muonmd"),
    (["optimizer.name=muonmd", "optimizer.output_layer_on_sphere=true"], "optimizer.output_layer_on_sphere",
     "no sphere, so no gains"),
    (["optimizer.name=adammd", "optimizer.output_layer_on_sphere=true"], "optimizer.output_layer_on_sphere",
     "allowed only with adamh (with adammd it has no sphere, so no gains"),
    (["optimizer.name=muonh", "optimizer.output_layer_on_sphere=true"], "optimizer.output_layer_on_sphere",
     "(with muonh the output layer takes Adam)"),
    (["optimizer.name=muonmd", "model.moe={num_experts: 4, router_sphere: row}"], "optimizer.gains",
     "'row_col' (row gains) with model.moe.router_sphere 'row'"),
    (["optimizer.name=adammd", "optimizer.gains=row", "model.moe={num_experts: 4, router_sphere: row}"],
     "optimizer.gains", "allowed: col, scalar, none"),
    (["optimizer.name=adammd", "checkpoint.format=torch"], "checkpoint.format",
     "'torch' cannot hold the gains of optimizer 'adammd'; allowed: torch_dist"),
]


@pytest.mark.parametrize("overrides,path,text", ERRORS, ids=[f"{e[1]}-{i}" for i, e in enumerate(ERRORS)])
def test_error_names_key_and_allowed_values(overrides, path, text):
    err = error_of(*overrides)
    messages = {}
    for p, m in err.problems:
        messages.setdefault(p, []).append(m)
    assert path in messages, f"{path} not among {list(messages)}"
    assert any(text in m for m in messages[path]), messages[path]
    assert f"  {path}: " in str(err)


def test_missing_required_keys():
    base = {k: v for k, v in BASE.items() if k != "schedule"}
    base["model"] = {k: v for k, v in BASE["model"].items() if k != "num_layers"}
    err = error_of(base=base)
    paths = [p for p, _ in err.problems]
    assert paths == ["model.num_layers", "schedule", "hyperp.block_output_scale"]
    assert dict(err.problems)["schedule"].startswith("required key is missing; allowed: a mapping with keys "
                                                     "train_iters, global_batch_size")
    assert dict(err.problems)["model.num_layers"] == "required key is missing; allowed: an integer >= 1 " \
        "(no decimal point, not a boolean)"


def test_several_problems_reported_together():
    err = error_of("model.hidden_size=66", "parallelism.tp=8", "optimizer.radius=init",
                   "optimizer.name=adamw", "checkpoint.save_interval=3")
    assert sorted(p for p, _ in err.problems) == [
        "checkpoint.save_interval", "model.hidden_size", "optimizer.radius", "parallelism.tp"]


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(dict(BASE, optimizer={"name": "adamh", "lr": 0.02, "radius": "x"})))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "optimizer.radius" in str(info.value)
    path.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


# -- overrides ---------------------------------------------------------------------------------------
def test_parse_override_yaml_semantics():
    assert parse_override("optimizer.lr=0.01") == ("optimizer.lr", 0.01)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=") == ("a.b", None)
    assert parse_override("a.b=[0.9, 0.99]") == ("a.b", [0.9, 0.99])
    assert parse_override("a.b={x: 1}") == ("a.b", {"x": 1})
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b=1e-2") == ("a.b", "1e-2")  # YAML 1.1 string; the schema makes it 0.01
    for bad in ("no_equals", ".a=1", "a..b=1", "a b=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_overrides_validated_like_the_file():
    cfg = cfg_of("optimizer.lr=1e-2", "optimizer.betas=[0.8, 0.9]", "model.moe.num_experts=4")
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.model.moe.num_experts == 4 and cfg.model.moe.topk == 2  # section created on the way
    assert cfg_of("optimizer.lr=0.1", "optimizer.lr=0.3").optimizer.lr == 0.3  # last one wins
    with pytest.raises(ConfigError, match="optimizer.lr"):
        cfg_of("optimizer.lr=-1")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(BASE, ["optimizer.lr.x=1"])
    assert BASE["optimizer"] == {"name": "adamh", "lr": 0.02}  # input left untouched


def test_config_from_argv(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg, rest = config_from_argv(["--config", str(path), "--set", "optimizer.lr=0.05", "model.num_layers=6",
                                  "schedule.train_iters=7", "--set", "optimizer.radius=sqrt_max_dim",
                                  "--log-timers-to-tensorboard"])
    assert (cfg.optimizer.lr, cfg.model.num_layers, cfg.schedule.train_iters) == (0.05, 6, 7)
    assert cfg.optimizer.radius == "sqrt_max_dim"
    assert rest == ["--log-timers-to-tensorboard"]
    with pytest.raises(ConfigError, match="optimizer.update_norm"):
        config_from_argv(["--config", str(path), "optimizer.update_norm=bogus"])


def test_yaml_exponent_strings_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-2 as a string; the float keys take it as the number (and only those)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE).replace("lr: 0.02", "lr: 1e-2\n  min_lr: 5e-4\n  betas: [9e-1, 0.99]"))
    assert yaml.safe_load(path.read_text())["optimizer"]["lr"] == "1e-2"
    cfg = load_config(path)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.betas) == (0.01, 5e-4, (0.9, 0.99))
    assert "schedule.train_iters" in str(error_of("schedule.train_iters=1e3"))  # not for a count


@pytest.mark.parametrize("content,message", [
    (b"model: {num_layers: 2}\x00\x01", "is not a text file (it contains NUL bytes)"),
    ("model: {num_layers: 2}  # caf\u00e9".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset"),
    (b"model:\n  num_layers: 2\n  num_layers: 4\n", "line 3, column 3: found key 'num_layers' twice (first on line 2)"),
    (b"- a\n- b\n", "the top level must be a mapping of sections, got list"),
    (b"model: [unclosed", "not valid YAML"),
])
def test_config_file_contents(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_config_path_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; allowed: a YAML config file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="cannot read config file: No such file"):
        load_config(tmp_path / "missing.yaml")


def test_command_line_problems(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="the following arguments are required: --config"):
        config_from_argv(["optimizer.lr=0.1"])
    with pytest.raises(ConfigError, match="argument 'optimizer.lr' has no value; allowed: optimizer.lr=VALUE"):
        config_from_argv(["--config", str(path), "optimizer.lr", "0.1"])
    with pytest.raises(ConfigError, match="--set: expected at least one argument"):
        config_from_argv(["--config", str(path), "--set"])
    with pytest.raises(ConfigError, match="found key 'x' twice"):
        config_from_argv(["--config", str(path), "model.moe={x: 1, x: 2}"])
    # the value of a Megatron flag may look like a key path
    assert config_from_argv(["--config", str(path), "--data-cache-path", "model.cache"])[1] == \
        ["--data-cache-path", "model.cache"]


# -- pre-flight: files, folders, packages, the checkpoint it resumes ----------------------------------
def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_path_problems(tmp_path, monkeypatch):
    from megatron_hyperball.config import path_problems

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("a.bin", "a.idx", "b.bin"):
        (tmp_path / "data" / name).write_bytes(b"")
    (tmp_path / "afile").write_text("x")
    own = ["model.tokenizer=null_tokenizer", "model.vocab_size=300"]
    before = _tree(tmp_path)
    problems = lambda *o: dict(path_problems(cfg_of(*o)))  # noqa: E731

    assert problems(*own, "data.data_path=data/a", "checkpoint.save=ck/x") == {}
    p = problems(*own, "data.data_path=[0.5, data/a, 0.5, data/b, 1, data/c]")
    assert "data/b (data/b.idx does not exist); data/c (data/c.bin and data/c.idx do not exist)" in p["data.data_path"]
    assert "data/a" not in p["data.data_path"].split(";")[0]
    p = problems("checkpoint.save=afile", "logging.tensorboard_dir=afile/tb", "data.embedded_dir=afile/d",
                 "checkpoint.load=nowhere")
    assert "afile exists and is not a directory" in p["checkpoint.save"]
    assert "afile/tb cannot be created" in p["logging.tensorboard_dir"] and "is not a directory" in \
        p["logging.tensorboard_dir"]
    assert "afile/d cannot be created" in p["data.embedded_dir"]
    assert "nowhere is not an existing directory" in p["checkpoint.load"]
    p = problems("checkpoint.save=ck", "logging.wandb.save_dir=afile")
    assert list(p) == ["logging.wandb.save_dir"]
    p = problems("checkpoint.save=~/ck", "checkpoint.load=data")
    assert "starts with '~', which is not expanded" in p["checkpoint.save"]
    assert "holds no Megatron checkpoint" in p["checkpoint.load"]
    p = problems("checkpoint.save=afile/ck")  # the W&B dir below it is not reported again
    assert list(p) == ["checkpoint.save"]
    p = problems("data.data_path=data/a", "model.tokenizer={type: gpt2bpe, vocab_file: v.json, merge_file: data/a.bin}")
    assert list(p) == ["model.tokenizer.vocab_file"] and "vocab_file v.json does not exist" in \
        p["model.tokenizer.vocab_file"]
    if importlib.util.find_spec("sentencepiece") is None:
        p = problems("data.data_path=data/a", "model.tokenizer={type: sentencepiece, model: data/a.bin}")
        assert "needs the Python package 'sentencepiece'" in p["model.tokenizer.type"]
    assert _tree(tmp_path) == before  # checked without creating anything
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        assert "cannot write" in problems("checkpoint.save=ro/ck")["checkpoint.save"]


def test_resume_problems(tmp_path):
    from megatron_hyperball.config import resume_problems

    cfg = cfg_of(f"checkpoint.save={tmp_path / 'ck'}")
    assert resume_problems(cfg) == []  # no checkpoint yet
    save_resolved_config(cfg, tmp_path / "ck")
    assert resume_problems(cfg) == []  # a config but no checkpoint tracker
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("30")
    assert resume_problems(cfg) == []
    assert resume_problems(cfg_of(f"checkpoint.save={tmp_path / 'ck'}", "schedule.train_iters=99",
                                  "optimizer.lr=0.5", "model.hidden_dropout=0.1")) == []  # not shapes
    changed = cfg_of(f"checkpoint.save={tmp_path / 'ck'}", "model.hidden_size=128", "model.swiglu=false")
    p = dict(resume_problems(changed))
    assert list(p) == ["model.hidden_size", "model.ffn_hidden_size", "model.swiglu"]
    assert p["model.hidden_size"] == (f"128, but the checkpoint this run resumes (checkpoint.save {tmp_path / 'ck'}, "
                                      f"iteration 30) has 64 (its hyperball_config.yaml); allowed: 64 to resume it, "
                                      f"or another checkpoint.save for a new run")
    assert resume_problems(changed, ["--load", "/elsewhere"]) == []  # Megatron loads from elsewhere
    moe = dict(resume_problems(cfg_of(f"checkpoint.save={tmp_path / 'ck'}", "model.moe={num_experts: 4}")))
    assert "model.moe.num_experts" in moe


# -- outputs -----------------------------------------------------------------------------------------
def test_to_megatron_args_values():
    cfg = cfg_of("model.moe={num_experts: 4, topk: 2, aux_loss_coeff: 0.1}", "parallelism.ep=2",
                 "checkpoint.save=/ck", "optimizer.weight_decay=0.1")
    f = flags(to_megatron_args(cfg, transformer_impl="local"))
    assert f["--num-layers"] == "2" and f["--hidden-size"] == "64" and f["--num-attention-heads"] == "4"
    assert f["--ffn-hidden-size"] == "128" and f["--seq-length"] == "32" and f["--max-position-embeddings"] == "32"
    assert f["--optimizer"] == "adamh"                      # a name add_plugin_args adds to --optimizer
    assert f["--hyperball-radius"] == "init" and f["--hyperball-update-norm"] == "exact"  # the defaults
    assert "--hyperball-output-layer" not in f and "--hyperball-embedding-lr" not in f
    assert f["--hyperball-metrics-interval"] == "10"        # default: logging.log_interval
    assert float(f["--lr"]) == 0.02 and float(f["--min-lr"]) == 0.1 * 0.02
    assert float(f["--weight-decay"]) == 0.1
    assert f["--num-experts"] == "4" and f["--moe-router-topk"] == "2" and f["--expert-model-parallel-size"] == "2"
    assert f["--tokenizer-type"] == "NullTokenizer" and f["--vocab-size"] == "257"
    assert f["--train-data-path"] == "data/pystdlib/pystdlib_train"
    assert f["--valid-data-path"] == "data/pystdlib/pystdlib_valid"
    assert f["--save"] == "/ck" and f["--save-interval"] == "10"  # default: save at the end
    assert f["--untie-embeddings-and-output-weights"] is True and f["--disable-bias-linear"] is True
    assert f["--override-opt_param-scheduler"] is True  # resuming follows the config's schedule
    assert f["--no-gradient-accumulation-fusion"] is True
    # W&B offline by default, with the TensorBoard dir Megatron needs to send scalars
    assert f["--wandb-project"] == "megatron-hyperball" and f["--wandb-exp-name"] == "adamh-L2-d64"
    assert f["--tensorboard-dir"] == "runs/adamh-L2-d64/tensorboard" and f["--wandb-save-dir"] == "/ck/wandb"
    assert wandb_environment(cfg) == {"WANDB_MODE": "offline"}
    assert wandb_environment(cfg_of("logging.wandb.project=p")) == {"WANDB_MODE": "online"}
    assert "--wandb-project" not in to_megatron_args(cfg_of("logging.wandb.mode=disabled"))


def test_hyperball_flags():
    f = flags(to_megatron_args(cfg_of("optimizer.radius=2.5", "optimizer.update_norm=shape",
                                      "optimizer.output_layer_on_sphere=true", "logging.metrics_interval=5")))
    assert (f["--optimizer"], f["--hyperball-radius"], f["--hyperball-update-norm"]) == ("adamh", "2.5", "shape")
    assert f["--hyperball-output-layer"] is True and f["--hyperball-metrics-interval"] == "5"
    f = flags(to_megatron_args(cfg_of("optimizer.name=muon_hyperball")))
    assert (f["--optimizer"], f["--hyperball-radius"], f["--hyperball-update-norm"]) == ("muonh", "init", "exact")
    assert "--hyperball-output-layer" not in f
    for name, megatron in (("adam", "adam"), ("muon", "muon")):
        f = flags(to_megatron_args(cfg_of(f"optimizer.name={name}", "optimizer.embedding_lr=0.004")))
        assert f["--optimizer"] == megatron
        assert not any(k.startswith(("--hyperball-radius", "--hyperball-update", "--hyperball-output-layer"))
                       for k in f)                       # no sphere options without spheres
        assert f["--hyperball-embedding-lr"] == "0.004"  # the per-group lrs for every optimizer


def test_md_gain_keys_and_flags():
    cfg = cfg_of("optimizer.name=muonmd")
    o = cfg.optimizer
    assert (o.resolved_gains(), o.resolved_gain_parametrization(), o.resolved_gain_lr()) == ("row_col", "softplus", 1e-3)
    f = flags(to_megatron_args(cfg))
    assert (f["--optimizer"], f["--md-gains"], f["--md-gain-parametrization"], float(f["--md-gain-lr"])) == \
        ("muonmd", "row_col", "softplus", 1e-3)
    assert "--md-allow-missing-gains" not in f
    f = flags(to_megatron_args(cfg_of("optimizer.name=adammd", "optimizer.gains=scalar", "optimizer.gain_lr=3e-3",
                                      "optimizer.gain_parametrization=direct", "optimizer.allow_missing_gains=true",
                                      "optimizer.radius=sqrt_max_dim", "optimizer.update_norm=shape")))
    assert (f["--optimizer"], f["--md-gains"], f["--md-gain-parametrization"], float(f["--md-gain-lr"])) == \
        ("adammd", "scalar", "direct", 3e-3)
    assert f["--md-allow-missing-gains"] is True
    assert (f["--hyperball-radius"], f["--hyperball-update-norm"]) == ("sqrt_max_dim", "shape")
    # no gain flags without gains; gains 'none' needs no torch_dist (no gain state to hold)
    assert not any(k.startswith("--md-") for k in flags(to_megatron_args(cfg_of("optimizer.name=muonh"))))
    assert cfg_of("optimizer.name=adammd", "optimizer.gains=none", "checkpoint.format=torch").checkpoint.format == "torch"
    # a row-normalized router takes column / scalar gains
    assert cfg_of("optimizer.name=muonmd", "optimizer.gains=col",
                  "model.moe={num_experts: 4, router_sphere: row}").optimizer.gains == "col"


def test_md_flags_on_megatrons_parser():
    """--md-* on a parser as add_plugin_args leaves it; the optimizer config gets them, defaults filled,
    and a gain flag with an optimizer without gains is refused naming the flag."""
    import argparse

    from megatron_hyperball.mcore.args import add_plugin_args, md_options_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", choices=["adam", "sgd", "muon"], default="adam")
    add_plugin_args(parser)
    args = parser.parse_args(["--optimizer", "muonmd", "--md-gains", "col", "--md-gain-lr", "0.002"])
    assert md_options_from_args(args) == {"md_gains": "col", "md_gain_parametrization": "softplus",
                                          "md_gain_lr": 0.002, "md_allow_missing_gains": False}
    args = parser.parse_args(["--optimizer", "adammd", "--md-allow-missing-gains"])
    assert md_options_from_args(args)["md_allow_missing_gains"] is True
    with pytest.raises(ValueError, match="--md-gain-lr given with --optimizer adamh, which has no gains; "
                                         "allowed only with adammd, muonmd"):
        md_options_from_args(parser.parse_args(["--optimizer", "adamh", "--md-gain-lr", "0.002"]))
    assert md_options_from_args(parser.parse_args(["--optimizer", "adamh"]))["md_gains"] == "row_col"
    for bad in (["--md-gains", "rows"], ["--md-gain-lr", "0"], ["--md-gain-lr", "x"],
                ["--md-gain-parametrization", "exp"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--optimizer", "adammd", *bad])


# -- the launch ---------------------------------------------------------------------------------------
def test_launch_problems():
    assert launch_problems(cfg_of(), 4, cpu=True) == []
    paths = lambda cfg, n, cpu=True: [p for p, _ in launch_problems(cfg, n, cpu=cpu)]  # noqa: E731
    assert paths(cfg_of("parallelism.tp=2"), 3) == ["parallelism"]
    problems = dict(launch_problems(cfg_of(), 3, cpu=True))
    assert "8 is not divisible by schedule.micro_batch_size * data-parallel size = 2 * 3" in \
        problems["schedule.global_batch_size"]
    moe = "model.moe={num_experts: 4, sqrt_gate: true, router_sphere: row, token_dispatcher: alltoall}"
    shape = "optimizer.update_norm=shape"  # row spheres need exact update norms
    assert paths(cfg_of(moe, shape, "model.transformer_impl=transformer_engine", "precision=fp16"), 2) == [
        "model.moe.router_sphere", "model.transformer_impl", "precision", "model.moe.token_dispatcher"]
    have_te = importlib.util.find_spec("transformer_engine") is not None
    assert paths(cfg_of(moe, shape, "model.transformer_impl=transformer_engine", "precision=fp16"), 2, cpu=False) == [
        "model.moe.router_sphere"] + ([] if have_te else ["model.transformer_impl"])
    # the machine is asked (cpu as a callable) only when a choice depends on it
    asked = []
    ask = lambda: asked.append(1) or True  # noqa: E731
    assert launch_problems(cfg_of(), 2, cpu=ask) == [] and asked == []
    assert [p for p, _ in launch_problems(cfg_of("precision=fp16"), 2, cpu=ask)] == ["precision"] and asked == [1]
    assert paths(cfg_of("model.moe={num_experts: 4, grouped_gemm: true}"), 2) == ["model.moe.grouped_gemm"]
    assert paths(cfg_of("optimizer.name=muonh", "precision=fp32", "checkpoint.save=/ck"), 2) == ["precision"]
    assert paths(cfg_of("optimizer.name=muonh", "precision=fp32"), 2) == []
    assert "fails in megatron-core 0.19.2" in dict(launch_problems(
        cfg_of("optimizer.name=muon", "precision=fp32"), 2, cpu=False))["precision"]


def test_resolved_config_round_trip(tmp_path):
    cfg = cfg_of("optimizer.lr=null", "optimizer.lr_law={eta0: 0.01, exponent: 0.25}", "optimizer.name=muonh",
                 "hyperp.block_output_scale=1/L", "model.moe={num_experts: 4, sqrt_gate: true}")
    argv = to_megatron_args(cfg, transformer_impl="local")
    path = save_resolved_config(cfg, tmp_path / "ckpt", megatron_args=argv)
    assert path == tmp_path / "ckpt" / "hyperball_config.yaml"
    text = path.read_text()
    assert text == resolved_config_yaml(cfg, argv)
    assert f"# {cfg.lr_summary()}" in text and "alpha = 0.5" in text and "--lr " in text
    again = load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()


# -- the real Megatron parser --------------------------------------------------------------------------
MEGATRON_CASES = {
    "adamh_law": {"overrides": ["optimizer.lr=null", "optimizer.lr_law={eta0: 0.01}", "optimizer.weight_decay=0.1",
                                "optimizer.radius=sqrt_max_dim", "optimizer.embedding_lr=0.004",
                                "optimizer.output_lr=0.002", "optimizer.scalar_lr=0.008",
                                "model.position_embedding=learned_absolute"],
                  "world_size": 2, "param_groups": True},
    "muonh": {"overrides": ["optimizer.name=muon_hyperball", "optimizer.momentum=0.9", "precision=fp32"],
              "world_size": 4, "opt_config": True},
    "adamh_options": {"overrides": ["optimizer.radius=2.5", "optimizer.update_norm=shape",
                                    "optimizer.output_layer_on_sphere=true"], "world_size": 2, "opt_config": True},
    "adamw_moe_own_data": {"overrides": ["optimizer.name=adam", "model.moe={num_experts: 4, topk: 2}",
                                         "parallelism.ep=2", "data.data_path=0.3 /d/a 0.7 /d/b",
                                         "model.tokenizer=null_tokenizer", "model.vocab_size=1000",
                                         "checkpoint.save=/tmp/x", "checkpoint.save_interval=5",
                                         "logging.wandb.mode=disabled"],
                           "world_size": 2, "opt_config": True},
    "muonmd": {"overrides": ["optimizer.name=muonmd", "optimizer.gains=row", "optimizer.gain_lr=0.002",
                             "optimizer.radius=sqrt_max_dim", "optimizer.update_norm=shape",
                             "optimizer.allow_missing_gains=true"], "world_size": 2, "opt_config": True},
    "adammd": {"overrides": ["optimizer.name=adammd"], "world_size": 2, "opt_config": True},
    "wsd": {"overrides": ["schedule.decay_style=WSD", "schedule.wsd_decay_iters=3"], "world_size": 1},
    # TP > 1: Megatron's validate_args asks the GPU for its architecture, so parse only here
    "tp2_parse_only": {"overrides": ["parallelism.tp=2", "parallelism.sequence_parallel=true"],
                       "world_size": 2, "validate": False},
}


@pytest.fixture(scope="module")
def megatron_parsed(tmp_path_factory):
    d = tmp_path_factory.mktemp("margs")
    spec = d / "in.json"
    out = d / "out.json"
    spec.write_text(json.dumps({"base": BASE, "cases": MEGATRON_CASES}))
    proc = subprocess.run([sys.executable, str(WORKERS / "megatron_args_check.py"), str(spec), str(out)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


def test_megatron_parses_and_validates(megatron_parsed):
    a = megatron_parsed["adamh_law"]["args"]
    eta0, B, L, T = 0.01, 8 * 32, 2, 10 * 8 * 32
    lr = eta0 * math.sqrt(B / 2**21) * math.sqrt(8 / L) * (T / 10.4e9) ** -0.32
    assert a["lr"] == pytest.approx(lr, rel=1e-15) and a["min_lr"] == pytest.approx(0.1 * lr, rel=1e-15)
    assert (a["num_layers"], a["hidden_size"], a["num_attention_heads"], a["ffn_hidden_size"]) == (2, 64, 4, 128)
    assert (a["seq_length"], a["max_position_embeddings"], a["train_iters"]) == (32, 32, 10)
    assert (a["global_batch_size"], a["micro_batch_size"], a["data_parallel_size"]) == (8, 2, 2)
    # adamh on Megatron's Adam path: validate_args keeps it on the ZeRO-1 distributed optimizer
    assert a["optimizer"] == "adamh" and a["use_distributed_optimizer"] is True
    assert a["use_layer_wise_distributed_optimizer"] is False
    assert (a["hyperball_radius"], a["hyperball_update_norm"], a["hyperball_output_layer"]) == \
        ("sqrt_max_dim", "exact", False)
    assert (a["hyperball_embedding_lr"], a["hyperball_output_lr"], a["hyperball_scalar_lr"]) == (0.004, 0.002, 0.008)
    assert a["hyperball_metrics_interval"] == 10
    assert (a["normalization"], a["swiglu"], a["add_bias_linear"]) == ("RMSNorm", True, False)
    assert (a["tokenizer_type"], a["vocab_size"]) == ("NullTokenizer", 257)
    assert a["train_data_path"] == ["data/pystdlib/pystdlib_train"]
    assert a["valid_data_path"] == ["data/pystdlib/pystdlib_valid"]
    assert (a["lr_warmup_iters"], a["lr_decay_style"], a["lr_decay_iters"]) == (0, "linear", 10)
    assert (a["adam_beta1"], a["adam_beta2"], a["weight_decay"]) == (0.9, 0.95, 0.1)
    assert a["bf16"] is True and a["position_embedding_type"] == "learned_absolute"

    m = megatron_parsed["muonh"]["args"]
    assert m["optimizer"] == "muonh" and m["use_layer_wise_distributed_optimizer"] is True
    assert m["use_distributed_optimizer"] is False  # validate_args moved it to the layer-wise optimizer
    assert (m["muon_momentum"], m["muon_num_ns_steps"], m["muon_nesterov"]) == (0.9, 5, True)
    assert m["bf16"] is False and m["data_parallel_size"] == 4

    w = megatron_parsed["adamw_moe_own_data"]["args"]
    assert w["data_path"] == ["0.3", "/d/a", "0.7", "/d/b"] and w["split"] == "969,30,1"
    assert (w["num_experts"], w["moe_router_topk"], w["expert_model_parallel_size"]) == (4, 2, 2)
    assert w["moe_ffn_hidden_size"] == 128 and w["moe_token_dispatcher_type"] == "allgather"
    assert (w["vocab_size"], w["save"], w["save_interval"], w["wandb_project"]) == (1000, "/tmp/x", 5, None)

    assert w["optimizer"] == "adam" and w["hyperball_embedding_lr"] is None

    wsd = megatron_parsed["wsd"]["args"]
    assert (wsd["lr_decay_style"], wsd["lr_wsd_decay_iters"], wsd["lr_decay_iters"]) == ("WSD", 3, 10)
    assert a["override_opt_param_scheduler"] is True and a["lr_wsd_decay_iters"] is None  # the config's schedule

    t = megatron_parsed["tp2_parse_only"]["args"]
    assert (t["tensor_model_parallel_size"], t["sequence_parallel"]) == (2, True)


def test_hyperball_flags_build_the_optimizer_config(megatron_parsed):
    """The optimizer config the trainer builds from the parsed flags (mcore.args.optimizer_config_from_args)."""
    hb = megatron_parsed["adamh_options"]
    assert hb["opt_config_class"] == "HyperballOptimizerConfig" and hb["opt_config"]["optimizer"] == "adamh"
    assert hb["hyperball_options"] == {"radius": 2.5, "update_norm": "shape", "output_layer": True,
                                       "gains": "row_col", "gain_parametrization": "softplus", "gain_lr": 1e-3,
                                       "allow_missing_gains": False, "split_qkv": False}
    mh = megatron_parsed["muonh"]
    assert mh["opt_config"]["optimizer"] == "muonh"
    assert mh["hyperball_options"] == {"radius": "init", "update_norm": "exact", "output_layer": False,
                                       "gains": "row_col", "gain_parametrization": "softplus", "gain_lr": 1e-3,
                                       "allow_missing_gains": False, "split_qkv": False}
    assert mh["opt_config"]["muon_momentum"] == 0.9
    assert megatron_parsed["adamw_moe_own_data"]["opt_config"]["optimizer"] == "adam"


def test_md_flags_through_megatron(megatron_parsed):
    """adammd / muonmd: validate_args keeps AdamMD on ZeRO-1 and puts MuonMD on the layer-wise optimizer;
    the --md-* flags reach the optimizer config."""
    m = megatron_parsed["muonmd"]
    a = m["args"]
    assert a["optimizer"] == "muonmd" and a["use_layer_wise_distributed_optimizer"] is True
    assert (a["md_gains"], a["md_gain_parametrization"], a["md_gain_lr"], a["md_allow_missing_gains"]) == \
        ("row", "softplus", 0.002, True)
    assert m["opt_config"]["optimizer"] == "muonmd"
    want = {"radius": "sqrt_max_dim", "update_norm": "shape", "output_layer": False, "gains": "row",
            "gain_parametrization": "softplus", "gain_lr": 0.002, "allow_missing_gains": True}
    assert {k: m["hyperball_options"][k] for k in want} == want
    d = megatron_parsed["adammd"]
    assert d["args"]["optimizer"] == "adammd" and d["args"]["use_distributed_optimizer"] is True
    assert d["args"]["use_layer_wise_distributed_optimizer"] is False
    assert (d["opt_config"]["md_gains"], d["opt_config"]["md_gain_lr"]) == ("row_col", 1e-3)


def test_trainer_optimizer_config_and_param_groups(megatron_parsed):
    case = megatron_parsed["adamh_law"]
    oc = case["opt_config"]
    lr = case["args"]["lr"]
    assert case["opt_config_class"] == "HyperballOptimizerConfig"
    assert oc["optimizer"] == "adamh" and oc["hyperball_radius"] == "sqrt_max_dim"
    assert oc["hyperball_update_norm"] == "exact" and oc["lr"] == lr and oc["weight_decay"] == 0.1
    groups = case["param_groups"]
    frac = 0.1  # every group decays to 0.1 of its own peak
    assert groups["embedding.word_embeddings.weight"] == {"max_lr": 0.004, "min_lr": pytest.approx(0.0004),
                                                          "wd_mult": 1.0}
    assert groups["embedding.position_embeddings.weight"]["max_lr"] == 0.004
    assert groups["output_layer.weight"] == {"max_lr": 0.002, "min_lr": pytest.approx(0.0002), "wd_mult": 1.0}
    norm = groups["decoder.layers.0.input_layernorm.weight"]
    assert norm == {"max_lr": 0.008, "min_lr": pytest.approx(0.008 * frac), "wd_mult": 0.0}
    qkv = groups["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv == {"max_lr": lr, "min_lr": pytest.approx(lr * frac, rel=1e-12), "wd_mult": 1.0}


def test_router_sphere_default_follows_the_optimizer_and_none_is_not_ignored():
    """frobenius by default under adamh / muonh (HyperP); 'none' and 'row' run (the entry tags the
    router: tests/distributed/test_moe_experts.py); 'row' is refused with MD, non-sphere optimizers and
    update_norm shape, naming the allowed modes."""
    from megatron_hyperball.config import launch_problems

    cfg = cfg_of("optimizer.name=muonh", "model.moe={num_experts: 4}")
    assert cfg.model.moe.router_sphere is None and launch_problems(cfg, 1, cpu=True) == []
    assert cfg.model.moe.resolved_router_sphere(True) == "frobenius"
    assert cfg.model.moe.resolved_router_sphere(False) == "none"
    for opt in ("adamh", "muonh", "adamw"):
        cfg = cfg_of(f"optimizer.name={opt}", "model.moe={num_experts: 4, router_sphere: none}")
        assert launch_problems(cfg, 1, cpu=True) == [] and cfg.model.moe.resolved_router_sphere(True) == "none"
    for opt in ("adamh", "muonh"):
        assert launch_problems(cfg_of(f"optimizer.name={opt}", "model.moe={num_experts: 4, router_sphere: row}"),
                               1, cpu=True) == []
    for bad in (["optimizer.name=adamw"], ["optimizer.name=muonmd", "optimizer.gains=col"], ["optimizer.update_norm=shape"]):
        problems = dict(launch_problems(cfg_of(*bad, "model.moe={num_experts: 4, router_sphere: row}"), 1, cpu=True))
        assert "'row'" in problems["model.moe.router_sphere"], bad
        assert problems["model.moe.router_sphere"].endswith(
            "allowed: frobenius, none (row: with adamh / muonh and update_norm exact)"), bad
    err = str(error_of("model.moe={num_experts: 4, router_sphere: rows}"))
    assert "model.moe.router_sphere" in err and "'frobenius'" in err and "'row'" in err and "'none'" in err


@pytest.mark.parametrize("moe,optimizer,flags", [
    ("{num_experts: 4}", "adamh", ("global_aux_loss", "0.1")),                    # HyperP's recipe by default
    ("{num_experts: 4}", "muonh", ("global_aux_loss", "0.1")),
    ("{num_experts: 4}", "adamw", ("global_aux_loss", "0.01")),                   # Megatron's suggested start
    ("{num_experts: 4, aux_loss_coeff: 0.3}", "muonh", ("global_aux_loss", "0.3")),
    ("{num_experts: 4, aux_loss_coeff: 0.01, aux_loss_type: aux_loss}", "adamh", ("aux_loss", "0.01")),
    ("{num_experts: 4, aux_loss_type: seq_aux_loss}", "adamh", ("seq_aux_loss", "0.1")),
    ("{num_experts: 4, aux_loss_coeff: 0}", "adamh", ("none", "0.0")),             # off
])
def test_aux_loss_maps_to_megatron_load_balancing_type(moe, optimizer, flags):
    args = to_megatron_args(cfg_of(f"optimizer.name={optimizer}", f"model.moe={moe}"))
    f = {k: v for k, v in zip(args, args[1:]) if k.startswith("--moe-")}
    assert (f["--moe-router-load-balancing-type"], f["--moe-aux-loss-coeff"]) == flags


def test_aux_loss_type_refused_naming_the_types():
    err = str(error_of("model.moe={num_experts: 4, aux_loss_type: sinkhorn}"))
    assert "model.moe.aux_loss_type" in err and "'global_aux_loss'" in err and "'seq_aux_loss'" in err
    assert "model.moe.aux_loss_coeff" in str(error_of("model.moe={num_experts: 4, aux_loss_coeff: -0.1}"))


def test_megatron_aux_loss_coeff_corrects_global_only():
    from megatron_hyperball.models.aux_loss import megatron_aux_loss_coeff

    assert megatron_aux_loss_coeff(0.1, "global_aux_loss", 8) == pytest.approx(0.8)
    assert megatron_aux_loss_coeff(0.1, "aux_loss", 8) == 0.1
    assert megatron_aux_loss_coeff([0.1, 0.2], ["aux_loss", "global_aux_loss"], 4) == [0.1, pytest.approx(0.8)]


def test_sqrt_gate_keys():
    cfg = cfg_of("model.moe={num_experts: 4, sqrt_gate: true, shared_expert_size: 32}")
    assert cfg.model.moe.shared_expert_fraction == 0.5 and launch_problems(cfg, 2, cpu=True) == []
    assert "allowed: 2 .. num_experts" in str(error_of("model.moe={num_experts: 4, topk: 1, sqrt_gate: true}"))
    assert "model.moe.shared_expert_fraction" in str(
        error_of("model.moe={num_experts: 4, sqrt_gate: true, shared_expert_fraction: 1.5}"))
