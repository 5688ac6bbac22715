"""Config-driven pretraining: scripts/pretrain_gpt.py through Megatron's own training loop (CPU, gloo).

The quickstart config trains under torchrun with 2 ranks, with fewer steps (overrides); the runs
are shared by the tests of this module:

- ``run_a``: 30 steps uninterrupted (checkpoint at the end).
- ``run_b``: the same run launched twice with Megatron's ``--exit-interval 15``: the first launch
  stops at step 15 with a checkpoint, the identical second launch resumes from it and stops at 30.
- ``run_c``: run_a's finished checkpoint (copied) continued with the documented command, the same
  command plus ``schedule.train_iters=40``: it resumes at 30 and follows the 40-step lr schedule.

Per-step numbers are read back from the TensorBoard files Megatron's writer left (full float32,
every step); Megatron's printed log lines are checked too. Invalid configs run the entry in this
process (so "no process group" is checked directly) and once as a real torchrun job.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, tb_scalars

SCRIPT = REPO_ROOT / "scripts" / "pretrain_gpt.py"
QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"
STEPS = 30
EXIT_AT = 15
CONTINUE_TO = 40
LR, MIN_LR = 0.03, 0.003  # the quickstart's lr, linear decay to 0.1 lr

SPHERE_TYPES = ("qkv", "proj", "fc1", "fc2")


def _launch(cwd: Path, args: list[str], nproc: int = 2, timeout: float = 300, cpu: bool = True) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(SCRIPT), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a machine with GPUs
    env.pop("WANDB_MODE", None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"pretrain_gpt.py timed out after {timeout}s:\n{out[-6000:]}") from None
    return proc.returncode, out


def _overrides(root: Path, data_dir: Path, name: str) -> list[str]:
    return [
        "--config", str(QUICKSTART),
        f"schedule.train_iters={STEPS}", "schedule.eval_interval=5", "schedule.eval_iters=4",
        f"data.embedded_dir={data_dir}", "data.embedded_max_mb=2",
        f"checkpoint.save={root / name / 'ckpt'}",
        f"logging.tensorboard_dir={root / name / 'tb'}",
        "logging.metrics_interval=5",
        f"logging.wandb.name={name}",
    ]


def _printed_validation(out: str) -> dict[int, float]:
    """Megatron's 'validation loss at iteration N | lm loss value: X' lines (in-loop evaluations)."""
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"validation loss at iteration (\d+) \| lm loss value: (\S+)", out)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture(scope="module")
def run_a(workdir):
    rc, out = _launch(workdir, _overrides(workdir, workdir / "data", "a"))
    assert rc == 0, out[-6000:]
    return {"root": workdir / "a", "out": out, "tb": tb_scalars(workdir / "a" / "tb")}


@pytest.fixture(scope="module")
def run_b(workdir, run_a):  # after run_a: the embedded corpus is prepared once
    args = _overrides(workdir, workdir / "data", "b") + ["--exit-interval", str(EXIT_AT)]
    rc1, out1 = _launch(workdir, args)
    assert rc1 == 0, out1[-6000:]
    ckpt = workdir / "b" / "ckpt"
    first = {"iteration": (ckpt / "latest_checkpointed_iteration.txt").read_text().strip(), "out": out1,
             "tb": tb_scalars(workdir / "b" / "tb")}
    rc2, out2 = _launch(workdir, args)  # the identical command again
    assert rc2 == 0, out2[-6000:]
    return {"root": workdir / "b", "first": first, "out": out2, "tb": tb_scalars(workdir / "b" / "tb")}


@pytest.fixture(scope="module")
def run_c(workdir, run_a):
    """run_a's checkpoint, continued as the README says: the same command + schedule.train_iters=40."""
    shutil.copytree(workdir / "a" / "ckpt", workdir / "c" / "ckpt")
    rc, out = _launch(workdir, _overrides(workdir, workdir / "data", "c") + [f"schedule.train_iters={CONTINUE_TO}"])
    assert rc == 0, out[-6000:]
    return {"root": workdir / "c", "out": out, "tb": tb_scalars(workdir / "c" / "tb")}


