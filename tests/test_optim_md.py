"""Single-process AdamMD / MuonMD (Magnitude-Direction, seed 004) against float64 references.

The reference is written from the equations (not from the package):

    W = diag(g_row) V diag(g_col),  g = softplus(raw) or raw,  raw initialised so g = 1
    V = W / (g_row g_col^T);  P = V * G
    grad_g_row = (P g_col) row sums,  grad_g_col = (g_row^T P) column sums,  grad_scalar = sum P
    grad_raw = grad_g * sigmoid(raw) (softplus) or grad_g (direct)
    G_V = G * (g_row g_col^T);  V <- AdamH / MuonH step of V with G_V (tests/reference.py)
    raw <- Adam(raw, grad_raw, gain_lr), no weight decay
    W = diag(g_row') V' diag(g_col')
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch

from megatron_hyperball.mcore.coords import local_blocks
from megatron_hyperball.optim import AdamH, AdamMD, MagnitudeDirectionHook, MuonMD, SphereHook
from megatron_hyperball.optim.newton_schulz import orthogonalize
from megatron_hyperball.optim.sphere import SphereIndex
from tests.reference import AdamHReference, MuonHReference

STEPS = 25
MODES = ["row_col", "row", "col", "scalar", "none"]
SHAPES = [(24, 16), (12, 40)]
LR, GAIN_LR = 0.03, 0.02  # gain lr well above the default 1e-3 so that the gains move (|g - 1| ~ 0.3)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def _orth_fp32(x):
    return orthogonalize(x.float(), fp32_matmul_prec="highest")


class GainAdamRef:
    """One raw gain vector with its own Adam (float64), no weight decay."""

    def __init__(self, n, parametrization, lr, betas=(0.9, 0.95), eps=1e-8):
        init = math.log(math.expm1(1.0)) if parametrization == "softplus" else 1.0
        self.raw = torch.full((n,), init, dtype=torch.float64)
        self.param, self.lr, self.betas, self.eps = parametrization, lr, betas, eps
        self.m, self.v, self.t = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0

    def g(self):
        return torch.log1p(torch.exp(self.raw)) if self.param == "softplus" else self.raw.clone()

    def step(self, grad_g, lr_factor=1.0):
        grad = grad_g * (torch.sigmoid(self.raw) if self.param == "softplus" else 1.0)
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        self.raw = self.raw - self.lr * lr_factor * m_hat / (v_hat.sqrt() + self.eps)


class MDReference:
    """W = diag(g_row) V diag(g_col) around a float64 AdamH / MuonH reference of V."""

    def __init__(self, w0, base, gains, parametrization, gain_lr):
        self.base = base  # holds V as .w, steps it with G_V
        self.m, self.n = w0.shape
        self.gains = gains
        self.row = GainAdamRef(self.m, parametrization, gain_lr) if gains in ("row_col", "row") else None
        self.col = GainAdamRef(self.n, parametrization, gain_lr) if gains in ("row_col", "col") else None
        self.scalar = GainAdamRef(1, parametrization, gain_lr) if gains == "scalar" else None
        self.w = self.outer() * base.w

    def outer(self):
        one_m, one_n = torch.ones(self.m, dtype=torch.float64), torch.ones(self.n, dtype=torch.float64)
        if self.scalar is not None:
            return self.scalar.g()[0] * torch.outer(one_m, one_n)
        return torch.outer(self.row.g() if self.row else one_m, self.col.g() if self.col else one_n)

    def gain_values(self):
        return {name: ref.g() for name, ref in (("row", self.row), ("col", self.col), ("scalar", self.scalar)) if ref}

    def step(self, g, lr_factor=1.0, lr=None):
        g = g.double()
        scale = self.outer()
        v = self.w / scale
        p = v * g
        g_row = self.row.g() if self.row else torch.ones(self.m, dtype=torch.float64)
        g_col = self.col.g() if self.col else torch.ones(self.n, dtype=torch.float64)
        grads = {}
        if self.row is not None:
            grads["row"] = (p * g_col[None, :]).sum(1)
        if self.col is not None:
            grads["col"] = (p * g_row[:, None]).sum(0)
        if self.scalar is not None:
            grads["scalar"] = p.sum().reshape(1)
        self.base.w = v
        if lr is None:
            self.base.step(g * scale)
        else:
            self.base.step(g * scale, lr=lr)
        for name, grad in grads.items():
            getattr(self, name).step(grad, lr_factor)
        self.w = self.outer() * self.base.w
        return self.w


def _stored_gains(opt, p):
    """Gain values from the optimizer's stored raw gains (the hook's own map, by sphere key)."""
    index = opt.sphere_index()
    return opt.md_hook.gain_values(index).get(index.key(index.sphere_of(p)), {})


def _run(cls, gains, update_norm, parametrization, shapes=SHAPES, seed=0):
    torch.manual_seed(seed)
    ws = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    if cls is AdamMD:
        opt = AdamMD(ws, lr=LR, update_norm=update_norm, gains=gains,
                     gain_parametrization=parametrization, gain_lr=GAIN_LR)
        bases = [AdamHReference(w, lr=LR, update_norm=update_norm) for w in ws]
    else:
        opt = MuonMD(ws, lr=LR, update_norm=update_norm, gains=gains, gain_parametrization=parametrization,
                     gain_lr=GAIN_LR, fp32_matmul_prec="highest")
        bases = [MuonHReference(w, lr=LR, orth=_orth_fp32, update_norm=update_norm) for w in ws]
    refs = [MDReference(w, b, gains, parametrization, GAIN_LR) for w, b in zip(ws, bases)]
    for gs in zip(*(_grads(s, STEPS, 10 + i) for i, s in enumerate(shapes))):
        for w, g in zip(ws, gs):
            w.grad = g.clone()
        opt.step()
        for ref, g in zip(refs, gs):
            ref.step(g)
    return ws, opt, refs


@pytest.mark.parametrize("parametrization", ["softplus", "direct"])
@pytest.mark.parametrize("update_norm", ["shape", "exact"])
@pytest.mark.parametrize("gains", MODES)
@pytest.mark.parametrize("cls", [AdamMD, MuonMD])
def test_md_matches_float64_reference(cls, gains, update_norm, parametrization):
    """Two matrices of different shapes in one optimizer (padded gain columns), 25 steps."""
    ws, opt, refs = _run(cls, gains, update_norm, parametrization)
    for w, ref in zip(ws, refs):
        assert rel(w.detach(), ref.w) <= 1e-5
        stored, expected = _stored_gains(opt, w), ref.gain_values()
        assert stored.keys() == expected.keys()
        for side, g in stored.items():
            assert rel(g, expected[side]) <= 1e-6, side
            # the movement g - 1, relative, up to one float32 ulp at 1 (a scalar gain moves ~0.005)
            assert (g.double() - expected[side]).abs().max() <= 1e-5 * (expected[side] - 1).abs().max() + 1.2e-7
            assert (g - 1).abs().max() > 2e-3  # they did move (a scalar gain, random-sign grads: 0.003+)


class RecordV(SphereHook):
    """Inside the MD hook: sees V before the base update and V_next after the sphere step."""

    def __init__(self, opt_ref):
        self.opt_ref, self.v_before, self.v_next, self.gains_before = opt_ref, [], [], []

    def pre_update(self, batch):
        self.v_before.append([p.detach().clone() for p in batch.params])
        self.gains_before.append([_stored_gains(self.opt_ref[0], p) for p in batch.params])

    def post_update(self, batch, sums):
        self.v_next.append([p.detach().clone() for p in batch.params])


@pytest.mark.parametrize("cls", [AdamMD, MuonMD])
@pytest.mark.parametrize("update_norm", ["shape", "exact"])
def test_v_on_sphere_and_w_exactly_reassembled(cls, update_norm):
    """Every step ||V_next|| = R (to 1e-6) and the stored W is bitwise (V_next * g_row) * g_col
    from the stored gains; at the first step the gains are exactly 1 and V is W itself."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in SHAPES]
    w0 = [w.detach().clone() for w in ws]
    radii = [w.detach().double().norm().item() for w in ws]
    holder = []
    rec = RecordV(holder)
    kw = {"fp32_matmul_prec": "highest"} if cls is MuonMD else {}
    opt = cls(ws, lr=LR, update_norm=update_norm, gain_lr=GAIN_LR, sphere_hooks=[rec], **kw)
    holder.append(opt)
    for step, gs in enumerate(zip(*(_grads(s, STEPS, 20 + i) for i, s in enumerate(SHAPES)))):
        for w, g in zip(ws, gs):
            w.grad = g.clone()
        opt.step()
        for i, w in enumerate(ws):
            v = rec.v_next[-1][i]
            assert abs(v.double().norm().item() / radii[i] - 1) < 1e-6
            g = _stored_gains(opt, w)
            assert torch.equal(w.detach(), v * g["row"][:, None] * g["col"][None, :])
            if step == 0:
                assert all(torch.equal(x, torch.ones_like(x)) for x in rec.gains_before[0][i].values())
                assert torch.equal(rec.v_before[0][i], w0[i])
    assert len(rec.v_next) == STEPS


