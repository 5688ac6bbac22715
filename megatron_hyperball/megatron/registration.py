"""Registration of the hyperball optimizers with megatron-core (runs on ``import megatron_hyperball``).

- ``megatron.core.optimizer.get_megatron_optimizer`` (and the name megatron.training imported, if
  it was imported first) becomes ``factory.get_megatron_optimizer``, which handles 'adamh' /
  'adam_hyperball' (ZeRO-1) and 'muonh' / 'muon_hyperball' and passes every other name through.
- ``_EMERGING_OPTIMIZERS['muonh']`` (and 'muon_hyperball', replacing the entry megatron-core
  0.19.2 builds from emerging-optimizers' MuonHyperball, which fails with TypeError 'betas') is
  this project's TensorParallelMuonH.
- ``megatron_hyperball.patches.apply()``: version-guarded fixes of megatron-core bugs.
"""

from __future__ import annotations

import sys

_done = False


def register() -> None:
    global _done
    if _done:
        return
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import emerging_optimizers as mcore_eopt
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    from megatron_hyperball import patches
    from megatron_hyperball.megatron import factory, muon_h, routing

    patches.apply()

    factory._original_get_megatron_optimizer = mcore_optimizer.get_megatron_optimizer
    mcore_optimizer.get_megatron_optimizer = factory.get_megatron_optimizer
    training = sys.modules.get("megatron.training.training")
    if training is not None and hasattr(training, "get_megatron_optimizer"):
        training.get_megatron_optimizer = factory.get_megatron_optimizer

    entry = mcore_eopt.EmergingOptimizerEntry(
        optimizer_cls=muon_h.TensorParallelMuonH,
        init_state_fn=mcore_eopt._eopt_init_state_fn,
        config_to_kwargs=muon_h.config_to_kwargs,
        # everything off the sphere takes Adam (the same rule as routing.is_sphere_param)
        default_param_overrides={
            ParamKey(with_name_predicate=ParamWithNamePredicate(
                name="not_on_sphere", fn=lambda p, n: not routing.is_sphere_param(n, p))
            ): {"optimizer": "adam"}
        },
    )
    mcore_eopt._EMERGING_OPTIMIZERS["muonh"] = entry
    mcore_eopt._EMERGING_OPTIMIZERS["muon_hyperball"] = entry
    _done = True
