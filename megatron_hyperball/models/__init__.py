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
