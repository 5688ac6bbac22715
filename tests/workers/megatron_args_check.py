"""Feed ``to_megatron_args`` output to megatron.training's real parser and validate_args.

Usage (plain python, one process): megatron_args_check.py IN.json OUT.json

IN.json: {"base": <config dict>, "cases": {name: {"overrides": [...], "world_size": N,
"validate": bool, "opt_config": bool, "param_groups": bool}}}. For each case: the config is loaded
with the overrides, ``to_megatron_args`` is parsed by ``megatron.training.arguments.parse_args``
with the plugin's flags (``mcore.args.add_plugin_args``; sys.argv, WORLD_SIZE from the case) and,
if ``validate``, checked by ``validate_args`` as ``patches.apply_training`` leaves it. With
``opt_config``, ``mcore.args.optimizer_config_from_args(args)`` builds the optimizer config the
trainer would get; with ``param_groups`` also Megatron's own ``_get_param_groups`` groups the
parameters of a real GPTModel (CPU, gloo world size 1) with its overrides, and per parameter name
its max_lr, min_lr and wd_mult are reported.
"""

import contextlib
import io
import json
import os
import socket
import sys

from common import REPO_ROOT  # noqa: F401  (puts the repository on sys.path)

import torch.distributed as dist

ARG_FIELDS = [
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
    "max_position_embeddings", "normalization", "position_embedding_type", "swiglu", "add_bias_linear",
    "untie_embeddings_and_output_weights", "transformer_impl", "tokenizer_type", "vocab_size",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_aux_loss_coeff", "moe_token_dispatcher_type",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "sequence_parallel", "use_distributed_optimizer", "use_layer_wise_distributed_optimizer",
    "data_path", "split", "train_data_path", "valid_data_path", "num_workers",
    "optimizer", "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
    "muon_momentum", "muon_num_ns_steps", "muon_nesterov",
    "train_iters", "global_batch_size", "micro_batch_size", "lr_warmup_iters", "lr_decay_style",
    "lr_decay_iters", "lr_wsd_decay_iters", "override_opt_param_scheduler", "eval_interval", "eval_iters", "bf16",
    "fp16", "seed",
    "save", "load", "save_interval", "ckpt_format", "log_interval", "tensorboard_dir",
    "wandb_project", "wandb_exp_name", "wandb_save_dir", "data_parallel_size",
    "hyperball_radius", "hyperball_update_norm", "hyperball_output_layer", "hyperball_embedding_lr",
    "hyperball_output_lr", "hyperball_scalar_lr", "hyperball_metrics_interval",
    "md_gains", "md_gain_parametrization", "md_gain_lr", "md_allow_missing_gains",
]
OPT_FIELDS = ["optimizer", "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "hyperball_radius",
              "hyperball_update_norm", "hyperball_output_layer", "use_distributed_optimizer",
              "use_layer_wise_distributed_optimizer", "muon_momentum", "md_gains", "md_gain_parametrization",
              "md_gain_lr", "md_allow_missing_gains"]


def _json(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    return str(v)


def init_dist():
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from megatron_hyperball.compat import enable_cpu

    enable_cpu()


def opt_config(args):
    from dataclasses import asdict

    from megatron_hyperball.mcore.args import optimizer_config_from_args
    from megatron_hyperball.mcore.options import hyperball_options

    config, overrides = optimizer_config_from_args(args)
    return ({f: _json(getattr(config, f, None)) for f in OPT_FIELDS}, type(config).__name__,
            _json_dict(asdict(hyperball_options(config))), config, overrides)


def _json_dict(d):
    return {k: _json(v) for k, v in d.items()}


def param_groups(cfg, config, overrides):
    from megatron.core.optimizer import _get_param_groups

    from megatron_hyperball.mcore.builders import build_gpt, init_parallel

    init_dist()
    init_parallel(tp=1)
    m = cfg.model
    model = build_gpt(m.num_layers, m.hidden_size, m.num_attention_heads, 384, m.seq_length,
                      ffn_hidden_size=m.resolved_ffn_hidden_size(),
                      position_embedding_type="learned_absolute",
                      share_embeddings_and_output_weights=m.tie_embeddings,
                      normalization=m.normalization)
    groups = _get_param_groups([model], config, overrides)
    names = {p: n for n, p in model.named_parameters()}
    per_param = {}
    for g in groups:
        for p in g["params"]:
            per_param[names[p]] = {"max_lr": g["max_lr"], "min_lr": g["min_lr"], "wd_mult": g["wd_mult"]}
    return per_param


def run_case(base, case):
    from megatron.training import arguments

    from megatron_hyperball import patches
    from megatron_hyperball.config import load_config
    from megatron_hyperball.mcore.args import add_plugin_args
    from megatron_hyperball.pretrain.megatron_args import to_megatron_args

    patches.apply_training(cpu=False)  # what the entry installs before Megatron parses
    cfg = load_config(raw=base, overrides=case.get("overrides", []))
    argv = to_megatron_args(cfg)
    os.environ["WORLD_SIZE"] = str(case.get("world_size", 1))
    os.environ["RANK"] = "0"
    saved = sys.argv
    sys.argv = ["pretrain"] + argv
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            args = arguments.parse_args(extra_args_provider=add_plugin_args)
            if case.get("validate", True):
                arguments.validate_args(args)
    finally:
        sys.argv = saved
    out = {"argv": argv, "args": {f: _json(getattr(args, f, None)) for f in ARG_FIELDS}}
    if case.get("opt_config") or case.get("param_groups"):
        out["opt_config"], out["opt_config_class"], out["hyperball_options"], config, overrides = opt_config(args)
        if case.get("param_groups"):
            out["param_groups"] = param_groups(cfg, config, overrides)
    return out


def main():
    spec = json.loads(open(sys.argv[1]).read())
    result = {name: run_case(spec["base"], case) for name, case in spec["cases"].items()}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
