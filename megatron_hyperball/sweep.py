"""Learning-rate sweeps through the pretraining entry: grid, run folders, logs, fit, table, plot.

    python scripts/lr_sweep.py --config X.yaml --lrs 0.003,0.01,0.03 --set model.hidden_size=64,128,256 \
        [--set model.num_layers=2,4] [--out runs/sweep_X] [--dry-run | --emit commands | --emit slurm] \
        [--nproc 2] [KEY=VALUE ...]

The grid is the product of ``--lrs`` and every ``--set KEY=V1,V2,...`` list. Each run is the entry
(``scripts/pretrain_gpt.py``) with the extra ``KEY=VALUE`` overrides, its grid point's overrides,
``optimizer.lr=LR optimizer.lr_law=null`` and its own ``checkpoint.save``,
``logging.tensorboard_dir`` and ``logging.wandb.mode=disabled`` under ``<out>/<run name>/``.
Every grid point's config is validated with :func:`load_config` before anything runs; a bad grid
(empty or non-positive lrs, an unknown key, a ``--set`` without values) is refused naming the
argument.

Per run folder: ``train.log`` (stdout and stderr of the entry), ``exit_status``, and
``result.json`` (the final validation loss; written only after the run exited 0 and its log held a
validation loss), or ``failed.json`` (exit status and the log's tail; the run is retried on the next
invocation). A run whose ``result.json`` exists is not repeated; a run diverged to NaN / Inf is
recorded in ``result.json`` with ``"diverged": true`` and ``loss: null`` (not retried). Runs made by
emitted commands (``--emit``) leave ``train.log`` and ``exit_status``; the next invocation without
``--emit`` collects them instead of running them again.

The report (``<out>/report.md``, also printed): loss vs lr per grid point; the optimum per grid
point from a parabola in log(lr) through the best lr and its two neighbours (a best lr at the edge
of the lrs is a bound, ``<= lr`` or ``>= lr``, not a fitted optimum); the drift factor (max / min
optimal lr across grid points); ``<out>/loss_vs_lr.png`` when matplotlib is importable; and the
LR-law line ``lr_law: {eta0: X}``, eta0 = lr_opt / (the law's factors at the base grid point).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from megatron_hyperball.config import lr_law
from megatron_hyperball.config.load import _KEY, load_config, parse_override, resolve_config
from megatron_hyperball.config.schema import ConfigError

__all__ = ["SweepError", "GridPoint", "Run", "Sweep", "Fit", "parse_lrs", "parse_set", "build_sweep",
           "parse_validation_loss", "fit_optimum", "run_sweep", "collect", "report", "emit_commands",
           "emit_slurm", "main"]

RESULT = "result.json"
FAILED = "failed.json"
LOG = "train.log"
EXIT = "exit_status"
ENTRY = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_gpt.py"


class SweepError(ValueError):
    """A bad sweep specification: ``argument`` names the command-line argument at fault."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(f"{argument}: {message}")


# -- the grid ------------------------------------------------------------------------------------

