"""Newton-Schulz orthogonalization: emerging-optimizers' implementation, the 'quintic' coefficients.

One place that says which iteration MuonH uses, so a faster correct one can replace it here.
"""

from __future__ import annotations

import torch
from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz
from emerging_optimizers.utils import fp32_matmul_precision

NS_COEFFICIENTS = "quintic"  # first step (4.0848, -6.8946, 2.9270)
NS_STEPS = 5


def orthogonalize(
    x: torch.Tensor, steps: int = NS_STEPS, coefficient_type: str = NS_COEFFICIENTS,
    fp32_matmul_prec: str = "medium",
) -> torch.Tensor:
    """NS5 of a 2-D fp32 matrix; 'medium' runs the iteration in bf16 (transposed when m > n)."""
    with fp32_matmul_precision(fp32_matmul_prec):
        return newton_schulz(x.float(), steps=steps, coefficient_type=coefficient_type)
