"""YAML config -> validated schema -> Megatron arguments; the LR transfer law.

    from megatron_hyperball.config import load_config, to_megatron_args
    cfg = load_config("configs/tiny_cpu.yaml", ["optimizer.lr=0.01"])
    argv = to_megatron_args(cfg)
    print(cfg.lr_summary())

See ``README_SECTION.md`` in this folder for the keys.
"""

from megatron_hyperball.config.load import (
    RESOLVED_CONFIG_NAME,
    add_config_arguments,
    apply_overrides,
    config_from_argv,
    load_config,
    parse_override,
    parse_overrides,
    read_yaml,
    resolved_config_yaml,
    save_resolved_config,
)
from megatron_hyperball.config.lr_law import LRLawResult, lr_from_run, transfer_lr
from megatron_hyperball.config.megatron_args import (
    hyperball_optimizer_fields,
    megatron_optimizer_config,
    param_group_overrides,
    prepare_embedded_data,
    to_megatron_args,
    wandb_environment,
)
from megatron_hyperball.config.schema import ConfigError, HyperballConfig, validate_config

__all__ = [
    "ConfigError", "HyperballConfig", "LRLawResult", "RESOLVED_CONFIG_NAME", "add_config_arguments",
    "apply_overrides", "config_from_argv", "hyperball_optimizer_fields", "load_config", "lr_from_run",
    "megatron_optimizer_config", "param_group_overrides", "parse_override", "parse_overrides",
    "prepare_embedded_data", "read_yaml", "resolved_config_yaml", "save_resolved_config", "to_megatron_args",
    "transfer_lr", "validate_config", "wandb_environment",
]