def parse_lrs(text: Optional[str]) -> list[float]:
    """'0.003,0.01,3e-2' -> sorted unique positive finite floats; SweepError('--lrs') otherwise."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise SweepError("--lrs", "no learning rates given; allowed: a comma-separated list of positive numbers, "
                                  "e.g. --lrs 0.003,0.01,0.03")
    lrs = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise SweepError("--lrs", f"{item!r} is not a number; allowed: positive finite numbers") from None
        if not math.isfinite(value) or value <= 0:
            raise SweepError("--lrs", f"{item!r} is not a positive finite number; allowed: lr > 0")
        lrs.append(value)
    if len(set(lrs)) != len(lrs):
        raise SweepError("--lrs", f"a learning rate is given twice in {text!r}; allowed: distinct values")
    return sorted(lrs)


def parse_set(text: str) -> tuple[str, list[Any]]:
    """'model.hidden_size=64,128' -> ('model.hidden_size', [64, 128]) (each value read as YAML).
    Values containing commas (flow lists) go in brackets or braces: ``optimizer.betas=[0.9,0.95],[0.9,0.99]``."""
    arg = f"--set {text}"
    if "=" not in text:
        raise SweepError(arg, "is not KEY=V1,V2,...; allowed: e.g. --set model.hidden_size=64,128,256")
    key, values = text.split("=", 1)
    key = key.strip()
    if not _KEY.match(key):
        raise SweepError(arg, f"{key!r} is not a dotted key path; allowed: e.g. model.hidden_size")
    parts = [p.strip() for p in _split_top_level(values)]
    if not any(parts):
        raise SweepError(arg, "has no values; allowed: KEY=V1,V2,...")
    if not all(parts):
        raise SweepError(arg, f"has an empty value in {values!r}; allowed: KEY=V1,V2,...")
    out = []
    for p in parts:
        try:
            out.append(parse_override(f"{key}={p}")[1])
        except ConfigError as e:
            raise SweepError(arg, "; ".join(m for _, m in e.problems)) from None
    if len({json.dumps(v, sort_keys=True, default=str) for v in out}) != len(out):
        raise SweepError(arg, "a value is given twice; allowed: distinct values")
    return key, out


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside [] and {}."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _yaml_scalar(value: Any) -> str:
    """A value as the text of a KEY=VALUE override (flow YAML, one line)."""
    if isinstance(value, str):
        return value if parse_override(f"k={value}")[1] == value else json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("\n...").strip()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "x"


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One setting of the --set keys (all lrs of a grid point share it)."""

    index: int
    items: tuple[tuple[str, Any], ...]   # (key, value) per --set key, in command-line order
    name: str                            # e.g. 'hidden_size128-num_layers2' ('base' without --set)

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={_yaml_scalar(v)}" for k, v in self.items]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_yaml_scalar(v)}" for k, v in self.items) or "(base)"


@dataclasses.dataclass(frozen=True)
class Run:
    point: GridPoint
    lr: float
    name: str
    dir: Path
    overrides: tuple[str, ...]           # everything after --config, in order

    def argv(self, config: str) -> list[str]:
        return ["--config", config, *self.overrides]


@dataclasses.dataclass
class Sweep:
    config: str
    out: Path
    lrs: list[float]
    keys: list[str]
    points: list[GridPoint]
    runs: list[Run]
    extra: list[str]
    law: dict                            # B0, d0, T0, exponent (the config's lr_law or the defaults)
    factors: dict                        # grid point index -> product of the law's factors there

    def runs_of(self, point: GridPoint) -> list[Run]:
        return [r for r in self.runs if r.point.index == point.index]


def _lr_text(lr: float) -> str:
    return f"{lr:.6g}"


def _point_names(keys: list[str], combos: list[tuple]) -> list[str]:
    lasts = [k.rsplit(".", 1)[-1] for k in keys]
    use = lasts if len(set(lasts)) == len(lasts) else keys
    return ["-".join(f"{_slug(k)}{_slug(_yaml_scalar(v))}" for k, v in zip(use, combo)) or "base"
            for combo in combos]


def _arg_for_problem(path: str, sets: list[str], extra: list[str]) -> str:
    """The command-line argument a config problem at ``path`` comes from."""
    def covers(key: str) -> bool:
        return bool(path) and (path == key or path.startswith(key + ".") or key.startswith(path + "."))
    for s in sets:
        if covers(s.split("=", 1)[0].strip()):
            return f"--set {s}"
    for e in extra:
        if covers(e.split("=", 1)[0].strip()):
            return e
    return "--config"


