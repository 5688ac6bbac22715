"""Shared helpers of the multi-rank tests: synthetic tensors, float64 references, the model and
optimizer under test, steps, full parameters and comparisons.

Everything here runs inside a torchrun rank whose process group and Megatron parallel state the
fixtures of ``conftest.py`` set up. Synthetic weights and gradients are drawn by parameter name at
the full (TP-gathered, whole-model) shape, so every DP/TP/PP layout and the float64 references
start from and are fed the same numbers. Names are global: with pipeline parallelism a stage's
``decoder.layers.0`` is renamed to its global layer index (:func:`global_names`).
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import zlib
from typing import Callable, Dict, Iterable, Optional

import pytest
import torch
import torch.distributed as dist

from tests.reference import AdamHReference, MuonHReference, adamw_reference_step

__all__ = [
    # synthetic tensors and the float64 references
    "SHAPE", "SPHERES", "is_sphere", "initial", "grad", "load_synthetic_weights", "feed_synthetic_grads",
    "load_full_weights", "model_reference", "adamh_reference", "muonh_reference", "AdamHReference",
    "MuonHReference",
    # the model and optimizer under test, steps
    "build", "build_hyperball", "fed_steps", "token_batch", "dp_slice", "train_step", "schedule_step",
    # what came out, and comparisons
    "full_params", "global_names", "gathered_logits", "local_optimizer_state", "rel_err", "max_rel_err",
    "assert_rel_close", "global_rel_err", "split_qkv_bias", "assert_trains", "all_max", "AllReduceCounter",
]

# the tiny GPT of every multi-rank test
SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)
SPHERES = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def is_sphere(name: str) -> bool:
    """The matrices AdamH / MuonH put on a sphere in the tiny GPT (the output layer takes Adam)."""
    return name.endswith(SPHERES)


# -- synthetic tensors, by global name ---------------------------------------------------------------
def _gen(name: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + salt)


def initial(name: str, shape) -> torch.Tensor:
    """Matrices ~ N(0, 0.02^2); norm gains 1; biases 0."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=_gen(name, 0)) * 0.02


def grad(name: str, shape, step: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(name, step + 1)) * 0.01


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def _full_shape(p, tp: int) -> list[int]:
    shape = list(p.shape)
    if tp > 1 and getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return shape


def _local_slice(full: torch.Tensor, p, tp: int, tp_rank: int) -> torch.Tensor:
    if tp > 1 and getattr(p, "tensor_model_parallel", False):
        return full.chunk(tp, dim=p.partition_dim)[tp_rank]
    return full


def global_names(model) -> Dict[str, torch.nn.Parameter]:
    """{global name: param} of a (wrapped) GPTModel: wrappers' 'module.' prefixes dropped and, on a
    pipeline stage, 'decoder.layers.i' renamed to the layer's global index."""
    from megatron_hyperball.mcore.builders import unwrap

    gpt = unwrap(model)
    offsets = {}
    decoder = getattr(gpt, "decoder", None)
    if decoder is not None:
        offsets = {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}

    def rename(m):
        return f"decoder.layers.{offsets[int(m.group(1))]}."

    return {re.sub(r"^decoder\.layers\.(\d+)\.", rename, name): p for name, p in gpt.named_parameters()}


@torch.no_grad()
def load_synthetic_weights(model, zero: Optional[str] = None) -> None:
    """Every parameter from :func:`initial` (this rank's TP slice); ``zero``: that one all zeros."""
    tp, tp_rank = _tp()
    for name, p in global_names(model).items():
        w = _local_slice(initial(name, _full_shape(p, tp)), p, tp, tp_rank)
        p.copy_(torch.zeros_like(w) if name == zero else w)


@torch.no_grad()
def load_full_weights(model, full: Dict[str, torch.Tensor]) -> None:
    """Copy full weights (by global name, e.g. another layout's :func:`full_params`) into this
    rank's params: its TP slice of its pipeline stage's layers."""
    tp, tp_rank = _tp()
    for name, p in global_names(model).items():
        src = _local_slice(full[name], p, tp, tp_rank)
        assert src.shape == p.shape, (name, tuple(src.shape), tuple(p.shape))
        p.copy_(src)


