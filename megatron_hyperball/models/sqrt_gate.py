"""SqrtGate MoE gating (HyperP) as Megatron-native modules.

Gates: each token picks its top-k experts by logit, takes the softmax over those k logits
(``g_1 .. g_k``, sum 1) and uses ``sqrt(g_i)`` as the expert weights, so the *squared* gates sum
to 1 and the output RMS of the MoE does not fall as ``1/sqrt(k)`` with granularity:

    y_routed = sum_i sqrt(g_i) * expert_i(x)

With a shared expert the two paths are mixed on the sphere as well:

    y = sqrt(1 - p) * y_routed + sqrt(p) * y_shared          (p = 0.5 by default)

Where (megatron-core 0.19):

- :class:`SqrtGateRouter` is a ``TopKRouter`` whose ``routing()`` calls Megatron's own
  ``TopKRouter.routing()`` (top-k, softmax over the selected logits, z-loss, token dropping /
  capacity, every aux-loss type, routing replay) and then takes the square root of the selected
  probabilities only. Megatron multiplies the probs inside each expert (``per_token_scale``,
  after the activation, before fc2; an fc2 bias is scaled too) and combines with a plain sum, so
  nothing else changes. The aux losses are computed by Megatron from the full softmax scores, as
  HyperP's switch-style loss; their gradient still reaches the router through the sqrt.
- :class:`SqrtGateMoELayer` is a ``MoELayer`` whose ``postprocess()`` (where Megatron adds the
  shared expert, on every forward path: plain, recompute, fine-grained EP overlap) applies the
  two factors.
- :func:`apply_sqrt_gate` swaps these two classes into a GPT layer / block spec: the MoE entry is
  a ``functools.partial(MoELayer, submodules=MoESubmodules(...))`` in both the local and the
  Transformer Engine specs; only ``MoELayer`` -> ``SqrtGateMoELayer`` and ``router`` ->
  ``SqrtGateRouter`` change (experts, shared experts and every other entry are kept as they are),
  so parameters, state dict keys and checkpoints are those of the plain model.

Refused at construction (``ValueError`` naming the Megatron ``TransformerConfig`` field and the
allowed value): configurations in which the selected gates do not sum to 1 before the square root
(``moe_router_score_function`` other than ``"softmax"``, ``moe_router_pre_softmax=True``, a
``moe_router_topk_scaling_factor`` other than None / 1, ``"sinkhorn"`` load balancing), and for
the layer Megatron's learned shared-expert gate (``moe_shared_expert_gate``) and
``moe_shared_expert_overlap``. Group-limited routing (``moe_router_num_groups`` /
``moe_router_group_topk``) and quantile balancing are accepted: with the softmax after the
top-k they only change *which* k experts are selected, the softmax is still over those k.
Token dropping (``moe_expert_capacity_factor``) is Megatron's: a dropped (token, expert) pair
loses its gate, the remaining gates are not renormalised (as for the plain softmax gate).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter

__all__ = [
    "DEFAULT_SHARED_EXPERT_FRACTION",
    "SqrtGateRouter",
    "SqrtGateMoELayer",
    "apply_sqrt_gate",
    "check_sqrt_gate_router_config",
    "check_sqrt_gate_layer_config",
    "check_shared_expert_fraction",
    "sqrt_gates",
]

#: HyperP's shared-expert share p in y = sqrt(1-p) y_routed + sqrt(p) y_shared.
DEFAULT_SHARED_EXPERT_FRACTION = 0.5


def _load_balancing_types(config) -> list:
    value = getattr(config, "moe_router_load_balancing_type", "aux_loss")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_sqrt_gate_router_config(config) -> None:
    """Raise ``ValueError`` unless the selected gates of ``config``'s top-k router sum to 1.

    SqrtGate takes ``sqrt`` of Megatron's selected probabilities; their squares sum to 1 per token
    only when Megatron's probs are the softmax over the k selected logits.
    """
    problems = []
    score = getattr(config, "moe_router_score_function", "softmax")
    if score != "softmax":
        problems.append(f"moe_router_score_function={score!r} (SqrtGate needs 'softmax')")
    if getattr(config, "moe_router_pre_softmax", False):
        problems.append("moe_router_pre_softmax=True (SqrtGate needs False: the softmax over the k "
                        "selected logits, not a softmax over all experts before the top-k)")
    factor = getattr(config, "moe_router_topk_scaling_factor", None)
    if factor is not None and float(factor) != 1.0:
        problems.append(f"moe_router_topk_scaling_factor={factor!r} (SqrtGate needs None or 1.0)")
    if "sinkhorn" in _load_balancing_types(config):
        problems.append("moe_router_load_balancing_type='sinkhorn' (its gates are not a softmax over "
                        "the top-k; SqrtGate allows 'aux_loss', 'seq_aux_loss', 'global_aux_loss', "
                        "'quantile_balancing' or 'none')")
    if problems:
        raise ValueError("SqrtGate: the selected gates must sum to 1 before the square root; refused "
                         "TransformerConfig settings: " + "; ".join(problems))


def check_shared_expert_fraction(p: Any) -> float:
    """``p`` as a float in [0, 1] (the shared expert's share), else ``ValueError``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(float(p)) \
            or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"SqrtGate: shared_expert_fraction p={p!r} must be a number in [0, 1] "
                         f"(y = sqrt(1-p) y_routed + sqrt(p) y_shared; HyperP uses 0.5)")
    return float(p)


