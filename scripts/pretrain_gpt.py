#!/usr/bin/env python
"""Pretrain a GPT with Megatron's training loop from one YAML config.

    torchrun --nproc-per-node 2 scripts/pretrain_gpt.py --config configs/quickstart.yaml [KEY=VALUE ...]

Overrides (``--set KEY=VALUE`` or bare ``section.key=value``) are validated like the file; any
other argument is passed to Megatron's parser as an extra flag (a later flag wins).
"""

import os
import sys

# Run from a checkout without installing: the repository root goes on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from megatron_hyperball.pretrain.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