def feed_synthetic_grads(model, step: int, nan_in: Optional[str] = None, bad: float = float("nan")) -> None:
    """Write :func:`grad` (this rank's TP slice) into every param's ``main_grad``, as Megatron's grad
    sync leaves it; ``nan_in``: put ``bad`` (NaN) into the first element of the params ending so."""
    tp, tp_rank = _tp()
    for name, p in global_names(model).items():
        g = _local_slice(grad(name, _full_shape(p, tp), step), p, tp, tp_rank)
        if nan_in is not None and name.endswith(nan_in):
            g = g.clone()
            g.view(-1)[0] = bad
        p.main_grad.copy_(g)


# -- float64 references --------------------------------------------------------------------------------
def model_reference(shapes: Dict[str, tuple], sphere_reference: Callable, steps: int, lr: float,
                    wd: float = 0.1) -> Dict[str, torch.Tensor]:
    """float64 run of the whole model fed :func:`grad` for ``steps`` steps: ``sphere_reference(w0)``
    (an object with .step(g) and .w) on the sphere matrices, AdamW on the rest with Megatron's
    weight-decay rule (none on 1-D params and biases)."""
    out = {}
    for name, shape in shapes.items():
        w0 = initial(name, shape).double()
        if is_sphere(name):
            ref = sphere_reference(w0)
            for t in range(steps):
                ref.step(grad(name, shape, t))
            out[name] = ref.w
        else:
            decay = 0.0 if (len(shape) == 1 or name.endswith("bias")) else wd
            state = {"m": torch.zeros(shape, dtype=torch.float64), "v": torch.zeros(shape, dtype=torch.float64),
                     "t": 0}
            w = w0
            for t in range(steps):
                w = adamw_reference_step(state, w, grad(name, shape, t).double(), lr, (0.9, 0.95), 1e-8, decay)
            out[name] = w
    return out


def adamh_reference(shapes, steps: int, lr: float):
    return model_reference(shapes, lambda w0: AdamHReference(w0, lr), steps, lr)


def muonh_reference(shapes, steps: int, lr: float):
    """MuonH in float64 around the package's Newton-Schulz in fp32 (as the layer-wise path runs it)."""
    from megatron_hyperball.optim.newton_schulz import orthogonalize

    def orth(x):
        return orthogonalize(x.float(), fp32_matmul_prec="highest")

    return model_reference(shapes, lambda w0: MuonHReference(w0, lr, orth, momentum=0.95, nesterov=True), steps, lr)