def build_sweep(config: str, lrs_text: Optional[str], sets: Sequence[str], extra: Sequence[str] = (),
                out: Optional[str] = None) -> Sweep:
    """Parse and validate the whole grid (every grid point's config through ``load_config``);
    raises SweepError naming the argument at fault. Nothing is written."""
    lrs = parse_lrs(lrs_text)
    parsed = [parse_set(s) for s in sets]
    keys = [k for k, _ in parsed]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise SweepError(f"--set {sets[i]}", f"key {k!r} is swept twice; allowed: one --set per key")
        if k in ("optimizer.lr", "optimizer.lr_law"):
            raise SweepError(f"--set {sets[i]}", "the lr is swept by --lrs; allowed: other keys")
    for e in extra:
        if "=" not in e:
            raise SweepError(e, "is not KEY=VALUE; allowed: extra overrides for every run, e.g. schedule.train_iters=200")
        try:
            parse_override(e)
        except ConfigError as err:
            raise SweepError(e, "; ".join(m for _, m in err.problems)) from None
    try:
        config_path = resolve_config(config)
    except ConfigError as err:
        raise SweepError("--config", "; ".join(m for _, m in err.problems)) from None
    config = str(config_path)
    out_dir = Path(out) if out else Path("runs") / f"sweep_{_slug(config_path.stem)}"

    # the law's constants: the config's lr_law when it has one (before the sweep removes it)
    try:
        base_cfg = load_config(config, list(extra))
    except ConfigError as err:
        path, msg = err.problems[0]
        raise SweepError(_arg_for_problem(path, [], list(extra)),
                         "; ".join(f"{p}: {m}" if p else m for p, m in err.problems)) from None
    law_cfg = base_cfg.optimizer.lr_law
    law = dict(B0=lr_law.DEFAULT_B0, d0=lr_law.DEFAULT_D0, T0=lr_law.DEFAULT_T0, exponent=lr_law.DEFAULT_EXPONENT)
    if law_cfg is not None:
        law = dict(B0=law_cfg.B0, d0=law_cfg.d0, T0=law_cfg.T0, exponent=law_cfg.exponent)

    combos = list(itertools.product(*[values for _, values in parsed]))
    names = _point_names(keys, combos)
    points = [GridPoint(i, tuple(zip(keys, combo)), name) for i, (combo, name) in enumerate(zip(combos, names))]
    runs, factors = [], {}
    for point in points:
        for lr in lrs:
            name = f"{point.name}_lr{_lr_text(lr)}" if point.items else f"lr{_lr_text(lr)}"
            rdir = out_dir / name
            overrides = (*extra, *point.overrides, f"optimizer.lr={_lr_text(lr)}", "optimizer.lr_law=null",
                         f"checkpoint.save={rdir / 'ckpt'}", f"logging.tensorboard_dir={rdir / 'tensorboard'}",
                         "logging.wandb.mode=disabled")
            try:
                cfg = load_config(config, list(overrides))
            except ConfigError as err:
                path, _ = err.problems[0]
                detail = "; ".join(f"{p}: {m}" if p else m for p, m in err.problems)
                raise SweepError(_arg_for_problem(path, list(sets), list(extra)),
                                 f"grid point {point.label}, lr {_lr_text(lr)}: {detail}") from None
            runs.append(Run(point, lr, name, rdir, tuple(overrides)))
            if point.index not in factors:
                r = lr_law.lr_from_run(1.0, global_batch_size=cfg.schedule.global_batch_size,
                                       seq_length=cfg.model.seq_length, num_layers=cfg.model.num_layers,
                                       train_iters=cfg.schedule.train_iters, **law)
                factors[point.index] = r.lr  # eta0 = 1: the product of the factors
    return Sweep(config, out_dir, lrs, keys, points, runs, list(extra), law, factors)


# -- commands ------------------------------------------------------------------------------------

