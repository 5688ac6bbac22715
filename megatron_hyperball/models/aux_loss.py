"""HyperP's MoE load-balancing loss as Megatron computes it (``global_aux_loss``), and the one
correction the mapping needs.

HyperP's loss is the switch loss of the full softmax over the global batch, one per MoE layer,
summed over layers:

    L = E / k * sum_i f_i P_i,    f_i = c_i / T,    P_i = (1/T) sum_t softmax(z_t)_i

with c_i the (token, top-k slot) pairs routed to expert i and T the tokens of every data-parallel
rank. megatron-core 0.19's ``global_aux_loss`` sums the counts c_i over the tp x dp x cp group and
has each rank add coeff * (its share of L) to the loss: the shares add up to L (that is the value
its MoE logging reports, summed over the group), but DDP then *averages* the router gradient over
the dp data-parallel ranks, so the step follows coeff * dL/dW / dp (measured: ratio 0.5000 at
dp = 2, ``tests/distributed/test_moe_aux_loss.py``). Passing coeff * dp to Megatron makes the
gradient coeff * dL/dW, HyperP's loss at HyperP's weight, at any data-parallel size; the logged
value (loss / coeff) is unchanged. Micro-batch ``aux_loss`` and ``seq_aux_loss`` are per-rank losses
that DDP averages as intended: their coefficient passes as is.
"""

from __future__ import annotations

from typing import Sequence, Union

__all__ = ["megatron_aux_loss_coeff", "corrected_global_aux_loss"]

Coeff = Union[float, Sequence[float]]


def megatron_aux_loss_coeff(coeff: Coeff, loss_type: Union[str, Sequence[str]], data_parallel_size: int) -> Coeff:
    """The ``moe_aux_loss_coeff`` to give Megatron for the configured ``coeff`` (a number, or one per
    type when ``loss_type`` is a list): global_aux_loss entries times the data-parallel size."""
    if isinstance(loss_type, str):
        return float(coeff) * (data_parallel_size if loss_type == "global_aux_loss" else 1)
    coeffs = list(coeff) if isinstance(coeff, (list, tuple)) else [float(coeff)] * len(loss_type)
    return [float(c) * (data_parallel_size if t == "global_aux_loss" else 1) for c, t in zip(coeffs, loss_type)]


def corrected_global_aux_loss(coeff: Coeff, loss_type: Union[str, Sequence[str]],
                              data_parallel_size: int) -> tuple[Coeff, str] | None:
    """For a run whose ``--moe-router-load-balancing-type`` includes global_aux_loss: (Megatron's
    ``moe_aux_loss_coeff``, the note to print), a one-entry list read as its value (Megatron's
    parser keeps ``nargs='+'`` lists); None when no type is global_aux_loss (nothing to correct)."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if "global_aux_loss" not in types:
        return None
    if len(types) == 1:
        loss_type = types[0]
    if isinstance(coeff, (list, tuple)) and len(coeff) == 1:
        coeff = coeff[0]
    out = megatron_aux_loss_coeff(coeff, loss_type, data_parallel_size)
    return out, (f"global aux loss weight {coeff} (Megatron's coefficient {out} = it x dp {data_parallel_size})")
