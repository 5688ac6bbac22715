"""Single-process AdamH / MuonH against the float64 references of the update rules."""


import copy

import pytest
import torch

from megatron_hyperball.optim import AdamH, MuonH, SphereHook, canonical_name
from megatron_hyperball.optim.newton_schulz import orthogonalize
from tests.reference import AdamHReference, MuonHReference, adamw_reference_step, chord_from_lr

STEPS = 25


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("radius", ["init", "sqrt_max_dim", 3.0])
@pytest.mark.parametrize("update_norm", ["exact", "shape"])
def test_adamh_matches_float64_reference(radius, update_norm):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 16) * 0.02)
    ref = AdamHReference(w, lr=0.03, radius=radius, update_norm=update_norm)
    opt = AdamH([w], lr=0.03, radius=radius, update_norm=update_norm)
    assert rel(w.detach(), ref.w) < 1e-6  # fixed radii rescale W onto the sphere at construction
    for g in _grads(w.shape, STEPS, 1):
        w.grad = g.clone()
        opt.step()
        ref.step(g)
        assert abs(w.detach().double().norm().item() / ref.R - 1) < 1e-6
    assert rel(w.detach(), ref.w) <= 1e-6


def test_adamh_plain_group_is_adamw():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(torch.randn(8))
    opt = AdamH([{"params": [w]}, {"params": [b], "sphere": False, "weight_decay": 0.1}], lr=0.01)
    state = {"m": torch.zeros(8, dtype=torch.float64), "v": torch.zeros(8, dtype=torch.float64), "t": 0}
    b_ref = b.detach().double().clone()
    for g in _grads(b.shape, STEPS, 2):
        w.grad = torch.randn_like(w)
        b.grad = g.clone()
        opt.step()
        b_ref = adamw_reference_step(state, b_ref, g.double(), 0.01, (0.9, 0.95), 1e-8, 0.1)
    assert rel(b.detach(), b_ref) <= 1e-6


def _orth_fp32(x):
    return orthogonalize(x.float(), fp32_matmul_prec="highest")


@pytest.mark.parametrize("shape", [(32, 16), (16, 48)])
@pytest.mark.parametrize("update_norm", ["exact", "shape"])
def test_muonh_matches_reference_with_same_newton_schulz(shape, update_norm):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape) * 0.02)
    radius = "init" if update_norm == "exact" else "sqrt_max_dim"
    ref = MuonHReference(w, lr=0.02, orth=_orth_fp32, radius=radius, update_norm=update_norm)
    opt = MuonH([w], lr=0.02, radius=radius, update_norm=update_norm, fp32_matmul_prec="highest")
    for g in _grads(shape, STEPS, 3):
        w.grad = g.clone()
        opt.step()
        ref.step(g)
        assert abs(w.detach().double().norm().item() / ref.R - 1) < 1e-6
    # same NS in fp32; the reference carries momentum in float64, so inputs differ by fp32 rounding
    assert rel(w.detach(), ref.w) <= 1e-5


class RecordUpdates(SphereHook):
    """Records the base update u of the first sphere tensor, every step."""

    def __init__(self):
        self.updates = []

    def partials(self, batch):
        self.updates.append(batch.updates[0].clone())
        return None


@pytest.mark.parametrize("cls", [AdamH, MuonH])
def test_exact_mode_chord_matches_lr(cls):
    """Every step: ||W_t|| = R, and ||W_{t+1} - W_t|| / R is the chord implied by lr."""
    torch.manual_seed(0)
    lr = 0.05
    w = torch.nn.Parameter(torch.randn(20, 12))
    R = w.detach().norm().item()
    kwargs = {"fp32_matmul_prec": "highest"} if cls is MuonH else {}
    record = RecordUpdates()
    opt = cls([w], lr=lr, sphere_hooks=[record], **kwargs)
    for g in _grads(w.shape, STEPS, 4):
        w0 = w.detach().double().clone()
        w.grad = g
        opt.step()
        u = record.updates[-1].double()
        cos = (w0 * u).sum().item() / (w0.norm().item() * u.norm().item())
        chord = (w.detach().double() - w0).norm().item() / R
        assert abs(w.detach().double().norm().item() / R - 1) < 1e-6
        assert abs(chord - chord_from_lr(lr, cos)) < 1e-6
    assert len(record.updates) == STEPS


