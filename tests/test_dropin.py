"""The drop-in launcher: Megatron-LM's own, unmodified pretrain_gpt.py with the plugin (CPU, gloo).

    torchrun --nproc-per-node 2 -m megatron_hyperball.run pretrain_gpt.py <Megatron flags> --optimizer adamh|muonh

Megatron-LM's script comes from ``../shared/thirdparty/megatron-lm-core_r0.19.0/`` (third-party test
files beside the repository, never copied into it); the tests that launch it are skipped when that
folder is absent. A tiny GPT on ``--mock-data``, 2 CPU ranks, per optimizer (shared by the tests):

- ``full``: 30 steps, checkpoint at the end;
- ``split``: the same command with ``--exit-interval 15`` launched twice: the first launch stops at
  step 15 with a checkpoint, the second resumes from it (``--load``) and stops at 30.

AdamH runs in fp32 on Megatron's ZeRO-1 DistributedOptimizer; MuonH in bf16 on the layer-wise
optimizer with Depth-muP (``--block-output-scale 1/sqrt(2L)``). Per-step numbers are read from the
TensorBoard files Megatron's writer leaves (every step, full float32).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, tb_scalars

MEGATRON_LM = REPO_ROOT.parent / "shared" / "thirdparty" / "megatron-lm-core_r0.19.0"
PRETRAIN_GPT = MEGATRON_LM / "pretrain_gpt.py"
needs_megatron_lm = pytest.mark.skipif(
    not PRETRAIN_GPT.is_file(),
    reason=f"Megatron-LM's pretrain_gpt.py is not at {PRETRAIN_GPT} (third-party test files, not part of the "
           f"project; see shared/thirdparty/README.md)")

STEPS, EXIT_AT, METRICS_EVERY = 30, 15, 5
SPHERE_TYPES = ("qkv", "proj", "fc1", "fc2")
TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(STEPS),
    "--lr", "0.01", "--min-lr", "0.001", "--lr-decay-style", "linear", "--seed", "1234",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    # No dropout: on the CPU, Megatron's "CUDA" RNG is the CPU generator, from which the data loader also
    # draws its base seed when its iterator is created, after a resume's RNG restore; the resumed run's
    # dropout masks would differ from the uninterrupted run's (on a GPU they come from the CUDA generator).
    "--hidden-dropout", "0", "--attention-dropout", "0",
]
OPTIMIZERS = {
    "adamh": ["--optimizer", "adamh", "--use-distributed-optimizer", "--hyperball-radius", "init"],
    "muonh": ["--optimizer", "muonh", "--use-distributed-optimizer", "--hyperball-radius", "init", "--bf16",
              "--block-output-scale", "1/sqrt(2L)"],
}
PATHS = {
    "adamh": ["DistributedOptimizer > AdamH (megatron_hyperball)"],
    "muonh": ["LayerWiseDistributedOptimizer > Float16OptimizerWithFloat16Params > TensorParallelMuonH "
              "(megatron_hyperball)", "DistributedOptimizer > AdamW (torch)"],
}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",  # the CPU path
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("WANDB_MODE", None)
    return env


def _start(cwd: Path, args: list[str], nproc: int = 0) -> subprocess.Popen:
    """``torchrun --nproc-per-node N -m megatron_hyperball.run ARGS`` (nproc 0: plain python, one process)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc else []
    cmd = [sys.executable, *launcher, "-m", "megatron_hyperball.run", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"megatron_hyperball.run timed out after {timeout}s:\n{out[-6000:]}") from None
    return proc.returncode, out


def _launch(cwd: Path, args: list[str], nproc: int = 2) -> tuple[int, str]:
    return _wait(_start(cwd, args, nproc))