def check_sqrt_gate_layer_config(config) -> None:
    """Raise ``ValueError`` for MoE-layer settings SqrtGate's shared-expert mix replaces or bypasses."""
    problems = []
    if getattr(config, "moe_shared_expert_gate", False):
        problems.append("moe_shared_expert_gate=True (SqrtGate mixes the shared expert with the fixed "
                        "factor sqrt(p); set it to False)")
    if getattr(config, "moe_shared_expert_overlap", False):
        problems.append("moe_shared_expert_overlap=True (the overlapped shared expert is added inside "
                        "the token dispatcher, outside SqrtGate's mix; set it to False)")
    if problems:
        raise ValueError("SqrtGate: refused TransformerConfig settings: " + "; ".join(problems))


def sqrt_gates(probs: torch.Tensor) -> torch.Tensor:
    """Elementwise ``sqrt`` of the nonzero entries of ``probs``; zeros stay zero with zero gradient.

    (``sqrt`` at 0 has an infinite derivative: the unselected entries must not see it.)
    """
    selected = probs > 0
    safe = torch.where(selected, probs, torch.ones_like(probs))
    return torch.where(selected, safe.sqrt(), torch.zeros_like(probs))


class SqrtGateRouter(TopKRouter):
    """Megatron's ``TopKRouter`` with SqrtGate gates: ``sqrt`` of the top-k softmax probabilities.

    The logits, top-k selection, z-loss, capacity / token dropping, aux losses and routing map are
    Megatron's (``super().routing()``); only the returned probs change. Refuses (``ValueError``,
    before any parameter is built) configs whose gates do not sum to 1, see
    :func:`check_sqrt_gate_router_config`.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        check_sqrt_gate_router_config(config)
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        return sqrt_gates(probs), routing_map


class SqrtGateMoELayer(MoELayer):
    """Megatron's ``MoELayer`` with HyperP's shared-expert mix.

    ``y = sqrt(1 - p) * y_routed + sqrt(p) * y_shared`` when the layer has a shared expert
    (``moe_shared_expert_intermediate_size`` set), else ``y = y_routed``. ``p`` is
    ``shared_expert_fraction`` (default 0.5). The gates themselves come from the router in
    ``submodules`` (``SqrtGateRouter`` via :func:`apply_sqrt_gate`). Refuses
    ``moe_shared_expert_gate`` and ``moe_shared_expert_overlap`` (``ValueError``).
    """

    def __init__(self, config, submodules: Optional[MoESubmodules] = None,
                 layer_number: Optional[int] = None, pg_collection=None, is_mtp_layer: bool = False,
                 name: Optional[str] = None, *,
                 shared_expert_fraction: float = DEFAULT_SHARED_EXPERT_FRACTION):
        p = check_shared_expert_fraction(shared_expert_fraction)
        check_sqrt_gate_layer_config(config)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)
        self.shared_expert_fraction = p
        self.routed_scale = math.sqrt(1.0 - p)
        self.shared_scale = math.sqrt(p)

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        output = super().postprocess(output, None)
        if shared_expert_output is None:
            return output
        return output * self.routed_scale + shared_expert_output * self.shared_scale

    def extra_repr(self) -> str:
        return f"sqrt_gate=True, shared_expert_fraction={self.shared_expert_fraction:g}"


# -- layer specs ---------------------------------------------------------------------------------

def _swap_moe_entry(entry, p: float):
    """A SqrtGate copy of one MoE spec entry (partial or ModuleSpec), or None if not an MoE entry."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(entry, functools.partial):
        cls, kwargs = entry.func, dict(entry.keywords)
        sub = kwargs.get("submodules")
    elif isinstance(entry, ModuleSpec):
        cls, kwargs, sub = entry.module, dict(entry.params or {}), entry.submodules
    else:
        return None
    if not (isinstance(cls, type) and issubclass(cls, MoELayer)):
        return None
    if cls not in (MoELayer, SqrtGateMoELayer):
        raise TypeError(f"apply_sqrt_gate: the MoE entry uses {cls.__qualname__}, a MoELayer subclass "
                        f"SqrtGate does not know how to replace (expected MoELayer)")
    if not isinstance(sub, MoESubmodules):
        raise TypeError(f"apply_sqrt_gate: the MoE entry's submodules are {type(sub).__name__}, "
                        f"expected MoESubmodules")
    if sub.router not in (TopKRouter, SqrtGateRouter):
        name = getattr(sub.router, "__qualname__", repr(sub.router))
        raise TypeError(f"apply_sqrt_gate: the MoE router is {name}; SqrtGate replaces only "
                        f"Megatron's TopKRouter (the inference-optimized spec is not supported)")
    new_sub = dataclasses.replace(sub, router=SqrtGateRouter)
    if isinstance(entry, functools.partial):
        kwargs.update(submodules=new_sub, shared_expert_fraction=p)
        return functools.partial(SqrtGateMoELayer, *entry.args, **kwargs)
    kwargs.update(shared_expert_fraction=p)
    return dataclasses.replace(entry, module=SqrtGateMoELayer, params=kwargs, submodules=new_sub)


