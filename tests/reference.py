"""Independent float64 references of the hyperball update rules (Hyperball, HyperP), written from the equations, not from the package."""

from __future__ import annotations

import math

import torch


def frob_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


class AdamHReference:
    """Per-matrix AdamH in float64: W' = W - lr R N(u); W = R N(W')."""

    def __init__(self, w0, lr, betas=(0.9, 0.95), eps=1e-8, radius="init", update_norm="exact"):
        self.w = w0.detach().double().clone()
        self.lr, self.betas, self.eps, self.update_norm = lr, betas, eps, update_norm
        m, n = self.w.shape[0], self.w[0].numel()
        self.R = self.w.norm().item() if radius == "init" else (
            math.sqrt(max(m, n)) if radius == "sqrt_max_dim" else float(radius))
        self.w = self.R * frob_normalize(self.w)
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.t = 0

    def step(self, g, lr=None):
        lr = self.lr if lr is None else lr
        g = g.double()
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        u = (self.m / (1 - b1**self.t)) / ((self.v / (1 - b2**self.t)).sqrt() + self.eps)
        step = lr * self.R * frob_normalize(u) if self.update_norm == "exact" else lr * u
        self.w = self.R * frob_normalize(self.w - step)
        return self.w


def adamw_reference_step(state, p, g, lr, betas, eps, wd):
    """Plain AdamW in float64 (torch's formula), state = dict(m, v, t)."""
    b1, b2 = betas
    state["t"] += 1
    t = state["t"]
    p = p * (1 - lr * wd)
    state["m"] = b1 * state["m"] + (1 - b1) * g
    state["v"] = b2 * state["v"] + (1 - b2) * g * g
    return p - lr * (state["m"] / (1 - b1**t)) / ((state["v"] / (1 - b2**t)).sqrt() + eps)


class MuonHReference:
    """Per-matrix MuonH in float64 around a given orthogonalization function."""

    def __init__(self, w0, lr, orth, momentum=0.95, nesterov=True, radius="init", update_norm="exact"):
        self.w = w0.detach().double().clone()
        self.lr, self.orth, self.mu, self.nesterov, self.update_norm = lr, orth, momentum, nesterov, update_norm
        m, n = self.w.shape
        self.R = self.w.norm().item() if radius == "init" else (
            math.sqrt(max(m, n)) if radius == "sqrt_max_dim" else float(radius))
        self.w = self.R * frob_normalize(self.w)
        self.buf = torch.zeros_like(self.w)
        self.shape_factor = math.sqrt(max(m / n, n / m))

    def step(self, g):
        g = g.double()
        self.buf = self.mu * self.buf + (1 - self.mu) * g
        mom = (1 - self.mu) * g + self.mu * self.buf if self.nesterov else self.buf
        u = self.orth(mom).double()
        step = (self.lr * self.R * frob_normalize(u) if self.update_norm == "exact"
                else self.lr * self.shape_factor * u)
        self.w = self.R * frob_normalize(self.w - step)
        return self.w


def chord_from_lr(lr: float, cos_wu: float) -> float:
    """||W_next - W|| / R of an exact-mode step whose direction makes cosine cos_wu with W."""
    new_norm = math.sqrt(1 - 2 * lr * cos_wu + lr * lr)
    return math.sqrt(max(0.0, 2 - 2 * (1 - lr * cos_wu) / new_norm))
