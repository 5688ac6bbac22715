"""HyperP's instability indicators (mcore.indicators) on a real Megatron MoE GPT (CPU, gloo).

A 2-layer GPT (layer 1 dense, layer 2 MoE with 4 experts, top-2, allgather dispatcher, expert
parallelism = world size), Depth-muP alpha = 0.3, RoPE, one word-embedding column scaled up so the
residual stream has a real 5-sigma outlier, trained through Megatron's forward-backward schedule
with 2 micro-batches per step. Independent hooks capture, on the same logging step, each layer's
input, its hidden state after the attention residual add, its output, the core attention's query
and key, the router's input and routing map; a float64 computation from the seed's formulas on
those tensors (summed over ranks) must give the logged numbers:

- router Z = mean_t logsumexp(x_t W_r^T)^2; attention Z = mean_{b,h,q} logsumexp_k(q.k/sqrt(d),
  causal)^2; output RMS of the residual increments (so "after alpha" is what the residual add
  really received); outliers = % of output elements > 5 sigma from their token's mean; MaxVio from
  the routing map's loads;
- per-type grad norm = the float64 norm of Megatron's reduced main_grad of each type (before
  clipping: clip_grad is set low enough to clip), sum over types + 1-D params = Megatron's grad-norm;
  the same numbers with ZeRO-1 (AdamH) and the layer-wise optimizer (MuonH);
- a non-logging step registers no hook, runs none and issues exactly the collectives of a step
  without indicators; a logging step adds one all-reduce (world); the names reaching Megatron's
  TensorBoard writer are ``models.indicators.indicator_names``.

Run: torchrun --nproc-per-node 2 -m pytest tests/distributed/test_indicators.py
"""

import collections
import contextlib
import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed.helpers import schedule_step, token_batch

WORLD_SIZES = (1, 2)

LAYERS, HIDDEN, HEADS, VOCAB, SEQ, EXPERTS, TOPK = 2, 64, 4, 128, 16, 4, 2
ALPHA = 0.3
BATCH, MICRO = 4, 2       # global batch, micro-batches per step and rank
OUTLIER_COLUMN = 7
INTERVAL = 2
CLIP = 0.05               # below the measured grad norm (~0.3): the step clips
TOL = 1e-5                # fp32 model vs float64 reference (measured ~1e-7)


def build(optimizer="adamh", distributed=True, layer_wise=False, seed=1234):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from megatron_hyperball.mcore.builders import seed_all, wrap_ddp
    from megatron_hyperball.mcore.options import HyperballOptimizerConfig
    from megatron_hyperball.models.depth_mup import apply_depth_mup

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=96,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False, init_method_std=0.05,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=32, moe_layer_freq=[0, 1],
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        expert_model_parallel_size=dist.get_world_size(), normalization="RMSNorm",
    )
    spec = apply_depth_mup(get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                      normalization="RMSNorm"), ALPHA)
    seed_all(seed)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type="rope")
    with torch.no_grad():
        model.embedding.word_embeddings.weight[:, OUTLIER_COLUMN] = 1.0
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed, layer_wise=layer_wise)
    opt_config = HyperballOptimizerConfig(
        optimizer=optimizer, lr=0.01, weight_decay=0.0, clip_grad=CLIP, bf16=False, params_dtype=torch.float32,
        use_distributed_optimizer=distributed, use_layer_wise_distributed_optimizer=layer_wise,
        muon_nesterov=True, muon_fp32_matmul_prec="highest", muon_tp_mode="duplicated", muon_split_qkv=False)
    opt = get_megatron_optimizer(opt_config, [ddp])
    return ddp, opt