def _walk(obj, p: float, found: list, depth: int = 0):
    if depth > 12:
        return obj
    swapped = _swap_moe_entry(obj, p)
    if swapped is not None:
        found.append(swapped)
        return swapped
    if isinstance(obj, (list, tuple)):
        items = [_walk(x, p, found, depth + 1) for x in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for field in dataclasses.fields(obj):
            if not field.init:
                continue
            value = getattr(obj, field.name)
            new = _walk(value, p, found, depth + 1)
            if new is not value:
                changes[field.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


def apply_sqrt_gate(spec, p: float = DEFAULT_SHARED_EXPERT_FRACTION):
    """A copy of ``spec`` whose MoE layers use SqrtGate (:class:`SqrtGateRouter`,
    :class:`SqrtGateMoELayer` with shared-expert fraction ``p``).

    ``spec`` is a TransformerLayer ``ModuleSpec`` (local or Transformer Engine), a
    ``TransformerBlockSubmodules`` (``get_gpt_decoder_block_spec``: MoE and dense layers mixed by
    ``moe_layer_freq``), a list of layer specs, an MTP block spec, or any dataclass tree holding
    them. Every ``MoELayer`` entry (a ``functools.partial(MoELayer, submodules=MoESubmodules(...))``
    or a ``ModuleSpec(module=MoELayer, ...)``) is swapped; dense MLPs, attention, norms, experts
    and shared experts are kept (the same objects). The input is not modified; a spec without an
    MoE layer comes back unchanged. Applying it twice only updates ``p``.
    """
    p = check_shared_expert_fraction(p)
    return _walk(spec, p, [])
