"""For the single-process check scripts in this folder (run as ``python tests/workers/X.py``).

``from common import REPO_ROOT`` puts the repository root on ``sys.path``. The multi-rank tests are
plain pytest modules in ``tests/distributed`` (run under torchrun), not scripts here.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
