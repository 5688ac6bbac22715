"""HyperP's learning-rate transfer law: the lr tuned once at a base scale, moved to a run's scale.

    lr = eta0 * sqrt(B / B0) * sqrt(d0 / depth) * (T / T0) ** (-exponent)

B      tokens per optimizer step (global_batch_size * seq_length)
depth  number of transformer layers
T      total training tokens (train_iters * B)
eta0   the learning rate tuned once at the base scale (B = B0, depth = d0, T = T0)

Defaults: B0 = 2**21 tokens, d0 = 8 layers, T0 = 10.4e9 tokens, exponent 0.32 (HyperP; MD uses
0.25). Pure Python: no torch, no Megatron.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["DEFAULT_B0", "DEFAULT_D0", "DEFAULT_T0", "DEFAULT_EXPONENT", "LRLawResult", "transfer_lr",
           "lr_from_run"]

DEFAULT_B0 = float(2**21)
DEFAULT_D0 = 8.0
DEFAULT_T0 = 10.4e9
DEFAULT_EXPONENT = 0.32


@dataclass(frozen=True)
class LRLawResult:
    """The resolved learning rate and every factor of the law."""

    lr: float
    eta0: float
    batch_tokens: float      # B
    depth: float             # L
    total_tokens: float      # T
    B0: float
    d0: float
    T0: float
    exponent: float
    batch_factor: float      # sqrt(B / B0)
    depth_factor: float      # sqrt(d0 / depth)
    tokens_factor: float     # (T / T0) ** -exponent

    def summary(self) -> str:
        """One line for the start-of-run printout."""
        return (
            f"lr law: lr = {self.lr:.6g} = eta0 {self.eta0:.6g}"
            f" * sqrt(B/B0) {self.batch_factor:.6g} [B={self.batch_tokens:.6g}, B0={self.B0:.6g}]"
            f" * sqrt(d0/depth) {self.depth_factor:.6g} [depth={self.depth:g}, d0={self.d0:g}]"
            f" * (T/T0)^-{self.exponent:g} {self.tokens_factor:.6g} [T={self.total_tokens:.6g}, T0={self.T0:.6g}]"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"lr law: {name}={value!r} must be a positive finite number")
    return value


def transfer_lr(
    eta0: float,
    batch_tokens: float,
    depth: float,
    total_tokens: float,
    *,
    B0: float = DEFAULT_B0,
    d0: float = DEFAULT_D0,
    T0: float = DEFAULT_T0,
    exponent: float = DEFAULT_EXPONENT,
) -> LRLawResult:
    """Resolve the law for a run of ``total_tokens`` at ``batch_tokens`` per step and ``depth`` layers."""
    eta0 = _positive("eta0", eta0)
    B = _positive("batch_tokens", batch_tokens)
    L = _positive("depth", depth)
    T = _positive("total_tokens", total_tokens)
    B0, d0, T0 = _positive("B0", B0), _positive("d0", d0), _positive("T0", T0)
    exponent = float(exponent)
    if not math.isfinite(exponent):
        raise ValueError(f"lr law: exponent={exponent!r} must be finite")
    batch_factor = math.sqrt(B / B0)
    depth_factor = math.sqrt(d0 / L)
    tokens_factor = (T / T0) ** (-exponent)
    return LRLawResult(
        lr=eta0 * batch_factor * depth_factor * tokens_factor,
        eta0=eta0, batch_tokens=B, depth=L, total_tokens=T, B0=B0, d0=d0, T0=T0, exponent=exponent,
        batch_factor=batch_factor, depth_factor=depth_factor, tokens_factor=tokens_factor,
    )


def lr_from_run(
    eta0: float,
    *,
    global_batch_size: int,
    seq_length: int,
    num_layers: int,
    train_iters: int,
    B0: float = DEFAULT_B0,
    d0: float = DEFAULT_D0,
    T0: float = DEFAULT_T0,
    exponent: float = DEFAULT_EXPONENT,
) -> LRLawResult:
    """The law with B = global_batch_size * seq_length, depth = num_layers, T = train_iters * B."""
    B = float(global_batch_size) * float(seq_length)
    return transfer_lr(eta0, B, num_layers, float(train_iters) * B, B0=B0, d0=d0, T0=T0, exponent=exponent)
