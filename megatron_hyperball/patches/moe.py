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


_dropin_reported: list = []


def _dropin_moe_run(config):
    """(args, router mode or None) for an MoE GPTModel built under the drop-in launcher's parser (it
    has --hyperball-router-sphere), else None (the YAML entry: its model_provider does both)."""
    from megatron.training import get_args

    from megatron_hyperball import names

    if not getattr(config, "num_moe_experts", None):
        return None
    try:
        args = get_args()
    except AssertionError:  # a GPTModel built outside megatron.training
        return None
    if not hasattr(args, "hyperball_router_sphere"):
        return None
    optimizer = str(getattr(args, "optimizer", "") or "")
    sphere = names.hyperball_name(optimizer) is not None
    given = args.hyperball_router_sphere
    if not sphere and given in ("frobenius", "row"):
        raise ValueError(f"--hyperball-router-sphere {given} given with --optimizer {optimizer}, which has no "
                         f"spheres; allowed with it: none (or use {' / '.join(names.HYPERBALL_OPTIMIZERS)})")
    return args, (names.resolve_router_sphere(given, True) if sphere else None)


def _install_dropin_moe_model() -> None:
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_hyperball.mcore.roles import tag_moe_spheres
    from megatron_hyperball.models.aux_loss import corrected_global_aux_loss

    original = GPTModel.__init__

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        run = _dropin_moe_run(config)
        if run is None:
            return original(self, config, *args, **kwargs)
        margs, router_sphere = run
        notes = []
        # recomputed from the flag's value for every chunk (idempotent); the router reads its config's
        # coefficient at each forward
        fix = corrected_global_aux_loss(margs.moe_aux_loss_coeff, margs.moe_router_load_balancing_type,
                                        parallel_state.get_data_parallel_world_size())
        if fix is not None:
            config.moe_aux_loss_coeff, note = fix
            notes.append(note)
        original(self, config, *args, **kwargs)
        if router_sphere is not None:  # before DDP: the shared-expert gate, and the router unless frobenius
            tag_moe_spheres(self, router_sphere)
            notes.append(f"router sphere {router_sphere}, shared-expert gate Adam")
        if notes and not _dropin_reported:
            _dropin_reported.append(True)
            from megatron_hyperball.patches.training import _print_rank0

            _print_rank0(f"[hyperball] MoE: {'; '.join(notes)}")

    replace(GPTModel, "__init__", __init__)


register(Patch(
    name="dropin_moe_model",
    target="megatron.core.models.gpt.gpt_model.GPTModel.__init__ (MoE tags, moe_aux_loss_coeff)",
    versions=VERSIONS,
    group="training",
    why="The YAML entry's model_provider tags the MoE router (router_sphere) and the shared-expert gate "
        "(roles.tag_moe_spheres) and gives Megatron coeff x dp for global_aux_loss (models.aux_loss: 0.19 steps "
        "coeff dL/dW / dp). Megatron-LM's own script builds its GPTModel through get_model's model_provider or "
        "0.19's config-container builder, both before DDP reads the tags; the GPTModel it builds under the "
        "drop-in launcher's parser (--hyperball-router-sphere present) now gets both. Without them MuonH "
        "steps the (1, h) gate (and a router meant for Adam) as a sphere matrix, and the router follows "
        "1/dp of the configured aux-loss weight. A dense model, or the YAML entry's parser, is left as it is.",
    install=_install_dropin_moe_model,
))