# -- the model and optimizer under test ------------------------------------------------------------------
def build(optimizer: str = "adamh", *, lr: float = 0.02, steps: int = 5, bf16: bool = False,
          layer_wise: bool = False, distributed: bool = True, clip_grad: float = 0.0,
          loss_scale: Optional[float] = None, zero_param: Optional[str] = None, config_overrides=None,
          **config_changes):
    """Tiny GPT (synthetic weights) + Megatron DDP + ``get_megatron_optimizer`` + Megatron's scheduler
    (constant lr, weight decay 0.1 times each group's wd_mult), for the current parallel state.

    Returns (ddp, optimizer, scheduler)."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_hyperball.mcore.builders import build_gpt, seed_all, wrap_ddp
    from megatron_hyperball.mcore.options import HyperballOptimizerConfig
    from megatron_hyperball.mcore.roles import tag_position_embeddings

    seed_all(1234)
    model = build_gpt(**SHAPE, bf16=bf16)
    load_synthetic_weights(model, zero=zero_param)
    tag_position_embeddings(model)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed, layer_wise=layer_wise)
    fields = dict(
        optimizer=optimizer, lr=lr, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        clip_grad=clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed, use_layer_wise_distributed_optimizer=layer_wise,
        muon_nesterov=True, muon_fp32_matmul_prec="highest", muon_tp_mode="duplicated", muon_split_qkv=False,
        hyperball_radius="init", hyperball_update_norm="exact", loss_scale=loss_scale,
    )
    fields.update(config_changes)
    config = HyperballOptimizerConfig(**fields)
    opt = get_megatron_optimizer(config, [ddp], config_overrides=config_overrides)
    scheduler = OptimizerParamScheduler(
        opt, init_lr=lr, max_lr=lr, min_lr=lr, lr_warmup_steps=0, lr_decay_steps=steps,
        lr_decay_style="constant", start_wd=config.weight_decay, end_wd=config.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant")
    return ddp, opt, scheduler


def build_hyperball(optimizer: str, **kwargs):
    """:func:`build` with the layout each optimizer runs on: MuonH (and Megatron's Muon) layer-wise."""
    muon = "muon" in optimizer
    return build(optimizer, layer_wise=muon or kwargs.pop("layer_wise", False), **kwargs)


def fed_steps(ddp, optimizer, scheduler, steps: Iterable[int], nan_step: int = -1,
              counter: Optional["AllReduceCounter"] = None, count_step: int = -1,
              bad: float = float("nan")) -> list[bool]:
    """The optimizer alone: per step, every rank writes the same synthetic gradients into the grad
    buffers (as Megatron's grad sync leaves them) and calls ``optimizer.step()``. Returns the steps'
    success flags. ``counter`` counts the all-reduces of step ``count_step``."""
    ok = []
    for step in steps:
        scheduler.step(increment=1)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        feed_synthetic_grads(ddp, step, nan_in="linear_fc1.weight" if step == nan_step else None, bad=bad)
        with (counter.counting() if counter is not None and step == count_step else contextlib.nullcontext()):
            success, _, _ = optimizer.step()
        ok.append(bool(success))
    return ok


# -- training on tokens -------------------------------------------------------------------------------------
def token_batch(step: int, batch: int, seq: int = SHAPE["seq_length"], vocab: int = SHAPE["vocab_size"],
                seed: int = 0):
    """The global batch for ``step``: (tokens, labels), identical on every rank.

    A learnable stream: tokens live in the first ``vocab // 8`` ids and follow
    x[t+1] = (3 x[t] + 1) mod (vocab // 8) from a random start, so a model's loss drops within a
    few steps (first by dropping unused ids, then by the rule).
    """
    active = max(2, vocab // 8)
    g = torch.Generator().manual_seed(seed * 100003 + step)
    x = torch.randint(0, active, (batch, 1), generator=g)
    cols = [x]
    for _ in range(seq):
        x = (3 * x + 1) % active
        cols.append(x)
    data = torch.cat(cols, dim=1)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def dp_slice(x: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's contiguous share of a global batch."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    r = parallel_state.get_data_parallel_rank()
    assert x.shape[0] % dp == 0, "global batch must divide by the data-parallel size"
    n = x.shape[0] // dp
    return x[r * n: (r + 1) * n]


def _positions(tokens):
    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def _dp_mean(loss: torch.Tensor) -> float:
    from megatron.core import parallel_state

    reported = loss.detach().clone().float()
    dist.all_reduce(reported, group=parallel_state.get_data_parallel_group())
    return (reported / parallel_state.get_data_parallel_world_size()).item()


def train_step(model, optimizer, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """One Megatron-style step without pipeline parallelism: zero buffers, forward (mean next-token
    loss over the local tokens), backward, grad sync, optimizer step. Returns the loss averaged over
    data-parallel ranks, the grad norm and the step's success flag."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    tokens, labels = dp_slice(tokens), dp_slice(labels)
    loss = model(tokens, _positions(tokens), None, labels=labels).float().mean()
    loss.backward()
    model.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()
    return {"loss": _dp_mean(loss), "grad_norm": grad_norm, "ok": bool(ok)}


def schedule_step(model, optimizer, tokens: torch.Tensor, labels: torch.Tensor, num_microbatches: int = 1) -> dict:
    """One step through Megatron's ``get_forward_backward_func()`` schedule (pipeline parallel or
    not): this DP rank's share of the batch in ``num_microbatches`` micro-batches, the same mean
    next-token loss as :func:`train_step`, then grad sync and the optimizer step. The loss (known on
    the last stage) is sent to every rank."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens, labels = dp_slice(tokens), dp_slice(labels)
    micro = list(zip(tokens.chunk(num_microbatches), labels.chunk(num_microbatches)))

    def forward_step(data_iterator, chunk):
        tok, lab = next(data_iterator)
        output = chunk(tok, _positions(tok), None, labels=lab)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"lm loss": loss.detach()}

        return output, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
        num_microbatches=num_microbatches, seq_length=tokens.shape[1], micro_batch_size=micro[0][0].shape[0],
        forward_only=False)
    model.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()
    loss = torch.zeros(1)
    if parallel_state.is_pipeline_last_stage():
        loss[0] = sum(x["lm loss"].float() for x in losses) / num_microbatches
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = dist.get_process_group_ranks(pp_group)[-1]
    dist.broadcast(loss, src=last, group=pp_group)
    return {"loss": _dp_mean(loss), "grad_norm": grad_norm, "ok": bool(ok)}


# -- full parameters and comparisons --------------------------------------------------------------------------
def full_params(model) -> Dict[str, torch.Tensor]:
    """Every parameter of the whole model as a full fp32 CPU tensor by global name, on every rank:
    TP shards gathered, and with pipeline parallelism every stage's params gathered."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, p in global_names(model).items():
        t = p.detach().float().cpu()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t.clone()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1:
        stages = [None] * pp
        dist.all_gather_object(stages, out, group=parallel_state.get_pipeline_model_parallel_group())
        out = {k: v for stage in stages for k, v in stage.items()}
    return out


def gathered_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits over the whole vocabulary (the vocab-parallel output gathered over TP), no grad."""
    from megatron.core import parallel_state

    with torch.no_grad():
        logits = model(tokens, _positions(tokens), None).float().contiguous()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def local_optimizer_state(optimizer) -> Dict[str, torch.Tensor]:
    """This rank's inner optimizer state (moments, step) and fp32 main params, in order."""
    from megatron_hyperball.mcore.tree import inner, leaves

    out = {}
    for i, leaf in enumerate(leaves(optimizer)):
        torch_opt = inner(leaf)
        for g, group in enumerate(torch_opt.param_groups):
            for j, p in enumerate(group["params"]):
                out[f"{i}.{g}.{j}.param"] = p.detach().clone()
                for k, v in torch_opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        out[f"{i}.{g}.{j}.{k}"] = v.detach().clone()
    return out


def assert_trains(losses, min_drop: float) -> None:
    """Finite, strictly decreasing, and down by more than ``min_drop`` overall."""
    assert all(math.isfinite(x) for x in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), f"loss not decreasing: {losses}"
    assert losses[0] - losses[-1] > min_drop, losses


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_rel_err(params: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]):
    """(worst relative error, {name: error}) over ``ref``'s names."""
    errs = {n: rel_err(params[n], ref[n]) for n in ref}
    return max(errs.values()), errs