def _args(root: Path, optimizer: str, *extra: str) -> list[str]:
    ckpt = root / "ckpt"
    return [PRETRAIN_GPT, *TINY_GPT, *OPTIMIZERS[optimizer],
            "--save", ckpt, "--load", ckpt, "--save-interval", str(STEPS),
            "--tensorboard-dir", root / "tb", "--hyperball-metrics-interval", str(METRICS_EVERY), *extra]


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def runs(request, tmp_path_factory):
    """The full run and the interrupted-and-resumed run of one optimizer."""
    if not PRETRAIN_GPT.is_file():
        pytest.skip(needs_megatron_lm.kwargs["reason"])
    name = request.param
    work = tmp_path_factory.mktemp(f"dropin_{name}")
    rc, out = _launch(work, _args(work / "full", name))
    assert rc == 0, out[-6000:]
    full = {"out": out, "tb": tb_scalars(work / "full" / "tb"), "root": work / "full"}
    split_args = _args(work / "split", name, "--exit-interval", str(EXIT_AT))
    rc1, out1 = _launch(work, split_args)
    assert rc1 == 0, out1[-6000:]
    ckpt = work / "split" / "ckpt"
    first = {"out": out1, "iteration": (ckpt / "latest_checkpointed_iteration.txt").read_text().strip(),
             "tb": tb_scalars(work / "split" / "tb")}
    rc2, out2 = _launch(work, split_args)  # the identical command again: resumes from step 15
    assert rc2 == 0, out2[-6000:]
    return {"name": name, "full": full, "first": first,
            "resumed": {"out": out2, "tb": tb_scalars(work / "split" / "tb"), "root": work / "split"}}


