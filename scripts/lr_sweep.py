#!/usr/bin/env python
"""Learning-rate sweep through the pretraining entry (``megatron_hyperball.sweep``).

    python scripts/lr_sweep.py --config X.yaml --lrs 0.003,0.01,0.03 --set model.hidden_size=64,128,256 \
        [--set model.num_layers=2,4] [--out runs/sweep_X] [--dry-run | --emit commands | --emit slurm | --report-only] \
        [--nproc 2] [--base-point 0] [KEY=VALUE ...]

Runs the grid (lrs x every --set list) one run after another, skipping runs with a result, and
writes <out>/report.md: loss vs lr per grid point, the fitted optimum, the drift factor, and the
eta0 of the LR law. Exit status: 0 all runs finished, 1 some failed (run again to retry them),
2 a bad sweep specification (nothing ran).
"""

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Import the pure-Python config and sweep modules without the package's __init__ (torch + Megatron).
if "megatron_hyperball" not in sys.modules:
    _spec = importlib.util.find_spec("megatron_hyperball")
    if _spec is not None and _spec.loader is not None:
        _package = importlib.util.module_from_spec(_spec)
        _package._init_deferred = True
        sys.modules["megatron_hyperball"] = _package

from megatron_hyperball.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
