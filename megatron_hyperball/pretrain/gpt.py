"""The GPT pieces ``megatron.training.pretrain`` needs: model provider, dataset provider, forward step.

megatron-core 0.19.2's wheel ships ``megatron.training`` but not Megatron-LM's root
``pretrain_gpt.py``; these are this project's equivalents, written against the installed
``megatron.training`` API. The providers take the run's validated config as their first argument
(the entry binds it with ``functools.partial``):

- :func:`model_provider` builds Megatron's ``GPTModel`` from the parsed Megatron arguments, with the
  Depth-muP layer spec (``models.depth_mup``) for the config's ``hyperp.block_output_scale``:
  Transformer Engine's spec when ``--transformer-impl transformer_engine``, Megatron's local spec
  otherwise (always on CPU). A learned position embedding is tagged so the hyperball optimizers
  give it Adam (``mcore.roles.tag_position_embeddings``).
- :func:`train_valid_test_datasets_provider` builds Megatron's ``GPTDataset`` splits with
  ``BlendedMegatronDatasetBuilder`` (data prefixes, blends, ``--split`` or per-split paths,
  exactly as Megatron reads them from ``args``). For ``data.data_path: embedded`` it first
  prepares the embedded corpus (:func:`ensure_embedded_data`).
- :func:`forward_step` fetches a micro-batch (broadcast over tensor parallelism, split over
  context parallelism, as Megatron does), runs the model with ``labels`` and ``loss_mask``, and
  returns Megatron's ``(loss_sum, num_tokens, {'lm loss': [loss_sum, num_tokens]})`` loss
  triple, masked by the dataset's loss mask (padding, and EOD tokens with ``--eod-mask-loss``).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Optional

import torch

__all__ = ["model_provider", "train_valid_test_datasets_provider", "forward_step", "prepare_embedded_data",
           "ensure_embedded_data", "layer_spec", "providers"]


# -- model ------------------------------------------------------------------------------------------
def layer_spec(args, config, alpha: Optional[float], vp_stage: Optional[int] = None,
               sqrt_gate_p: Optional[float] = None):
    """The transformer layer / block spec with Depth-muP scale ``alpha`` (None: off) for ``args``;
    with ``sqrt_gate_p`` (MoE) the SqrtGate router and shared-expert mix (``models.sqrt_gate``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_hyperball.models.depth_mup import apply_depth_mup, get_gpt_layer_spec_with_depth_mup

    use_te = args.transformer_impl == "transformer_engine"
    if args.num_experts:
        # MoE: Megatron's block spec (dense / MoE layers per --moe-layer-freq), then Depth-muP.
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                          normalization=args.normalization, vp_stage=vp_stage)
        spec = apply_depth_mup(spec, alpha)
        if sqrt_gate_p is not None:
            from megatron_hyperball.models.sqrt_gate import apply_sqrt_gate

            spec = apply_sqrt_gate(spec, p=sqrt_gate_p)
        return spec
    return get_gpt_layer_spec_with_depth_mup(
        alpha, use_te=use_te, num_experts=None, moe_grouped_gemm=False,
        qk_layernorm=args.qk_layernorm, normalization=args.normalization)


