"""MoE matrices that take Adam under the sphere optimizers leave Megatron's layer-wise matrix set."""

from __future__ import annotations

import functools

from megatron_hyperball.patches import Patch, register, replace

VERSIONS = ("0.19.",)


def _install_layer_wise_untagged() -> None:
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import layer_wise_optimizer as lw

    from megatron_hyperball.mcore.roles import sphere_mode

    original = lw.is_managed_by_layer_wise_optimizer

    @functools.wraps(original)
    def is_managed_by_layer_wise_optimizer(param) -> bool:
        return original(param) and sphere_mode(param) != "none"

    replace(lw, "is_managed_by_layer_wise_optimizer", is_managed_by_layer_wise_optimizer)
    if getattr(mcore_optimizer, "is_managed_by_layer_wise_optimizer", None) is original:
        replace(mcore_optimizer, "is_managed_by_layer_wise_optimizer", is_managed_by_layer_wise_optimizer)


register(Patch(
    name="layer_wise_untagged_matrices",
    target="megatron.core.optimizer.layer_wise_optimizer.is_managed_by_layer_wise_optimizer",
    versions=VERSIONS,
    why="Megatron puts every 2-D parameter not tagged is_embedding_or_output_parameter into the layer-wise "
        "(Muon) buffers. A router with router_sphere 'none' and the shared expert's (1, h) gate take Adam under "
        "MuonH (roles.SPHERE_ATTR = 'none'); in a layer-wise buffer Megatron's Adam DistributedOptimizer, which "
        "owns only the other buffers, would never see them. (Tagging them is_embedding_or_output_parameter "
        "instead would also hand them Megatron's decoupled embedding lr.)",
    install=_install_layer_wise_untagged,
))
