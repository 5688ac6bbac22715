"""HyperP model side (HyperP): Depth-muP block output scaling (``depth_mup``)."""

from megatron_hyperball.models.depth_mup import (
    BLOCK_OUTPUT_SCALES,
    apply_depth_mup,
    get_gpt_layer_local_spec_with_depth_mup,
    get_gpt_layer_spec_with_depth_mup,
    parse_block_output_scale,
    resolve_block_output_scale,
    scaled_bias_dropout_add,
)

__all__ = [
    "BLOCK_OUTPUT_SCALES",
    "apply_depth_mup",
    "get_gpt_layer_local_spec_with_depth_mup",
    "get_gpt_layer_spec_with_depth_mup",
    "parse_block_output_scale",
    "resolve_block_output_scale",
    "scaled_bias_dropout_add",
]

# SqrtGate (``sqrt_gate``) subclasses Megatron's MoE classes: imported on first use, so that this
# package stays importable without megatron-core.
_SQRT_GATE_EXPORTS = (
    "DEFAULT_SHARED_EXPERT_FRACTION",
    "SqrtGateMoELayer",
    "SqrtGateRouter",
    "apply_sqrt_gate",
    "check_shared_expert_fraction",
    "check_sqrt_gate_layer_config",
    "check_sqrt_gate_router_config",
    "sqrt_gates",
)
__all__ += list(_SQRT_GATE_EXPORTS)


def __getattr__(name):
    if name in _SQRT_GATE_EXPORTS:
        from megatron_hyperball.models import sqrt_gate

        return getattr(sqrt_gate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
