"""megatron-hyperball: hypersphere optimizers (AdamH, MuonH) for megatron-core.

Importing the package registers the optimizers with megatron-core's optimizer factory when
megatron-core is installed; the pure-torch optimizers in ``megatron_hyperball.optim`` work without it.
"""

__version__ = "0.1.0"

from megatron_hyperball import optim  # noqa: F401  (pure torch, always importable)

try:
    import megatron.core  # noqa: F401
except ImportError:  # the optimizers are still usable on their own
    pass
else:
    from megatron_hyperball.megatron import registration as _registration

    _registration.register()