def test_gains_start_at_exactly_one():
    for param in ("softplus", "direct"):
        hook = MagnitudeDirectionHook(gain_parametrization=param)
        raw = torch.full((7,), hook.raw_init(), dtype=torch.float32)
        assert torch.equal(hook.gain(raw), torch.ones(7))


def test_none_mode_is_adamh():
    torch.manual_seed(0)
    w0 = torch.randn(12, 8)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    md = AdamMD([a], lr=LR, gains="none", update_norm="exact")
    h = AdamH([b], lr=LR, update_norm="exact")
    for g in _grads(w0.shape, 10, 3):
        a.grad, b.grad = g.clone(), g.clone()
        md.step()
        h.step()
    assert torch.equal(a.detach(), b.detach())
    assert not any(k.startswith("gain") for k in md.state[a])


def test_gain_lr_follows_the_schedule():
    """With a torch scheduler (group 'initial_lr'), the gain lr is gain_lr * lr / initial_lr."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 6))
    opt = AdamMD([w], lr=LR, gain_lr=GAIN_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / STEPS)
    ref = MDReference(w, AdamHReference(w, lr=LR, update_norm="shape"), "row_col", "softplus", GAIN_LR)
    for g in _grads(w.shape, STEPS, 4):
        factor = opt.param_groups[0]["lr"] / LR
        w.grad = g.clone()
        opt.step()
        ref.step(g, lr_factor=factor, lr=LR * factor)
        sched.step()
    assert rel(w.detach(), ref.w) <= 1e-5
    assert rel(_stored_gains(opt, w)["row"] - 1, ref.row.g() - 1) <= 1e-5


def test_state_keys_for_checkpointing():
    """The gains travel in the hook state of the param groups, per sphere key: float32 vectors of
    length m and n for raw, exp_avg, exp_avg_sq, and the sphere's gain step count."""
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = MuonMD([w], gains="row_col", fp32_matmul_prec="highest")
    w.grad = torch.randn(6, 4)
    opt.step()
    hooks = opt.state_dict()["param_groups"][0]["sphere_hooks"]
    st = hooks[0]["md_gains"]["0"]
    for side, n in (("row", 6), ("col", 4)):
        for suffix in ("raw", "exp_avg", "exp_avg_sq"):
            assert st[f"{side}_{suffix}"].shape == (n,)
            assert st[f"{side}_{suffix}"].dtype == torch.float32
    assert st["step"] == 1
    assert "scalar_raw" not in st
    assert "init_radius" in hooks[1]  # the sphere step's own state beside it
    assert not any(k.startswith("gain") for k in opt.state[w])  # no per-element gain state