class RowGain(SphereHook):
    """A miniature magnitude-direction hook: W = diag(r) V, V on the sphere, r stepped by SGD.

    pre_update:   V = W / r,  G_V = diag(r) G,  local grad_r[i] = sum_j V[i,j] G[i,j]
    partials:     grad_r as sphere k's row of extra columns (padded to the tallest matrix)
    post_update:  (after the sphere step of V)  r -= lr grad_r,  W = diag(r) V
    """

    def __init__(self, gains, lr):
        self.gains, self.lr = gains, lr

    def pre_update(self, batch):
        self.grad_r = torch.zeros(len(self.gains), max(len(r) for r in self.gains))
        for i, (w, k) in enumerate(zip(batch.params, batch.ids)):
            r = self.gains[k][:, None]
            w.div_(r)
            self.grad_r[k, : w.shape[0]] += (w * batch.grads[i]).sum(1)
            batch.grads[i] = batch.grads[i] * r

    def partials(self, batch):
        return self.grad_r

    def post_update(self, batch, sums):
        for k, r in enumerate(self.gains):
            r -= self.lr * sums[k, : len(r)]
        for w, k in zip(batch.params, batch.ids):
            w.mul_(self.gains[k][:, None])


def test_custom_hook_transforms_grad_and_weight_and_adds_partials():
    """A row-gain hook around MuonH's sphere step matches a float64 computation of the same rule.

    The hook rewrites the gradient (Newton-Schulz is not invariant to row scaling, so G_V matters),
    the weight before and after the sphere step, and adds per-row sums as extra reduced columns."""
    torch.manual_seed(0)
    shapes, lr_r = [(12, 8), (8, 20)], 0.01
    ws = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    gains = [1 + 0.5 * torch.rand(s[0]) for s in shapes]
    hook = RowGain([r.clone() for r in gains], lr_r)
    opt = MuonH(ws, lr=0.02, fp32_matmul_prec="highest", sphere_hooks=[hook])
    refs = [MuonHReference(w / r[:, None], lr=0.02, orth=_orth_fp32) for w, r in zip(ws, gains)]
    r_ref = [r.double() for r in gains]
    for gs in zip(*(_grads(s, STEPS, 5 + i) for i, s in enumerate(shapes))):
        for w, g in zip(ws, gs):
            w.grad = g.clone()
        opt.step()
        for k, (ref, g) in enumerate(zip(refs, gs)):
            grad_r = (ref.w * g.double()).sum(1)
            ref.step(r_ref[k][:, None] * g.double())
            r_ref[k] = r_ref[k] - lr_r * grad_r
    for k in range(len(shapes)):
        assert rel(hook.gains[k] - gains[k], r_ref[k] - gains[k]) <= 1e-5
        assert rel(ws[k].detach(), r_ref[k][:, None] * refs[k].w) <= 1e-5


def test_zero_gradient_leaves_matrix_in_place():
    w = torch.nn.Parameter(torch.randn(6, 4))
    w0 = w.detach().clone()
    opt = AdamH([w], lr=0.1)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), w0)


# -- bad input: each a clear error naming the option and what is allowed, before any step -------

def test_zero_norm_matrix_is_refused():
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(shape \(4, 4\)\).*norm 0"):
        AdamH([torch.nn.Parameter(torch.zeros(4, 4))])


def test_weight_decay_on_sphere_group_is_refused():
    with pytest.raises(ValueError, match=r"sphere group.*weight_decay=0.1.*allowed: weight_decay=0"):
        MuonH([torch.nn.Parameter(torch.randn(4, 4))], weight_decay=0.1)


