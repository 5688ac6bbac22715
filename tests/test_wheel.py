"""Installed, not cloned: the wheel, installed into a fresh virtual environment, runs the quickstart
by name from an empty directory outside the repository.

The wheel is built from a copy of the working tree (``pip wheel --no-deps --no-build-isolation``:
offline, about a second; the copy keeps ``build/`` and ``*.egg-info`` out of the checkout) and
installed with ``pip install --no-deps --no-index`` into a venv made with ``python -m venv
--without-pip``. Isolation, so that nothing of the checkout or its editable install is seen:

- the dependencies (torch, megatron-core, ...) are not installed again (minutes, network): the new
  venv's site-packages gets a ``.pth`` naming a folder of symbolic links to the entries of this
  interpreter's site-packages, *except* ``megatron_hyperball*`` (package, dist-info),
  ``__editable__*`` (the editable install's finder and its ``.pth``), every ``*.pth`` and
  ``__pycache__``. A folder named by a ``.pth`` line is only appended to ``sys.path``; its own
  ``.pth`` files would not run anyway, so the editable finder can never load;
- every command runs with ``PYTHONPATH``/``PYTHONHOME`` unset, ``PYTHONNOUSERSITE=1`` and an empty
  working directory under the test's tmp folder; the test checks that ``megatron_hyperball``, its
  ``configs`` and its distribution metadata come from the new venv, that no ``sys.path`` entry is
  inside the repository and that no editable finder is installed.

The quickstart runs for 40 steps under ``python -m torch.distributed.run`` (= ``torchrun``; the new
venv has no ``torchrun`` script because torch's own scripts are not installed into it) with 2 CPU
ranks: exit 0, the validation loss falls, the corpus, checkpoint, TensorBoard and W&B files are in
that directory and nothing was written into the venv. About 40 s on the 2-core dev machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_hyperball.config.load import resolve_config, shipped_configs
from megatron_hyperball.config.schema import ConfigError
from tests.conftest import REPO_ROOT

CONFIG_NAMES = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml"))
STEPS, EVAL_INTERVAL = 40, 10

# not copied to build the wheel: at the repository root only (megatron_hyperball/data is a package)
_ROOT_SKIP = {".venv", ".git", "build", "dist", "data", "runs", "wandb", ".whl", ".pytest_cache"}
# never linked into the new venv: the checkout's own installation
_DEPS_SKIP = re.compile(r"^(megatron_hyperball|__editable__|__pycache__$)|\.pth$|\.egg-link$")


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(directory).resolve() == REPO_ROOT:
        skip |= _ROOT_SKIP & set(names)
    return skip


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "WANDB_MODE")}
    env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]))
    return env


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout}s:\n{(out + err).decode()[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    assert REPO_ROOT not in root.resolve().parents, "the test folder must be outside the repository"
    src, dist, venv, deps = root / "src", root / "dist", root / "venv", root / "deps"
    shutil.copytree(REPO_ROOT, src, ignore=_copy_ignore, symlinks=True)

    # the wheel (offline when setuptools is importable here, as in the README's .venv: torch needs it)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src]
    if importlib.util.find_spec("setuptools") is not None:
        build.insert(5, "--no-build-isolation")
    proc = _run(build, root, dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dist.glob("megatron_hyperball-*.whl")

    # a fresh venv; the dependencies through a filtered view of this interpreter's site-packages
    proc = _run([sys.executable, "-m", "venv", "--without-pip", venv], root, dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deps.mkdir()
    for folder in site.getsitepackages():
        for entry in sorted(Path(folder).iterdir()) if os.path.isdir(folder) else ():
            if not _DEPS_SKIP.search(entry.name) and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    (purelib,) = (venv / "lib").glob("python*/site-packages")
    (purelib / "_hyperball_test_deps.pth").write_text(f"{deps}\n")

    env = _env(venv)
    python = venv / "bin" / "python"
    proc = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"root": root, "wheel": wheel, "venv": venv, "python": python, "purelib": purelib, "env": env,
            "cli": venv / "bin" / "megatron-hyperball", "venv_files": _files(venv)}


# -- the wheel and its installation -----------------------------------------------------------------
def test_wheel_holds_the_configs_and_the_command(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert sorted(n for n in names if n.startswith("megatron_hyperball/configs/") and n.endswith(".yaml")) == \
        [f"megatron_hyperball/configs/{c}.yaml" for c in CONFIG_NAMES]
    assert "megatron_hyperball/pretrain/__main__.py" in names and "megatron_hyperball/cli.py" in names
    assert any(n.endswith(".data/scripts/megatron-hyperball") for n in names)
    assert not [n for n in names if n.split("/")[0] in ("configs", "tests", "scripts", "benchmarks")]


def test_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    probe = (
        "import importlib.util, importlib.machinery, importlib.metadata as md, json, sys\n"
        "spec = importlib.util.find_spec('megatron_hyperball')\n"  # not imported: its __init__ imports torch
        "configs = importlib.machinery.PathFinder.find_spec('megatron_hyperball.configs',\n"
        "                                                   spec.submodule_search_locations)\n"
        "print(json.dumps({'package': spec.origin, 'configs': list(configs.submodule_search_locations),\n"
        "  'dists': [str(d._path) for d in md.distributions() if d.metadata['Name'] == 'megatron-hyperball'],\n"
        "  'path': sys.path, 'meta_path': [repr(f) for f in sys.meta_path],\n"
        "  'editable_finder': importlib.util.find_spec('__editable___megatron_hyperball_0_1_0_finder') is not None}))\n"
    )
    proc = _run([installed["python"], "-c", probe], tmp_path, installed["env"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    site_dir = installed["purelib"]
    assert Path(info["package"]) == site_dir / "megatron_hyperball" / "__init__.py", info
    assert [Path(p) for p in info["configs"]] == [site_dir / "megatron_hyperball" / "configs"], info
    assert [Path(d).parent for d in info["dists"]] == [site_dir], info
    repo = str(REPO_ROOT)
    assert not [p for p in info["path"] if p == repo or p.startswith(repo + os.sep)], info["path"]
    assert not [f for f in info["meta_path"] if "editable" in f.lower()], info["meta_path"]
    assert not info["editable_finder"]


# -- the command: configs, show, an unknown name ----------------------------------------------------
def test_configs_and_show(installed, tmp_path):
    listed = _run([installed["cli"], "configs"], tmp_path, installed["env"])
    assert listed.returncode == 0, listed.stderr
    rows = [line.split(None, 1) for line in listed.stdout.splitlines()]
    assert [r[0] for r in rows] == CONFIG_NAMES and all(len(r) == 2 for r in rows), listed.stdout
    assert f"(in {installed['purelib'] / 'megatron_hyperball' / 'configs'})" in listed.stderr, listed.stderr
    assert "show NAME > my_run.yaml" in listed.stderr

    shown = subprocess.run([str(installed["cli"]), "show", "quickstart"], cwd=tmp_path, env=installed["env"],
                           capture_output=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == (REPO_ROOT / "configs" / "quickstart.yaml").read_bytes()
    (tmp_path / "my_run.yaml").write_bytes(shown.stdout)
    # the copy is a config file like any other (the entry's check: no torch import, well under a second)
    check = _run([installed["cli"], "pretrain", "--check-only", "--config", "./my_run.yaml"], tmp_path,
                 dict(installed["env"], WORLD_SIZE="2"))
    assert check.returncode == 0 and "config check passed: ./my_run.yaml (2 processes)" in check.stdout, \
        check.stdout + check.stderr
    assert sorted(os.listdir(tmp_path)) == ["my_run.yaml"]  # a check creates nothing


def test_unknown_config_name_is_refused_with_the_names(installed, tmp_path):
    names = ", ".join(CONFIG_NAMES)
    shown = _run([installed["cli"], "show", "quickstrt"], tmp_path, installed["env"])
    assert shown.returncode == 2 and shown.stdout == "", shown
    assert shown.stderr.startswith("invalid config (quickstrt):\n") and names in shown.stderr, shown.stderr
    # the module torchrun runs (it imports torch and megatron-core first: python -m runs the
    # package's __init__ before the entry)
    run = _run([installed["python"], "-m", "megatron_hyperball.pretrain", "--config", "quickstrt"], tmp_path,
               installed["env"])
    assert run.returncode == 2, run.stdout + run.stderr
    assert "invalid config (quickstrt):\n  no config file 'quickstrt'" in run.stderr and names in run.stderr
    assert "Traceback" not in run.stderr
    assert os.listdir(tmp_path) == []


# -- the quickstart, by name, from an empty directory -----------------------------------------------
def test_quickstart_by_name_from_an_empty_directory(installed, tmp_path):
    here = tmp_path / "my_runs"
    here.mkdir()
    cmd = [installed["python"], "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_hyperball.pretrain", "--config", "quickstart",
           f"schedule.train_iters={STEPS}", f"schedule.eval_interval={EVAL_INTERVAL}", "data.embedded_max_mb=2"]
    proc = _run(cmd, here, installed["env"], timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    # Megatron's loop ran the steps; the held-out loss falls (measured: 2.558 at step 10, 2.310 at 40;
    # the untrained model starts near ln 257 = 5.55)
    assert f"iteration       {STEPS}/      {STEPS}" in out
    val = {int(m.group(1)): float(m.group(2))
           for m in re.finditer(r"validation loss at iteration (\d+) \| lm loss value: (\S+)", out)}
    assert sorted(val) == list(range(EVAL_INTERVAL, STEPS + 1, EVAL_INTERVAL)), val
    first = float(re.search(r"iteration +1/ +\d+ \|.*?lm loss: (\S+) \|", out).group(1))
    assert first > 5.0 and val[STEPS] < val[EVAL_INTERVAL] - 0.1 and val[STEPS] < 3.0, (first, val)

    # everything landed here: the corpus, the checkpoint (with the resolved config), TensorBoard, W&B
    assert sorted(os.listdir(here)) == ["data", "runs"]
    assert (here / "data" / "pystdlib" / "manifest.json").is_file()
    ckpt = here / "runs" / "quickstart" / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    assert (ckpt / f"iter_{STEPS:07d}").is_dir() and (ckpt / "hyperball_config.yaml").is_file()
    assert list((here / "runs" / "quickstart" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((ckpt / "wandb").glob("**/offline-run-*")), sorted(_files(ckpt / "wandb"))[:20]
    # and nothing in the installed package or the venv (compiled bytecode aside)
    assert _files(installed["venv"]) == installed["venv_files"]


# -- from a checkout: the same names --------------------------------------------------------------
def test_checkout_scripts_take_names(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2")
    env.pop("PYTHONPATH", None)
    check = _run([sys.executable, REPO_ROOT / "scripts" / "pretrain_gpt.py", "--check-only", "--config", "quickstart"],
                 tmp_path, env)
    assert check.returncode == 0 and "config check passed: quickstart (2 processes)" in check.stdout, check
    listed = _run([sys.executable, REPO_ROOT / "scripts" / "megatron-hyperball", "configs"], tmp_path, env)
    assert listed.returncode == 0 and [l.split()[0] for l in listed.stdout.splitlines()] == CONFIG_NAMES, listed
    assert os.listdir(tmp_path) == []


def test_resolve_config_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = shipped_configs()
    assert sorted(shipped) == CONFIG_NAMES
    assert shipped["quickstart"].read_bytes() == (REPO_ROOT / "configs" / "quickstart.yaml").read_bytes()
    # a name, with or without .yaml; a directory of that name does not hide it
    assert resolve_config("quickstart") == resolve_config("quickstart.yaml") == shipped["quickstart"]
    (tmp_path / "quickstart").mkdir()
    assert resolve_config("quickstart") == shipped["quickstart"]
    # an existing file wins, relative to the working directory
    (tmp_path / "quickstart.yaml").write_text("seed: 1\n")
    assert resolve_config("quickstart.yaml") == Path("quickstart.yaml")
    assert resolve_config("./quickstart.yaml") == Path("quickstart.yaml")
    # an unknown name: the list of names
    with pytest.raises(ConfigError) as info:
        resolve_config("quickstrt")
    assert str(info.value).startswith("invalid config (quickstrt):\n  no config file 'quickstrt' in the working "
                                      f"directory {tmp_path}") and ", ".join(CONFIG_NAMES) in str(info.value)
    # a missing path: the file error, with the shipped config of that name when there is one
    with pytest.raises(ConfigError, match=r"cannot read config file: No such file .* \(--config gpt_125m_muonh\)"):
        resolve_config("configs/gpt_125m_muonh.yaml")
    with pytest.raises(ConfigError, match="cannot read config file: No such file .*shipped config name: gpt_1"):
        resolve_config("elsewhere/x.yaml")