@pytest.mark.parametrize("cls", [AdamMD, MuonMD])
def test_state_dict_round_trip_continues_bitwise(cls):
    """Gains and their moments travel in torch's state dict: a new optimizer continues bit for bit."""
    torch.manual_seed(0)
    w0 = torch.randn(10, 6)
    kw = {"fp32_matmul_prec": "highest"} if cls is MuonMD else {}
    a = torch.nn.Parameter(w0.clone())
    opt = cls([a], lr=LR, gain_lr=GAIN_LR, **kw)
    grads = _grads(w0.shape, 12, 6)
    for g in grads[:6]:
        a.grad = g.clone()
        opt.step()
    saved_w, saved = a.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[6:]:
        a.grad = g.clone()
        opt.step()
    b = torch.nn.Parameter(saved_w)
    opt2 = cls([b], lr=LR, gain_lr=GAIN_LR, **kw)
    opt2.load_state_dict(saved)
    for g in grads[6:]:
        b.grad = g.clone()
        opt2.step()
    assert torch.equal(a.detach(), b.detach())
    for side, g in _stored_gains(opt, a).items():
        assert torch.equal(g, _stored_gains(opt2, b)[side]), side

# -- shards: two simulated ranks (threads), each a flat ZeRO-1-style slice of the same matrix -----