# -- training, evaluation, checkpoint -------------------------------------------------------------
def test_quickstart_trains_evaluates_and_saves(run_a):
    out, tb, ckpt = run_a["out"], run_a["tb"], run_a["root"] / "ckpt"
    # Megatron's loop ran: its log lines, every step in TensorBoard
    assert f"iteration       {STEPS}/      {STEPS}" in out
    assert sorted(tb["lm loss"]) == list(range(1, STEPS + 1))
    # the loss falls (measured on 2 CPU ranks: training loss 5.98 at step 1, ~ln(257) = 5.55;
    # held-out loss 2.645 at step 5, 2.577 at 10, 2.374 at 20, 2.432 at 30)
    val = _printed_validation(out)  # in-loop evaluations (TensorBoard's step 30 is the final one)
    assert sorted(val) == list(range(5, STEPS + 1, 5))
    assert tb["lm loss"][1] > 5.0
    assert val[STEPS] < tb["lm loss"][1] - 3.0, val
    assert val[STEPS] < val[5] - 0.1, val
    assert sorted(tb["lm loss validation"]) == sorted(val)
    assert tb["lm loss validation"][5] == pytest.approx(val[5], rel=1e-6)
    assert "validation loss at iteration 30 on validation set" in out  # the final evaluation
    # checkpoint: Megatron's tracker file names the last iteration, the torch_dist files exist
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    it_dir = ckpt / f"iter_{STEPS:07d}"
    assert (it_dir / "metadata.json").is_file()
    assert sorted(p.name for p in it_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # the resolved config next to it, loadable again
    from megatron_hyperball.config import load_config

    saved = ckpt / "hyperball_config.yaml"
    assert load_config(saved).schedule.train_iters == STEPS
    assert "lr = 0.03 (fixed)" in saved.read_text()


def test_start_of_run_report_and_optimizer_path(run_a):
    out = run_a["out"]
    assert "[hyperball] lr = 0.03 (fixed); min_lr = 0.003 (linear decay)" in out
    assert "Depth-muP block_output_scale 1/sqrt(2L) -> alpha = 0.353553" in out
    # MuonH on Megatron's layer-wise optimizer (matrices), the rest on ZeRO-1 Adam
    assert ("[hyperball] optimizer: LayerWiseDistributedOptimizer > Float16OptimizerWithFloat16Params > "
            "TensorParallelMuonH (") in out
    assert "[hyperball] optimizer: DistributedOptimizer > AdamW (" in out
    assert "--optimizer muonh " in out and "--use-distributed-optimizer" in out
    assert "> building GPTModel (local spec)" in out


def test_hyperball_metrics_in_tensorboard_and_wandb(run_a):
    tb, root = run_a["tb"], run_a["root"]
    from megatron_hyperball.mcore.metrics import metric_names

    expected = metric_names(SPHERE_TYPES + ("output", "embedding"))
    for name in expected:
        assert sorted(tb[name]) == list(range(5, STEPS + 1, 5)), name
    lr = tb["learning-rate"]
    for kind in SPHERE_TYPES:
        norms = list(tb[f"hyperball/weight_norm/{kind}"].values())
        assert max(norms) / min(norms) - 1 < 1e-3, (kind, norms)  # on the sphere: the norm stays
        for step, rel in tb[f"hyperball/rel_update/{kind}"].items():
            # MuonH moves each matrix by lr relative to its norm, a little less after the retraction
            # (measured 0.975 - 0.998 lr). Megatron logs the lr for the next step: step k used lr[k-1].
            applied = lr[step - 1]
            assert 0.95 * applied < rel <= applied * (1 + 1e-5), (kind, step, rel, applied)
    # the Adam-trained output layer is off the sphere: its norm grows
    out_norm = tb["hyperball/weight_norm/output"]
    assert out_norm[STEPS] > out_norm[5]
    # W&B: offline run files under the checkpoint dir, with the same metric names
    runs = list((root / "ckpt" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for name in expected + ["lm loss validation", "grad-norm"]:
        assert name.encode() in data, name


# -- resume ----------------------------------------------------------------------------------------
def test_same_command_twice_resumes_with_identical_losses(run_a, run_b):
    first, out2 = run_b["first"], run_b["out"]
    assert first["iteration"] == str(EXIT_AT)
    assert sorted(first["tb"]["lm loss"]) == list(range(1, EXIT_AT + 1))
    assert f"successfully loaded checkpoint from {run_b['root'] / 'ckpt'}" in out2
    assert re.search(rf"successfully loaded checkpoint from .* at iteration {EXIT_AT}\b", out2)
    assert f"iteration        1/      {STEPS}" not in out2              # not from scratch ...
    assert f"iteration       10/      {STEPS}" not in out2
    assert f"iteration       {EXIT_AT + 1}/      {STEPS}" in out2        # ... but from the checkpoint
    assert f"iteration       {STEPS}/      {STEPS}" in out2
    assert (run_b["root"] / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    a, b = run_a["tb"], run_b["tb"]
    # every step before and after the interruption: the same losses, grad norms and lrs, bit for bit
    for tag in ("lm loss", "grad-norm", "learning-rate"):
        assert sorted(b[tag]) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            assert b[tag][step] == a[tag][step], (tag, step, b[tag][step], a[tag][step])
    val_a = _printed_validation(run_a["out"])
    assert _printed_validation(first["out"]) == {k: v for k, v in val_a.items() if k <= EXIT_AT}
    assert _printed_validation(out2) == {k: v for k, v in val_a.items() if k > EXIT_AT}
    for step in range(5, STEPS, 5):  # (step 30 of run_a's TensorBoard is its final evaluation)
        assert b["lm loss validation"][step] == a["lm loss validation"][step], step


def test_raise_train_iters_to_continue(run_a, run_c):
    """A finished run continued to more steps: it resumes at the checkpoint's iteration, the lr follows
    the linear decay over the new length (--override-opt_param-scheduler: the schedule is the config's),
    the loss stays finite and low, and the checkpoint and its config say 40."""
    out, tb, root = run_c["out"], run_c["tb"], run_c["root"]
    assert re.search(rf"successfully loaded checkpoint from .* at iteration {STEPS}\b", out)
    assert f"iteration       {CONTINUE_TO}/      {CONTINUE_TO}" in out
    assert f"iteration       {STEPS}/      {CONTINUE_TO}" not in out  # not retrained from scratch
    steps = list(range(STEPS + 1, CONTINUE_TO + 1))
    assert sorted(tb["lm loss"]) == steps
    for k in steps:  # Megatron logs the lr after step k: min + (max - min) * (1 - k / 40)
        assert tb["learning-rate"][k] == pytest.approx(MIN_LR + (LR - MIN_LR) * (1 - k / CONTINUE_TO), rel=1e-6), k
    assert tb["learning-rate"][STEPS + 1] > 2 * MIN_LR  # the old 30-step schedule would be at min_lr already
    losses = [tb["lm loss"][k] for k in steps]
    assert all(math.isfinite(x) for x in losses)
    a = run_a["tb"]["lm loss"]  # measured: 5.97 at step 1, mean 2.44 over steps 31-40
    mean, mean_a = sum(losses) / len(losses), sum(a[k] for k in range(STEPS - 9, STEPS + 1)) / 10
    assert mean < a[1] - 3.0 and mean < mean_a + 0.1, (losses, mean_a)
    val, val_a = _printed_validation(out), _printed_validation(run_a["out"])
    assert sorted(val) == [35, 40] and all(math.isfinite(v) for v in val.values())
    assert val[CONTINUE_TO] < val_a[5] and val[CONTINUE_TO] < val_a[STEPS] + 0.1, (val, val_a)
    assert (root / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(CONTINUE_TO)
    from megatron_hyperball.config import load_config

    assert load_config(root / "ckpt" / "hyperball_config.yaml").schedule.train_iters == CONTINUE_TO


def test_failed_resume_leaves_the_saved_config(workdir, run_a):
    """hyperball_config.yaml always describes the checkpoint beside it: a rerun that cannot resume
    leaves it byte for byte. A changed model is refused before anything starts (naming the key); a
    change only Megatron's checkpoint loader refuses (MuonH's optimizer state loaded as AdamH's) fails
    after the process groups exist, before any save, so the config is not rewritten either."""
    ckpt = workdir / "d" / "ckpt"
    shutil.copytree(workdir / "a" / "ckpt", ckpt)
    saved = ckpt / "hyperball_config.yaml"
    before = saved.read_bytes()
    base = _overrides(workdir, workdir / "data", "d")
    rc, out = _launch(workdir, base + ["model.hidden_size=256"], timeout=120)
    assert rc != 0 and out.count(f"invalid config ({QUICKSTART}):") == 1, out[-4000:]
    assert f"model.hidden_size: 256, but the checkpoint this run resumes (checkpoint.save {ckpt}, iteration " \
           f"{STEPS}) has 128" in out
    assert "initializing torch distributed" not in out
    assert saved.read_bytes() == before
    rc, out = _launch(workdir, base + ["optimizer.name=adamh"], timeout=300)
    assert rc != 0 and "initializing torch distributed" in out and "not in state dict" in out, out[-4000:]
    assert saved.read_bytes() == before
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)


# -- invalid configs --------------------------------------------------------------------------------
# case -> (overrides, world size, the message)
INVALID = {
    "unknown_key": (["model.num_layer=4"], 1, "model.num_layer: unknown key; allowed keys of model:"),
    "unknown_top_level_key": (["epochs=3"], 1, "epochs: unknown key"),
    "tp_not_dividing_heads": (["--set", "parallelism.tp=3"], 3,
                              "parallelism.tp: 3 does not divide model.num_attention_heads=4"),
    "sphere_weight_decay": (["optimizer.sphere_weight_decay=0.1"], 1,
                            "optimizer.sphere_weight_decay: 0.1: weight decay is a first-order no-op on the sphere"),
    "batch_vs_ranks": (["schedule.global_batch_size=24"], 2,
                       "schedule.global_batch_size: 24 is not divisible by schedule.micro_batch_size * "
                       "data-parallel size = 8 * 2"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_stops_before_anything(case, tmp_path, monkeypatch, capsys):
    from megatron_hyperball.pretrain import entry

    args, world_size, message = INVALID[case]
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    rc = entry.main(["--config", str(QUICKSTART), f"checkpoint.save={ckpt}", *args])
    captured = capsys.readouterr()
    assert rc == entry.EXIT_CONFIG_ERROR == 2
    assert f"invalid config ({QUICKSTART}):\n" in captured.err, captured.err
    assert message in captured.err, captured.err
    assert "[hyperball] lr" not in captured.out  # stopped before the start-of-run report
    assert not torch.distributed.is_initialized()
    assert list(tmp_path.iterdir()) == []  # no checkpoint, data, TensorBoard or W&B dir


def test_invalid_config_under_torchrun(tmp_path):
    rc, out = _launch(tmp_path, ["--config", str(QUICKSTART), f"checkpoint.save={tmp_path / 'ckpt'}",
                                 "optimizer.sphere_weight_decay=0.1", "parallelism.tp=3"], timeout=120)
    assert rc != 0
    assert "exitcode  : 2" in out  # both ranks exit with the config-error status
    assert out.count(f"invalid config ({QUICKSTART}):") == 1  # reported once per node
    assert "optimizer.sphere_weight_decay: 0.1" in out and "parallelism.tp: 3 does not divide" in out
    assert "initializing torch distributed" not in out and "[hyperball] lr" not in out
    assert list(tmp_path.iterdir()) == []


# -- the shipped configs ----------------------------------------------------------------------------
def test_configs_pass_megatrons_validate_args(tmp_path):
    """Every config through Megatron's parser and validate_args: AdamW / AdamH / AdamMD stay on the ZeRO-1
    distributed optimizer, MuonH / MuonMD go to the layer-wise optimizer, the hyperball name (and MD's
    gain options) reach the optimizer factory, the lr is the LR law's, and --load = --save (resume)."""
    configs = sorted((REPO_ROOT / "configs").glob("gpt_*.yaml"))
    assert len(configs) == 13
    out = tmp_path / "args.json"
    worker = REPO_ROOT / "tests" / "workers" / "pretrain_args_check.py"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(worker), str(out), "16", *map(str, configs)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for path in configs:
        r = result[path.name]
        assert r["lr"] == pytest.approx(r["resolved_lr"], rel=1e-12)
        assert r["load"] == r["save"] and r["save"].startswith("runs/")
        assert r["data_parallel_size"] == 16
        if r["name"] in ("adamw", "adamh", "adammd"):
            megatron_name = {"adamw": "adam"}.get(r["name"], r["name"])
            assert (r["args_optimizer"], r["use_distributed_optimizer"], r["use_layer_wise_distributed_optimizer"]) \
                == (megatron_name, True, False), r
            assert r["config_optimizer"] == megatron_name
        else:
            assert (r["args_optimizer"], r["use_distributed_optimizer"], r["use_layer_wise_distributed_optimizer"]) \
                == (r["name"], False, True), r
            assert r["config_optimizer"] == r["name"]
        if r["name"].endswith("md"):  # seed 004's recipe
            assert r["md"] == ["row_col", "softplus", 1e-3] and r["hyperball"] == ["sqrt_max_dim", "shape"], r
    assert result["gpt_125m_muonh.yaml"]["lr"] == pytest.approx(0.00642859, rel=1e-5)
    # MD: eta0 * sqrt(B/B0) * (T/T0)^-0.25, no depth factor (d0 = depth)
    assert result["gpt_125m_muonmd.yaml"]["lr"] == pytest.approx(0.01 * 0.5 * (4800 * 2**19 / 10.4e9) ** -0.25,
                                                                 rel=1e-12)
    assert result["gpt_350m_adammd.yaml"]["lr"] == pytest.approx(1e-3 * 0.5 * (13400 * 2**19 / 10.4e9) ** -0.25,
                                                                 rel=1e-12)
    assert result["gpt_1.3b_adamw.yaml"]["lr"] == 2e-4


@pytest.mark.parametrize("world,names", [(16, ("moe_d8_muonh_sqrtgate", "moe_seed004_muonmd")), (2, ("quickstart_moe",))])
def test_moe_configs_pass_megatrons_validate_args(tmp_path, world, names):
    """The MoE configs through Megatron's parser and validate_args: the MoE keys arrive (HyperP's global
    aux loss at 0.1 for the SqrtGate recipe), the optimizer runs where it should, the lr is the law's."""
    from megatron_hyperball.config import launch_problems, load_config

    configs = [REPO_ROOT / "configs" / f"{n}.yaml" for n in names]
    for path in configs:
        assert launch_problems(load_config(path), world, cpu=path.stem.startswith("quickstart")) == [], path
    out = tmp_path / "args.json"
    worker = REPO_ROOT / "tests" / "workers" / "pretrain_args_check.py"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(worker), str(out), str(world), *map(str, configs)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for path in configs:
        r = result[path.name]
        assert r["lr"] == pytest.approx(r["resolved_lr"], rel=1e-12) and r["load"] == r["save"]
        assert (r["use_distributed_optimizer"], r["use_layer_wise_distributed_optimizer"]) == (False, True), r
        assert r["config_optimizer"] == r["name"] and r["data_parallel_size"] == world
    if world == 16:
        assert result["moe_d8_muonh_sqrtgate.yaml"]["lr"] == pytest.approx(0.00622527, rel=1e-5)
        assert result["moe_seed004_muonmd.yaml"]["lr"] == pytest.approx(0.00458719, rel=1e-5)


def test_launchers_print_the_command(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\necho \"ran: $*\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), NPROC="3", OMP_NUM_THREADS="1")
    single = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "launch_single_node.sh"), "--config", "c.yaml"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert single.returncode == 0, single.stderr
    checked, printed, ran = single.stdout.splitlines()[:3]
    assert checked == f"ran: {SCRIPT} --check-only --config c.yaml"  # the config first, before torchrun
    assert printed.startswith("+ OMP_NUM_THREADS=1 ") and "--standalone --nproc-per-node 3" in printed
    assert ran == f"ran: -m torch.distributed.run --standalone --nproc-per-node 3 {SCRIPT} --config c.yaml"
    multi_env = dict(env, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    multi = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "launch_multi_node.sh"), "--config", "c.yaml"],
                           env=multi_env, capture_output=True, text=True, timeout=60)
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.splitlines()[0] == f"ran: {SCRIPT} --check-only --config c.yaml"
    assert ("--nnodes 2 --node-rank 1 --nproc-per-node 3 --master-addr 10.0.0.1 --master-port 29500"
            in multi.stdout.splitlines()[1])
    missing = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "launch_multi_node.sh")],
                             env=dict(env, NNODES="2"), capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "NODE_RANK" in missing.stderr


@pytest.mark.gpu
def test_quickstart_on_gpu(tmp_path):
    """The same entry on GPUs (skipped without CUDA): Megatron's GPU path, no CPU layer."""
    nproc = min(2, torch.cuda.device_count())
    args = _overrides(tmp_path, tmp_path / "data", "gpu")
    args[args.index("schedule.eval_interval=5")] = "schedule.eval_interval=10"
    rc, out = _launch(tmp_path, args + [f"schedule.global_batch_size={8 * nproc}"], nproc=nproc, cpu=False)
    assert rc == 0, out[-6000:]
    assert "--distributed-backend gloo" not in out
    val = _printed_validation(out)
    assert val[STEPS] < val[10], val
    assert (tmp_path / "gpu" / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)


QUICKSTART_MOE = REPO_ROOT / "configs" / "quickstart_moe.yaml"
MOE_STEPS, MOE_EXIT = 16, 8


def _moe_args(root: Path, name: str) -> list[str]:
    return ["--config", str(QUICKSTART_MOE), f"schedule.train_iters={MOE_STEPS}", "schedule.eval_interval=8",
            "schedule.eval_iters=2", f"data.embedded_dir={root / 'data'}", "data.embedded_max_mb=2",
            f"checkpoint.save={root / name / 'ckpt'}", f"logging.tensorboard_dir={root / name / 'tb'}",
            "logging.metrics_interval=4", f"logging.wandb.name={name}"]


def test_quickstart_moe_trains_and_resumes_bitwise(tmp_path):
    """configs/quickstart_moe.yaml (SqrtGate + shared expert, 8 experts top-2, EP = 2, MuonH, HyperP's
    global aux loss 0.1) through the real entry: the SqrtGate spec is built, MuonH runs layer-wise, the
    aux loss is Megatron's global one at weight 0.1 (given to Megatron as 0.1 x dp), the router stays on
    its sphere, the held-out loss falls; interrupted at step 8 and run again, every step's loss, grad
    norm and lr equal the uninterrupted run's bit for bit."""
    code, out = _launch(tmp_path, _moe_args(tmp_path, "a"))
    assert code == 0, out[-4000:]
    assert "SqrtGate, shared-expert fraction p = 0.5" in out
    assert "global aux loss weight 0.1 (Megatron's coefficient 0.2 = it x dp 2)" in out
    assert "--moe-router-load-balancing-type global_aux_loss" in out and "--expert-model-parallel-size 2" in out
    assert "[hyperball] optimizer: LayerWiseDistributedOptimizer > Float16OptimizerWithFloat16Params > " \
           "TensorParallelMuonH (megatron_hyperball)" in out
    a = tb_scalars(tmp_path / "a" / "tb")
    val = _printed_validation(out)
    assert sorted(val) == [8, 16] and val[16] < val[8] < a["lm loss"][1] - 2.0, (val, a["lm loss"][1])
    assert sorted(a["global_load_balancing_loss"]) == list(range(1, MOE_STEPS + 1))
    router = list(a["hyperball/weight_norm/router"].values())
    assert max(router) / min(router) - 1 < 1e-3, router  # frobenius: the router keeps its norm

    args = _moe_args(tmp_path, "b") + ["--exit-interval", str(MOE_EXIT)]
    for _ in range(2):  # the same command twice: stops at 8, then resumes to 16
        code, out_b = _launch(tmp_path, args)
        assert code == 0, out_b[-4000:]
    assert re.search(rf"successfully loaded checkpoint from .* at iteration {MOE_EXIT}\b", out_b)
    b = tb_scalars(tmp_path / "b" / "tb")
    for tag in ("lm loss", "grad-norm", "learning-rate", "global_load_balancing_loss"):
        assert sorted(b[tag]) == list(range(1, MOE_STEPS + 1)), tag
        for step in range(1, MOE_STEPS + 1):
            assert b[tag][step] == a[tag][step], (tag, step, b[tag][step], a[tag][step])
    assert _printed_validation(out_b) == {16: val[16]}


def test_muonmd_quickstart_trains_through_the_entry(tmp_path, workdir, run_a):
    """configs/quickstart_muonmd.yaml (MuonMD, seed 004's recipe) through the real entry and Megatron's
    loop: MuonMD runs layer-wise, the held-out loss falls, the direction stays on its sphere (||V|| constant)
    while the gains move, in TensorBoard."""
    args = _overrides(tmp_path, workdir / "data", "muonmd")
    args[args.index("--config") + 1] = str(REPO_ROOT / "configs" / "quickstart_muonmd.yaml")
    code, out = _launch(tmp_path, args + ["schedule.train_iters=20", "schedule.eval_interval=10"])
    assert code == 0, out[-4000:]
    assert "--optimizer muonmd " in out and "--md-gains row_col" in out
    assert "[hyperball] optimizer: LayerWiseDistributedOptimizer > Float16OptimizerWithFloat16Params > " \
           "TensorParallelMuonMD (megatron_hyperball)" in out
    val = _printed_validation(out)
    tb = tb_scalars(tmp_path / "muonmd" / "tb")
    # measured: training loss 5.9 at step 1; held-out 4.17 at step 10, 3.74 at step 20 (the Adam groups' fixed
    # lrs of 1e-3 / 3e-3 start slower than the quickstart's 0.03; 1.59 at step 300)
    assert val[10] < tb["lm loss"][1] - 1.0 and val[20] < val[10] - 0.2, (val, tb["lm loss"][1])
    for kind in SPHERE_TYPES:
        norms = list(tb[f"hyperball/direction_norm/{kind}"].values())
        assert sorted(tb[f"hyperball/direction_norm/{kind}"]) == [5, 10, 15, 20]
        assert max(norms) / min(norms) - 1 < 1e-3, (kind, norms)
        assert tb[f"hyperball/gain_max/{kind}"][20] > 1 > tb[f"hyperball/gain_min/{kind}"][20], kind
