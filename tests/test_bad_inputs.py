"""Bad inputs through the real launch commands: each stops before anything exists, with one message.

Every case runs ``scripts/pretrain_gpt.py`` as a user would, in a fresh empty working directory,
and checks: a non-zero exit (2 from ``python scripts/pretrain_gpt.py``; torchrun itself exits 1
when a child fails and says ``exitcode : 2`` for it; the launcher exits 2 before torchrun starts),
exactly one ``invalid config`` message naming the key path and the allowed values (once, not once
per rank), no Traceback, no file or folder created (the working directory and the fixture
directory are compared before and after), and no process left behind (each command runs in its own
process group, which must be empty afterwards).

Validation runs before torch or Megatron is imported, so most cases take well under a second each
with plain ``python``; a handful run under ``torchrun --nproc-per-node 2`` and one through
``scripts/launch_single_node.sh``. Megatron's own parser still judges the extra ``--flags``: those
two cases import Megatron (~10 s each) and must still stop before any folder exists.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "pretrain_gpt.py"
LAUNCHER = REPO_ROOT / "scripts" / "launch_single_node.sh"
QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"
FAST_S = 5.0  # per case without torch / Megatron (measured ~0.4 s on 2 cores; slack for a loaded machine)


# -- fixtures: files the cases point at (all under one directory, compared before / after) ----------
@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    (root / "data").mkdir()
    for name in ("a.bin", "a.idx", "b.bin"):
        (root / "data" / name).write_bytes(b"")
    (root / "afile").write_text("not a directory\n")
    (root / "binary.yaml").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    (root / "latin1.yaml").write_bytes(QUICKSTART.read_bytes() + "# r\u00e9sum\u00e9\n".encode("latin-1"))
    (root / "dup.yaml").write_text("seed: 1\nmodel: {num_layers: 2}\nseed: 7\n")
    (root / "list.yaml").write_text("- model\n- optimizer\n")
    (root / "broken.yaml").write_text("model: {num_layers: 4\n")
    (root / "empty.yaml").write_text("")
    (root / "adir.yaml").mkdir()
    # a checkpoint of the quickstart (tracker + resolved config: all the pre-flight reads)
    from megatron_hyperball.config import load_config, save_resolved_config

    ckpt = root / "ckpt"
    save_resolved_config(load_config(QUICKSTART, [f"checkpoint.save={ckpt}"]), ckpt)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("300")
    return root


def _tree(*roots: Path) -> list[str]:
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                out.append(f"{p} {p.stat().st_size if p.is_file() else 'dir'}")
    return sorted(out)


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "WANDB_MODE"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 120, **env) -> tuple[int, str, str, float]:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out[-3000:]}\n{err[-3000:]}") from None
    elapsed = time.monotonic() - start
    # no process left behind: the command's process group is empty
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"processes of {cmd} still running after it exited")
    return proc.returncode, out, err, elapsed


def _fill(args: list[str], fx: Path) -> list[str]:
    return [a.replace("{fx}", str(fx)) for a in args]


def _check_message(text: str, key: str, detail: str, header: str = "invalid config") -> None:
    assert len(re.findall(rf"^{header}", text, re.M)) == 1, text[-4000:]
    # no traceback through this project's or Megatron's code (torchrun prints its own for a failed child)
    assert not re.search(r'File ".*(megatron_hyperball|pretrain_gpt\.py|/megatron/)', text), text[-4000:]
    all_lines = text.splitlines()
    start = next(i for i, line in enumerate(all_lines) if line.startswith(header))
    block = []
    for line in all_lines[start + 1:]:  # the message: the indented lines under its header
        if not line.startswith("  "):
            break
        block.append(line)
    lines = [line for line in block if key == "" or line.startswith(f"  {key}: ")]
    assert lines, f"no line for {key!r} in:\n{text[-3000:]}"
    assert any(detail in line for line in lines), (detail, lines)
    assert all("allowed" in line for line in lines), lines


# -- the cases: (arguments, key path, text of its message) ------------------------------------------
# '{fx}' is the fixture directory; --config defaults to the quickstart.
OWN_DATA = ["model.tokenizer=null_tokenizer", "model.vocab_size=300"]
CASES = {
    # types (strict: no bool for a number, no float for a count, no number for a string)
    "float_for_count": (["schedule.train_iters=300.0"], "schedule.train_iters", "valid integer (got 300.0)"),
    "bool_for_count": (["model.num_layers=true"], "model.num_layers", "valid integer (got True)"),
    "string_for_count": (["model.num_layers='4'"], "model.num_layers", "valid integer (got '4')"),
    "bool_for_float": (["optimizer.lr=true"], "optimizer.lr", "valid number (got True)"),
    "int_for_bool": (["model.swiglu=1"], "model.swiglu", "valid boolean (got 1)"),
    "number_for_path": (["checkpoint.save=2024"], "checkpoint.save", "valid string (got 2024)"),
    "list_for_section": (["model=[4, 128]"], "model", "valid dictionary"),
    "unknown_literal": (["model.normalization=rmsnorm"], "model.normalization", "'RMSNorm', 'LayerNorm'"),
    "unknown_optimizer": (["optimizer.name=adamx"], "optimizer.name", "adamw, muon, adamh, muonh"),
    "unknown_key": (["optimizer.learning_rate=0.1"], "optimizer.learning_rate", "unknown key"),
    # ranges, finiteness
    "inf_lr": (["optimizer.lr=.inf"], "optimizer.lr", "finite number (got inf)"),
    "nan_eps": (["optimizer.eps=.nan"], "optimizer.eps", "finite number (got nan)"),
    "inf_law_exponent": (["optimizer.lr=null", "optimizer.lr_law={eta0: 0.01, exponent: -.inf}"],
                         "optimizer.lr_law.exponent", "finite number"),
    "negative_lr": (["optimizer.lr=-0.1"], "optimizer.lr", "greater than 0"),
    "dropout_one": (["model.hidden_dropout=1.0"], "model.hidden_dropout", "less than 1"),
    "beta_range": (["optimizer.betas=[0.9, 1.5]"], "optimizer.betas", "must both be in [0, 1)"),
    "betas_length": (["optimizer.betas=[0.9]"], "optimizer.betas", "too few items (got (0.9,)); allowed: a list of 2"),
    "seed_zero": (["seed=0"], "seed", "greater than or equal to 1"),
    "zero_corpus": (["data.embedded_max_mb=0"], "data.embedded_max_mb", "greater than 0"),
    "min_lr_ratio": (["optimizer.min_lr_ratio=2"], "optimizer.min_lr_ratio", "less than or equal to 1"),
    # combinations Megatron refuses late (or runs wrongly)
    "odd_rope_head": (["model.hidden_size=132"], "model.hidden_size", "head dimension 33, which is odd"),
    "heads_not_dividing": (["model.hidden_size=130"], "model.hidden_size", "not divisible by"),
    "wsd_without_length": (["schedule.decay_style=WSD"], "schedule.wsd_decay_iters", "required"),
    "warmup_too_long": (["schedule.warmup_iters=300"], "schedule.warmup_iters", ">= schedule.train_iters=300"),
    "min_lr_above_lr": (["optimizer.min_lr_ratio=null", "optimizer.min_lr=0.5"], "optimizer.min_lr", "> resolved lr"),
    "sequence_parallel_tp1": (["parallelism.sequence_parallel=true"], "parallelism.sequence_parallel",
                              "needs parallelism.tp > 1"),
    "tp_vs_processes": (["parallelism.tp=2"], "parallelism", "does not divide the number of processes 1"),
    "topk_above_experts": (["model.moe={num_experts: 2, topk: 4}"], "model.moe.topk", "> model.moe.num_experts=2"),
    "grouped_gemm_on_cpu": (["model.moe={num_experts: 2, grouped_gemm: true}"], "model.moe.grouped_gemm",
                            "CUDA grouped-GEMM"),
    "tokenizer_vs_embedded": (["model.tokenizer=gpt2bpe"], "model.tokenizer.type", "with data.data_path 'embedded'"),
    # MoE
    "moe_ep_not_dividing_experts": (["model.moe={num_experts: 3}", "parallelism.ep=3"], "parallelism.ep",
                                    "does not divide the data-parallel size 1"),
    "moe_ep_vs_experts": (["model.moe={num_experts: 3}", "parallelism.ep=2"], "parallelism.ep",
                          "does not divide model.moe.num_experts=3"),
    "moe_ep_not_dividing_dp": (["model.moe={num_experts: 4}", "parallelism.ep=2"], "parallelism.ep",
                               "does not divide the data-parallel size 1"),
    "moe_unknown_router_mode": (["model.moe={num_experts: 4, router_sphere: rows}"], "model.moe.router_sphere",
                                "allowed: 'frobenius', 'row', 'none' or null"),
    "moe_router_row_shape": (["model.moe={num_experts: 4, router_sphere: row}", "optimizer.update_norm=shape"],
                             "model.moe.router_sphere", "with optimizer.update_norm 'shape'; allowed: frobenius, none"),
    "moe_sqrt_gate_top1": (["model.moe={num_experts: 4, topk: 1, sqrt_gate: true}"], "model.moe.topk",
                           "1 with model.moe.sqrt_gate true; allowed: 2 .. num_experts"),
    "moe_unknown_aux_loss": (["model.moe={num_experts: 4, aux_loss_type: sinkhorn}"], "model.moe.aux_loss_type",
                             "allowed: 'global_aux_loss', 'aux_loss', 'seq_aux_loss'"),
    "moe_negative_aux_coeff": (["model.moe={num_experts: 4, aux_loss_coeff: -0.1}"], "model.moe.aux_loss_coeff",
                               "greater than or equal to 0"),
    "moe_tp2_on_cpu": (["model.moe={num_experts: 4}", "parallelism.tp=2"], "parallelism.tp",
                       "needs sequence parallelism, which the CPU path lacks; allowed on CPU: 1"),
    "moe_alltoall_on_cpu": (["model.moe={num_experts: 4, token_dispatcher: alltoall}"], "model.moe.token_dispatcher",
                            "gloo lacks"),
    # magnitude-direction gains (AdamMD / MuonMD)
    "md_unknown_gain_mode": (["optimizer.name=muonmd", "optimizer.gains=rows"], "optimizer.gains",
                             "allowed: row_col, row, col, scalar, none"),
    "md_gain_lr_zero": (["optimizer.name=muonmd", "optimizer.gain_lr=0"], "optimizer.gain_lr", "greater than 0"),
    "md_gain_lr_text": (["optimizer.name=adammd", "optimizer.gain_lr=fast"], "optimizer.gain_lr",
                        "valid number (got 'fast')"),
    "md_gains_without_md": (["optimizer.gains=row"], "optimizer.gains", "allowed only with adammd, muonmd"),
    "md_output_layer_gains": (["optimizer.name=muonmd", "optimizer.output_layer_on_sphere=true"],
                              "optimizer.output_layer_on_sphere", "no sphere, so no gains"),
    "md_row_gains_row_router": (["optimizer.name=muonmd", "model.moe={num_experts: 4, router_sphere: row}"],
                                "optimizer.gains", "with model.moe.router_sphere 'row'"),
    "md_checkpoint_format": (["optimizer.name=muonmd", "checkpoint.format=torch"], "checkpoint.format",
                             "cannot hold the gains"),
    # paths (checked without creating anything)
    "missing_prefix": ([*OWN_DATA, "data.data_path={fx}/data/nope"], "data.data_path",
                       "nope.bin and {fx}/data/nope.idx do not exist"),
    "half_prefix": ([*OWN_DATA, "data.data_path=[0.5, {fx}/data/a, 0.5, {fx}/data/b]"], "data.data_path",
                    "{fx}/data/b.idx does not exist"),
    "mixed_weights": ([*OWN_DATA, "data.data_path=[0.5, {fx}/data/a, {fx}/data/b, 0.5]"], "data.data_path",
                      "mixes weights and prefixes"),
    "save_is_file": (["checkpoint.save={fx}/afile"], "checkpoint.save", "exists and is not a directory"),
    "save_under_file": (["checkpoint.save={fx}/afile/ckpt"], "checkpoint.save", "cannot be created"),
    "save_with_tilde": (["checkpoint.save=~/ckpt"], "checkpoint.save", "'~', which is not expanded"),
    "tensorboard_under_file": (["logging.tensorboard_dir={fx}/afile/tb"], "logging.tensorboard_dir",
                               "cannot be created"),
    "wandb_dir_is_file": (["logging.wandb.save_dir={fx}/afile"], "logging.wandb.save_dir", "not a directory"),
    "embedded_dir_under_file": (["data.embedded_dir={fx}/afile/corpus"], "data.embedded_dir", "cannot be created"),
    "load_missing": (["checkpoint.load={fx}/nowhere"], "checkpoint.load", "is not an existing directory"),
    "load_not_a_checkpoint": (["checkpoint.load={fx}/data"], "checkpoint.load", "holds no Megatron checkpoint"),
    "vocab_file_missing": ([*OWN_DATA[1:], "data.data_path={fx}/data/a",
                            "model.tokenizer={type: gpt2bpe, vocab_file: {fx}/v.json, merge_file: {fx}/afile}",
                            "model.vocab_size=null"], "model.tokenizer.vocab_file", "does not exist"),
    "resume_changed_model": (["checkpoint.save={fx}/ckpt", "model.num_layers=6"], "model.num_layers",
                             "6, but the checkpoint this run resumes"),
    # file contents and the command line
    "binary_config": (["--config", "{fx}/binary.yaml"], "", "is not a text file"),
    "latin1_config": (["--config", "{fx}/latin1.yaml"], "", "is not UTF-8 text"),
    "config_is_directory": (["--config", "{fx}/adir.yaml"], "", "is a directory"),
    "config_missing": (["--config", "{fx}/missing.yaml"], "", "No such file"),
    "duplicate_key": (["--config", "{fx}/dup.yaml"], "", "line 3, column 1: found key 'seed' twice (first on line 1)"),
    "broken_yaml": (["--config", "{fx}/broken.yaml"], "", "not valid YAML"),
    "top_level_list": (["--config", "{fx}/list.yaml"], "", "must be a mapping of sections"),
    "empty_config": (["--config", "{fx}/empty.yaml"], "model", "required key is missing"),
    "no_config_flag": (["--no-config"], "", "the following arguments are required: --config"),
    "override_without_value": (["optimizer.lr", "0.1"], "optimizer.lr", "has no value"),
    "bad_override_yaml": (["optimizer.betas=[0.9,"], "optimizer.betas", "not valid YAML"),
}
SLOW = {"grouped_gemm_on_cpu", "moe_tp2_on_cpu", "moe_alltoall_on_cpu"}  # ask torch whether CUDA is there (the choices that depend on it)


def _case_args(args: list[str], fx: Path) -> list[str]:
    args = _fill(args, fx)
    if "--config" in args or "--no-config" in args:
        return [a for a in args if a != "--no-config"]
    return ["--config", str(QUICKSTART), *args]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_python(name, fx, tmp_path):
    """``python scripts/pretrain_gpt.py``: status 2, one message, nothing created, fast."""
    args, key, detail = CASES[name]
    args = _case_args(args, fx)
    before = _tree(tmp_path, fx)
    rc, out, err, elapsed = _run([sys.executable, str(SCRIPT), *args], tmp_path)
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    _check_message(err, key, detail.replace("{fx}", str(fx)))
    assert "[hyperball]" not in out  # stopped before the start-of-run report
    assert _tree(tmp_path, fx) == before  # no checkpoint, TensorBoard, W&B or data folder
    if name not in SLOW:
        assert elapsed < FAST_S, f"{name}: {elapsed:.1f}s (torch or Megatron imported before validation?)"


def test_bad_input_not_writable(fx, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write to any directory")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    rc, out, err, _ = _run([sys.executable, str(SCRIPT), "--config", str(QUICKSTART), f"checkpoint.save={ro}/ck"],
                           tmp_path)
    assert rc == 2
    _check_message(err, "checkpoint.save", "cannot write to")
    assert not (ro / "ck").exists()


# -- under torchrun (2 ranks) and the launcher ------------------------------------------------------
TORCHRUN_CASES = {
    "inf_lr": CASES["inf_lr"],
    "batch_vs_ranks": (["schedule.global_batch_size=24"], "schedule.global_batch_size",
                       "not divisible by schedule.micro_batch_size * data-parallel size = 8 * 2"),
    "missing_prefix": CASES["missing_prefix"],
    "save_is_file": CASES["save_is_file"],
    "binary_config": CASES["binary_config"],
}


@pytest.mark.parametrize("name", list(TORCHRUN_CASES))
def test_bad_input_torchrun(name, fx, tmp_path):
    """torchrun --nproc-per-node 2: every rank exits 2, the message is printed once (local rank 0);
    torchrun reports the failed children and exits 1."""
    args, key, detail = TORCHRUN_CASES[name]
    argv = _case_args(args, fx)
    before = _tree(tmp_path, fx)
    rc, out, err, elapsed = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  "2", str(SCRIPT), *argv], tmp_path)
    text = out + err
    assert rc == 1, (rc, text[-3000:])  # torchrun's own status for a failed child
    # the first rank to fail exits 2 (torchrun may stop the other with a signal before it exits 2 too)
    assert re.search(r"exitcode\s*: 2\b", text), text[-3000:]
    _check_message(err, key, detail.replace("{fx}", str(fx)))
    assert "initializing torch distributed" not in text and "[hyperball] lr" not in text
    assert _tree(tmp_path, fx) == before
    assert elapsed < 60


def test_bad_input_launcher(fx, tmp_path):
    """scripts/launch_single_node.sh checks the config first: status 2, one message, torchrun never starts."""
    before = _tree(tmp_path, fx)
    rc, out, err, elapsed = _run(["bash", str(LAUNCHER), "--config", str(QUICKSTART), "optimizer.lr=.inf",
                                  f"checkpoint.save={fx}/afile"], tmp_path, NPROC="2", PYTHON=sys.executable)
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    _check_message(err, "optimizer.lr", "finite number")
    assert "torch.distributed.run" not in out + err  # the torchrun command line is printed only when it starts
    assert _tree(tmp_path, fx) == before
    # a valid config passes the check and torchrun starts (stopped at once by a bad Megatron flag)
    rc, out, err, _ = _run(["bash", str(LAUNCHER), "--config", str(QUICKSTART), "--no-such-megatron-flag"],
                           tmp_path, NPROC="2", PYTHON=sys.executable, timeout=180)
    assert "[hyperball] config check passed" in out and "torch.distributed.run" in out
    assert rc == 1 and (out + err).count("invalid Megatron arguments") == 1, (out + err)[-3000:]
    assert _tree(tmp_path, fx) == before


# -- validation imports neither torch nor Megatron ---------------------------------------------------
def test_validation_imports_no_torch_or_megatron(tmp_path):
    rc, out, err, elapsed = _run([sys.executable, "-X", "importtime", str(SCRIPT), "--config", str(QUICKSTART),
                                  "optimizer.lr=.inf"], tmp_path)
    assert rc == 2
    imported = [line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")]
    assert "megatron_hyperball.config.schema" in imported and "pydantic" in imported
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "megatron", "numpy", "transformer_engine")]
    assert heavy == [], heavy[:20]
    assert err.count("invalid config (") == 1
    assert elapsed < FAST_S


# -- Megatron's parser judges the extra flags: once, status 2, before any folder --------------------
@pytest.mark.parametrize("flags,text", [
    (["--no-such-megatron-flag"], "unrecognized arguments: --no-such-megatron-flag"),
    (["--save-retain-interval", "7"], "Megatron's validate_args refused them: "
                                      "assert args.save_retain_interval % args.save_interval == 0"),
])
def test_bad_megatron_flag(flags, text, fx, tmp_path):
    before = _tree(tmp_path, fx)
    rc, out, err, _ = _run([sys.executable, str(SCRIPT), "--config", str(QUICKSTART), *flags], tmp_path, timeout=180)
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    assert err.count("invalid Megatron arguments") == 1 and text in err, err[-3000:]
    assert "Traceback" not in err and "usage:" not in err
    assert _tree(tmp_path, fx) == before  # before Megatron's TensorBoard / W&B writers exist


def test_cases_cover_every_section():
    """The suite touches every section of the schema and each kind of problem."""
    keys = {c[1].split(".")[0] for c in CASES.values() if c[1]}
    assert {"model", "parallelism", "data", "optimizer", "schedule", "checkpoint", "logging", "seed"} <= keys
    assert len(CASES) + len(TORCHRUN_CASES) >= 30
    assert yaml  # the fixtures are YAML files