def entry_command(nproc: int, python: Optional[str] = None, torchrun: Optional[str] = None) -> list[str]:
    """The launcher + entry: ``torchrun --standalone --nproc-per-node N scripts/pretrain_gpt.py`` or
    ``python scripts/pretrain_gpt.py`` when N = 1."""
    python = python or sys.executable
    if nproc == 1:
        return [python, str(ENTRY)]
    if torchrun is None:
        candidate = Path(python).parent / "torchrun"
        torchrun = str(candidate) if candidate.exists() else (shutil.which("torchrun") or "torchrun")
    return [torchrun, "--standalone", "--nproc-per-node", str(nproc), str(ENTRY)]


def run_command(sweep: Sweep, run: Run, nproc: int, **kw) -> list[str]:
    return [*entry_command(nproc, **kw), *run.argv(sweep.config)]


def _shell_line(sweep: Sweep, run: Run, nproc: int, **kw) -> str:
    d = shlex.quote(str(run.dir))
    cmd = " ".join(shlex.quote(a) for a in run_command(sweep, run, nproc, **kw))
    if nproc == 1:  # a plain python process still initialises torch.distributed from the environment
        port = 29500 + 1 + sweep.runs.index(run) % 1000
        cmd = f"env MASTER_ADDR=127.0.0.1 MASTER_PORT={port} RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 {cmd}"
    return f"mkdir -p {d} && {{ {cmd} ; }} > {d}/{LOG} 2>&1; echo $? > {d}/{EXIT}"


def emit_commands(sweep: Sweep, nproc: int, runs: Optional[list[Run]] = None, **kw) -> str:
    runs = sweep.runs if runs is None else runs
    head = [f"# lr sweep: {len(runs)} runs (of {len(sweep.runs)}; finished ones left out), run from "
            f"{shlex.quote(os.getcwd())}",
            "# afterwards, the same lr_sweep command without --emit collects the results and writes the report"]
    return "\n".join(head + [_shell_line(sweep, r, nproc, **kw) for r in runs]) + "\n"