class ThreadSumIndex(SphereIndex):
    """A SphereIndex whose all_reduce_ sums the partials of the threads sharing it."""

    def __init__(self, param, shape, shared):
        super().__init__(index={id(param): 0}, shapes=[shape])
        self.shared, self.rank = shared, shared["next_rank"]
        shared["next_rank"] += 1

    def all_reduce_(self, partials):
        s = self.shared
        s["slots"][self.rank] = partials.clone()
        s["barrier"].wait()
        total = s["slots"][0] + s["slots"][1]
        s["barrier"].wait()
        partials.copy_(total)


@pytest.mark.parametrize("gains", ["row_col", "row", "col", "scalar"])
def test_adammd_on_flat_shards_matches_whole_matrix(gains):
    """Two ranks hold [0, 37) and [37, m n) of the flattened matrix (a cut inside a row: rank 0 a
    partial last row, rank 1 a partial first row); with the layout (mcore.coords blocks) and summed
    columns they reproduce the single-process AdamMD."""
    torch.manual_seed(0)
    m, n = 9, 7
    w0 = torch.randn(m, n)
    cut = 37
    whole = torch.nn.Parameter(w0.clone())
    opt = AdamMD([whole], lr=LR, gains=gains, gain_lr=GAIN_LR, update_norm="exact")
    grads = _grads((m, n), STEPS, 5)
    for g in grads:
        whole.grad = g.clone()
        opt.step()

    shared = {"next_rank": 0, "slots": [None, None], "barrier": threading.Barrier(2)}
    bounds = [(0, cut), (cut, m * n)]
    shards = [torch.nn.Parameter(w0.reshape(-1)[a:b].clone()) for a, b in bounds]

    def layout_for(start):
        def layout(index, p, k):
            return local_blocks((m, n), flat_range=(start, start + p.numel()))
        return layout

    opts = [AdamMD([s], lr=LR, gains=gains, gain_lr=GAIN_LR, update_norm="exact", prepare_spheres=False,
                   gain_layout=layout_for(a), sphere_index=ThreadSumIndex(s, (m, n), shared))
            for s, (a, _) in zip(shards, bounds)]
    errors = []

    def run(r):
        try:
            a, b = bounds[r]
            for g in grads:
                shards[r].grad = g.reshape(-1)[a:b].clone()
                opts[r].step()
        except Exception as e:  # surface in the main thread
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = torch.cat([s.detach() for s in shards]).reshape(m, n)
    assert rel(got, whole.detach()) <= 1e-6
    for side, g in _stored_gains(opt, whole).items():
        for o, s in zip(opts, shards):
            assert rel(_stored_gains(o, s)[side] - 1, g - 1) <= 1e-5


# -- bad input: the option name and the allowed values ----------------------------------------

@pytest.mark.parametrize("cls", [AdamMD, MuonMD])
def test_bad_gain_options_are_refused(cls):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"gains='rows'.*allowed: row_col, row, col, scalar, none"):
        cls([p], gains="rows")
    with pytest.raises(ValueError, match=r"gain_parametrization='exp'.*allowed: softplus, direct"):
        cls([p], gain_parametrization="exp")
    for bad in (0.0, -1e-3, float("nan"), float("inf"), "1e-3", True):
        with pytest.raises(ValueError, match=r"gain_lr=.*allowed: a positive finite number"):
            cls([p], gain_lr=bad)