def assert_rel_close(params: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], tol: float, what: str = "") -> None:
    """Every tensor within relative (Frobenius) error ``tol`` of the reference; the worst three in
    the message."""
    assert params.keys() == ref.keys(), (what, sorted(set(params) ^ set(ref)))
    err, errs = max_rel_err(params, ref)
    assert err <= tol, f"{what}: max relative error {err:.3g} > {tol:g}; worst: " + ", ".join(
        f"{n} {e:.3g}" for n, e in sorted(errs.items(), key=lambda kv: -kv[1])[:3])


def all_max(x: float) -> float:
    """The maximum of ``x`` over all ranks."""
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def global_rel_err(pa: Dict[str, torch.Tensor], pb: Dict[str, torch.Tensor]) -> float:
    """||pa - pb|| / ||pa|| over all tensors together."""
    num = sum(((pa[k].double() - pb[k].double()) ** 2).sum() for k in pa)
    den = sum((pa[k].double() ** 2).sum() for k in pa)
    return math.sqrt(float(num / den))


def split_qkv_bias(params: Dict[str, torch.Tensor], heads: int = SHAPE["num_attention_heads"]):
    """Replace each fused QKV bias by its Q and V parts and return the K parts apart.

    The key bias has an identically zero gradient (softmax is invariant to it), so Adam turns its
    round-off-level gradient into full-size steps of arbitrary sign: it is compared by size, not value.
    """
    head_dim = SHAPE["hidden_size"] // heads
    out, key_biases = {}, {}
    for name, t in params.items():
        if name.endswith("linear_qkv.bias"):
            groups = t.view(heads, 3, head_dim)
            out[name + "[q]"] = groups[:, 0].clone()
            out[name + "[v]"] = groups[:, 2].clone()
            key_biases[name] = groups[:, 1].clone()
        else:
            out[name] = t
    return out, key_biases


