"""Small builders around megatron-core for tests and benchmarks.

- :func:`init_parallel` sets up Megatron's model-parallel groups and seeds the RNGs the
  way ``megatron.training`` does (data-parallel replicas initialise identically).
- :func:`build_gpt` builds a ``GPTModel`` with the local (no Transformer Engine) layer spec.
- :func:`wrap_ddp` wraps it in Megatron's ``DistributedDataParallel``, computing the
  parameter layout the way ``megatron.training.training.wrap_model_chunks_with_ddp`` does
  (``LayerWiseDistributedOptimizer.compute_full_param_layout`` for the layer-wise optimizer,
  ``DistributedOptimizer.compute_full_param_layout`` for ZeRO-1).

``torch.distributed`` must already be initialised; on CPU call
``megatron_hyperball.compat.enable_cpu()`` before :func:`init_parallel`.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.layer_wise_optimizer import (
    LayerWiseDistributedOptimizer,
    tag_params_for_buffer_routing,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_pg_size

__all__ = ["init_parallel", "destroy_parallel", "seed_all", "build_gpt", "wrap_ddp", "unwrap"]


def seed_all(seed: int) -> None:
    """Seed Python, torch and Megatron's (CUDA or, after ``enable_cpu``, CPU) RNG tracker.

    ``model_parallel_cuda_manual_seed`` gives every data-parallel replica the same default
    seed and every tensor-parallel rank its own tracker seed (``seed + 2718 + tp_rank``).
    """
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_parallel(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234, **kwargs: Any) -> None:
    """(Re)initialise Megatron's parallel groups and seed.

    Extra keyword arguments go to ``parallel_state.initialize_model_parallel``. An existing
    model-parallel state is destroyed first, so a process can switch layouts (e.g. TP=1
    then TP=2).
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError("init_parallel: initialise torch.distributed first")
    destroy_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        **kwargs,
    )
    seed_all(seed)


def destroy_parallel() -> None:
    """Destroy Megatron's model-parallel state and the process groups it created.

    ``destroy_model_parallel`` forgets its groups but torch keeps them alive: on gloo each
    initialisation leaves ~20 groups and ~60 threads per rank behind (measured, megatron-core
    0.19.2), so a process that switches layouts often (a test launch) reached 4,600 threads.
    Every group but the default one is destroyed here.
    """
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        world = torch.distributed.group.WORLD
        for group in list(torch.distributed.distributed_c10d._world.pg_map):
            if group is not world:
                torch.distributed.destroy_process_group(group)


def build_gpt(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    vocab_size: int,
    seq_length: int,
    ffn_hidden_size: Optional[int] = None,
    bf16: bool = False,
    *,
    position_embedding_type: str = "learned_absolute",
    share_embeddings_and_output_weights: bool = False,
    gpt_kwargs: Optional[dict] = None,
    **config_kwargs: Any,
) -> torch.nn.Module:
    """A ``GPTModel`` with the local layer spec, for the current parallel state.

    Dropout defaults to 0 (pass ``hidden_dropout`` / ``attention_dropout`` to change it);
    other keyword arguments go to ``TransformerConfig``. With ``bf16=True`` the parameters
    are bf16 and the model is wrapped in Megatron's ``Float16Module`` exactly as
    ``megatron.training`` does (the ``GPTModel`` is its ``.module``).
    """
    config_kwargs.setdefault("hidden_dropout", 0.0)
    config_kwargs.setdefault("attention_dropout", 0.0)
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        **config_kwargs,
    )
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        qk_layernorm=config.qk_layernorm,
        normalization=config.normalization,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type=position_embedding_type,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        **(gpt_kwargs or {}),
    )
    if bf16:
        model = Float16Module(config, model)
    return model


def wrap_ddp(
    model: torch.nn.Module,
    *,
    use_distributed_optimizer: bool,
    layer_wise: bool = False,
    bucket_size: Optional[int] = None,
    grad_reduce_in_fp32: Optional[bool] = None,
    overlap_grad_reduce: bool = False,
    average_in_collective: bool = False,
    **ddp_kwargs: Any,
) -> DistributedDataParallel:
    """Wrap ``model`` in Megatron's DDP with the parameter layout Megatron's trainer uses.

    ``layer_wise=True`` prepares the model for ``LayerWiseDistributedOptimizer`` (the
    optimizer for ``OptimizerConfig(use_layer_wise_distributed_optimizer=True)``): params are
    tagged for buffer routing, ``use_distributed_optimizer`` is forced on (reduce-scatter),
    and the shard-aligned layout comes from
    ``LayerWiseDistributedOptimizer.compute_full_param_layout``. ``grad_reduce_in_fp32``
    defaults to the model's ``bf16`` flag (Megatron reduces bf16 grads in fp32).
    """
    config = model.config
    if grad_reduce_in_fp32 is None:
        grad_reduce_in_fp32 = bool(config.bf16 or config.fp16)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer or layer_wise,
        bucket_size=bucket_size,
        average_in_collective=average_in_collective,
        **ddp_kwargs,
    )

    if layer_wise:
        tag_params_for_buffer_routing([model])
        compute_layout = LayerWiseDistributedOptimizer.compute_full_param_layout
    elif use_distributed_optimizer:
        compute_layout = DistributedOptimizer.compute_full_param_layout
    else:
        compute_layout = None

    kwargs = {}
    if compute_layout is not None:
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        dp_group = getattr(pgs, "intra_dp_cp", None)
        if dp_group is None:
            dp_group = pgs.dp_cp
        expt_dp_group = getattr(pgs, "intra_expt_dp", None)
        if expt_dp_group is None:
            expt_dp_group = getattr(pgs, "expt_dp", None)
        kwargs["full_param_layout"] = compute_layout(
            [p for p in model.parameters() if p.requires_grad],
            ddp_config.bucket_size,
            get_pg_size(dp_group),
            ddp_config,
            expert_data_parallel_world_size=get_pg_size(expt_dp_group),
        )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost module under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
