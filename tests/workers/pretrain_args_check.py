"""The entry's Megatron command line for each config, through Megatron's real parser and validate_args.

Usage (plain python, one process): pretrain_args_check.py OUT.json WORLD_SIZE CONFIG [CONFIG ...]

For each config: ``pretrain.megatron_args.megatron_argv(cfg, cpu=False)`` is parsed by
``megatron.training.arguments.parse_args`` with the plugin's flags (``mcore.args.add_plugin_args``)
and checked by ``validate_args`` as ``patches.apply_training`` leaves it (WORLD_SIZE from the
command line, as torchrun would set it), then ``mcore.args.optimizer_config_from_args`` builds the
optimizer config the trainer would get. Reported per config: the fields that decide where the
optimizer runs and the lr.
"""

import contextlib
import io
import json
import os
import sys

from common import REPO_ROOT  # noqa: F401  (puts the repository on sys.path)


def main(out, world_size, paths):
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["RANK"] = "0"
    from megatron_hyperball import patches
    from megatron_hyperball.config import load_config
    from megatron_hyperball.mcore.args import add_plugin_args, optimizer_config_from_args
    from megatron_hyperball.pretrain.megatron_args import megatron_argv

    patches.apply_training(cpu=False)  # what the entry installs before Megatron parses
    from megatron.training import arguments

    result = {}
    for path in paths:
        cfg = load_config(path)
        argv = megatron_argv(cfg, cpu=False)
        saved = sys.argv
        sys.argv = ["pretrain_gpt.py"] + argv
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                args = arguments.parse_args(extra_args_provider=add_plugin_args)
                arguments.validate_args(args, {})
        finally:
            sys.argv = saved
        opt_config, _ = optimizer_config_from_args(args)
        result[os.path.basename(path)] = {
            "name": cfg.optimizer.name,
            "args_optimizer": args.optimizer,
            "use_distributed_optimizer": bool(args.use_distributed_optimizer),
            "use_layer_wise_distributed_optimizer": bool(args.use_layer_wise_distributed_optimizer),
            "config_optimizer": opt_config.optimizer,
            "md": [getattr(opt_config, f, None) for f in ("md_gains", "md_gain_parametrization", "md_gain_lr")],
            "hyperball": [getattr(opt_config, f, None) for f in ("hyperball_radius", "hyperball_update_norm")],
            "lr": args.lr,
            "resolved_lr": cfg.resolved_lr(),
            "load": args.load,
            "save": args.save,
            "data_parallel_size": args.data_parallel_size,
        }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
