"""scripts/lr_sweep.py / megatron_hyperball.sweep: grid, resumption, log parsing, fit, emitted commands.

No training: runs go through a fake runner that writes a Megatron-format log.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from megatron_hyperball import sweep as sw

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")

# as printed by megatron.training.training.evaluate_and_print_results
REAL_LOG = """\
 [2025-01-01 00:00:00] iteration      290/     300 | consumed samples:         4640 | lm loss: 1.901234E+00 |
--------------------------------------------------------------------------------------------------------------
 validation loss at iteration 275 | lm loss value: 1.893311E+00 | lm loss PPL: 6.640916E+00 |
--------------------------------------------------------------------------------------------------------------
--------------------------------------------------------------------------------------------------------------
 validation loss at iteration 300 | lm loss value: 1.873012E+00 | lm loss PPL: 6.507481E+00 |
--------------------------------------------------------------------------------------------------------------
saving checkpoint at iteration     300 to runs/quickstart/ckpt in torch_dist format
-----------------------------------------------------------------------------------------------------------------------------
 validation loss at iteration 300 on validation set | lm loss value: 1.859455E+00 | lm loss PPL: 6.419865E+00 |
-----------------------------------------------------------------------------------------------------------------------------
"""


def _log(loss: float, it: int = 20) -> str:
    return (f" validation loss at iteration {it} | lm loss value: {loss + 0.01:.6E} | lm loss PPL: 1.0E+00 |\n"
            f" validation loss at iteration {it} on validation set | lm loss value: {loss:.17E} | lm loss PPL: 1.0E+00 |\n")


def _lr_of(cmd):
    return float(next(a for a in cmd if a.startswith("optimizer.lr=")).split("=", 1)[1])


def _width_of(cmd):
    hs = [a for a in cmd if a.startswith("model.hidden_size=")]
    return int(hs[0].split("=", 1)[1]) if hs else 128


class FakeRunner:
    """Loss = (log lr - log opt(width))^2 + 1; records calls; fails the runs named in ``fail``."""

    def __init__(self, fail=(), nan=()):
        self.calls, self.fail, self.nan = [], set(fail), set(nan)

    def __call__(self, cmd, log_path: Path, env) -> int:
        self.calls.append(cmd)
        lr, w = _lr_of(cmd), _width_of(cmd)
        name = log_path.parent.name
        if name in self.fail:
            log_path.write_text("Traceback: RuntimeError: boom\n")
            return 1
        if name in self.nan:
            log_path.write_text("RuntimeError: Rerun validation: loss is NaN\n")
            return 1
        opt = 0.01 * (128 / w)
        log_path.write_text(_log(1.0 + (math.log(lr) - math.log(opt)) ** 2))
        return 0


def _sweep(tmp_path, lrs="0.003,0.01,0.03,0.1", sets=("model.hidden_size=64,128",), extra=("schedule.train_iters=20",)):
    return sw.build_sweep(QUICKSTART, lrs, list(sets), list(extra), str(tmp_path / "sweep"))


def test_parse_real_megatron_log():
    r = sw.parse_validation_loss(REAL_LOG)
    assert r["loss"] == pytest.approx(1.859455) and r["iteration"] == 300 and r["source"] == "final evaluation"
    assert r["last_inloop_loss"] == pytest.approx(1.873012)
    inloop = sw.parse_validation_loss(REAL_LOG.split("saving")[0])
    assert inloop["loss"] == pytest.approx(1.873012) and inloop["source"] == "in-loop evaluation"
    assert sw.parse_validation_loss("no evaluation here") is None


def test_fit_exact_parabola_and_bounds():
    opt, a, c = 0.0123, 0.7, 2.5
    lrs = [0.001, 0.003, 0.01, 0.03, 0.1]
    pts = [(lr, a * (math.log(lr) - math.log(opt)) ** 2 + c) for lr in lrs]
    f = sw.fit_optimum(pts)
    assert f.kind == "fit"
    assert abs(math.log(f.lr_opt) - math.log(opt)) < 1e-9 and abs(f.loss_opt - c) < 1e-9
    # the optimum below / above the swept lrs: a bound at the edge, not a fit
    low = sw.fit_optimum([(lr, (math.log(lr) - math.log(1e-4)) ** 2) for lr in lrs])
    assert (low.kind, low.lr_opt) == ("upper", 0.001) and "<=" in low.text()
    high = sw.fit_optimum([(lr, (math.log(lr) - math.log(1.0)) ** 2) for lr in lrs])
    assert (high.kind, high.lr_opt) == ("lower", 0.1) and ">=" in high.text()
    # diverged (None / nan) points are left out; fewer than 3 finite points cannot be fitted
    assert sw.fit_optimum([(0.01, 1.0), (0.03, None), (0.1, float("nan"))]).kind == "none"
    assert sw.fit_optimum([(0.01, 2.0), (0.03, 1.0)]).kind == "lower"


def test_sweep_runs_resumes_and_retries(tmp_path):
    s = _sweep(tmp_path)
    assert len(s.runs) == 8 and [p.name for p in s.points] == ["hidden_size64", "hidden_size128"]
    r0 = s.runs[0]
    assert r0.overrides[:2] == ("schedule.train_iters=20", "model.hidden_size=64")
    assert "optimizer.lr_law=null" in r0.overrides and "logging.wandb.mode=disabled" in r0.overrides
    assert f"checkpoint.save={r0.dir / 'ckpt'}" in r0.overrides

    bad = "hidden_size128_lr0.01"
    runner = FakeRunner(fail={bad})
    states = sw.run_sweep(s, 2, runner=runner, echo=lambda _: None)
    assert len(runner.calls) == 8
    assert states[bad]["status"] == "failed" and (s.out / bad / "failed.json").is_file()
    assert not (s.out / bad / "result.json").exists()
    assert json.loads((s.out / "hidden_size64_lr0.01" / "result.json").read_text())["exit_status"] == 0
    assert (s.out / "hidden_size64_lr0.01" / "train.log").is_file()

    # resumed: only the failed run is repeated, and now succeeds
    runner2 = FakeRunner()
    states = sw.run_sweep(_sweep(tmp_path), 2, runner=runner2, echo=lambda _: None)
    assert [c for c in runner2.calls] and len(runner2.calls) == 1 and _lr_of(runner2.calls[0]) == 0.01
    assert states[bad]["status"] == "done" and not (s.out / bad / "failed.json").exists()

    # everything finished: nothing runs
    runner3 = FakeRunner()
    sw.run_sweep(_sweep(tmp_path), 2, runner=runner3, echo=lambda _: None)
    assert runner3.calls == []

    rep = sw.report(s, sw.collect(s), echo=lambda _: None)
    assert rep["fits"][0].kind == "fit" and rep["fits"][0].lr_opt == pytest.approx(0.02, rel=1e-9)
    assert rep["fits"][1].lr_opt == pytest.approx(0.01, rel=1e-9)
    assert rep["drift"] == pytest.approx(2.0, rel=1e-9)
    # eta0 = lr_opt / law factors at the base point (B = 16*128, depth 4, T = 20*B)
    factors = sw.lr_law.lr_from_run(1.0, global_batch_size=16, seq_length=128, num_layers=4, train_iters=20).lr
    assert rep["eta0"] == pytest.approx(0.02 / factors, rel=1e-9)
    assert rep["law_line"].startswith("lr_law: {eta0: ")
    text = (s.out / "report.md").read_text()
    assert "| model.hidden_size=64 |" in text and "drift factor" in text

    # a different sweep into the same folder is refused before running
    with pytest.raises(sw.SweepError, match="--out"):
        sw.run_sweep(_sweep(tmp_path, extra=("schedule.train_iters=30",)), 2, runner=FakeRunner(),
                     echo=lambda _: None)


def test_diverged_run_recorded_not_retried(tmp_path):
    s = _sweep(tmp_path, sets=())
    runner = FakeRunner(nan={"lr0.03", "lr0.1"})
    states = sw.run_sweep(s, 1, runner=runner, echo=lambda _: None)
    assert states["lr0.1"]["status"] == "diverged"
    runner2 = FakeRunner()
    sw.run_sweep(s, 1, runner=runner2, echo=lambda _: None)
    assert runner2.calls == []
    rep = sw.report(s, sw.collect(s), echo=lambda _: None)
    assert rep["fits"][0].kind == "lower" and "lower bound" in rep["law_line"]


def test_emitted_runs_are_collected(tmp_path):
    s = _sweep(tmp_path, sets=())
    for r in s.runs:  # what an emitted command leaves
        r.dir.mkdir(parents=True)
        (r.dir / "train.log").write_text(_log(1.0 + (math.log(r.lr) - math.log(0.01)) ** 2))
        (r.dir / "exit_status").write_text("0\n")
    runner = FakeRunner()
    states = sw.run_sweep(s, 2, runner=runner, echo=lambda _: None)
    assert runner.calls == [] and all(v["status"] == "done" for v in states.values())


@pytest.mark.parametrize("kwargs, argument", [
    (dict(lrs=""), "--lrs"),
    (dict(lrs=" , "), "--lrs"),
    (dict(lrs="0.01,0"), "--lrs"),
    (dict(lrs="0.01,-0.1"), "--lrs"),
    (dict(lrs="0.01,inf"), "--lrs"),
    (dict(lrs="0.01,nan"), "--lrs"),
    (dict(lrs="0.01,abc"), "--lrs"),
    (dict(sets=("model.hiden_size=64,128",)), "--set model.hiden_size=64,128"),
    (dict(sets=("model.hidden_size=",)), "--set model.hidden_size="),
    (dict(sets=("model.hidden_size",)), "--set model.hidden_size"),
    (dict(sets=("model.hidden_size=64,,128",)), "--set model.hidden_size=64,,128"),
    (dict(sets=("model.hidden_size=64,100",)), "--set model.hidden_size=64,100"),
    (dict(sets=("optimizer.lr=0.1,0.2",)), "--set optimizer.lr=0.1,0.2"),
    (dict(extra=("schedule.trian_iters=5",)), "schedule.trian_iters=5"),
])
def test_bad_grid_refused_naming_argument(tmp_path, kwargs, argument):
    with pytest.raises(sw.SweepError) as e:
        _sweep(tmp_path, **kwargs)
    assert e.value.argument == argument, str(e.value)
    assert not (tmp_path / "sweep").exists()


def test_cli_bad_spec_exit_2(tmp_path):
    p = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "lr_sweep.py"), "--config", QUICKSTART,
                        "--lrs", "0.01", "--set", "model.nope=1,2", "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and "--set model.nope=1,2" in p.stderr and "model.nope" in p.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kind", ["commands", "slurm"])
def test_emit(tmp_path, kind, capsys):
    out = tmp_path / "sweep"
    rc = sw.main(["--config", QUICKSTART, "--lrs", "0.003,0.01", "--set", "model.hidden_size=64,128",
                  "--set", "model.num_layers=2,4", "--out", str(out), "--emit", kind, "--nproc", "2",
                  "schedule.train_iters=20"])
    assert rc == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if "pretrain_gpt.py" in ln]
    assert len(lines) == 8
    seen = set()
    for ln in lines:
        assert "--nproc-per-node 2" in ln and "optimizer.lr_law=null" in ln and "logging.wandb.mode=disabled" in ln
        assert "schedule.train_iters=20" in ln and "train.log" in ln and "exit_status" in ln
        lr = next(t for t in ln.split() if t.startswith("optimizer.lr="))
        hs = next(t for t in ln.split() if t.startswith("model.hidden_size="))
        nl = next(t for t in ln.split() if t.startswith("model.num_layers="))
        seen.add((lr, hs, nl))
        name = f"hidden_size{hs.split('=')[1]}-num_layers{nl.split('=')[1]}_lr{lr.split('=')[1]}"
        assert f"checkpoint.save={out / name / 'ckpt'}" in ln
    assert len(seen) == 8
    if kind == "slurm":
        assert "#SBATCH --array=0-7" in text and text.startswith("#!/bin/bash")
    assert not out.exists()  # nothing written


def test_emitted_command_line_runs_in_shell(tmp_path):
    """One emitted line, with the entry replaced by a fake, leaves train.log and exit_status."""
    s = _sweep(tmp_path, sets=())
    fake = tmp_path / "fake_entry.py"
    fake.write_text("import sys\nprint(' validation loss at iteration 5 on validation set | lm loss value: "
                    "2.5E+00 | x'); print(sys.argv[1:])\n")
    line = sw._shell_line(s, s.runs[0], 1, python=sys.executable).replace(str(sw.ENTRY), str(fake))
    subprocess.run(["bash", "-c", line], check=True, timeout=60)
    assert (s.runs[0].dir / "exit_status").read_text().strip() == "0"
    states = sw.collect(s)
    assert states[s.runs[0].name]["loss"] == 2.5