class AllReduceCounter:
    """Counts ``torch.distributed.all_reduce`` calls by the ranks of their group, inside
    ``with counter.counting():``."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def counting(self):
        original = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            key = str(dist.get_process_group_ranks(group)) if group is not None else "world"
            self.counts[key] += 1
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counted
        try:
            yield self
        finally:
            dist.all_reduce = original


def sharded_state(ddp, optimizer, is_loading: bool, sharding: str = "dp_reshardable") -> dict:
    """The model + optimizer sharded state dict megatron.training builds for a torch_dist checkpoint."""
    from megatron.core import parallel_state

    from megatron_hyperball.mcore.builders import unwrap

    metadata = {
        "distrib_optim_sharding_type": sharding,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    sd = {"model": unwrap(ddp).sharded_state_dict(metadata=metadata)}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=metadata)
    return sd


# -- magnitude-direction (AdamMD / MuonMD) float64 reference ---------------------------------------------
class MDReference:
    """Seed 004 in float64, written from its equations (not from optim/gains.py):

        W = diag(r) V diag(c),  r = softplus(raw_r), c = softplus(raw_c)  (raw_0 = log(e - 1): gains 1)
        V = W / (r c^T),  P = V * G,  dL/dr_i = sum_j P_ij c_j,  dL/dc_j = sum_i P_ij r_i
        V' = base step of V with G * (r c^T)  (``base``: AdamHReference / MuonHReference holding V)
        raw' = Adam(raw, dL/dg * sigmoid(raw)), lr ``gain_lr``, no weight decay;  W' = diag(r') V' diag(c')
    """

    def __init__(self, w0, base, gain_lr, betas=(0.9, 0.95), eps=1e-8):
        self.base, self.lr, self.betas, self.eps = base, gain_lr, betas, eps
        m, n = base.w.shape
        self.raw = {s: torch.full((k,), math.log(math.e - 1), dtype=torch.float64) for s, k in (("r", m), ("c", n))}
        self.mom = {s: torch.zeros_like(v) for s, v in self.raw.items()}
        self.sq = {s: torch.zeros_like(v) for s, v in self.raw.items()}
        self.t = 0
        self.w = self._outer() * base.w

    def gains(self):
        return {s: torch.nn.functional.softplus(v) for s, v in self.raw.items()}

    def _outer(self):
        g = self.gains()
        return g["r"][:, None] * g["c"][None, :]

    def step(self, grad, lr_factor: float = 1.0):
        """One step; ``lr_factor``: the schedule's lr / max_lr, for V's lr and the gains' alike."""
        grad = grad.double()
        g = self.gains()
        outer = self._outer()
        v = self.w / outer
        p = v * grad
        dg = {"r": (p * g["c"][None, :]).sum(1), "c": (p * g["r"][:, None]).sum(0)}
        self.base.w = v
        if lr_factor == 1.0:
            self.base.step(grad * outer)
        else:
            self.base.step(grad * outer, lr=self.base.lr * lr_factor)
        b1, b2 = self.betas
        self.t += 1
        for s in self.raw:
            d = dg[s] * torch.sigmoid(self.raw[s])
            self.mom[s] = b1 * self.mom[s] + (1 - b1) * d
            self.sq[s] = b2 * self.sq[s] + (1 - b2) * d * d
            m_hat, v_hat = self.mom[s] / (1 - b1**self.t), self.sq[s] / (1 - b2**self.t)
            self.raw[s] = self.raw[s] - self.lr * lr_factor * m_hat / (v_hat.sqrt() + self.eps)
        self.w = self._outer() * self.base.w
        return self.w


def md_reference(shapes, steps: int, lr: float, gain_lr: float, base: str = "adam", update_norm: str = "exact"):
    """(weights, {name: gains}) of a float64 AdamMD (base 'adam') or MuonMD ('muon') run of the whole
    model fed :func:`grad` (non-sphere params: AdamW as :func:`model_reference`)."""
    from megatron_hyperball.optim.newton_schulz import orthogonalize

    refs = {}

    def make(w0):
        if base == "adam":
            b = AdamHReference(w0, lr, update_norm=update_norm)
        else:
            b = MuonHReference(w0, lr, lambda x: orthogonalize(x.float(), fp32_matmul_prec="highest"),
                               momentum=0.95, nesterov=True, update_norm=update_norm)
        ref = MDReference(w0, b, gain_lr)
        refs[len(refs)] = ref
        return ref

    weights = model_reference(shapes, make, steps, lr)
    names = [n for n in shapes if is_sphere(n)]
    return weights, {n: refs[i].gains() for i, n in enumerate(names)}


def md_gains_by_name(optimizer) -> Dict[str, Dict[str, torch.Tensor]]:
    """{global-ish name (wrapper prefixes dropped): {'row'|'col'|...: gains}} of every MD leaf on this rank."""
    from megatron_hyperball.mcore.tree import inner, leaves

    out = {}
    for leaf in leaves(optimizer):
        torch_opt = inner(leaf)
        hook = getattr(torch_opt, "md_hook", None)
        if hook is None:
            continue
        for key, gains in hook.gain_values(torch_opt.sphere_index()).items():
            out[re.sub(r"^(module\.)+", "", key)] = gains
    return out


def assert_gains_close(gains: dict, ref_gains: dict, params: dict, tol: float) -> None:
    """Every sphere's row and column gains equal the reference's, relative to how far they moved
    from 1 (the start), and the reference's gains did move (> 0.02 somewhere)."""
    assert set(gains) == {n for n in params if is_sphere(n)}  # every rank holds every sphere's gains
    moved = 0.0
    for name, g in gains.items():
        for side, key in (("row", "r"), ("col", "c")):
            want = ref_gains[name][key]
            err = ((g[side].double() - want).norm() / (want - 1).norm()).item()
            assert err < tol, (name, side, err)
            moved = max(moved, (want - 1).abs().max().item())
    assert moved > 0.02


def save_torch_dist(ddp, optimizer, directory, sharding: str = "dp_reshardable") -> None:
    """Save model + optimizer as megatron.training does (torch_dist, ``sharded_state``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state(ddp, optimizer, False, sharding), str(directory),
                            sharded_strategy=get_default_save_sharded_strategy("torch_dist"))


def load_torch_dist(ddp, optimizer, directory, sharding: str = "dp_reshardable") -> None:
    """Load what :func:`save_torch_dist` wrote; the weights are scaled by 1.5 first, so a load that
    missed something shows."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy

    from megatron_hyperball.mcore.builders import unwrap

    with torch.no_grad():
        for p in ddp.parameters():
            p.mul_(1.5)
    loaded = dist_checkpointing.load(sharded_state(ddp, optimizer, True, sharding), str(directory),
                                     sharded_strategy=get_default_load_sharded_strategy(str(directory)))
    unwrap(ddp).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])


def one_step_all_reduces(build_fn, name: str) -> dict:
    """{group ranks: count} of the all-reduces in the second of two fed steps of ``build_fn(name)``."""
    counter = AllReduceCounter()
    ddp, optimizer, scheduler = build_fn(name, steps=2)
    fed_steps(ddp, optimizer, scheduler, range(2), counter=counter, count_step=1)
    return dict(counter.counts)


def layout(dp: int, tp: int = 1, *values, id: Optional[str] = None):
    """A ``pytest.param(dp, tp, *values)`` for a data x tensor parallel layout, run only in a launch
    of dp * tp ranks (id ``dp{dp}-tp{tp}`` unless given)."""
    return pytest.param(dp, tp, *values, id=id or f"dp{dp}-tp{tp}", marks=pytest.mark.world_size(dp * tp))
