"""Depth-muP block output scaling (HyperP).

Every sub-block output -- attention after its output projection, MLP / MoE after its down
projection -- is multiplied by alpha before the residual add:

    h <- h + alpha * (f(norm(h)) + bias)          (then dropout, as Megatron's bias-dropout-add)

alpha is ``1/sqrt(2L)`` (HyperP, the default), ``1/L`` (MD), a positive number, or off.

Where: Megatron's ``TransformerLayer`` does its residual adds through the ``self_attn_bda`` /
``mlp_bda`` entries of ``TransformerLayerSubmodules``, a factory ``(training, fused) -> fn`` with
``fn((x, bias), residual, dropout_prob) -> residual + dropout(x + bias)``
(``megatron.core.fusions.fused_bias_dropout.get_bias_dropout_add``). The spec functions below
return Megatron's own layer specs with those two entries replaced by
:func:`scaled_bias_dropout_add` ``(alpha)``, which computes ``alpha * (x + bias)`` and hands it to
Megatron's bias-dropout-add (fused or not, as the config says). Nothing else in the layer
changes, so the weights, state dict and checkpoints are those of the plain model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import warnings
from typing import Optional

from megatron_hyperball.names import BLOCK_OUTPUT_SCALES, parse_block_output_scale, resolve_block_output_scale

__all__ = [
    "BLOCK_OUTPUT_SCALES",
    "parse_block_output_scale",
    "resolve_block_output_scale",
    "scaled_bias_dropout_add",
    "apply_depth_mup",
    "get_gpt_layer_local_spec_with_depth_mup",
    "get_gpt_layer_spec_with_depth_mup",
    "have_transformer_engine",
]

def scaled_bias_dropout_add(alpha: float):
    """A ``self_attn_bda`` / ``mlp_bda`` factory: ``residual + dropout(alpha * (x + bias))``.

    Returns a plain function (Megatron's ``build_module`` passes functions through) with the
    signature of ``get_bias_dropout_add``: ``(training, fused) -> fn(x_with_bias, residual, prob)``.
    ``x`` (and the bias) are cast to the residual's dtype first, as Megatron does for fp32
    residual connections, so the scale is applied in the residual's precision.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"scaled_bias_dropout_add: alpha={alpha!r} must be a positive finite number")
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    def get_scaled_bias_dropout_add(training, fused):
        bda = get_bias_dropout_add(training, fused)

        def scaled_bda(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if x.dtype != residual.dtype:
                x = x.to(residual.dtype)
                if bias is not None:
                    bias = bias.to(residual.dtype)
            x = (x + bias) * alpha if bias is not None else x * alpha
            return bda((x, None), residual, prob)

        return scaled_bda

    get_scaled_bias_dropout_add.alpha = alpha
    get_scaled_bias_dropout_add.__qualname__ = f"scaled_bias_dropout_add(alpha={alpha:g})"
    return get_scaled_bias_dropout_add


def _scaled_layer_spec(layer_spec, bda):
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    sub = getattr(layer_spec, "submodules", None)
    if not isinstance(sub, TransformerLayerSubmodules):
        raise TypeError(
            f"apply_depth_mup: expected a ModuleSpec of a TransformerLayer (with "
            f"TransformerLayerSubmodules), got {type(layer_spec).__name__} with submodules "
            f"{type(sub).__name__}"
        )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, self_attn_bda=bda, mlp_bda=bda))


def apply_depth_mup(spec, alpha: Optional[float]):
    """A copy of ``spec`` whose attention and MLP/MoE residual adds are scaled by ``alpha``.

    ``spec`` is a TransformerLayer ``ModuleSpec``, a ``TransformerBlockSubmodules`` (e.g. from
    ``get_gpt_decoder_block_spec``, MoE layouts included) or a list of layer specs. ``alpha``
    None returns ``spec`` unchanged. The input is not modified.
    """
    if alpha is None:
        return spec
    bda = scaled_bias_dropout_add(alpha)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(spec, layer_specs=[_scaled_layer_spec(s, bda) for s in spec.layer_specs])
    if isinstance(spec, (list, tuple)):
        return type(spec)(_scaled_layer_spec(s, bda) for s in spec)
    return _scaled_layer_spec(spec, bda)


def have_transformer_engine() -> bool:
    """True when Transformer Engine is importable and megatron-core can use it."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # pragma: no cover - broken TE install
        return False
    return bool(HAVE_TE)


def get_gpt_layer_local_spec_with_depth_mup(alpha: Optional[float], **local_spec_kwargs):
    """``get_gpt_layer_local_spec(**local_spec_kwargs)`` with Depth-muP residual scaling ``alpha``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return apply_depth_mup(get_gpt_layer_local_spec(**local_spec_kwargs), alpha)


def get_gpt_layer_spec_with_depth_mup(alpha: Optional[float], *, use_te: Optional[bool] = None,
                                      **spec_kwargs):
    """A GPT layer spec with Depth-muP residual scaling ``alpha`` (None: the plain spec).

    ``use_te`` None: Transformer Engine's spec when TE is importable, else the local spec.
    ``use_te=True`` without TE warns and falls back to the local spec. ``spec_kwargs`` go to
    ``get_gpt_layer_local_spec`` / ``get_gpt_layer_with_transformer_engine_spec``
    (``normalization`` is a local-spec argument; TE takes it from the TransformerConfig, so it
    is dropped for TE).
    """
    te = have_transformer_engine()
    if use_te and not te:
        warnings.warn("Depth-muP: Transformer Engine is not importable; using the local layer spec",
                      stacklevel=2)
    if use_te is None:
        use_te = te
    if use_te and te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        kwargs = {k: v for k, v in spec_kwargs.items() if k != "normalization"}
        return apply_depth_mup(get_gpt_layer_with_transformer_engine_spec(**kwargs), alpha)
    return get_gpt_layer_local_spec_with_depth_mup(alpha, **spec_kwargs)
