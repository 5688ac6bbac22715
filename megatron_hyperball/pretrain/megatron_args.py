"""A validated config translated for ``megatron.training``: its command line and environment.

- :func:`to_megatron_args`: Megatron's own flags for every key, plus the plugin's ``--hyperball-*``
  flags (``mcore.args.add_plugin_args`` adds them to Megatron's parser): ``--optimizer adamh`` /
  ``muonh`` / ``adammd`` / ``muonmd`` directly, the sphere options for those, the ``--md-*`` gain
  options for the last two, the per-group peak lrs when set, the per-matrix metrics interval.
- :func:`megatron_argv`: that plus what the launch needs: ``--load`` = ``--save`` (the same
  command again resumes), the local layer spec's flags, gloo and no fused GPU kernels on CPU, and
  extra Megatron flags from the command line (a later flag wins). The lr schedule is always the
  config's (``--override-opt_param-scheduler``): raising ``schedule.train_iters`` continues a run.
- :func:`wandb_environment` / :func:`set_environment`: W&B offline unless a project is set;
  ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with tensor parallelism.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from megatron_hyperball import names
from megatron_hyperball.config import HyperballConfig

__all__ = [
    "DEFAULT_WANDB_PROJECT", "resolve_transformer_impl", "to_megatron_args", "megatron_argv", "wandb_environment",
    "set_environment",
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
    return "transformer_engine" if _have_te() else "local"


def to_megatron_args(cfg: HyperballConfig, *, transformer_impl: Optional[str] = None) -> list[str]:
    """``megatron.training`` flags for ``cfg`` (lr resolved through the lr law), the plugin's included.

    Not flags: Depth-muP (the model provider reads ``cfg.block_output_alpha()``) and the W&B mode
    (:func:`wandb_environment`).
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
        # HyperP: global_aux_loss at 0.1 (the model provider corrects Megatron's 1/dp on its gradient,
        # models.aux_loss); 0 turns load balancing off
        coeff = moe.resolved_aux_loss_coeff(names.OPTIMIZERS[opt.name].sphere)
        flag("--moe-aux-loss-coeff", coeff)
        flag("--moe-router-load-balancing-type", moe.aux_loss_type if coeff > 0 else "none")
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
    spec = names.OPTIMIZERS[opt.name]
    flag("--optimizer", opt.name if spec.sphere else spec.megatron)  # adamh / muonh: add_plugin_args' names
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
    if spec.sphere:
        flag("--hyperball-radius", "init" if opt.radius is None else opt.radius)
        flag("--hyperball-update-norm", "exact" if opt.update_norm is None else opt.update_norm)
        flag("--hyperball-output-layer", opt.output_layer_on_sphere)
        flag("--hyperball-split-qkv", opt.split_qkv)
    if spec.md:
        flag("--md-gains", opt.resolved_gains())
        flag("--md-gain-parametrization", opt.resolved_gain_parametrization())
        flag("--md-gain-lr", opt.resolved_gain_lr())
        flag("--md-allow-missing-gains", opt.allow_missing_gains)
    flag("--hyperball-embedding-lr", opt.embedding_lr)  # absolute peak lrs; each decays to min_lr / lr of it
    flag("--hyperball-output-lr", opt.output_lr)
    flag("--hyperball-scalar-lr", opt.scalar_lr)

    # schedule
    flag("--train-iters", sch.train_iters)
    flag("--global-batch-size", sch.global_batch_size)
    flag("--micro-batch-size", sch.micro_batch_size)
    flag("--lr-warmup-iters", sch.warmup_iters)
    flag("--lr-decay-style", sch.decay_style)
    flag("--lr-decay-iters", sch.decay_iters or sch.train_iters)
    flag("--lr-wsd-decay-iters", sch.wsd_decay_iters)
    # resuming: the lr / weight-decay schedule is this config's (e.g. a raised train_iters), not the
    # checkpoint's; only the step count comes from the checkpoint. Without it Megatron's scheduler
    # asserts that every schedule value equals the checkpoint's.
    flag("--override-opt_param-scheduler")
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
    flag("--hyperball-metrics-interval", cfg.resolved_metrics_interval())
    tb, wandb_dir = cfg.log_dirs()
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


def megatron_argv(cfg: HyperballConfig, *, cpu: bool, extra: Sequence[str] = ()) -> list[str]:
    """The entry's ``megatron.training`` command line: :func:`to_megatron_args` plus the launch's flags."""
    impl = "local" if cpu else resolve_transformer_impl(cfg)
    argv = to_megatron_args(cfg, transformer_impl=impl)
    ck = cfg.checkpoint
    if ck.save is not None and ck.load is None:
        argv += ["--load", ck.save]  # resume from the latest checkpoint in the save dir, if any
    if "--tensorboard-dir" in argv:
        argv += ["--log-validation-ppl-to-tensorboard"]
    if impl == "local":
        argv += ["--no-persist-layer-norm"]  # the local spec's torch norms have no persistent kernel
        if not _have_te():
            argv += ["--no-rope-fusion"]  # Megatron's fused RoPE comes from Transformer Engine
    if cpu:
        # gloo; and Megatron's torch.compile fusions off: they only exist to fuse GPU kernels
        argv += ["--distributed-backend", "gloo", "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
                 "--no-bias-dropout-fusion", "--no-masked-softmax-fusion"]
    return argv + list(extra)


def _have_te() -> bool:
    from megatron_hyperball.models.depth_mup import have_transformer_engine

    return have_transformer_engine()


def set_environment(cfg: HyperballConfig) -> None:
    """W&B's mode; with TP > 1 ``CUDA_DEVICE_MAX_CONNECTIONS=1``, which Megatron's validate_args
    requires before Blackwell (one CUDA work queue keeps TP communication ordered with compute).
    Call it before CUDA is initialised."""
    os.environ.update(wandb_environment(cfg))
    if cfg.parallelism.tp > 1:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