class Capture:
    """Independent forward hooks: what each layer received and produced, per micro-batch."""

    def __init__(self, model):
        from megatron_hyperball.mcore.builders import unwrap

        self.gpt = unwrap(model)
        self.data = collections.defaultdict(list)
        self.handles = []
        for layer in self.gpt.decoder.layers:
            n = layer.layer_number
            self._pre(layer, f"in{n}", lambda a, kw: kw.get("hidden_states", a[0] if a else None))
            self._pre(layer.pre_mlp_layernorm, f"mid{n}", lambda a, kw: a[0])
            self._post(layer, f"out{n}", lambda out: out[0])
            self._pre(layer.self_attention.core_attention, f"qk{n}", lambda a, kw: (a[0], a[1]))
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                self._pre(router, f"rin{n}", lambda a, kw, r=router: (a[0], r.weight))  # the weight before the step
                self._post(router, f"rmap{n}", lambda out: out[1])

    def _pre(self, module, key, pick):
        def hook(m, args, kwargs):
            v = pick(args, kwargs)
            self.data[key].append(tuple(t.detach().clone() for t in v) if isinstance(v, tuple)
                                  else v.detach().clone())
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module, key, pick):
        def hook(m, args, out):
            self.data[key].append(pick(out).detach().clone())
        self.handles.append(module.register_forward_hook(hook))

    def clear(self):
        self.data.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def _sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, float64."""
    x = x.double().clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def reference(cap: Capture) -> dict:
    """The indicators from the captured activations, float64, from the formulas."""
    from megatron_hyperball.models.indicators import layer_key

    out = {}
    for layer in cap.gpt.decoder.layers:
        n, key = layer.layer_number, layer_key(layer.layer_number, LAYERS)
        acc = torch.zeros(10, dtype=torch.float64)
        for x, mid, y, (q, k) in zip(cap.data[f"in{n}"], cap.data[f"mid{n}"], cap.data[f"out{n}"],
                                     cap.data[f"qk{n}"]):
            x, mid, y, q, k = (t.double() for t in (x, mid, y, q, k))
            attn, mlp = mid - x, y - mid                       # what the residual adds received
            acc[0] += attn.pow(2).sum(); acc[1] += attn.numel()
            acc[2] += mlp.pow(2).sum(); acc[3] += mlp.numel()
            mean, std = y.mean(-1, keepdim=True), ((y - y.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True).sqrt()
            acc[4] += ((y - mean).abs() > 5 * std).sum(); acc[5] += y.numel()
            scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])   # [b, h, sq, sk]
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
            lse = torch.logsumexp(scores.masked_fill(causal, float("-inf")), dim=-1)
            acc[6] += lse.pow(2).sum(); acc[7] += lse.numel()
        router = getattr(layer.mlp, "router", None)
        loads = torch.zeros(EXPERTS, dtype=torch.float64)
        if router is not None:
            for (h, w), rmap in zip(cap.data[f"rin{n}"], cap.data[f"rmap{n}"]):
                lse = torch.logsumexp(h.double().reshape(-1, HIDDEN) @ w.double().T, dim=-1)
                acc[8] += lse.pow(2).sum(); acc[9] += lse.numel()
                loads += rmap.double().sum(0)
        acc, loads = _sum(acc), _sum(loads)
        out[f"indicators/attn_rms/{key}"] = math.sqrt(acc[0] / acc[1])
        out[f"indicators/mlp_rms/{key}"] = math.sqrt(acc[2] / acc[3])
        out[f"indicators/outliers/{key}"] = 100 * float(acc[4] / acc[5])
        out[f"indicators/attention_z/{key}"] = float(acc[6] / acc[7])
        if router is not None:
            out[f"indicators/router_z/{key}"] = float(acc[8] / acc[9])
            out[f"moe/maxvio/{key}"] = float((loads.max() - loads.mean()) / loads.mean())
    return out


class GradCapture:
    """Megatron's reduced gradients just before ``optimizer.step()`` (full on every rank without a
    distributed optimizer), float64, by parameter name."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.grads = model, optimizer, {}
        inner = optimizer.step

        def step(*a, **kw):
            self.grads = {n: p.main_grad.detach().double().clone() for n, p in model.named_parameters()}
            return inner(*a, **kw)

        optimizer.step = step