@pytest.mark.parametrize("cls", [AdamMD, MuonMD])
def test_gains_only_on_spheres_and_one_mode(cls):
    """A param group off the sphere asking for gains, or a group asking for another gain mode, is
    refused at construction (before any step), naming the group, the option and the allowed values."""
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"param group 0 asks for gains='col'.*allowed: 'row_col'"):
        cls([{"params": [a], "gains": "col"}])
    if cls is AdamMD:  # MuonMD (as MuonH) refuses any group off the sphere already
        with pytest.raises(ValueError, match=r"param group 1 asks for gains='row'.*not on a sphere.*allowed on this group: gains='none'"):
            cls([{"params": [a]}, {"params": [b], "sphere": False, "gains": "row"}])
        cls([{"params": [a], "gains": "row_col"}, {"params": [b], "sphere": False, "gains": "none"}])  # fine
    with pytest.raises(ValueError, match=r"gain betas=.*allowed: each in \[0, 1\)"):
        MagnitudeDirectionHook(betas=(0.9, 1.0))


@pytest.mark.parametrize("cls,base", [(AdamMD, AdamH), (MuonMD, None)])
def test_checkpoint_without_gains(cls, base):
    """An AdamH / MuonH state dict (no gains) loaded by AdamMD / MuonMD is refused naming
    md_allow_missing_gains; with allow_missing_gains=True the gains start at 1 (W = V), with a
    warning, and the next step equals a fresh MD optimizer's first gain step."""
    from megatron_hyperball.optim import MuonH

    base = base or MuonH
    kw = {"fp32_matmul_prec": "highest"} if cls is MuonMD else {}
    torch.manual_seed(0)
    w0 = torch.randn(8, 6)
    h = base([torch.nn.Parameter(w0.clone())], lr=LR, **kw)
    h.param_groups[0]["params"][0].grad = torch.randn(8, 6)
    h.step()
    saved = copy.deepcopy(h.state_dict())
    p = torch.nn.Parameter(w0.clone())
    with pytest.raises(ValueError, match=r"no magnitude-direction gains for 1 matrices.*md_allow_missing_gains=True"):
        cls([p], lr=LR, **kw).load_state_dict(copy.deepcopy(saved))
    md = cls([p], lr=LR, gain_lr=GAIN_LR, allow_missing_gains=True, **kw)
    with pytest.warns(UserWarning, match="md_allow_missing_gains=True: those gains start at 1"):
        md.load_state_dict(copy.deepcopy(saved))
    p.grad = torch.randn(8, 6)
    md.step()
    g = _stored_gains(md, p)
    assert md.md_hook.steps.tolist() == [1.0]  # the gains' own Adam starts at step 1
    assert all((v - 1).abs().max() > 0 for v in g.values())


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("zero", [None, (5, 29), (0, 11), (17, 40)])
def test_gated_fc1_rows_are_in_gate_up_order_at_every_tp(tp, zero):
    """A SwiGLU fc1 (full [gate; up], 2f x n) split over TP ranks (shard t = [gate rows of t; up rows
    of t]) and then sliced by ZeRO-1: every local element's full-matrix (row, col) from
    ``param_blocks(gated=True)`` is its position in [gate; up], whatever the TP size."""
    from megatron_hyperball.mcore.coords import param_blocks

    f, n = 8, 5
    full = torch.arange(2 * f * n).view(2 * f, n)          # element value = its [gate; up] flat index
    gate, up = full[:f], full[f:]
    for t in range(tp):
        rows = slice(t * f // tp, (t + 1) * f // tp)
        shard = torch.cat([gate[rows], up[rows]])           # Megatron's layout of TP shard t
        param = torch.nn.Parameter(shard.float())
        param.tensor_model_parallel, param.partition_dim = True, 0
        start, end = (0, shard.numel()) if zero is None else (min(zero[0], shard.numel()), min(zero[1], shard.numel()))
        local = shard.reshape(-1)[start:end]
        got = torch.full_like(local, -1)
        for b in param_blocks(param, tp, t, None if zero is None else (start, end), gated=True):
            rr, cc = torch.meshgrid(torch.arange(b.row, b.row + b.rows), torch.arange(b.col, b.col + b.cols),
                                    indexing="ij")
            got[b.offset: b.offset + b.numel] = (rr * n + cc).reshape(-1)
        assert torch.equal(got, local), (tp, t, zero)
