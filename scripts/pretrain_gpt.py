#!/usr/bin/env python
"""Pretrain a GPT with Megatron's training loop from one YAML config, from a checkout.

    torchrun --nproc-per-node 2 scripts/pretrain_gpt.py --config configs/quickstart.yaml [KEY=VALUE ...]
    python scripts/pretrain_gpt.py --check-only --config X.yaml [KEY=VALUE ...]   # validate only

A thin wrapper: the same entry as ``python -m megatron_hyperball.pretrain`` of an installed package
(``megatron_hyperball.pretrain.entry.main``); ``--config`` also takes a shipped config's name
(``--config quickstart``). Paths in the config are relative to the working directory.

Overrides (``--set KEY=VALUE`` or bare ``section.key=value``) are validated like the file; any
other argument is passed to Megatron's parser as an extra flag (a later flag wins).

The config is validated before torch or Megatron is imported: ``megatron_hyperball/__init__.py``
(which imports both, several seconds) runs only once the config has passed
(``pretrain.entry._complete_package_import``). A config error exits with status 2 in well under a
second, printed once per node.
"""

import importlib.util
import os
import sys

# Run from a checkout without installing: the repository root goes on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _defer_package_init() -> None:
    """Put the ``megatron_hyperball`` package in sys.modules without running its __init__, so its
    pure-Python submodules (config, names) import alone; the entry runs __init__ later."""
    if "megatron_hyperball" in sys.modules:
        return
    spec = importlib.util.find_spec("megatron_hyperball")
    if spec is None or spec.loader is None:
        return
    package = importlib.util.module_from_spec(spec)
    package._init_deferred = True  # pretrain.entry.DEFERRED_INIT_ATTR
    sys.modules["megatron_hyperball"] = package


_defer_package_init()

from megatron_hyperball.pretrain.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
