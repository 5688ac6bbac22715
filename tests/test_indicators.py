"""The indicator formulas (models.indicators) against float64 loops, the metric names, and the
``megatron-hyperball dashboard`` command on a TensorBoard folder written under those names.

The hooks on a real Megatron model (values on captured activations, collective counts) are in
tests/distributed/test_indicators.py.
"""

import math
import os
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from tests.conftest import REPO_ROOT

from megatron_hyperball.models import indicators as ind

SCRIPT = os.path.join(REPO_ROOT, "scripts", "megatron-hyperball")


# -- formulas -------------------------------------------------------------------------------------
def test_z_partials_is_the_mean_squared_logsumexp_over_valid_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    valid = torch.tensor([True, False, True, True, False, True, True])
    total, count = ind.z_partials(logits.float(), valid).tolist()
    rows = [math.log(sum(math.exp(v) for v in row)) ** 2 for row, ok in zip(logits.tolist(), valid.tolist()) if ok]
    assert count == 5
    assert total / count == pytest.approx(sum(rows) / len(rows), rel=1e-6)


def test_outlier_partials_counts_elements_beyond_five_population_sigmas():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 50, generator=g, dtype=torch.float64) * 0.1
    h[0, 3] = 4.0   # an outlier
    h[2, 7] = -3.0  # another
    h[4, 1] = 0.45  # 4.5 sigma-ish: not one
    count, n = ind.outlier_partials(h.float()).tolist()
    expected = 0
    for row in h.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))
        expected += sum(abs(v - mean) > 5 * std for v in row)
    assert (count, n) == (expected, h.numel()) and expected == 2


def test_rms_maxvio_and_loads():
    y = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    total, n = ind.rms_partials(y).tolist()
    assert ind.rms(total, n) == pytest.approx(math.sqrt(25 / 4))
    routing = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    loads = ind.expert_loads(routing).tolist()
    assert loads == [3, 1, 1, 1]
    assert ind.max_vio(loads) == pytest.approx((3 - 1.5) / 1.5)
    assert ind.max_vio([0, 0]) is None


def test_layout_finish_writes_the_documented_names():
    layout = ind.Layout(num_layers=3, num_experts=2, grad_types=("qkv", "router"))
    v = [0.0] * layout.size
    for layer in (1, 2, 3):
        for name in ("attention_z", "attn_rms", "mlp_rms", "outliers"):
            s = layout.slot(layer, name)
            v[s], v[s + 1] = 4.0 * layer, 2.0
    s = layout.slot(3, "router_z")
    v[s], v[s + 1] = 9.0, 3.0
    v[layout.loads(3)] = [6.0, 2.0]
    g = layout.grad_slot("qkv")
    v[g], v[g + 1] = 16.0, 10.0
    values = layout.finish(v)
    names = ind.indicator_names(3, moe_layers=[3], grad_types=("qkv",))
    assert sorted(values) == sorted(names)
    assert values["indicators/router_z/layer_03"] == 3.0
    assert values["indicators/attn_rms/layer_02"] == pytest.approx(2.0)        # sqrt(8 / 2)
    assert values["indicators/outliers/layer_01"] == pytest.approx(200.0)      # 100 * 4 / 2
    assert values["indicators/attention_z/mean"] == pytest.approx(4.0)         # (2 + 4 + 6) / 3
    assert values["indicators/attention_z/max"] == pytest.approx(6.0)
    assert values["moe/maxvio/layer_03"] == pytest.approx(0.5)
    assert values["hyperball/grad_norm/qkv"] == 4.0
    assert "hyperball/grad_norm/router" not in values                          # no element of that type
    assert ind.layer_key(7, 120) == "layer_007" and ind.layer_key(3, 8) == "layer_03"