def test_unknown_radius_and_update_norm_are_refused():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"radius='unit'.*allowed: init, sqrt_max_dim, <positive number>"):
        AdamH([p], radius="unit")
    with pytest.raises(ValueError, match=r"radius=-1.0 must be a positive"):
        AdamH([p], radius=-1.0)
    with pytest.raises(ValueError, match=r"update_norm='rms'.*allowed: exact, shape"):
        MuonH([p], update_norm="rms")


def test_optimizer_name_typo_is_refused():
    assert canonical_name("muon_hyperball") == "muonh"
    assert canonical_name("AdamH") == "adamh"
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamhh'.*adam_hyperball, adamh, adammd, muon_hyperball, muonh, muonmd"):
        canonical_name("adamhh")


def test_muonh_refuses_non_matrix():
    with pytest.raises(ValueError, match=r"shape \(8,\).*matrices only"):
        MuonH([torch.nn.Parameter(torch.randn(8))])


def test_adamh_refuses_eps_zero():
    """eps = 0 would turn one exactly-zero gradient element into 0/0 = NaN, and the sphere step
    spreads it over the whole matrix through ||u||."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    for eps in (0.0, -1e-8, float("inf")):
        with pytest.raises(ValueError, match=r"AdamH: eps=.*allowed: a positive finite number"):
            AdamH([w], lr=0.01, eps=eps)


def test_late_first_gradient_gets_its_own_bias_correction():
    """A plain (sphere=False) param whose first gradient arrives at step 3 takes torch AdamW's
    first update (its own step count), not the group's third-step bias correction."""
    torch.manual_seed(0)
    a0, b0 = torch.randn(6, 5), torch.randn(7)
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    ra, rb = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    ours = AdamH([{"params": [a, b], "sphere": False}], lr=0.01, weight_decay=0.0)
    ref = torch.optim.AdamW([ra, rb], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        ga, gb = torch.randn(6, 5, generator=g), torch.randn(7, generator=g)
        a.grad, ra.grad = ga.clone(), ga.clone()
        b.grad = rb.grad = None
        if step >= 2:
            b.grad, rb.grad = gb.clone(), gb.clone()
        ours.step()
        ref.step()
    assert ours.state[b]["step"].item() == 4 and ours.state[a]["step"].item() == 6
    torch.testing.assert_close(a, ra, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, rb, rtol=1e-6, atol=1e-7)


def test_init_radius_is_held_fixed_and_checkpointed():
    """radius 'init': R is ||W|| at the first step and never re-read, so rounding cannot walk it
    (re-reading it each step drifted 1.5e-6 in 10,000 steps; held: 2.9e-7). It travels in the
    state dict: a new optimizer loading it continues bit for bit."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16) * 0.02)
    r0 = w.detach().double().norm().item()
    opt = AdamH([w], lr=0.02)
    g = torch.Generator().manual_seed(1)
    worst, held = 0.0, None
    for step in range(1500):
        w.grad = torch.randn(w.shape, generator=g)
        opt.step()
        held = held or opt.sphere_hooks[-1].init_radius.tolist()
        worst = max(worst, abs(w.detach().double().norm().item() / r0 - 1))
        if step == 1000:
            saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
            rng = g.get_state()
    assert opt.sphere_hooks[-1].init_radius.tolist() == held  # bitwise the first step's R
    assert abs(held[0] / r0 - 1) < 1e-7 and worst < 3e-7, worst
    assert saved["param_groups"][0]["sphere_hooks"][-1] == {"init_radius": {"0": held[0]}}

    w2 = torch.nn.Parameter(saved_w.clone())
    opt2 = AdamH([w2], lr=0.02)
    opt2.load_state_dict(saved)
    assert "sphere_hooks" not in opt2.param_groups[0]
    g.set_state(rng)
    for _ in range(1001, 1500):
        w2.grad = torch.randn(w2.shape, generator=g)
        opt2.step()
    assert torch.equal(w2.detach(), w.detach())
