"""megatron-hyperball: hypersphere optimizers (AdamH, MuonH) for megatron-core.

Importing the package installs the ``core`` patches (``megatron_hyperball.patches``) when
megatron-core is installed: 'adamh' / 'muonh' become names Megatron's optimizer factory builds.
The pure-torch optimizers in ``megatron_hyperball.optim`` work without Megatron.
"""

__version__ = "0.1.0"

from megatron_hyperball import optim  # noqa: F401  (pure torch, always importable)

try:
    import megatron.core  # noqa: F401
except ImportError:  # the optimizers are still usable on their own
    pass
else:
    from megatron_hyperball import patches as _patches

    _patches.apply("core")
