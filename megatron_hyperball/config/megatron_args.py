"""Validated config -> what ``megatron.training`` needs.

- :func:`to_megatron_args`: the command-line flags of ``megatron.training.arguments`` (real flag
  names, checked by the tests against Megatron's parser and ``validate_args``).
- :func:`hyperball_optimizer_fields`: the fields of ``HyperballOptimizerConfig`` this config sets
  (``optimizer`` 'adamh' / 'muonh' and the ``hyperball_*`` options). Megatron's ``--optimizer``
  has fixed argparse choices, so the flags carry the base optimizer ('adam' for adamh, 'muon' for
  muonh, which also makes ``validate_args`` choose the right distributed optimizer) and the entry
  puts the hyperball name back when it builds the optimizer config.
- :func:`megatron_optimizer_config`: a drop-in for
  ``megatron.training.training.get_megatron_optimizer_config(args)`` that does exactly that and
  adds the per-group learning rates (:func:`param_group_overrides`).
- :func:`wandb_environment`: environment for W&B (offline unless a project is set).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from megatron_hyperball.config.schema import OPTIMIZER_NAMES, HyperballConfig

__all__ = [
    "DEFAULT_WANDB_PROJECT", "resolve_transformer_impl", "to_megatron_args", "hyperball_optimizer_fields",
    "param_group_overrides", "megatron_optimizer_config", "wandb_environment", "embedded_data_dir",
    "prepare_embedded_data",
]

DEFAULT_WANDB_PROJECT = "megatron-hyperball"
DEFAULT_SPLIT = "969,30,1"

_TOKENIZER_TYPES = {
    "byte": "NullTokenizer",
    "null_tokenizer": "NullTokenizer",
    "gpt2bpe": "GPT2BPETokenizer",
    "huggingface": "HuggingFaceTokenizer",
    "sentencepiece": "GPTSentencePieceTokenizer",
    "tiktoken": "TikTokenizer",
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: the parsed float is exactly v
    return str(v)


def resolve_transformer_impl(cfg: HyperballConfig) -> str:
    impl = cfg.model.transformer_impl
    if impl != "auto":
        return impl
    from megatron_hyperball.models.depth_mup import have_transformer_engine

    return "transformer_engine" if have_transformer_engine() else "local"


def embedded_data_dir(cfg: HyperballConfig) -> str:
    return cfg.data.embedded_dir


def prepare_embedded_data(cfg: HyperballConfig, verbose: bool = True) -> Optional[dict]:
    """Write the embedded corpus if ``data.data_path`` is 'embedded' (a no-op when already there).

    Returns the corpus manifest, or None for your own data. Call it on one rank (e.g. global
    rank 0, then a barrier) before Megatron builds its datasets.
    """
    if not cfg.data.embedded:
        return None
    from megatron_hyperball.data.prepare import prepare

    return prepare(cfg.data.embedded_dir, int(cfg.data.embedded_max_mb * 1e6), verbose=verbose)


def _wandb_dirs(cfg: HyperballConfig) -> tuple[Optional[str], Optional[str]]:
    """(tensorboard_dir, wandb_save_dir) with the defaults filled when W&B is on."""
    wb, name = cfg.logging.wandb, cfg.run_name()
    tb = cfg.logging.tensorboard_dir
    if wb.resolved_mode() == "disabled":
        return tb, None
    if tb is None:
        tb = os.path.join("runs", name, "tensorboard")
    save_dir = wb.save_dir
    if save_dir is None:
        base = cfg.checkpoint.save or os.path.join("runs", name)
        save_dir = os.path.join(base, "wandb")
    return tb, save_dir


def to_megatron_args(cfg: HyperballConfig, *, transformer_impl: Optional[str] = None) -> list[str]:
    """``megatron.training`` command-line flags for ``cfg`` (lr resolved through the lr law).

    Not expressed as flags (the entry applies them): the hyperball optimizer name and options
    (:func:`hyperball_optimizer_fields`), per-group lrs (:func:`param_group_overrides`),
    Depth-muP (``cfg.block_output_alpha()`` with ``models.get_gpt_layer_spec_with_depth_mup``),
    SqrtGate / router sphere, the instability-indicator interval, W&B mode (environment).
    """
    m, par, data, opt, sch = cfg.model, cfg.parallelism, cfg.data, cfg.optimizer, cfg.schedule
    a: list[str] = []

    def flag(name: str, value: Any = True) -> None:
        if value is None or value is False:
            return
        a.append(name)
        if value is not True:
            a.append(_fmt(value))

    # model
    flag("--num-layers", m.num_layers)
    flag("--hidden-size", m.hidden_size)
    flag("--num-attention-heads", m.num_attention_heads)
    if m.num_query_groups is not None and m.num_query_groups != m.num_attention_heads:
        flag("--group-query-attention")
        flag("--num-query-groups", m.num_query_groups)
    flag("--ffn-hidden-size", m.resolved_ffn_hidden_size())
    flag("--seq-length", m.seq_length)
    flag("--max-position-embeddings", m.max_position_embeddings or m.seq_length)
    flag("--normalization", m.normalization)
    flag("--norm-epsilon", float(m.norm_epsilon))
    flag("--position-embedding-type", m.position_embedding)
    if m.position_embedding == "rope":
        flag("--rotary-base", m.rotary_base)
    flag("--swiglu", m.swiglu)
    flag("--disable-bias-linear", not m.bias)
    flag("--qk-layernorm", m.qk_layernorm)
    flag("--untie-embeddings-and-output-weights", not m.tie_embeddings)
    flag("--init-method-std", float(m.init_method_std))
    flag("--hidden-dropout", float(m.hidden_dropout))
    flag("--attention-dropout", float(m.attention_dropout))
    impl = transformer_impl or resolve_transformer_impl(cfg)
    flag("--transformer-impl", impl)
    if impl == "local":
        flag("--no-gradient-accumulation-fusion")  # needs TE / apex kernels
    # tokenizer
    tok = m.tokenizer
    flag("--tokenizer-type", _TOKENIZER_TYPES[tok.type])
    if tok.type == "byte":
        from megatron_hyperball.data.prepare import BYTE_VOCAB_SIZE

        flag("--vocab-size", BYTE_VOCAB_SIZE)
    elif m.vocab_size is not None:
        flag("--vocab-size", m.vocab_size)
    flag("--tokenizer-model", tok.model)
    flag("--vocab-file", tok.vocab_file)
    flag("--merge-file", tok.merge_file)
    # MoE
    if m.moe is not None:
        moe = m.moe
        flag("--num-experts", moe.num_experts)
        flag("--moe-router-topk", moe.topk)
        flag("--moe-ffn-hidden-size", moe.ffn_hidden_size or m.resolved_ffn_hidden_size())
        flag("--moe-shared-expert-intermediate-size", moe.shared_expert_size)
        flag("--moe-aux-loss-coeff", float(moe.aux_loss_coeff))
        flag("--moe-router-load-balancing-type", "aux_loss" if moe.aux_loss_coeff > 0 else "none")
        flag("--moe-token-dispatcher-type", moe.token_dispatcher)
        flag("--moe-grouped-gemm", moe.grouped_gemm)
        if moe.layer_freq != 1:
            flag("--moe-layer-freq", moe.layer_freq)

    # parallelism
    flag("--tensor-model-parallel-size", par.tp)
    flag("--pipeline-model-parallel-size", par.pp)
    flag("--expert-model-parallel-size", par.ep)
    flag("--sequence-parallel", par.sequence_parallel)
    flag("--use-distributed-optimizer", par.distributed_optimizer)

    # data
    if data.embedded:
        from megatron_hyperball.data.prepare import megatron_data_args

        a.extend(megatron_data_args(data.embedded_dir))
    else:
        a.append("--data-path")
        a.extend(data.data_path)
        flag("--split", data.split or DEFAULT_SPLIT)
    flag("--num-workers", data.num_workers)

    # optimizer
    flag("--optimizer", OPTIMIZER_NAMES[opt.name])
    flag("--lr", cfg.resolved_lr())
    flag("--min-lr", cfg.resolved_min_lr())
    flag("--weight-decay", float(opt.weight_decay))
    flag("--adam-beta1", float(opt.betas[0]))
    flag("--adam-beta2", float(opt.betas[1]))
    flag("--adam-eps", float(opt.eps))
    flag("--clip-grad", float(opt.clip_grad))
    if opt.muon_family:
        flag("--muon-momentum", 0.95 if opt.momentum is None else float(opt.momentum))
        flag("--muon-num-ns-steps", 5 if opt.ns_steps is None else opt.ns_steps)
        flag("--muon-nesterov", True if opt.nesterov is None else opt.nesterov)

    # schedule
    flag("--train-iters", sch.train_iters)
    flag("--global-batch-size", sch.global_batch_size)
    flag("--micro-batch-size", sch.micro_batch_size)
    flag("--lr-warmup-iters", sch.warmup_iters)
    flag("--lr-decay-style", sch.decay_style)
    flag("--lr-decay-iters", sch.decay_iters or sch.train_iters)
    flag("--eval-interval", sch.eval_interval or sch.train_iters)
    flag("--eval-iters", sch.eval_iters)

    # precision, seed
    flag("--bf16", cfg.precision == "bf16")
    flag("--fp16", cfg.precision == "fp16")
    flag("--seed", cfg.seed)

    # checkpoint
    ck = cfg.checkpoint
    flag("--save", ck.save)
    flag("--load", ck.load)
    if ck.save is not None:
        flag("--save-interval", ck.save_interval or sch.train_iters)
    flag("--ckpt-format", ck.format)

    # logging
    flag("--log-interval", cfg.logging.log_interval)
    tb, wandb_dir = _wandb_dirs(cfg)
    flag("--tensorboard-dir", tb)
    wb = cfg.logging.wandb
    if wb.resolved_mode() != "disabled":
        flag("--wandb-project", wb.project or DEFAULT_WANDB_PROJECT)
        flag("--wandb-entity", wb.entity)
        flag("--wandb-exp-name", cfg.run_name())
        flag("--wandb-save-dir", wandb_dir)
    return a


def wandb_environment(cfg: HyperballConfig) -> dict[str, str]:
    """Environment variables for W&B: WANDB_MODE offline / online / disabled."""
    return {"WANDB_MODE": cfg.logging.wandb.resolved_mode()}


def hyperball_optimizer_fields(cfg: HyperballConfig) -> dict[str, Any]:
    """Fields of ``megatron_hyperball.megatron.options.HyperballOptimizerConfig`` set by ``cfg``.

    Always ``optimizer`` (Megatron's name: 'adam', 'muon', 'adamh', 'muonh'); for sphere
    optimizers also ``hyperball_radius``, ``hyperball_update_norm``, ``hyperball_output_layer``.
    """
    opt = cfg.optimizer
    if not opt.sphere:
        return {"optimizer": OPTIMIZER_NAMES[opt.name]}
    return {
        "optimizer": opt.name,
        "hyperball_radius": "init" if opt.radius is None else opt.radius,
        "hyperball_update_norm": "exact" if opt.update_norm is None else opt.update_norm,
        "hyperball_output_layer": bool(opt.output_layer_on_sphere),
    }


def _is_embedding(param, name: str) -> bool:
    return name.endswith(("embedding.word_embeddings.weight", "embedding.position_embeddings.weight"))


def _is_output(param, name: str) -> bool:
    return name.endswith("output_layer.weight")


def _is_scalar(param, name: str) -> bool:
    return param.dim() == 1


def param_group_overrides(cfg: HyperballConfig) -> dict:
    """Megatron ``config_overrides`` for optimizer.embedding_lr / output_lr / scalar_lr.

    Each maps a ``ParamKey`` to ``{'max_lr': lr_g, 'min_lr': lr_g * min_lr / lr}`` (the group
    decays on the same schedule to the same fraction of its peak as the rest).
    """
    from megatron.core.optimizer import ParamKey, ParamWithNamePredicate

    opt, frac = cfg.optimizer, cfg.min_lr_fraction()
    out = {}
    for key, lr, fn in (("embedding_lr", opt.embedding_lr, _is_embedding),
                        ("output_lr", opt.output_lr, _is_output),
                        ("scalar_lr", opt.scalar_lr, _is_scalar)):
        if lr is not None:
            pred = ParamWithNamePredicate(name=f"hyperball_{key}", fn=fn)
            out[ParamKey(with_name_predicate=pred)] = {"max_lr": float(lr), "min_lr": float(lr) * frac}
    return out


def megatron_optimizer_config(cfg: HyperballConfig, args: Any):
    """(optimizer config, config_overrides) for ``get_megatron_optimizer``, from Megatron's args.

    Like ``megatron.training.training.get_megatron_optimizer_config(args)`` (every
    ``OptimizerConfig`` field read from ``args``), but a ``HyperballOptimizerConfig`` with
    :func:`hyperball_optimizer_fields` applied, and the standard overrides plus
    :func:`param_group_overrides`. The entry can install it with
    ``training.get_megatron_optimizer_config = lambda args: megatron_optimizer_config(cfg, args)``.
    """
    from megatron.core.optimizer import get_standard_config_overrides

    from megatron_hyperball.megatron.options import HyperballOptimizerConfig

    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(HyperballOptimizerConfig)
              if hasattr(args, f.name)}
    kwargs.update(hyperball_optimizer_fields(cfg))
    config = HyperballOptimizerConfig(**kwargs)
    overrides = dict(get_standard_config_overrides(config=config))
    overrides.update(param_group_overrides(cfg))
    return config, overrides
