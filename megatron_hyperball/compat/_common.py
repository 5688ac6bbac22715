"""What the CPU layer's parts share: which modules are Megatron's, one lock, rebinding a function."""

from __future__ import annotations

import sys
import threading
from typing import Callable

#: Megatron packages whose modules get the CPU view of torch.
MEGATRON_PREFIXES = ("megatron.core", "megatron.training")

lock = threading.RLock()


def is_megatron_module(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in MEGATRON_PREFIXES)


def rebind_everywhere(old: Callable, new: Callable) -> None:
    """Replace module-level references to ``old`` (``from x import f``) in Megatron modules."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not is_megatron_module(name):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)