def test_trains_and_the_loss_falls(runs):
    out, tb = runs["full"]["out"], runs["full"]["tb"]
    assert "[hyperball] drop-in: " in out and "on CPU (gloo); added: --distributed-backend gloo --transformer-impl " \
                                              "local --no-gradient-accumulation-fusion" in out
    assert f"iteration       {STEPS}/      {STEPS}" in out
    losses = tb["lm loss"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    # measured on 2 CPU ranks: 5.56 at step 1 (~ln 256 = 5.55), 1.39 (adamh) / 1.55 (muonh) at step 30
    assert losses[1] > 5.0
    assert sum(losses[k] for k in range(STEPS - 4, STEPS + 1)) / 5 < losses[1] - 3.0, losses
    assert (runs["full"]["root"] / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)


def test_optimizer_path_is_printed(runs):
    out = runs["full"]["out"]
    printed = [line.removeprefix("[hyperball] optimizer: ") for line in out.splitlines()
               if line.startswith("[hyperball] optimizer: ")]
    assert printed == PATHS[runs["name"]], printed
    if runs["name"] == "muonh":
        assert "[hyperball] Depth-muP: block output scale 1/sqrt(2L) -> alpha = 0.5 (L = 2; 2/2 layers of this " \
               "stage scaled)" in out
    else:
        assert "Depth-muP" not in out  # off unless asked: Megatron's model as the user gave it


def test_sphere_norms_stay_at_their_radius(runs):
    tb = runs["full"]["tb"]
    for kind in SPHERE_TYPES:
        norms = tb[f"hyperball/weight_norm/{kind}"]
        assert sorted(norms) == list(range(METRICS_EVERY, STEPS + 1, METRICS_EVERY)), kind
        values = list(norms.values())
        assert max(values) / min(values) - 1 < 1e-4, (kind, values)  # 'init': the initial norm, held
        assert all(0 < r < 0.05 for r in tb[f"hyperball/rel_update/{kind}"].values()), kind  # it moved


def test_interrupted_run_resumes_bitwise(runs):
    first, resumed, full = runs["first"], runs["resumed"], runs["full"]
    assert first["iteration"] == str(EXIT_AT)
    assert sorted(first["tb"]["lm loss"]) == list(range(1, EXIT_AT + 1))
    out2 = resumed["out"]
    assert f"successfully loaded checkpoint from {resumed['root'] / 'ckpt'}" in out2
    assert f"at iteration {EXIT_AT}" in out2
    assert f"iteration        1/      {STEPS}" not in out2
    assert f"iteration       {EXIT_AT + 1}/      {STEPS}" in out2
    a, b = full["tb"], resumed["tb"]
    for tag in ("lm loss", "grad-norm", "learning-rate"):
        assert sorted(b[tag]) == list(range(1, STEPS + 1)), tag
        for step in range(1, STEPS + 1):
            assert b[tag][step] == a[tag][step], (tag, step, b[tag][step], a[tag][step])
    for kind in SPHERE_TYPES:
        tag = f"hyperball/weight_norm/{kind}"
        assert b[tag] == a[tag], (tag, b[tag], a[tag])


# -- MoE: the YAML entry's MoE tags and global aux-loss weight, on the model Megatron-LM's script builds --
MOE_STEPS, MOE_SAVE = 10, 5
MOE_FLAGS = [
    "--num-experts", "4", "--expert-model-parallel-size", "2", "--moe-ffn-hidden-size", "64",
    "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-gate",
    "--disable-bias-linear",  # Megatron's shared experts take no bias
    "--moe-router-load-balancing-type", "global_aux_loss", "--moe-aux-loss-coeff", "0.1",
    "--hyperball-router-sphere", "none",
]
MOE_KEYS = ("decoder.layers.mlp.router.weight", "decoder.layers.mlp.shared_experts.gate_weight")


def _dcp_tensors(path: Path, keys) -> dict:
    """The named tensors of a torch_dist checkpoint (Megatron's format: PyTorch DCP), one process."""
    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return {k: v.double() for k, v in out.items()}


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """MuonH (bf16, layer-wise) on a 2-layer MoE GPT: 4 experts over EP 2 with a gated shared expert,
    the router on Adam (--hyperball-router-sphere none), global_aux_loss; checkpoints at 5 and 10."""
    if not PRETRAIN_GPT.is_file():
        pytest.skip(needs_megatron_lm.kwargs["reason"])
    work = tmp_path_factory.mktemp("dropin_moe")
    tiny = [str(a) for a in TINY_GPT]
    tiny[tiny.index("--train-iters") + 1] = str(MOE_STEPS)
    rc, out = _launch(work, [PRETRAIN_GPT, *tiny, *OPTIMIZERS["muonh"], *MOE_FLAGS,
                             "--save", work / "ckpt", "--save-interval", str(MOE_SAVE),
                             "--tensorboard-dir", work / "tb", "--hyperball-metrics-interval", "1"])
    assert rc == 0, out[-6000:]
    ckpt = {it: _dcp_tensors(work / "ckpt" / f"iter_{it:07d}", MOE_KEYS) for it in (MOE_SAVE, MOE_STEPS)}
    return {"out": out, "tb": tb_scalars(work / "tb"), "ckpt": ckpt}


@needs_megatron_lm
def test_moe_tags_and_aux_loss_weight_are_printed(moe_run):
    out = moe_run["out"]
    # dp = 2: Megatron's global_aux_loss steps coeff dL/dW / dp, so it gets 0.1 x 2 (models.aux_loss)
    assert "[hyperball] MoE: global aux loss weight 0.1 (Megatron's coefficient 0.2 = it x dp 2); router sphere " \
           "none, shared-expert gate Adam" in out
    printed = [line.removeprefix("[hyperball] optimizer: ") for line in out.splitlines()
               if line.startswith("[hyperball] optimizer: ")]
    assert printed == PATHS["muonh"], printed
    # the logged loss is HyperP's L (~1 for near-uniform routing), not scaled by the corrected coefficient
    values = list(moe_run["tb"]["global_load_balancing_loss"].values())
    assert len(values) == MOE_STEPS and all(0.95 < v < 1.2 for v in values), values


@needs_megatron_lm
def test_moe_router_and_gate_take_adam_the_spheres_hold(moe_run):
    tb = moe_run["tb"]
    for kind in SPHERE_TYPES + ("expert_fc1", "expert_fc2"):  # MuonH: each held at its initial norm
        values = list(tb[f"hyperball/weight_norm/{kind}"].values())
        assert len(values) == MOE_STEPS and max(values) / min(values) - 1 < 1e-4, (kind, values)
    # the router on Adam: it moves and its norm is not held (measured 0.354 at step 1 -> 0.519 at 10;
    # as a sphere matrix it would stay within 1e-4)
    router = tb["hyperball/weight_norm/router"]
    assert router[MOE_STEPS] / router[1] > 1.2, router
    assert all(r > 0.01 for r in tb["hyperball/rel_update/router"].values())
    # the (1, h) shared-expert gate, in no metric: from the checkpoints at steps 5 and 10, per layer
    a, b = moe_run["ckpt"][MOE_SAVE], moe_run["ckpt"][MOE_STEPS]
    for key in MOE_KEYS:
        assert a[key].shape[0] == 2, key  # one per layer
        for layer in range(2):
            na, nb = a[key][layer].norm().item(), b[key][layer].norm().item()
            assert (a[key][layer] != b[key][layer]).any(), key  # stepped
            assert nb / na > 1.05, (key, layer, na, nb)  # measured 1.15-1.18: not held on a sphere


def test_dropin_moe_router_mode_and_aux_loss_correction():
    """Patch dropin_moe_model's reading of the flags (no Megatron-LM script): the router mode, refused
    with an optimizer without spheres, and the coefficient Megatron gets."""
    from argparse import Namespace
    from types import SimpleNamespace

    from megatron.training import global_vars

    from megatron_hyperball.models.aux_loss import corrected_global_aux_loss
    from megatron_hyperball.patches.moe import _dropin_moe_run

    moe, dense = SimpleNamespace(num_moe_experts=4), SimpleNamespace(num_moe_experts=None)
    saved = global_vars._GLOBAL_ARGS
    try:
        global_vars._GLOBAL_ARGS = Namespace(optimizer="muonh", hyperball_router_sphere=None)
        assert _dropin_moe_run(moe)[1] == "frobenius" and _dropin_moe_run(dense) is None
        global_vars._GLOBAL_ARGS = Namespace(optimizer="adamh", hyperball_router_sphere="row")
        assert _dropin_moe_run(moe)[1] == "row"
        global_vars._GLOBAL_ARGS = Namespace(optimizer="adam", hyperball_router_sphere=None)
        assert _dropin_moe_run(moe)[1] is None  # Megatron's own optimizers: no tags
        global_vars._GLOBAL_ARGS = Namespace(optimizer="adam", hyperball_router_sphere="frobenius")
        with pytest.raises(ValueError, match="--hyperball-router-sphere frobenius given with --optimizer adam.*"
                                             "allowed with it: none"):
            _dropin_moe_run(moe)
        global_vars._GLOBAL_ARGS = Namespace(optimizer="muonh")  # the YAML entry's parser: its provider does it
        assert _dropin_moe_run(moe) is None
    finally:
        global_vars._GLOBAL_ARGS = saved
    assert corrected_global_aux_loss([0.1], ["global_aux_loss"], 2) == (
        0.2, "global aux loss weight 0.1 (Megatron's coefficient 0.2 = it x dp 2)")
    assert corrected_global_aux_loss([0.1], ["aux_loss"], 4) is None
    assert corrected_global_aux_loss([0.1, 0.01], ["aux_loss", "global_aux_loss"], 4)[0] == [0.1, 0.04]


# -- refusals: Megatron's own parser, before any process group -------------------------------------
_ERR = "pretrain_gpt.py: error: "
BAD_FLAGS = {  # case: (flags, what Megatron's parser prints)
    "misspelled": (["--hyperball-radiuss", "1"],
                   [_ERR + "unrecognized arguments: --hyperball-radiuss 1",
                    "--hyperball-radiuss: did you mean --hyperball-radius (allowed: init, sqrt_max_dim, "
                    "<positive number>)?"]),
    "radius_out_of_range": (["--hyperball-radius", "-1"],
                            [_ERR + "argument --hyperball-radius: radius=-1.0 must be a positive finite "
                                    "number; allowed: init, sqrt_max_dim, <positive number>"]),
    "block_output_scale_out_of_range": (["--block-output-scale", "0"],
                                        [_ERR + "argument --block-output-scale: block_output_scale=0.0 must be "
                                                "a positive finite number; allowed: 1/sqrt(2L), 1/L, "
                                                "<positive number>, none"]),
    "router_sphere_not_a_choice": (["--hyperball-router-sphere", "rows"],
                                   [_ERR + "argument --hyperball-router-sphere: invalid choice: 'rows' "
                                           "(choose from 'frobenius', 'row', 'none')"]),
    "update_norm_not_a_choice": (["--hyperball-update-norm", "exactly"],
                                 [_ERR + "argument --hyperball-update-norm: invalid choice: 'exactly' "
                                         "(choose from 'exact', 'shape')"]),
}


# The launcher's main() with Megatron-LM's script, once per case, in one process (one import of torch and
# Megatron for all): what each case printed on stderr and the status it exited with.
_REFUSAL_WORKER = """
import contextlib, io, json, sys
from megatron_hyperball.run import main
out = {}
for case, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    out[case] = [code, err.getvalue()]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every BAD_FLAGS case: the misspelled one under torchrun with 2 ranks, as a user launches it; the
    others through the launcher's main() in one process (beside it). Megatron's parser refuses each
    before torch.distributed starts."""
    if not PRETRAIN_GPT.is_file():
        pytest.skip(needs_megatron_lm.kwargs["reason"])
    import json

    work = tmp_path_factory.mktemp("dropin_refusals")
    argv = {case: [str(a) for a in (PRETRAIN_GPT, *TINY_GPT, *OPTIMIZERS["adamh"], *flags)]
            for case, (flags, _) in BAD_FLAGS.items()}
    torchrun = _start(work, argv.pop("misspelled")[0:], nproc=2)
    worker = subprocess.run([sys.executable, "-c", _REFUSAL_WORKER, json.dumps(argv)], cwd=work, env=_env(),
                            capture_output=True, text=True, timeout=240)
    result = [line for line in worker.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, worker.stdout[-3000:] + worker.stderr[-3000:]
    got = {case: tuple(v) for case, v in json.loads(result[-1].removeprefix("RESULT ")).items()}
    got["misspelled"] = _wait(torchrun)
    return got


@needs_megatron_lm
@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_plugin_flag_is_megatrons_usage_error(refusals, case):
    rc, out = refusals[case]
    if case == "misspelled":  # torchrun reports the ranks' status 2 as its own failure
        assert rc != 0 and re.search(r"exitcode\s*:\s*2\b", out), out[-3000:]
    else:
        assert rc == 2, out[-3000:]
    assert "usage: pretrain_gpt.py [-h]" in out
    for text in BAD_FLAGS[case][1]:
        assert text in out, (text, out[-3000:])
    # no traceback but torchrun's own report of the failed ranks; no process group was created
    assert out.count("Traceback (most recent call last)") == (case == "misspelled"), out[-3000:]
    assert "initializing torch distributed" not in out


# -- the launcher itself (no Megatron-LM script needed) ----------------------------------------------
def test_cpu_flags_are_added_unless_given():
    from megatron_hyperball.run import CPU_FLAGS, cpu_flags

    assert cpu_flags([]) == [f for group in CPU_FLAGS for f in group]
    added = cpu_flags(["--transformer-impl", "transformer_engine", "--distributed-backend=gloo", "--no-rope-fusion",
                       "--lr", "0.1"])
    assert "--transformer-impl" not in added and "--distributed-backend" not in added
    assert "--no-rope-fusion" not in added
    assert added[:2] == ["--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]


def test_launcher_usage_errors(tmp_path, capsys):
    from megatron_hyperball.run import EXIT_USAGE, main

    assert main([]) == EXIT_USAGE
    assert "usage: torchrun [torchrun options] -m megatron_hyperball.run SCRIPT" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.py"), "--lr", "1"]) == EXIT_USAGE
    assert "is not a file; the first argument is the training script" in capsys.readouterr().err
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('must not run')\n")
    # fp32 MuonH on the layer-wise optimizer cannot save in megatron-core 0.19.2: refused before anything runs
    assert main([str(script), "--optimizer", "muonh", "--use-distributed-optimizer", "--save", "x"]) == EXIT_USAGE
    assert "cannot save checkpoints with megatron-core 0.19.2; allowed: add --bf16" in capsys.readouterr().err
    assert main([str(script), "--optimizer", "muonmd", "--use-distributed-optimizer", "--save", "x"]) == EXIT_USAGE
    assert "--optimizer muonmd in fp32" in capsys.readouterr().err