def emit_slurm(sweep: Sweep, nproc: int, runs: Optional[list[Run]] = None, **kw) -> str:
    runs = sweep.runs if runs is None else runs
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=lr_sweep_{_slug(sweep.out.name)}",
             f"#SBATCH --array=0-{max(len(runs) - 1, 0)}",
             "#SBATCH --nodes=1",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={max(nproc, 1)}",
             f"#SBATCH --output={sweep.out}/slurm-%A_%a.out",
             f"# lr sweep: {len(runs)} runs (one array task each); afterwards, the same lr_sweep command",
             "# without --emit collects the results and writes the report.",
             "set -u",
             f"cd {shlex.quote(os.getcwd())}",
             'case "$SLURM_ARRAY_TASK_ID" in']
    lines += [f"  {i}) {_shell_line(sweep, r, nproc, **kw)}; exit \"$(cat {shlex.quote(str(r.dir))}/{EXIT})\" ;;"
              for i, r in enumerate(runs)]
    lines += ['  *) echo "no run for task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac"]
    return "\n".join(lines) + "\n"


# -- logs ----------------------------------------------------------------------------------------

_VALID = re.compile(r"validation loss at iteration (\d+)( on validation set)? \| lm loss value: ([-+0-9.eE]+|nan|inf)",
                    re.IGNORECASE)
_DIVERGED = re.compile(r"loss is NaN|found NaN|found Inf|is not finite|lm loss: nan", re.IGNORECASE)


def parse_validation_loss(text: str) -> Optional[dict]:
    """The final validation loss in a Megatron log: the last ``validation loss at iteration N on
    validation set | lm loss value: X`` line (the evaluation after training) if there is one, else the
    in-loop evaluation at the largest iteration. None if no line."""
    final, inloop = None, None
    for m in _VALID.finditer(text):
        it, value = int(m.group(1)), float(m.group(3))
        if m.group(2):
            final = (it, value)
        elif inloop is None or it >= inloop[0]:
            inloop = (it, value)
    chosen, source = (final, "final evaluation") if final else (inloop, "in-loop evaluation")
    if chosen is None:
        return None
    out = {"loss": chosen[1], "iteration": chosen[0], "source": source}
    if inloop is not None:
        out["last_inloop_loss"], out["last_inloop_iteration"] = inloop[1], inloop[0]
    return out


def tensorboard_validation_loss(directory: Path) -> Optional[dict]:
    """The last ``lm loss validation`` scalar of a TensorBoard folder (None if unreadable)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except Exception:
        return None
    if not Path(directory).is_dir():
        return None
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    if "lm loss validation" not in acc.Tags().get("scalars", []):
        return None
    events = acc.Scalars("lm loss validation")
    if not events:
        return None
    last = events[-1]
    return {"loss": float(last.value), "iteration": int(last.step), "source": "tensorboard"}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _finish(run: Run, status: int, log_text: str) -> dict:
    """Record a run that exited with ``status``: result.json (success / diverged) or failed.json."""
    parsed = parse_validation_loss(log_text) if status == 0 else None
    if status == 0 and parsed is None:
        parsed = tensorboard_validation_loss(run.dir / "tensorboard")
    base = {"run": run.name, "lr": run.lr, "point": run.point.label, "overrides": list(run.overrides),
            "exit_status": status}
    if parsed is not None and math.isfinite(parsed["loss"]):
        data = {**base, **parsed, "diverged": False}
        (run.dir / FAILED).unlink(missing_ok=True)
        _write_json(run.dir / RESULT, data)
        return {"status": "done", **data}
    if _DIVERGED.search(log_text) or (parsed is not None and not math.isfinite(parsed["loss"])):
        data = {**base, "loss": None, "diverged": True}
        (run.dir / FAILED).unlink(missing_ok=True)
        _write_json(run.dir / RESULT, data)
        return {"status": "diverged", **data}
    why = "exited 0 but its log has no validation loss" if status == 0 else f"exit status {status}"
    data = {**base, "error": why, "log_tail": log_text[-2000:]}
    _write_json(run.dir / FAILED, data)
    return {"status": "failed", **data}


def _check_same_run(run: Run, data: dict) -> None:
    if data.get("overrides") is not None and list(data["overrides"]) != list(run.overrides):
        raise SweepError("--out", f"{run.dir} holds a run made with other overrides ({' '.join(data['overrides'])}); "
                                  f"allowed: the same sweep command, or a new --out")


def state(run: Run) -> dict:
    """'done' / 'diverged' (result.json), 'collectable' (exit_status 0 from an emitted command, not
    collected yet), 'failed' (failed.json or a non-zero exit_status), or 'pending'."""
    result = _read_json(run.dir / RESULT)
    if result is not None:
        _check_same_run(run, result)
        return {"status": "diverged" if result.get("diverged") else "done", **result}
    exit_file = run.dir / EXIT
    if exit_file.is_file() and (run.dir / LOG).is_file():
        text = exit_file.read_text().strip()
        if text == "0":
            return {"status": "collectable"}
    failed = _read_json(run.dir / FAILED)
    if failed is not None:
        return {"status": "failed", **failed}
    if exit_file.is_file():
        return {"status": "failed", "error": f"exit status {exit_file.read_text().strip()}"}
    return {"status": "pending"}


Runner = Callable[[list[str], Path, dict], int]


def subprocess_runner(cmd: list[str], log_path: Path, env: dict) -> int:
    """Run ``cmd`` with stdout and stderr to ``log_path``; returns the exit status."""
    with open(log_path, "wb") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL).returncode


def run_sweep(sweep: Sweep, nproc: int = 2, runner: Runner = subprocess_runner,
              echo: Callable[[str], None] = print, **kw) -> dict[str, dict]:
    """Run every run that has no result, in order; returns run name -> state."""
    states = {r.name: state(r) for r in sweep.runs}   # checks every folder before running anything
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if nproc == 1:  # plain python: torch.distributed's env:// rendezvous needs these
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                   WORLD_SIZE="1")
    todo = [r for r in sweep.runs if states[r.name]["status"] not in ("done", "diverged")]
    echo(f"[lr_sweep] {len(sweep.runs)} runs, {len(sweep.runs) - len(todo)} finished, {len(todo)} to do")
    for i, run in enumerate(todo, 1):
        run.dir.mkdir(parents=True, exist_ok=True)
        log_path = run.dir / LOG
        if states[run.name]["status"] == "collectable":
            states[run.name] = _finish(run, 0, log_path.read_text(errors="replace"))
            if states[run.name]["status"] != "failed":
                echo(f"[lr_sweep] ({i}/{len(todo)}) {run.name}: collected, {_fmt_state(states[run.name])}")
                continue
        cmd = run_command(sweep, run, nproc, **kw)
        echo(f"[lr_sweep] ({i}/{len(todo)}) {run.name}: {' '.join(shlex.quote(c) for c in cmd)}")
        (run.dir / EXIT).unlink(missing_ok=True)
        status = runner(cmd, log_path, env)
        (run.dir / EXIT).write_text(f"{status}\n")
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        states[run.name] = _finish(run, status, text)
        echo(f"[lr_sweep] ({i}/{len(todo)}) {run.name}: {_fmt_state(states[run.name])}")
    return states


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fmt_state(s: dict) -> str:
    if s["status"] == "done":
        return f"validation loss {s['loss']:.4f} (iteration {s.get('iteration')}, {s.get('source')})"
    if s["status"] == "diverged":
        return "diverged (NaN / Inf)"
    return f"FAILED ({s.get('error', '?')}); retried on the next invocation"


def collect(sweep: Sweep) -> dict[str, dict]:
    """The state of every run, without running anything (emitted runs finished with 0 are collected)."""
    states = {}
    for run in sweep.runs:
        s = state(run)
        if s["status"] == "collectable":
            s = _finish(run, 0, (run.dir / LOG).read_text(errors="replace"))
        states[run.name] = s
    return states


# -- fit -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Fit:
    lr_opt: Optional[float]          # the fitted optimum, or the bound's lr
    loss_opt: Optional[float]        # the parabola's minimum (the best loss for a bound)
    kind: str                        # 'fit', 'upper' (optimum <= lr_opt), 'lower' (optimum >= lr_opt), 'none'
    best_lr: Optional[float] = None
    best_loss: Optional[float] = None

    def text(self) -> str:
        if self.kind == "fit":
            return f"{self.lr_opt:.4g}"
        if self.kind == "upper":
            return f"<= {self.lr_opt:.4g} (best at the smallest lr)"
        if self.kind == "lower":
            return f">= {self.lr_opt:.4g} (best at the largest lr)"
        return "n/a"


def fit_optimum(points: Sequence[tuple[float, Optional[float]]]) -> Fit:
    """The optimal lr from (lr, loss) pairs (None / non-finite losses are left out): a parabola in
    log(lr) through the best point and its two neighbours in lr. A best point at either end of the
    finite points is a bound; fewer than 3 finite points give a bound or nothing."""
    pts = sorted((float(lr), float(loss)) for lr, loss in points if loss is not None and math.isfinite(loss))
    if not pts:
        return Fit(None, None, "none")
    i = min(range(len(pts)), key=lambda j: (pts[j][1], j))
    best_lr, best_loss = pts[i]
    if len(pts) < 3 or i == 0 or i == len(pts) - 1:
        kind = "upper" if i == 0 and len(pts) > 1 else "lower" if i == len(pts) - 1 and len(pts) > 1 else "none"
        return Fit(best_lr if kind != "none" else None, best_loss if kind != "none" else None, kind, best_lr, best_loss)
    (x0, y0), (x1, y1), (x2, y2) = [(math.log(lr), loss) for lr, loss in pts[i - 1:i + 2]]
    # Newton form: y = y0 + d01 (x - x0) + a (x - x0)(x - x1)
    d01 = (y1 - y0) / (x1 - x0)
    d12 = (y2 - y1) / (x2 - x1)
    a = (d12 - d01) / (x2 - x0)
    if not a > 0:  # flat: the best point itself
        return Fit(best_lr, best_loss, "fit", best_lr, best_loss)
    b = d01 - a * (x0 + x1)             # y = a x^2 + b x + c
    xs = -b / (2 * a)
    ys = y0 + d01 * (xs - x0) + a * (xs - x0) * (xs - x1)
    return Fit(math.exp(xs), ys, "fit", best_lr, best_loss)


# -- report --------------------------------------------------------------------------------------

def _loss_cell(s: dict) -> str:
    if s["status"] == "done":
        return f"{s['loss']:.4f}"
    if s["status"] == "diverged":
        return "diverged"
    return s["status"]


def report(sweep: Sweep, states: dict[str, dict], base_point: int = 0, plot: bool = True,
           echo: Callable[[str], None] = print) -> dict:
    """Fits, the markdown table (``<out>/report.md``), the drift factor, the PNG and the eta0 line."""
    fits = {}
    for p in sweep.points:
        fits[p.index] = fit_optimum([(r.lr, states[r.name].get("loss") if states[r.name]["status"] == "done"
                                      else None) for r in sweep.runs_of(p)])
    lr_cols = [_lr_text(lr) for lr in sweep.lrs]
    head = ["grid point", *[f"lr {c}" for c in lr_cols], "lr_opt", "loss at lr_opt", "eta0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    eta0s = {}
    for p in sweep.points:
        f = fits[p.index]
        eta = f.lr_opt / sweep.factors[p.index] if f.lr_opt is not None else None
        eta0s[p.index] = eta
        cells = [p.label, *[_loss_cell(states[r.name]) for r in sweep.runs_of(p)], f.text(),
                 f"{f.loss_opt:.4f}" if f.loss_opt is not None else "n/a",
                 (("<= " if f.kind == "upper" else ">= " if f.kind == "lower" else "") + f"{eta:.4g}")
                 if eta is not None else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    opts = [f.lr_opt for f in fits.values() if f.lr_opt is not None]
    all_fitted = all(f.kind == "fit" for f in fits.values())
    drift = max(opts) / min(opts) if opts else None
    drift_line = ("drift factor (max / min optimal lr across the grid): "
                  + (f"{drift:.3g}" if drift is not None else "n/a")
                  + ("" if all_fitted or drift is None else " (some optima are bounds: the drift is a rough value)"))
    bp = sweep.points[base_point]
    bf = fits[bp.index]
    law_extra = "".join(f", {k}: {v:g}" for k, v in sweep.law.items()
                        if v != {"B0": lr_law.DEFAULT_B0, "d0": lr_law.DEFAULT_D0, "T0": lr_law.DEFAULT_T0,
                                 "exponent": lr_law.DEFAULT_EXPONENT}[k])
    if eta0s[bp.index] is not None:
        note = {"fit": "", "upper": "  # an upper bound: the best lr is the smallest swept",
                "lower": "  # a lower bound: the best lr is the largest swept"}[bf.kind]
        law_line = f"lr_law: {{eta0: {eta0s[bp.index]:.4g}{law_extra}}}{note}"
    else:
        law_line = "# lr_law: no eta0 (the base grid point has no finished run)"
    factors_line = (f"eta0 = lr_opt / {sweep.factors[bp.index]:.6g} (the law's factors sqrt(B/B0) * sqrt(d0/depth) * "
                    f"(T/T0)^-exponent at the base grid point {bp.label})")
    png = sweep.out / "loss_vs_lr.png"
    png_line = _plot(sweep, states, fits, png) if plot else "plot: not requested"
    text = "\n".join([f"# lr sweep: {sweep.config}", "", f"extra overrides: {' '.join(sweep.extra) or '(none)'}", "",
                      table, "", drift_line, factors_line, png_line, "", "```yaml", law_line, "```", ""])
    sweep.out.mkdir(parents=True, exist_ok=True)
    (sweep.out / "report.md").write_text(text)
    echo(text)
    return {"fits": fits, "drift": drift, "eta0": eta0s.get(bp.index), "law_line": law_line, "table": table,
            "eta0s": eta0s}


def _plot(sweep: Sweep, states: dict, fits: dict, png: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "plot: skipped (matplotlib is not importable; pip install matplotlib for loss_vs_lr.png)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in sweep.points:
        xs = [r.lr for r in sweep.runs_of(p) if states[r.name]["status"] == "done"]
        ys = [states[r.name]["loss"] for r in sweep.runs_of(p) if states[r.name]["status"] == "done"]
        if not xs:
            continue
        (line,) = ax.plot(xs, ys, "o-", label=p.label)
        f = fits[p.index]
        if f.kind == "fit":
            ax.plot([f.lr_opt], [f.loss_opt], "*", color=line.get_color(), markersize=12)
    ax.set_xscale("log")
    ax.set_xlabel("lr")
    ax.set_ylabel("final validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"plot: {png}"


# -- command line --------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SweepError("command line", message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lr_sweep.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="YAML config file or a shipped config's name")
    p.add_argument("--lrs", required=True, help="comma-separated learning rates, e.g. 0.003,0.01,0.03")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept key and its values (repeatable; the grid is the product)")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweep_<config name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    mode.add_argument("--emit", choices=["commands", "slurm"], help="write the runs out instead of running them")
    mode.add_argument("--report-only", action="store_true", help="collect finished runs and report, run nothing")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun; 1: plain python)")
    p.add_argument("--base-point", type=int, default=0, help="index of the grid point eta0 is computed at (0)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra overrides for every run")
    return p


def main(argv: Optional[Sequence[str]] = None, runner: Runner = subprocess_runner,
         echo: Callable[[str], None] = print) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.nproc < 1:
            raise SweepError("--nproc", f"{args.nproc}; allowed: >= 1")
        sweep = build_sweep(args.config, args.lrs, args.sets, args.overrides, args.out)
        if not 0 <= args.base_point < len(sweep.points):
            raise SweepError("--base-point", f"{args.base_point}; allowed: 0..{len(sweep.points) - 1}")
        if args.emit or args.dry_run:
            states = {r.name: state(r) for r in sweep.runs}
            pending = [r for r in sweep.runs if states[r.name]["status"] not in ("done", "diverged")]
            if args.dry_run:
                echo(f"[lr_sweep] {len(sweep.points)} grid points x {len(sweep.lrs)} lrs = {len(sweep.runs)} runs "
                     f"under {sweep.out}; {len(sweep.runs) - len(pending)} finished")
                for r in sweep.runs:
                    echo(f"  {r.name} [{states[r.name]['status']}]: "
                         + " ".join(shlex.quote(c) for c in run_command(sweep, r, args.nproc)))
            elif args.emit == "commands":
                sys.stdout.write(emit_commands(sweep, args.nproc, pending))
            else:
                sys.stdout.write(emit_slurm(sweep, args.nproc, pending))
            return 0
        if args.report_only:
            states = collect(sweep)
        else:
            states = run_sweep(sweep, args.nproc, runner=runner, echo=echo)
        report(sweep, states, args.base_point, plot=not args.no_plot, echo=echo)
        failed = [n for n, s in states.items() if s["status"] not in ("done", "diverged")]
        if failed:
            echo(f"[lr_sweep] {len(failed)} runs not finished ({', '.join(failed)}); run the same command again "
                 f"to retry them")
            return 1
        return 0
    except SweepError as e:
        print(f"lr_sweep: invalid sweep: {e}", file=sys.stderr)
        return 2
