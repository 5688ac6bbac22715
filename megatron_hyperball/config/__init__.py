"""A pretraining run as one validated YAML config, and HyperP's lr transfer law.

    from megatron_hyperball.config import load_config, launch_problems
    cfg = load_config("configs/quickstart.yaml", ["optimizer.lr=0.01"])
    print(cfg.lr_summary())
    problems = launch_problems(cfg, world_size=2, cpu=True)

These modules read only pydantic, PyYAML and ``megatron_hyperball.names`` (no torch, no Megatron),
so a config, its launch and the files it names (``config.preflight``) are checked completely before
a process group exists. (Import them without ``megatron_hyperball/__init__.py``, which imports
torch and megatron-core, the way ``scripts/pretrain_gpt.py`` does, to check in a fraction of a
second.) The translation to Megatron's flags lives beside the entry, in
``megatron_hyperball.pretrain.megatron_args``.
"""

from megatron_hyperball.config.launch import config_for_launch, launch_problems
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
    split_argv,
)
from megatron_hyperball.config.lr_law import LRLawResult, lr_from_run, transfer_lr
from megatron_hyperball.config.preflight import file_problems, path_problems, resume_problems
from megatron_hyperball.config.schema import ConfigError, HyperballConfig, validate_config

__all__ = [
    "ConfigError", "HyperballConfig", "LRLawResult", "RESOLVED_CONFIG_NAME", "add_config_arguments",
    "apply_overrides", "config_for_launch", "config_from_argv", "file_problems", "launch_problems", "load_config",
    "lr_from_run", "parse_override", "parse_overrides", "path_problems", "read_yaml", "resolved_config_yaml",
    "resume_problems", "save_resolved_config", "split_argv", "transfer_lr", "validate_config",
]
