"""HyperP's instability indicators on a Megatron GPT: forward hooks switched on for logging steps only.

On an iteration that is a multiple of ``--hyperball-metrics-interval`` (the YAML
``logging.metrics_interval``) the hooks below are registered before the step's forward passes and
removed after them; every other step runs with no hook, no host sync and no collective. While on,
each hook adds float64 partial sums (``models.indicators``) into one local vector; after the
optimizer step the per-type gradient sums join it and one ``all_reduce`` over all ranks adds the
data-parallel, tensor-, pipeline- and expert-parallel ranks. The finished values go to Megatron's
TensorBoard and W&B writers (last rank) at the iteration ``training_log`` uses:

    indicators/router_z/layer_NN     mean over tokens of logsumexp(router logits)^2     (MoE layers)
    indicators/attention_z/layer_NN  mean over batch, heads, queries of LSE(scores)^2   (local spec)
    indicators/attn_rms/layer_NN     RMS of alpha * (attention output + bias)
    indicators/mlp_rms/layer_NN      RMS of alpha * (MLP / MoE output + bias)
    indicators/outliers/layer_NN     % of the layer's output elements > 5 sigma from their token's mean
    moe/maxvio/layer_NN              (max expert load - mean) / mean over the step's tokens
    .../mean, .../max                over the layers that have the indicator
    hyperball/grad_norm/<type>       L2 norm of the gradients of that matrix type, before clipping

Where each hook sits (``TransformerLayer`` = one of ``decoder.layers``):

- router Z and MaxVio: forward hook on ``layer.mlp.router`` (``TopKRouter`` and subclasses, e.g.
  SqrtGate): its output carries the routing map (the loads); the logits are not in its output,
  so the hook recomputes them with the router's own ``gating`` on the router's input (one
  [tokens, h] x [h, E] product, logging steps only; without Megatron's input jitter);
- attention Z: forward pre-hook on the local spec's ``core_attention.scale_mask_softmax``
  (``FusedScaleMaskSoftmax``): its input are the scores already scaled by 1/sqrt(d); the softmax's
  own extra scale and mask (given, causal or sliding window, masked value -10000 as Megatron's
  ``mask_func``) are applied to a copy, because the mask is applied in place. N/A with Transformer
  Engine's attention (fused kernels expose no LSE: Megatron's ``--log-max-attention-logit`` logs
  the max attention logit there) and with a softmax offset (attention sinks);
- output RMS: forward hooks on ``layer.self_attention`` / ``layer.mlp`` (their output is
  ``(out, bias)``), times the alpha of the layer's ``self_attn_bda`` / ``mlp_bda``
  (``models.depth_mup``; 1 without Depth-muP): exactly the increment the residual add receives
  (before dropout);
- outliers: forward hook on each ``TransformerLayer`` (its output hidden state).

Activation recomputation runs a hook twice with the same values: sums and counts double alike and
every ratio stays the same. The per-type gradient norm reads each rank's fp32 main gradients
after the step (ZeRO-1 slices, layer-wise owners, replicas counted once, as ``mcore.reduce``
does), divided by Megatron's clip factor so it is the gradient before clipping, like
``grad-norm``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from megatron_hyperball.mcore import tree
from megatron_hyperball.mcore.builders import unwrap as _unwrap
from megatron_hyperball.mcore.reduce import group_rank
from megatron_hyperball.mcore.roles import MATRIX_TYPES, role_of
from megatron_hyperball.models import indicators as ind

__all__ = ["Indicators", "install", "attention_z_exposed"]


def _layers(model_chunks) -> list:
    """Every ``TransformerLayer`` of the decoders of ``model_chunks`` (this rank's stages)."""
    out = []
    for chunk in model_chunks:
        decoder = getattr(_unwrap(chunk), "decoder", None)
        out += list(getattr(decoder, "layers", None) or ())
    return out


def _softmax_module(layer):
    """The local spec's ``FusedScaleMaskSoftmax`` of a layer, or None (Transformer Engine, ...)."""
    core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
    return getattr(core, "scale_mask_softmax", None)


def attention_z_exposed(model_chunks) -> bool:
    """Whether the attention path exposes the scores (Megatron's local ``DotProductAttention``)."""
    layers = _layers(model_chunks)
    return bool(layers) and all(_softmax_module(layer) is not None for layer in layers)


def _router(layer):
    router = getattr(getattr(layer, "mlp", None), "router", None)
    return router if router is not None and hasattr(router, "gating") else None


def _alpha(bda) -> float:
    return float(getattr(bda, "alpha", 1.0))


class Indicators:
    """The indicator hooks of one model; ``step(iteration)`` brackets a training step."""

    def __init__(self, model_chunks, interval: int, optimizer=None, clip_grad: float = 0.0):
        self.interval = int(interval)
        self.optimizer = optimizer
        self.clip_grad = float(clip_grad or 0.0)
        self.model_chunks = list(model_chunks)
        self.layers = _layers(self.model_chunks)
        config = getattr(_unwrap(self.model_chunks[0]), "config", None) if self.model_chunks else None
        num_layers = int(getattr(config, "num_layers", 0) or 0) or len(self.layers)
        num_experts = int(getattr(config, "num_moe_experts", 0) or 0)
        self.params, self.kinds = [], []
        seen = set()
        for chunk in self.model_chunks:
            for name, p in chunk.named_parameters():
                kind = role_of(name, p).metric
                if kind is None or id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                self.params.append(p)
                self.kinds.append(kind)
        self.layout = ind.Layout(num_layers, num_experts, MATRIX_TYPES)
        self.device = next((p.device for p in self.params), torch.device("cpu"))
        self.acc: Optional[torch.Tensor] = None
        self._handles: list = []
        self.hook_calls = 0  # hooks run since the last start() (tests)
        self.last: dict[str, float] = {}

    # -- when -------------------------------------------------------------------------------------------
    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    @contextlib.contextmanager
    def step(self, iteration: int):
        """Around one training step (forward, backward, optimizer step) of ``iteration``: hooks on
        when it is due; on leaving, the indicators are reduced and written. Yields a dict the
        caller may fill with ``grad_norm`` (Megatron's, before clipping) for the gradient norms."""
        info: dict = {}
        if not self.due(iteration):
            yield info
            return
        self.start()
        try:
            yield info
        finally:
            self.remove_hooks()
        self.finish(iteration, info.get("grad_norm"))

    # -- hooks ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Zero the local sums and register the hooks."""
        self.remove_hooks()
        self.acc = torch.zeros(self.layout.size, dtype=torch.float64, device=self.device)
        self.hook_calls = 0
        for layer in self.layers:
            n = int(layer.layer_number)
            self._handles.append(layer.register_forward_hook(self._outliers_hook(n)))
            if getattr(layer, "self_attention", None) is not None:
                self._handles.append(layer.self_attention.register_forward_hook(
                    self._rms_hook(n, "attn_rms", _alpha(getattr(layer, "self_attn_bda", None)))))
                softmax = _softmax_module(layer)
                if softmax is not None:
                    self._handles.append(softmax.register_forward_pre_hook(self._attention_z_hook(n)))
            if getattr(layer, "mlp", None) is not None:
                self._handles.append(layer.mlp.register_forward_hook(
                    self._rms_hook(n, "mlp_rms", _alpha(getattr(layer, "mlp_bda", None)))))
                router = _router(layer)
                if router is not None:
                    self._handles.append(router.register_forward_hook(self._router_hook(n), with_kwargs=True))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _add(self, slot: int, partials: torch.Tensor) -> None:
        self.hook_calls += 1
        self.acc[slot:slot + partials.numel()] += partials.to(self.acc.device)

    def _outliers_hook(self, layer: int):
        slot = self.layout.slot(layer, "outliers")

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            with torch.no_grad():
                self._add(slot, ind.outlier_partials(hidden.detach()))

        return hook

    def _rms_hook(self, layer: int, name: str, alpha: float):
        slot = self.layout.slot(layer, name)

        def hook(module, args, output):
            out, bias = (output[0], output[1]) if isinstance(output, (tuple, list)) else (output, None)
            with torch.no_grad():
                y = out.detach()
                if bias is not None:
                    y = y + bias.detach()
                self._add(slot, ind.rms_partials(y.float() * alpha))

        return hook

    def _attention_z_hook(self, layer: int):
        slot = self.layout.slot(layer, "attention_z")

        def hook(module, args):
            from megatron.core.transformer.enums import AttnMaskType
            from megatron.core.transformer.utils import get_default_causal_mask, get_sliding_window_causal_mask

            scores, mask = args[0], (args[1] if len(args) > 1 else None)
            if len(args) > 2 and args[2] is not None:  # softmax offset (attention sinks): not a plain LSE
                return
            with torch.no_grad():
                x = scores.detach().float().clone() if scores.dtype != torch.float64 else scores.detach().clone()
                if module.scale is not None:
                    x.mul_(module.scale)
                sq, sk = x.size(2), x.size(3)
                if module.window_size is not None:
                    mask = get_sliding_window_causal_mask(sq, sk, module.window_size)
                elif module.attn_mask_type == AttnMaskType.causal and mask is None and sq > 1:
                    mask = get_default_causal_mask(sq)
                if mask is not None:
                    x = module.mask_func(x, mask)
                self._add(slot, ind.z_partials(x))

        return hook

    def _router_hook(self, layer: int):
        z_slot = self.layout.slot(layer, "router_z")
        loads = self.layout.loads(layer)

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["input"]
            padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
            with torch.no_grad():
                logits = module.gating(hidden.detach())
                logits = logits.reshape(-1, logits.shape[-1])
                valid = None if padding is None else padding.reshape(-1).bool()
                self._add(z_slot, ind.z_partials(logits, valid))
                routing_map = output[1]
                self._add(loads.start, ind.expert_loads(routing_map))

        return hook

    # -- gradients ----------------------------------------------------------------------------------------
    def _grad_partials(self, acc: torch.Tensor, grad_norm: Optional[float]) -> None:
        """Per type: squared gradient elements this rank holds (replicas once) and their count."""
        mains = tree.main_params(self.optimizer) if self.optimizer is not None else {}
        unclip = 1.0
        if self.clip_grad > 0 and grad_norm is not None:
            coeff = self.clip_grad / (float(grad_norm) + 1.0e-6)  # Megatron's clip_grad_by_total_norm_fp32
            if coeff < 1.0:
                unclip = 1.0 / coeff
        sums = torch.zeros(len(MATRIX_TYPES), 2, dtype=torch.float64, device=self.device)
        for p, kind in zip(self.params, self.kinds):
            if self.optimizer is None:
                g, replicated_dp = getattr(p, "main_grad", None), True
                if g is None:
                    g = p.grad
            else:
                main = mains.get(p)
                if main is None:
                    continue
                g, replicated_dp = main.tensor.grad, main.replicated_over_dp
            if g is None or g.numel() == 0:
                continue
            if replicated_dp and group_rank(tree.dp_group_of(p)) != 0:
                continue
            if not getattr(p, "tensor_model_parallel", False) and group_rank(tree.tp_group_of(p)) != 0:
                continue
            k = MATRIX_TYPES.index(kind)
            sums[k, 0] += g.detach().float().square().sum(dtype=torch.float64)
            sums[k, 1] += g.numel()
        sums[:, 0] *= unclip * unclip
        start = self.layout.grad_slot(MATRIX_TYPES[0])
        acc[start:start + sums.numel()] += sums.reshape(-1).to(acc.device)

    # -- reduce and write ---------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self, iteration: int, grad_norm: Optional[float] = None) -> dict[str, float]:
        """Add the gradient sums, all-reduce once, write; returns the values (every rank)."""
        self.remove_hooks()
        if self.acc is None:
            return {}
        acc, self.acc = self.acc, None
        self._grad_partials(acc, grad_norm)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(acc)
        values = self.layout.finish(acc.tolist())
        self.last = values
        from megatron_hyperball.mcore.metrics import HyperballMetrics

        HyperballMetrics.write(values, iteration)
        return values


def install(model_chunks, interval: int, optimizer=None, clip_grad: float = 0.0) -> Optional[Indicators]:
    """The indicators of a built model (None when ``interval`` is 0)."""
    if not interval or interval <= 0:
        return None
    return Indicators(model_chunks, interval, optimizer, clip_grad)