@contextlib.contextmanager
def count_collectives(counts: collections.Counter):
    names = [n for n in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                         "_reduce_scatter_base", "_all_gather_base", "broadcast", "barrier", "all_to_all_single",
                         "reduce_scatter", "all_gather_object", "broadcast_object_list") if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}

    def counted(name):
        def call(*a, **kw):
            group = kw.get("group", None)
            counts[(name, "world" if group is None else str(dist.get_process_group_ranks(group)))] += 1
            return originals[name](*a, **kw)
        return call

    for n in names:
        setattr(dist, n, counted(n))
    try:
        yield counts
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)


def run_step(ddp, opt, indicators, iteration, counts=None):
    tokens, labels = token_batch(iteration, BATCH, seq=SEQ, vocab=VOCAB)
    with (count_collectives(counts) if counts is not None else contextlib.nullcontext()):
        with indicators.step(iteration) as info:
            result = schedule_step(ddp, opt, tokens, labels, num_microbatches=MICRO)
            info["grad_norm"] = result["grad_norm"]
    return result


class RecordingWriter:
    """Megatron's TensorBoard writer for the test: a real SummaryWriter that also records the names."""

    def __init__(self, tb_dir):
        from torch.utils.tensorboard import SummaryWriter

        self.dir, self.tb, self.scalars = tb_dir, SummaryWriter(str(tb_dir)), {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = (value, step)
        self.tb.add_scalar(name, value, step)


@pytest.fixture
def writer(monkeypatch, tmp_path):
    from megatron.training import global_vars

    recording = RecordingWriter(tmp_path / "run" / "tensorboard")
    monkeypatch.setattr(global_vars, "_GLOBAL_TENSORBOARD_WRITER", recording)
    yield recording
    recording.tb.close()


def test_indicators_match_float64_reference_on_the_same_step(parallel, writer):
    from megatron_hyperball.mcore.indicators import Indicators, attention_z_exposed
    from megatron_hyperball.mcore.roles import MATRIX_TYPES, role_of
    from megatron_hyperball.models.indicators import indicator_names

    parallel(ep=dist.get_world_size())
    ddp, opt = build(distributed=False)
    ind = Indicators([ddp], INTERVAL, opt, clip_grad=CLIP)
    grads = GradCapture(ddp, opt)
    cap = Capture(ddp)

    # iteration 1: not a logging step -- no hook registered, none runs, nothing written
    run_step(ddp, opt, ind, 1)
    assert ind.hook_calls == 0 and ind._handles == [] and writer.scalars == {}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ddp.modules())
    assert hooks == len(cap.handles)  # only the test's own capture hooks
    cap.clear()

    # iteration 2: logging step
    result = run_step(ddp, opt, ind, 2)
    values = ind.last
    expected = reference(cap)
    for name, ref in expected.items():
        assert values[name] == pytest.approx(ref, rel=TOL, abs=1e-9), (name, values[name], ref)
    assert values["indicators/outliers/layer_01"] > 1.0  # the planted column is an outlier in every token
    assert values["moe/maxvio/layer_02"] > 0
    # mean / max over layers
    for family in ("attn_rms", "mlp_rms", "outliers", "attention_z"):
        per = [expected[f"indicators/{family}/layer_0{n}"] for n in (1, 2)]
        assert values[f"indicators/{family}/mean"] == pytest.approx(sum(per) / 2, rel=TOL)
        assert values[f"indicators/{family}/max"] == pytest.approx(max(per), rel=TOL)
    assert values["indicators/router_z/max"] == pytest.approx(expected["indicators/router_z/layer_02"], rel=TOL)

    # per-type grad norms: Megatron's reduced main_grad before clipping, float64
    sq = collections.Counter()
    scalars = 0.0
    for name, p in ddp.named_parameters():
        g = grads.grads[name]
        expert = not getattr(p, "allreduce", True)
        part = float(_sum(g.pow(2).sum().reshape(1))) if expert else float(g.pow(2).sum())
        kind = role_of(name, p).metric
        if kind is None:
            scalars += part
        else:
            sq[kind] += part
    assert result["grad_norm"] > CLIP * 2  # the step did clip
    for kind in MATRIX_TYPES:
        assert values[f"hyperball/grad_norm/{kind}"] == pytest.approx(math.sqrt(sq[kind]), rel=TOL), kind
    total = sum(values[f"hyperball/grad_norm/{k}"] ** 2 for k in MATRIX_TYPES) + scalars
    assert math.sqrt(total) == pytest.approx(result["grad_norm"], rel=TOL)

    # written to Megatron's TensorBoard writer, at the iteration, under the documented names
    assert attention_z_exposed([ddp])  # the local spec
    names = indicator_names(LAYERS, moe_layers=[2], attention_z=True, grad_types=MATRIX_TYPES)
    assert sorted(writer.scalars) == sorted(names)
    assert all(step == 2 for _, step in writer.scalars.values())

    # collectives (iterations 3 and 4, after the first step's one-time ones): the logging step adds
    # exactly one all-reduce over all ranks (none with one rank), a non-logging step runs no hook
    cap.clear()
    counts_off, counts_on = collections.Counter(), collections.Counter()
    calls = ind.hook_calls  # the hooks of step 2
    run_step(ddp, opt, ind, 3, counts_off)
    assert ind.hook_calls == calls  # no hook ran
    run_step(ddp, opt, ind, 4, counts_on)
    assert ind.hook_calls == calls  # the same hooks as step 2 ran, once each per micro-batch
    extra = {("all_reduce", "world"): 1} if dist.get_world_size() > 1 else {}
    assert dict(counts_on - counts_off) == extra, (dict(counts_on), dict(counts_off))
    assert counts_off - counts_on == collections.Counter()
    assert ind._handles == []
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ddp.modules())
    assert hooks == len(cap.handles)
    cap.remove()

    # the dashboard of this run's TensorBoard folder: one panel per indicator family + grad norms
    pytest.importorskip("matplotlib")
    from megatron_hyperball import dashboard

    writer.tb.flush()
    titles = dashboard.render(writer.dir.parent, writer.dir.parent / "dashboard.png")
    assert [t.split("] ")[1].split(":")[0] for t in titles] == [
        "grad norm (before clipping)", "router Z", "attention Z", "output RMS, attention (after alpha)",
        "output RMS, MLP / MoE (after alpha)", "outliers", "MaxVio"]
    assert (writer.dir.parent / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("optimizer,layer_wise", [("adamh", False), ("muonh", True)])
def test_grad_norms_same_on_zero1_and_layer_wise(parallel, optimizer, layer_wise):
    """The per-type gradient norms do not depend on how the optimizer shards the gradients."""
    from megatron_hyperball.mcore.indicators import Indicators
    from megatron_hyperball.mcore.roles import MATRIX_TYPES

    out = {}
    for distributed in (False, True):
        parallel(ep=dist.get_world_size())
        ddp, opt = build(optimizer, distributed=distributed, layer_wise=layer_wise and distributed)
        ind = Indicators([ddp], 1, opt, clip_grad=CLIP)
        run_step(ddp, opt, ind, 1)
        out[distributed] = ind.last
    for kind in MATRIX_TYPES:
        name = f"hyperball/grad_norm/{kind}"
        assert out[True][name] == pytest.approx(out[False][name], rel=1e-5), (name, out[True][name], out[False][name])
    assert out[True]["indicators/router_z/layer_02"] == pytest.approx(out[False]["indicators/router_z/layer_02"],
                                                                       rel=1e-6)
