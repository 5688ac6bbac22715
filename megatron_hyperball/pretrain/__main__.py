"""``python -m megatron_hyperball.pretrain --config NAME|FILE [KEY=VALUE ...] [Megatron flags]``: the
pretraining entry (:func:`megatron_hyperball.pretrain.entry.main`) of an installed package, the one
``scripts/pretrain_gpt.py`` runs from a checkout:

    torchrun --nproc-per-node 2 -m megatron_hyperball.pretrain --config quickstart     # a shipped config
    torchrun --nproc-per-node 2 -m megatron_hyperball.pretrain --config ./my_run.yaml  # or a file

Python runs ``megatron_hyperball/__init__.py`` (torch, megatron-core: several seconds) before this
module, so here a config error is reported after those imports; ``megatron-hyperball pretrain``
(the same entry, ``torchrun --no-python``) and ``--check-only`` check a config without them.
"""

import sys

from megatron_hyperball.pretrain.entry import main

if __name__ == "__main__":
    sys.exit(main())
