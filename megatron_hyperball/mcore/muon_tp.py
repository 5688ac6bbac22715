"""MuonH / MuonMD inside Megatron: the pure step with Megatron's TP-aware Newton-Schulz.

Megatron's ``TensorParallelMuon`` knows how to orthogonalize a TP-sharded matrix (all-gather the
momentum along the partition dim, or a distributed NS) and how to split fused QKV. MuonH reuses
exactly those methods for u = NS5(momentum); everything else is ``optim.MuonH``: the sphere
step, batched over all matrices, with norms summed over TP by the sphere index the adapter installs.
``TensorParallelMuonMD`` is the same with ``optim.MuonMD``'s gain hook (its layout of TP shards, and
so its gain sums over TP, installed by the adapter too).
"""

from __future__ import annotations

from typing import Any

from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz_tp
from emerging_optimizers.utils import fp32_matmul_precision
from megatron.core.optimizer.emerging_optimizers import TensorParallelMuon, _get_qkv_split_shapes

from megatron_hyperball.optim.muon_h import MuonH
from megatron_hyperball.optim.muon_md import MuonMD


class TensorParallelMuonH(MuonH):
    # Megatron's TP / fused-QKV aware orthogonalization, used as is.
    orthogonalize_tp = TensorParallelMuon.orthogonalize
    scaled_orthogonalize_fn_with_gtp_remat = TensorParallelMuon.scaled_orthogonalize_fn_with_gtp_remat

    def __init__(
        self,
        params,
        *,
        pg_collection=None,
        split_qkv: bool = True,
        qkv_split_shapes=None,
        tp_mode: str = "blockwise",
        megatron_config=None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
        # ChainedOptimizer asserts that its members share one config; Megatron's layer-wise
        # optimizer chains this raw optimizer directly when not in bf16, so carry it.
        self.config = megatron_config
        self.pg_collection = pg_collection
        self.split_qkv = split_qkv
        self.is_qkv_fn = lambda p: getattr(p, "is_qkv", False)
        self.qkv_split_shapes = qkv_split_shapes
        self.tp_mode = tp_mode
        steps, coeff = self.ns_steps, self.coefficient_type
        ns_tp_mode = "duplicated" if tp_mode == "blockwise" else tp_mode

        # No Muon scale factor here: the sphere step normalizes u (exact) or applies the
        # full-matrix shape factor itself (shape).
        def scaled_orthogonalize_fn(grad, tp_group, partition_dim=None):
            return newton_schulz_tp(grad, steps, coeff, tp_group, partition_dim, ns_tp_mode)

        self.scaled_orthogonalize_fn = scaled_orthogonalize_fn

    def orthogonalize(self, p, m):
        # Megatron tags main params with the model param's TP attributes; fall back on the
        # model param the adapter recorded when a wrapper made a fresh fp32 copy.
        src = getattr(p, "_hyperball_model_param", p)
        with fp32_matmul_precision(self.fp32_matmul_prec):
            return self.orthogonalize_tp(src, m.float()).to(p.dtype)


class TensorParallelMuonMD(TensorParallelMuonH, MuonMD):
    """MuonMD (W = diag(g_row) V diag(g_col), V stepped by MuonH) with Megatron's TP-aware NS:
    TensorParallelMuonH's TP methods over MuonMD's hooks (MRO: TP layer, then MuonMD, then MuonH)."""


def config_to_kwargs(config, model_chunks, pg_collection) -> dict[str, Any]:
    """OptimizerConfig -> TensorParallelMuonH kwargs (Megatron's muon_* knobs, hyperball_* knobs)."""
    from megatron_hyperball.mcore.options import hyperball_options

    hb = hyperball_options(config)
    return dict(
        lr=config.lr,
        momentum=config.muon_momentum,
        nesterov=config.muon_nesterov,
        ns_steps=config.muon_num_ns_steps,
        coefficient_type=config.muon_coefficient_type,
        fp32_matmul_prec=config.muon_fp32_matmul_prec,
        radius=hb.radius,
        update_norm=hb.update_norm,
        weight_decay=0.0,
        prepare_spheres=False,  # the adapter checks and scales the full (TP-global) matrices
        pg_collection=pg_collection,
        split_qkv=config.muon_split_qkv,
        qkv_split_shapes=_get_qkv_split_shapes(model_chunks[0].config),
        tp_mode=config.muon_tp_mode,
        megatron_config=config,
    )


def config_to_kwargs_md(config, model_chunks, pg_collection) -> dict[str, Any]:
    """OptimizerConfig -> TensorParallelMuonMD kwargs: MuonH's plus the gains (their Adam takes the
    run's adam betas / eps, seed 004)."""
    from megatron_hyperball.mcore.options import hyperball_options

    hb = hyperball_options(config)
    return dict(
        config_to_kwargs(config, model_chunks, pg_collection),
        gains=hb.gains, gain_parametrization=hb.gain_parametrization, gain_lr=hb.gain_lr,
        gain_betas=(config.adam_beta1, config.adam_beta2), gain_eps=config.adam_eps,
        allow_missing_gains=hb.allow_missing_gains,
    )
