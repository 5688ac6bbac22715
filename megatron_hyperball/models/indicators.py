"""HyperP's instability indicators: the formulas, as additive partial sums (pure torch, no Megatron).

Each indicator is a ratio of two sums over tokens (or elements), so every rank adds its own
micro-batches' partial sums into one vector, one all-reduce adds the ranks, and the ratio is taken
once at the end (a copy seen by several ranks, e.g. over tensor parallelism, scales both sums
alike and leaves the ratio unchanged):

    router Z     = mean_tokens  logsumexp_e(router logits)^2
    attention Z  = mean_{b,heads,queries}  logsumexp_keys(scaled, masked scores)^2
    output RMS   = sqrt(mean y^2),  y = alpha * (sub-block output + bias)   (after Depth-muP)
    outliers     = 100 * #{|h_ti - mean_i h_ti| > 5 std_i h_ti} / #elements   (per token t)
    MaxVio       = (max_e load_e - mean_e load_e) / mean_e load_e,  load_e = tokens routed to e

Partial sums are float64; the per-element work stays in the input's precision raised to fp32 (a
logging step must not materialise fp64 copies of the attention scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = [
    "OUTLIER_SIGMAS", "LAYER_INDICATORS", "RATIO_SLOTS", "z_partials", "rms_partials", "outlier_partials",
    "expert_loads", "ratio", "rms", "percent", "max_vio", "Layout", "layer_key", "indicator_names",
]

OUTLIER_SIGMAS = 5.0

#: Per-layer indicators, each (name, how its two sums finish): in logging order.
LAYER_INDICATORS = (
    ("router_z", "ratio"),      # MoE layers
    ("attention_z", "ratio"),   # the local attention spec (N/A with Transformer Engine)
    ("attn_rms", "rms"),        # attention sub-block output after alpha
    ("mlp_rms", "rms"),         # MLP / MoE sub-block output after alpha
    ("outliers", "percent"),    # the layer's output hidden state
)
RATIO_SLOTS = 2  # (sum, count) per indicator


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _count(like: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` as a float64 scalar on ``like``'s device, without a host-to-device copy (a fill kernel:
    ``torch.tensor(n, device='cuda')`` would synchronise the host)."""
    return like.new_full((), float(n), dtype=torch.float64)