def model_provider(cfg, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """Megatron's ``GPTModel`` with the Depth-muP spec of ``cfg`` (called by ``megatron.training.get_model``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args, print_rank_0
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_hyperball.mcore.roles import tag_moe_spheres, tag_position_embeddings

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    alpha = cfg.block_output_alpha()
    moe = cfg.model.moe
    aux_note = _correct_global_aux_loss(args, config) if moe is not None else ""
    sqrt_gate_p = float(moe.shared_expert_fraction) if moe is not None and moe.sqrt_gate else None
    spec = layer_spec(args, config, alpha, vp_stage, sqrt_gate_p=sqrt_gate_p)
    print_rank_0(f"> building GPTModel ({args.transformer_impl} spec), Depth-muP block output scale "
                 f"{cfg.hyperp.block_output_scale} -> alpha = {'off' if alpha is None else f'{alpha:.6g}'}"
                 + ("" if sqrt_gate_p is None else f"; SqrtGate, shared-expert fraction p = {sqrt_gate_p:g}")
                 + aux_note)
    kwargs = {}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        **kwargs,
    )
    tag_position_embeddings(model)
    if moe is not None and cfg.optimizer.sphere:
        # before DDP: the shared-expert gate, and the router unless frobenius, take Adam
        tag_moe_spheres(model, moe.resolved_router_sphere(True))
    return model


def _correct_global_aux_loss(args, config) -> str:
    """Give the router HyperP's global aux loss at the configured weight (``models.aux_loss``:
    Megatron's global_aux_loss gradient is 1/dp of it); returns a note for the build line."""
    from megatron.core import parallel_state

    from megatron_hyperball.models.aux_loss import corrected_global_aux_loss

    # from the config's coefficient every time: the same for every model chunk
    fix = corrected_global_aux_loss(args.moe_aux_loss_coeff, args.moe_router_load_balancing_type,
                                    parallel_state.get_data_parallel_world_size())
    if fix is None:
        return ""
    config.moe_aux_loss_coeff, note = fix
    return f"; {note}"


# -- data -------------------------------------------------------------------------------------------
def prepare_embedded_data(cfg, verbose: bool = True) -> Optional[dict]:
    """Write the embedded corpus if ``data.data_path`` is 'embedded' (a no-op when already there).

    Returns the corpus manifest, or None for your own data.
    """
    if not cfg.data.embedded:
        return None
    from megatron_hyperball.data.prepare import prepare

    return prepare(cfg.data.embedded_dir, int(cfg.data.embedded_max_mb * 1e6), verbose=verbose)


def ensure_embedded_data(cfg) -> None:
    """Prepare the embedded corpus once per node; all other processes wait on barriers.

    Global rank 0 writes (or finds) it first. Then the first process of each node checks it
    again: on a shared file system it is found and nothing is written; on node-local disks that
    node writes its own copy. The corpus is byte-identical wherever it is written.
    """
    if not cfg.data.embedded:
        return
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_initialized() else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        prepare_embedded_data(cfg, verbose=True)
    if dist.is_initialized():
        dist.barrier()
        if rank != 0 and local_rank == 0:
            prepare_embedded_data(cfg, verbose=False)
        dist.barrier()


def _is_dataset_built_on_rank(vp_stage: Optional[int] = None) -> bool:
    from megatron.core import mpu
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return is_first_or_last_pipeline_stage(vp_stage) and mpu.get_tensor_model_parallel_rank() == 0


def _gpt_dataset_config(args):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        context_parallel_size=args.context_parallel_size,
    )


def train_valid_test_datasets_provider(cfg, train_val_test_num_samples, vp_stage: Optional[int] = None):
    """Megatron's GPTDataset splits (called by ``build_train_valid_test_data_iterators``)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()
    ensure_embedded_data(cfg)
    config = _gpt_dataset_config(args)
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    train_ds, valid_ds, test_ds = BlendedMegatronDatasetBuilder(
        GPTDataset, train_val_test_num_samples, partial(_is_dataset_built_on_rank, vp_stage=vp_stage), config
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return train_ds, valid_ds, test_ds


def providers(cfg) -> tuple:
    """(model provider, dataset provider) bound to ``cfg``, as ``megatron.training.pretrain`` takes them."""
    datasets = partial(train_valid_test_datasets_provider, cfg)
    # every rank calls it (the datasets are built only where _is_dataset_built_on_rank says; the
    # embedded-data barrier needs every rank)
    datasets.is_distributed = True
    return partial(model_provider, cfg), datasets


# -- forward step -----------------------------------------------------------------------------------
_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def get_batch(data_iterator, vp_stage: Optional[int] = None):
    """(tokens, labels, loss_mask, attention_mask, position_ids) of this rank's micro-batch."""
    from megatron.core import mpu
    from megatron.core.parallel_state import get_context_parallel_group, get_hybrid_data_context_parallel_groups
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        data = next(data_iterator)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        for key in _BATCH_KEYS:
            value = data.get(key)
            batch[key] = value.to(device, non_blocking=True) if (value is not None and device) else value
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=args.hybrid_context_parallel,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch.setdefault("cu_seqlens", None)
    batch = get_batch_on_this_cp_rank(
        batch,
        is_hybrid_cp=args.hybrid_context_parallel,
        cp_group=get_context_parallel_group(),
        hybrid_cp_group_func=get_hybrid_data_context_parallel_groups,
    )
    return (batch.get("tokens"), batch.get("labels"), batch.get("loss_mask"), batch.get("attention_mask"),
            batch.get("position_ids"))


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    """Masked token loss: (sum, number of tokens, {'lm loss': [sum, tokens]}) as Megatron reduces it."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    args = get_args()
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    if args.check_for_nan_in_loss_and_grad:
        rerun = get_rerun_state_machine()
        rerun.validate_result(result=loss, rejection_func=torch.isnan,
                              message="found NaN in local forward loss calculation", tolerance=0.0, fatal=True)
        rerun.validate_result(result=loss, rejection_func=torch.isinf,
                              message="found Inf in local forward loss calculation", tolerance=0.0, fatal=True)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch forward: the model's per-token loss and the masked loss function."""
    from megatron.training import get_timers

    timers = get_timers()
    vp_stage = getattr(model, "vp_stage", None)
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask, model=model)