# -- dashboard ------------------------------------------------------------------------------------
def _png_info(path):
    """(width, height, {tEXt key: text}) of a PNG file, after checking its signature and CRCs."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, texts, size = 8, {}, None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            texts[key.decode()] = text.decode("latin-1")
        pos += 12 + length
    return size[0], size[1], texts


def _write_run(tb_dir, steps=6):
    from torch.utils.tensorboard import SummaryWriter

    names = ind.indicator_names(2, moe_layers=[2], grad_types=("qkv",))
    w = SummaryWriter(str(tb_dir))
    for step in range(1, steps + 1):
        w.add_scalar("lm loss", 5.0 / step, step)
        w.add_scalar("learning-rate", 0.01, step)
        for n in names:
            w.add_scalar(n, 1.0 + 0.1 * step, step)
    w.close()


def _cli(*args):
    return subprocess.run([sys.executable, SCRIPT, "dashboard", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


def test_dashboard_png_from_a_tensorboard_folder(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_hyperball import dashboard

    _write_run(tmp_path / "run" / "tensorboard")
    out = tmp_path / "dash.png"
    r = _cli(tmp_path / "run", "-o", out)
    assert r.returncode == 0, r.stderr
    expected = ["[loss] lm loss", "[loss] grad norm (before clipping)", "[lr] learning rate",
                "[indicators] router Z: mean_t LSE(router logits)^2", "[indicators] attention Z: mean LSE(scores)^2",
                "[indicators] output RMS, attention (after alpha)", "[indicators] output RMS, MLP / MoE (after alpha)",
                "[indicators] outliers: % of elements > 5 sigma", "[moe] MaxVio: (max load - mean) / mean"]
    assert f"{out}: 9 panels" in r.stdout
    width, height, texts = _png_info(out)
    assert texts["Description"] == "panels: " + " | ".join(expected)
    # three panels a row, PANEL_SIZE inches at DPI each: 9 panels -> 3 rows
    assert (width, height) == (round(3 * dashboard.PANEL_SIZE[0] * dashboard.DPI),
                               round(3 * dashboard.PANEL_SIZE[1] * dashboard.DPI))


def test_dashboard_bad_input_and_missing_matplotlib(tmp_path):
    r = _cli(tmp_path / "nope")
    assert r.returncode == 2
    assert "RUN_DIR: " in r.stderr and "does not exist" in r.stderr and "events.out.tfevents" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli(tmp_path / "empty")
    assert r.returncode == 2 and "no TensorBoard event files" in r.stderr
    assert not (tmp_path / "empty" / "dashboard.png").exists()
    # without matplotlib: how to install it
    _write_run(tmp_path / "run")
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "
            f"sys.argv = [{SCRIPT!r}, 'dashboard', {str(tmp_path / 'run')!r}]; runpy.run_path({SCRIPT!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 1
    assert "needs matplotlib" in r.stderr and "pip install 'megatron-hyperball[dashboard]'" in r.stderr


# -- W&B sections ---------------------------------------------------------------------------------
def test_wandb_writer_logs_sectioned_aliases_beside_the_original_names():
    from megatron_hyperball.dashboard import SECTIONS, wandb_alias
    from megatron_hyperball.patches.training import _SectionedWandb

    class FakeWandb:
        def __init__(self):
            self.calls, self.config = [], {"x": 1}

        def log(self, data, step=None):
            self.calls.append((data, step))

    fake = FakeWandb()
    writer = _SectionedWandb(fake)
    writer.log({"lm loss": 2.5}, 7)
    writer.log({"hyperball/weight_norm/qkv": 3.0, "indicators/router_z/mean": 1.5, "learning-rate": 0.01}, 8)
    assert fake.calls == [
        ({"lm loss": 2.5, "loss/lm_loss": 2.5}, 7),
        ({"hyperball/weight_norm/qkv": 3.0, "indicators/router_z/mean": 1.5, "learning-rate": 0.01,
          "spheres/weight_norm/qkv": 3.0, "lr/learning_rate": 0.01}, 8),
    ]
    assert writer.config == {"x": 1}  # everything else is the wandb module's
    for name in ("lm loss validation", "grad-norm", "global_load_balancing_loss", "hyperball/grad_norm/router",
                 "max_attention_logit"):
        assert wandb_alias(name).split("/")[0] in SECTIONS
    assert wandb_alias("indicators/router_z/mean") is None and wandb_alias("moe/maxvio/layer_02") is None


# -- through the entry ------------------------------------------------------------------------------
def test_entry_logs_the_indicators_on_logging_steps_only(tmp_path):
    """quickstart_moe (4 MoE layers, EP = 2, 2 ranks) for 4 steps, indicators every 2: Megatron's
    TensorBoard gets exactly the documented names, at steps 2 and 4 only (the train_step patch),
    and the per-type gradient norms add up to Megatron's grad-norm but for the 1-D parameters."""
    from megatron_hyperball.mcore.roles import MATRIX_TYPES
    from tests.conftest import tb_scalars

    tb_dir = tmp_path / "tb"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(REPO_ROOT, "scripts", "pretrain_gpt.py"), "--config", "configs/quickstart_moe.yaml",
           "checkpoint.save=null", "schedule.train_iters=4", "schedule.eval_interval=4", "schedule.eval_iters=1",
           "logging.log_interval=2", "logging.metrics_interval=2", f"logging.tensorboard_dir={tb_dir}",
           "logging.wandb.mode=disabled", f"data.embedded_dir={tmp_path / 'data'}", "data.embedded_max_mb=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    tb = tb_scalars(tb_dir)
    ours = {t for t in tb if t.startswith(("indicators/", "moe/", "hyperball/grad_norm/"))}
    # quickstart_moe: 4 layers, all MoE, local attention spec on CPU, every matrix type present
    assert ours == set(ind.indicator_names(4, moe_layers=[1, 2, 3, 4], grad_types=MATRIX_TYPES))
    assert all(sorted(tb[t]) == [2, 4] for t in ours)
    for step in (2, 4):
        typed = math.sqrt(sum(tb[f"hyperball/grad_norm/{k}"][step] ** 2 for k in MATRIX_TYPES))
        assert 0.9 * tb["grad-norm"][step] < typed <= tb["grad-norm"][step] * (1 + 1e-5)