def z_partials(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(sum of logsumexp(logits, -1)^2, number of rows) in float64; ``valid`` (bool, the logits'
    shape without the last axis) keeps only those rows (by weighting: no host sync)."""
    lse2 = torch.logsumexp(_f32(logits), dim=-1).double().square()
    if valid is None:
        return torch.stack([lse2.sum(), _count(lse2, lse2.numel())])
    keep = valid.reshape(lse2.shape).to(lse2.dtype)
    return torch.stack([(lse2 * keep).sum(), keep.sum()])


def rms_partials(y: torch.Tensor) -> torch.Tensor:
    """(sum y^2, number of elements) in float64."""
    return torch.stack([_f32(y).square().sum(dtype=torch.float64), _count(y, y.numel())])


def outlier_partials(h: torch.Tensor, sigmas: float = OUTLIER_SIGMAS) -> torch.Tensor:
    """(number of elements more than ``sigmas`` standard deviations from their token's mean,
    number of elements) in float64; the last axis is the hidden dimension, the standard deviation
    the population one (over that axis)."""
    x = _f32(h)
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, correction=0, keepdim=True)
    count = ((x - mean).abs() > sigmas * std).sum(dtype=torch.float64)
    return torch.stack([count, _count(x, x.numel())])


def expert_loads(routing_map: torch.Tensor) -> torch.Tensor:
    """Tokens routed to each expert: ``routing_map`` [tokens, experts] (bool or 0/1) summed over tokens."""
    return routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0, dtype=torch.float64)


def ratio(total: float, count: float) -> Optional[float]:
    return total / count if count > 0 else None


def rms(total: float, count: float) -> Optional[float]:
    return (total / count) ** 0.5 if count > 0 else None


def percent(total: float, count: float) -> Optional[float]:
    return 100.0 * total / count if count > 0 else None


_FINISH = {"ratio": ratio, "rms": rms, "percent": percent}


def max_vio(loads: Sequence[float]) -> Optional[float]:
    """(max load - mean load) / mean load; None when no token was routed."""
    loads = list(loads)
    if not loads:
        return None
    mean = sum(loads) / len(loads)
    return (max(loads) - mean) / mean if mean > 0 else None


def layer_key(layer: int, num_layers: int) -> str:
    """``layer_03``: the 1-based global layer number, zero-padded to the width of ``num_layers``
    (at least two digits), so the names sort in layer order."""
    return f"layer_{layer:0{max(2, len(str(num_layers)))}d}"


@dataclass(frozen=True)
class Layout:
    """Where each partial sum lives in the one vector a logging step all-reduces.

    Per global layer (1-based): two slots per indicator of ``LAYER_INDICATORS``, then
    ``num_experts`` expert loads; then per matrix type of ``grad_types``: (sum of squared
    gradient elements, number of elements). The same on every rank (it depends on the model's
    config only), whichever layers a pipeline stage holds."""

    num_layers: int
    num_experts: int = 0
    grad_types: tuple = ()

    @property
    def per_layer(self) -> int:
        return RATIO_SLOTS * len(LAYER_INDICATORS) + self.num_experts

    @property
    def size(self) -> int:
        return self.num_layers * self.per_layer + 2 * len(self.grad_types)

    def slot(self, layer: int, indicator: str) -> int:
        """First of the two slots of ``indicator`` in 1-based ``layer``."""
        k = [name for name, _ in LAYER_INDICATORS].index(indicator)
        return (layer - 1) * self.per_layer + RATIO_SLOTS * k

    def loads(self, layer: int) -> slice:
        start = (layer - 1) * self.per_layer + RATIO_SLOTS * len(LAYER_INDICATORS)
        return slice(start, start + self.num_experts)

    def grad_slot(self, kind: str) -> int:
        return self.num_layers * self.per_layer + 2 * self.grad_types.index(kind)

    def finish(self, totals: Sequence[float]) -> dict[str, float]:
        """Metric name -> value from the reduced vector: per layer, then mean and max over the
        layers that have the indicator; indicators no layer has are left out."""
        totals = list(totals)
        values: dict[str, float] = {}

        def family(prefix: str, per_layer: dict[int, float]) -> None:
            if not per_layer:
                return
            for layer, v in per_layer.items():
                values[f"{prefix}/{layer_key(layer, self.num_layers)}"] = v
            values[f"{prefix}/mean"] = sum(per_layer.values()) / len(per_layer)
            values[f"{prefix}/max"] = max(per_layer.values())

        for name, how in LAYER_INDICATORS:
            per_layer = {}
            for layer in range(1, self.num_layers + 1):
                s = self.slot(layer, name)
                v = _FINISH[how](totals[s], totals[s + 1])
                if v is not None:
                    per_layer[layer] = v
            family(f"indicators/{name}", per_layer)
        if self.num_experts:
            per_layer = {}
            for layer in range(1, self.num_layers + 1):
                v = max_vio(totals[self.loads(layer)])
                if v is not None:
                    per_layer[layer] = v
            family("moe/maxvio", per_layer)
        for kind in self.grad_types:
            s = self.grad_slot(kind)
            if totals[s + 1] > 0:
                values[f"hyperball/grad_norm/{kind}"] = max(totals[s], 0.0) ** 0.5
        return values


def indicator_names(num_layers: int, *, moe_layers: Sequence[int] = (), attention_z: bool = True,
                    grad_types: Sequence[str] = ()) -> list[str]:
    """The names a logging step writes for a model with ``num_layers`` layers, MoE in
    ``moe_layers`` (1-based), attention Z when the attention path exposes it, and the grad norm of
    ``grad_types``."""
    names = []
    every = list(range(1, num_layers + 1))
    for name, _ in LAYER_INDICATORS:
        layers = list(moe_layers) if name == "router_z" else every
        if name == "attention_z" and not attention_z:
            layers = []
        if layers:
            names += [f"indicators/{name}/{layer_key(n, num_layers)}" for n in layers]
            names += [f"indicators/{name}/mean", f"indicators/{name}/max"]
    if moe_layers:
        names += [f"moe/maxvio/{layer_key(n, num_layers)}" for n in moe_layers] + ["moe/maxvio/mean",
                                                                                 "moe/maxvio/max"]
    names += [f"hyperball/grad_norm/{t}" for t in grad_types]
    return names
