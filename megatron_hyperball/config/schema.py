"""The YAML schema of a pretraining run (pydantic v2, unknown keys refused everywhere).

Eight sections plus two top-level keys:

    seed, precision
    model        shape, tokenizer, normalization, position embedding, MoE block
    parallelism  tp, pp, ep (dp = world_size / (tp * pp), implied)
    data         data_path ('embedded' or Megatron prefixes), split, num_workers
    optimizer    name, lr | lr_law, min_lr, weight decay, sphere options, per-group lrs, betas...
    schedule     train_iters, warmup, decay style, batch sizes, evaluation
    hyperp       block_output_scale (Depth-muP)
    checkpoint   save, load, save_interval, format
    logging      log_interval, tensorboard_dir, wandb, metrics_interval

Each section checks its own keys and their combinations (a ``model_validator`` raising
:class:`SectionProblems`); :func:`cross_section_problems` checks the few rules that read two
sections. Every problem is reported as ``key.path: message`` with the allowed values, all of them
in one :class:`ConfigError`. The allowed optimizer names and sphere / Depth-muP values come from
``megatron_hyperball.names``.
"""

from __future__ import annotations

import math
import os
import typing
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from megatron_hyperball import names
from megatron_hyperball.config import lr_law

__all__ = [
    "ConfigError", "SectionProblems", "HyperballConfig", "ModelConfig", "TokenizerConfig", "MoEConfig",
    "ParallelismConfig", "DataConfig", "LRLawConfig", "OptimizerSection", "ScheduleConfig", "HyperPConfig",
    "CheckpointConfig", "WandbConfig", "LoggingConfig", "validate_config", "cross_section_problems",
]

_SPHERE = ", ".join(names.HYPERBALL_OPTIMIZERS)
_MUON = ", ".join(n for n, o in names.OPTIMIZERS.items() if o.muon)
_MD = ", ".join(names.MD_OPTIMIZERS)


class ConfigError(ValueError):
    """An invalid config: ``problems`` is a list of (key path, message)."""

    def __init__(self, problems: list[tuple[str, str]], source: Optional[str] = None):
        self.problems = list(problems)
        self.source = source
        where = f" ({source})" if source else ""
        lines = [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in self.problems]
        super().__init__(f"invalid config{where}:\n" + "\n".join(lines))


class SectionProblems(ValueError):
    """Raised by a section's validator: (key path relative to the section, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{k}: {m}" for k, m in self.problems))


def _number_from_string(value: Any) -> Any:
    """'1e-2' -> 0.01: YAML 1.1 reads exponent notation without a dot as a string. Other strings
    are left for the strict float check to refuse."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


Num = Annotated[float, BeforeValidator(_number_from_string)]
"""A finite float: ints and numeric strings are accepted, booleans are not (strict mode)."""

SEED_MAX = 2**32 - 1  # numpy's seed range (Megatron seeds numpy with seed + 100 * pipeline rank)


class _Section(BaseModel):
    # strict: no bool for a number, no float for an integer count, no number for a string;
    # allow_inf_nan=False: every float is finite
    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(), strict=True,
                              allow_inf_nan=False)

    def problems(self) -> list[tuple[str, str]]:
        """Combinations of this section's keys that are invalid, as (relative key, message)."""
        return []

    @model_validator(mode="after")
    def _check_section(self, info: ValidationInfo):
        if info.context and info.context.get("fields_only"):
            return self
        p = self.problems()
        if p:
            raise SectionProblems(p)
        return self


# -- model --------------------------------------------------------------------------------------
class TokenizerConfig(_Section):
    type: Literal["byte", "null_tokenizer", "gpt2bpe", "huggingface", "sentencepiece", "tiktoken"] = "byte"
    """byte: the embedded corpus's byte-level ids (Megatron NullTokenizer, vocab 257, eod 256);
    null_tokenizer: NullTokenizer with model.vocab_size; the others: Megatron's tokenizers of those names."""
    model: Optional[str] = None
    """Tokenizer model / name (huggingface, sentencepiece, tiktoken)."""
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None


class MoEConfig(_Section):
    num_experts: int = Field(ge=1)
    topk: int = Field(2, ge=1)
    ffn_hidden_size: Optional[int] = Field(None, ge=1)
    """Hidden size of each expert (default: model.ffn_hidden_size)."""
    shared_expert_size: Optional[int] = Field(None, ge=1)
    sqrt_gate: bool = False
    """SqrtGate (HyperP): gates g -> sqrt(g) after the top-k softmax."""
    shared_expert_fraction: Num = Field(0.5, ge=0, le=1)
    """SqrtGate with a shared expert: y = sqrt(1-p) y_routed + sqrt(p) y_shared (HyperP: p = 0.5)."""
    router_sphere: Optional[Literal["frobenius", "row", "none"]] = None
    """frobenius: the router is a sphere matrix of the optimizer (HyperP); row: unit-norm rows (MD);
    none: plain Adam. Default: frobenius with a sphere optimizer (HyperP), none otherwise."""
    aux_loss_coeff: Optional[Num] = Field(None, ge=0)
    """Load-balancing loss weight (0: off). Default: 0.1 with a sphere optimizer (HyperP's MoE runs),
    0.01 otherwise (Megatron's suggested start)."""
    aux_loss_type: Literal["global_aux_loss", "aux_loss", "seq_aux_loss"] = "global_aux_loss"
    """Megatron's --moe-router-load-balancing-type: global_aux_loss is HyperP's switch loss on the full
    softmax with token counts over every data-parallel rank, one per MoE layer, summed; aux_loss counts
    one micro-batch, seq_aux_loss one sequence."""
    token_dispatcher: Literal["allgather", "alltoall", "flex"] = "allgather"
    grouped_gemm: bool = False
    layer_freq: int = Field(1, ge=1)
    """One MoE layer every layer_freq layers (Megatron's --moe-layer-freq)."""

    def problems(self):
        p = []
        if self.topk > self.num_experts:
            p.append(("topk", f"{self.topk} > model.moe.num_experts={self.num_experts}; "
                              f"allowed: 1 .. {self.num_experts}"))
        if self.sqrt_gate and self.topk == 1:
            # every gate would be 1 (the router learns only from the aux loss), and Megatron refuses
            # top-1 with the softmax after the top-k, which SqrtGate needs
            p.append(("topk", "1 with model.moe.sqrt_gate true; allowed: 2 .. num_experts"))
        return p

    def resolved_router_sphere(self, sphere_optimizer: bool) -> str:
        return names.resolve_router_sphere(self.router_sphere, sphere_optimizer)

    def resolved_aux_loss_coeff(self, sphere_optimizer: bool) -> float:
        if self.aux_loss_coeff is not None:
            return float(self.aux_loss_coeff)
        return names.DEFAULT_AUX_LOSS_COEFF_SPHERE if sphere_optimizer else names.DEFAULT_AUX_LOSS_COEFF


class ModelConfig(_Section):
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_query_groups: Optional[int] = Field(None, ge=1)
    """Grouped-query attention: number of key/value heads (default: no GQA)."""
    ffn_hidden_size: Optional[int] = Field(None, ge=1)
    """Default as Megatron: 4 h, or int(8 h / 3 / 64) * 64 with swiglu."""
    seq_length: int = Field(ge=1)
    max_position_embeddings: Optional[int] = Field(None, ge=1)
    vocab_size: Optional[int] = Field(None, ge=1)
    """Only with tokenizer.type null_tokenizer (required there) or tiktoken; other tokenizers know their size."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: Num = Field(1e-5, gt=0)
    position_embedding: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: int = Field(10000, ge=1)
    swiglu: bool = True
    bias: bool = False
    """Biases in the linear layers (False: --disable-bias-linear)."""
    qk_layernorm: bool = False
    tie_embeddings: bool = False
    init_method_std: Num = Field(0.02, gt=0)
    hidden_dropout: Num = Field(0.0, ge=0, lt=1)
    attention_dropout: Num = Field(0.0, ge=0, lt=1)
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """auto: Transformer Engine when importable, else Megatron's local modules."""
    moe: Optional[MoEConfig] = None

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_shorthand(cls, v):
        return {"type": v} if isinstance(v, str) else v

    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int((4 * self.hidden_size * 2 / 3) / 64) * 64
        return 4 * self.hidden_size

    def problems(self):
        p = []
        if self.hidden_size % self.num_attention_heads:
            p.append(("hidden_size", f"{self.hidden_size} is not divisible by model.num_attention_heads="
                                     f"{self.num_attention_heads}; allowed: a multiple of it"))
        elif self.position_embedding == "rope" and (self.hidden_size // self.num_attention_heads) % 2:
            head = self.hidden_size // self.num_attention_heads
            p.append(("hidden_size", f"{self.hidden_size} / model.num_attention_heads={self.num_attention_heads} "
                                     f"= head dimension {head}, which is odd: RoPE rotates pairs of channels; "
                                     f"allowed with position_embedding 'rope': an even head dimension"))
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            p.append(("num_query_groups", f"{self.num_query_groups} does not divide model.num_attention_heads="
                                          f"{self.num_attention_heads}; allowed: a divisor of it"))
        if self.resolved_ffn_hidden_size() < 1:
            p.append(("ffn_hidden_size", f"not set and Megatron's swiglu default int(8h/3/64)*64 is 0 for "
                                         f"hidden_size={self.hidden_size}; allowed: set it explicitly"))
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_length:
            p.append(("max_position_embeddings", f"{self.max_position_embeddings} < model.seq_length="
                                                 f"{self.seq_length}; allowed: >= seq_length"))
        # tokenizer / vocabulary
        tok, vocab = self.tokenizer, self.vocab_size
        if tok.type == "null_tokenizer" and vocab is None:
            p.append(("vocab_size", "required with model.tokenizer.type 'null_tokenizer'; allowed: an integer >= 1 "
                                    "(larger than every token id in the data)"))
        if tok.type == "byte" and vocab not in (None, 257):
            p.append(("vocab_size", f"{vocab} with the byte tokenizer, whose vocabulary is 257 "
                                    f"(256 bytes + eod); allowed: leave it out"))
        if tok.type not in ("byte", "null_tokenizer", "tiktoken") and vocab is not None:
            p.append(("vocab_size", f"set with model.tokenizer.type '{tok.type}', which defines its own "
                                    f"vocabulary; allowed: leave it out"))
        if tok.type in ("huggingface", "sentencepiece", "tiktoken") and not tok.model:
            p.append(("tokenizer.model", f"required with model.tokenizer.type '{tok.type}'; allowed: "
                                        + ("a local tokenizer directory or a hub id" if tok.type == "huggingface"
                                           else f"the path of a {tok.type} model file")))
        if tok.type == "gpt2bpe" and not (tok.vocab_file and tok.merge_file):
            p.append(("tokenizer", "type 'gpt2bpe' needs vocab_file and merge_file; allowed: both set (GPT-2's "
                                  "vocab.json and merges.txt)"))
        return p


# -- parallelism, data -----------------------------------------------------------------------------
class ParallelismConfig(_Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1 for Adam/AdamH; Megatron's
    layer-wise distributed optimizer for Muon/MuonH)."""

    def data_parallel_size(self, world_size: int) -> int:
        """dp = world_size / (tp * pp); ValueError if it does not divide."""
        mp = self.tp * self.pp
        if world_size % mp:
            raise ValueError(f"world size {world_size} is not divisible by parallelism.tp * parallelism.pp = {mp}")
        return world_size // mp

    def problems(self):
        if self.sequence_parallel and self.tp == 1:
            return [("sequence_parallel", "needs parallelism.tp > 1; allowed with tp 1: false")]
        return []


class DataConfig(_Section):
    data_path: Any = "embedded"
    """'embedded' (the Python-stdlib byte corpus, see data/prepare.py) or Megatron data prefixes:
    one string or a list, optionally weighted ('0.3 /p/a 0.7 /p/b' / ['0.3', '/p/a', ...])."""
    embedded_dir: str = "data/pystdlib"
    embedded_max_mb: Num = Field(20.0, gt=0)
    split: Optional[str] = None
    """Megatron's --split for your own data_path (default '969,30,1'); the embedded corpus has
    its own held-out validation prefix."""
    num_workers: int = Field(2, ge=0)

    @field_validator("data_path", mode="before")
    @classmethod
    def _data_path(cls, v):
        allowed = ("allowed: 'embedded', a prefix, or a list of prefixes optionally with weights "
                   "(['0.3', '/data/a', '0.7', '/data/b'])")
        if isinstance(v, str):
            v = v.strip()
            if not v:
                raise ValueError(f"data_path is empty; {allowed}")
            if v == "embedded":
                return v
            v = v.split()
        elif isinstance(v, list) and v and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                               for x in v):
            v = [str(x).strip() for x in v]
        else:
            raise ValueError(f"data_path={v!r} is not a prefix or a list of prefixes; {allowed}")
        if any(not x for x in v):
            raise ValueError(f"data_path={v!r} has an empty entry; {allowed}")
        data_blend(v)  # raises ValueError on a malformed weighted list
        return v

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, v):
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"split={v!r} is not comma-separated numbers; allowed: e.g. '969,30,1'")
        parts = str(v).replace("/", ",").split(",")
        try:
            nums = [float(x) for x in parts]
        except ValueError:
            raise ValueError(f"split={v!r} is not comma-separated numbers; allowed: e.g. '969,30,1'") from None
        if len(nums) > 3 or any(n < 0 or not math.isfinite(n) for n in nums) or sum(nums) <= 0:
            raise ValueError(f"split={v!r}: allowed: up to 3 non-negative numbers with a positive sum, "
                             f"e.g. '969,30,1'")
        return str(v)

    def prefixes(self) -> list[str]:
        """The data prefixes of ``data_path`` (weights dropped); [] for 'embedded'."""
        return [] if self.embedded else data_blend(self.data_path)[0]

    @property
    def embedded(self) -> bool:
        return self.data_path == "embedded"

    def problems(self):
        if self.embedded and self.split is not None:
            return [("split", "set with data.data_path 'embedded', which has its own held-out "
                              "validation prefix; allowed: leave it out")]
        return []


def data_blend(items: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """(prefixes, weights or None) of a Megatron ``--data-path`` list, read as Megatron's
    ``get_blend_from_list`` reads it: an even-length list whose every other entry (from the first)
    is a number is weighted; otherwise every entry is a prefix. ValueError for a mix, or for weights
    that are not positive finite numbers."""
    if len(items) % 2 == 0:
        weights = []
        for w in items[0::2]:
            try:
                weights.append(float(w))
            except ValueError:
                weights.append(None)
        numeric = [w is not None for w in weights]
        if all(numeric):
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"data_path weights {items[0::2]}: allowed: positive finite numbers")
            return list(items[1::2]), weights
        if any(numeric):
            raise ValueError(f"data_path={items!r} mixes weights and prefixes; allowed: all prefixes, or "
                             f"weight prefix pairs ['0.3', '/data/a', '0.7', '/data/b']")
    return list(items), None


# -- optimizer, schedule ---------------------------------------------------------------------------
class LRLawConfig(_Section):
    """lr = eta0 * sqrt(B/B0) * sqrt(d0/depth) * (T/T0)^(-exponent)."""

    eta0: Num = Field(gt=0)
    B0: Num = Field(lr_law.DEFAULT_B0, gt=0)
    """Base tokens per batch."""
    d0: Num = Field(lr_law.DEFAULT_D0, gt=0)
    """Base depth (layers)."""
    T0: Num = Field(lr_law.DEFAULT_T0, gt=0)
    """Base total training tokens."""
    exponent: Num = lr_law.DEFAULT_EXPONENT


class OptimizerSection(_Section):
    name: str
    lr: Optional[Num] = Field(None, gt=0)
    lr_law: Optional[LRLawConfig] = None
    min_lr: Optional[Num] = Field(None, ge=0)
    """Absolute final lr; default min_lr_ratio * lr."""
    min_lr_ratio: Optional[Num] = Field(None, ge=0, le=1)
    """Final lr as a fraction of lr (default 0.1: linear decay to 0.1 lr, HyperP)."""
    weight_decay: Num = Field(0.0, ge=0)
    """Decoupled weight decay of the Adam groups (embeddings, output layer; with adamw/muon also
    the matrices). Norm gains and biases never take weight decay (Megatron's rule)."""
    sphere_weight_decay: Num = Field(0.0, ge=0)
    """Weight decay on sphere matrices: must be 0 (a first-order no-op on the sphere)."""
    radius: Any = None
    """Hyperball optimizers: 'init' (default), 'sqrt_max_dim' or a positive number."""
    update_norm: Optional[str] = None
    """Hyperball optimizers: 'exact' (default) or 'shape'."""
    output_layer_on_sphere: bool = False
    """adamh: put the output layer on a sphere too (HyperP, Marin)."""
    split_qkv: bool = False
    """adamh / muonh: Q, K and V of the fused attention QKV matrix each on its own sphere (HyperP's
    separate matrices); default one sphere for the fused matrix."""
    embedding_lr: Optional[Num] = Field(None, gt=0)
    output_lr: Optional[Num] = Field(None, gt=0)
    scalar_lr: Optional[Num] = Field(None, gt=0)
    """lr of 1-D parameters (norm gains, biases)."""
    betas: tuple[Num, Num] = (0.9, 0.95)
    eps: Num = Field(1e-8, gt=0)
    clip_grad: Num = Field(1.0, ge=0)
    momentum: Optional[Num] = Field(None, ge=0, lt=1)
    """muon / muonh momentum (default 0.95)."""
    nesterov: Optional[bool] = None
    """muon / muonh Nesterov momentum (default true)."""
    ns_steps: Optional[int] = Field(None, ge=1)
    """muon / muonh Newton-Schulz steps (default 5)."""
    gains: Optional[str] = None
    """adammd / muonmd: the gains of W = diag(g_row) V diag(g_col): row_col (default), row, col,
    scalar, none (seed 004)."""
    gain_parametrization: Optional[str] = None
    """adammd / muonmd: softplus (default; g = softplus(raw), raw initialised so g = 1) or direct (g = raw)."""
    gain_lr: Optional[Num] = Field(None, gt=0)
    """adammd / muonmd: peak lr of the gains' Adam (default 1e-3, seed 004); decays like the main lr."""
    allow_missing_gains: bool = False
    """adammd / muonmd: resuming from a checkpoint without gains (e.g. AdamH's) starts them at 1,
    with a message; without it such a checkpoint is refused."""

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v):
        return names.canonical_optimizer(v)

    @field_validator("radius")
    @classmethod
    def _radius(cls, v):
        return v if v is None else names.check_radius(v)

    @field_validator("update_norm", mode="before")
    @classmethod
    def _update_norm(cls, v):
        return v if v is None else names.check_update_norm(v)

    @field_validator("gains", mode="before")
    @classmethod
    def _gains(cls, v):
        if v is not None and v not in names.GAIN_MODES:
            raise ValueError(f"gains={v!r} is not a gain mode; allowed: {', '.join(names.GAIN_MODES)}")
        return v

    @field_validator("gain_parametrization", mode="before")
    @classmethod
    def _gain_parametrization(cls, v):
        if v is not None and v not in names.GAIN_PARAMETRIZATIONS:
            raise ValueError(f"gain_parametrization={v!r} is not a gain parametrization; allowed: "
                             f"{', '.join(names.GAIN_PARAMETRIZATIONS)}")
        return v

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_list(cls, v):
        return tuple(v) if isinstance(v, list) else v  # YAML has lists, not tuples

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas={list(v)} must both be in [0, 1); allowed: two numbers in [0, 1)")
        return v

    @property
    def sphere(self) -> bool:
        """A hyperball optimizer: the weight matrices live on spheres."""
        return names.OPTIMIZERS[self.name].sphere

    @property
    def muon_family(self) -> bool:
        return names.OPTIMIZERS[self.name].muon

    @property
    def md(self) -> bool:
        """A magnitude-direction optimizer (adammd / muonmd): learned gains around the sphere."""
        return names.OPTIMIZERS[self.name].md

    def resolved_gains(self) -> str:
        return names.GAIN_MODES[0] if self.gains is None else self.gains

    def resolved_gain_parametrization(self) -> str:
        return names.GAIN_PARAMETRIZATIONS[0] if self.gain_parametrization is None else self.gain_parametrization

    def resolved_gain_lr(self) -> float:
        return names.DEFAULT_GAIN_LR if self.gain_lr is None else float(self.gain_lr)

    def problems(self):
        p = []
        if (self.lr is None) == (self.lr_law is None):
            p.append(("lr", "set exactly one of optimizer.lr and optimizer.lr_law "
                            + ("(both are set)" if self.lr is not None else "(neither is set)")
                            + "; allowed: lr: <number> or lr_law: {eta0: <number>}"))
        if self.min_lr is not None and self.min_lr_ratio is not None:
            p.append(("min_lr", "set at most one of optimizer.min_lr and optimizer.min_lr_ratio; allowed: one of "
                                "them, or neither (ratio 0.1)"))
        if self.sphere_weight_decay != 0:
            why = ("weight decay is a first-order no-op on the sphere, so sphere matrices take none"
                   if self.sphere else f"optimizer '{self.name}' has no sphere matrices (use optimizer.weight_decay)")
            p.append(("sphere_weight_decay", f"{self.sphere_weight_decay}: {why}; allowed: 0"))
        if not self.sphere:
            for key in ("radius", "update_norm"):
                if getattr(self, key) is not None:
                    p.append((key, f"set for optimizer '{self.name}', which has no spheres; allowed "
                                   f"only with {_SPHERE}"))
        if self.output_layer_on_sphere and self.name != "adamh":
            why = ("it has no sphere, so no gains (seed 004: the embedding and output layer take none)"
                   if self.md else "the output layer takes Adam")
            p.append(("output_layer_on_sphere", f"true with optimizer '{self.name}'; allowed only with adamh "
                                                f"(with {self.name} {why})"))
        if self.split_qkv and (self.md or not self.sphere or (self.muon_family and self.update_norm == "shape")):
            why = (" with update_norm 'shape' (MuonH's shape factor is the fused matrix's, not each part's)"
                   if self.sphere and not self.md else "")
            p.append(("split_qkv", f"true with optimizer '{self.name}'{why}; allowed: false, or true with adamh, "
                                   f"or with muonh and update_norm exact"))
        if not self.md:
            for key in ("gains", "gain_parametrization", "gain_lr"):
                if getattr(self, key) is not None:
                    p.append((key, f"set for optimizer '{self.name}', which has no gains; allowed only with "
                                   f"{_MD}"))
            if self.allow_missing_gains:
                p.append(("allow_missing_gains", f"true for optimizer '{self.name}', which has no gains; allowed "
                                                 f"only with {_MD}"))
        if not self.muon_family:
            for key in ("momentum", "nesterov", "ns_steps"):
                if getattr(self, key) is not None:
                    p.append((key, f"set for optimizer '{self.name}'; allowed only with {_MUON}"))
        return p


class ScheduleConfig(_Section):
    train_iters: int = Field(ge=1)
    global_batch_size: int = Field(ge=1)
    micro_batch_size: int = Field(1, ge=1)
    warmup_iters: int = Field(0, ge=0)
    """HyperP: none."""
    decay_style: Literal["linear", "cosine", "constant", "WSD", "inverse-square-root"] = "linear"
    decay_iters: Optional[int] = Field(None, ge=1)
    """Default: train_iters."""
    wsd_decay_iters: Optional[int] = Field(None, ge=1)
    """decay_style WSD only (required there): the final iterations of the decay that anneal."""
    eval_interval: Optional[int] = Field(None, ge=1)
    """Default: train_iters (one evaluation at the end)."""
    eval_iters: int = Field(10, ge=0)

    def problems(self):
        p = []
        if self.global_batch_size % self.micro_batch_size:
            p.append(("global_batch_size", f"{self.global_batch_size} is not divisible by "
                                           f"schedule.micro_batch_size={self.micro_batch_size}; allowed: a "
                                           f"multiple of it"))
        if self.warmup_iters >= self.train_iters and self.warmup_iters > 0:
            p.append(("warmup_iters", f"{self.warmup_iters} >= schedule.train_iters={self.train_iters}; allowed: "
                                      f"0 .. {self.train_iters - 1}"))
        if self.decay_iters is not None and self.decay_iters <= self.warmup_iters:
            p.append(("decay_iters", f"{self.decay_iters} <= schedule.warmup_iters={self.warmup_iters}; allowed: "
                                     f"> {self.warmup_iters}"))
        decay = self.decay_iters or self.train_iters
        if self.decay_style == "WSD" and self.wsd_decay_iters is None:
            p.append(("wsd_decay_iters", "required with schedule.decay_style 'WSD'; allowed: an integer in "
                                         f"[1, {decay}] (the annealing phase at the end of the decay)"))
        if self.decay_style != "WSD" and self.wsd_decay_iters is not None:
            p.append(("wsd_decay_iters", f"set with schedule.decay_style '{self.decay_style}'; allowed only "
                                         f"with 'WSD'"))
        if self.decay_style == "WSD" and self.wsd_decay_iters is not None and self.wsd_decay_iters > decay:
            p.append(("wsd_decay_iters", f"{self.wsd_decay_iters} > the decay length {decay} (schedule.decay_iters,"
                                         f" default train_iters); allowed: an integer in [1, {decay}]"))
        return p


class HyperPConfig(_Section):
    block_output_scale: Any = "1/sqrt(2L)"
    """Depth-muP multiplier of every attention / MLP output before the residual add:
    '1/sqrt(2L)' (HyperP), '1/L' (MD), a positive number, or 'none'."""

    @field_validator("block_output_scale")
    @classmethod
    def _scale(cls, v):
        parsed = names.parse_block_output_scale(v)
        return "none" if parsed is None else parsed


class CheckpointConfig(_Section):
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = Field(None, ge=1)
    """Default with save: train_iters (save at the end)."""
    format: Literal["torch_dist", "torch"] = "torch_dist"

    def problems(self):
        if self.save_interval is not None and self.save is None:
            return [("save_interval", "set without checkpoint.save; allowed: set checkpoint.save too, or leave it out")]
        return []


class WandbConfig(_Section):
    project: Optional[str] = None
    """None: offline run under project 'megatron-hyperball' (no account needed)."""
    entity: Optional[str] = None
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    """Default: online when a project is set, else offline."""
    name: Optional[str] = None
    """Run name (default: '<optimizer>-L<layers>-d<hidden>')."""
    save_dir: Optional[str] = None

    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "online" if self.project else "offline"

    def problems(self):
        if self.mode == "online" and not self.project:
            return [("project", "required with logging.wandb.mode 'online'; allowed: a W&B project name, or mode "
                                "offline / disabled")]
        return []


class LoggingConfig(_Section):
    log_interval: int = Field(10, ge=1)
    tensorboard_dir: Optional[str] = None
    """Default when W&B is on: runs/<name>/tensorboard (Megatron sends most W&B scalars only
    when a TensorBoard dir is set)."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    metrics_interval: Optional[int] = Field(None, ge=1)
    """Interval of the instability indicators (default: log_interval)."""


class HyperballConfig(_Section):
    seed: int = Field(1234, ge=1, le=SEED_MAX)
    """Megatron seeds nothing for seed <= 0; numpy needs seed + 100 * (pp - 1) < 2**32."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    model: ModelConfig
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerSection
    schedule: ScheduleConfig
    hyperp: HyperPConfig = Field(default_factory=HyperPConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def problems(self):
        return cross_section_problems(self)

    # -- resolved values -------------------------------------------------------------------------
    def lr_law_result(self) -> Optional[lr_law.LRLawResult]:
        law = self.optimizer.lr_law
        if law is None:
            return None
        return lr_law.lr_from_run(
            law.eta0, global_batch_size=self.schedule.global_batch_size, seq_length=self.model.seq_length,
            num_layers=self.model.num_layers, train_iters=self.schedule.train_iters,
            B0=law.B0, d0=law.d0, T0=law.T0, exponent=law.exponent,
        )

    def resolved_lr(self) -> float:
        result = self.lr_law_result()
        return result.lr if result is not None else float(self.optimizer.lr)

    def resolved_min_lr(self) -> float:
        if self.optimizer.min_lr is not None:
            return float(self.optimizer.min_lr)
        ratio = 0.1 if self.optimizer.min_lr_ratio is None else self.optimizer.min_lr_ratio
        return ratio * self.resolved_lr()

    def min_lr_fraction(self) -> float:
        """min_lr / lr (used for the per-group lrs' final values)."""
        return self.resolved_min_lr() / self.resolved_lr()

    def block_output_alpha(self) -> Optional[float]:
        """Depth-muP alpha, or None when off."""
        return names.resolve_block_output_scale(self.hyperp.block_output_scale, self.model.num_layers)

    def resolved_metrics_interval(self) -> int:
        """Interval of the instability indicators (logging.metrics_interval or log_interval)."""
        return self.logging.metrics_interval or self.logging.log_interval

    def log_dirs(self) -> tuple[Optional[str], Optional[str]]:
        """(TensorBoard dir, W&B save dir) the run writes, defaults filled: with W&B on, TensorBoard
        defaults to runs/<name>/tensorboard and W&B to <checkpoint.save or runs/<name>>/wandb."""
        wb, name = self.logging.wandb, self.run_name()
        tb = self.logging.tensorboard_dir
        if wb.resolved_mode() == "disabled":
            return tb, None
        if tb is None:
            tb = os.path.join("runs", name, "tensorboard")
        save_dir = wb.save_dir
        if save_dir is None:
            save_dir = os.path.join(self.checkpoint.save or os.path.join("runs", name), "wandb")
        return tb, save_dir

    def run_name(self) -> str:
        return self.logging.wandb.name or f"{self.optimizer.name}-L{self.model.num_layers}-d{self.model.hidden_size}"

    def lr_summary(self) -> str:
        result = self.lr_law_result()
        head = result.summary() if result is not None else f"lr = {self.resolved_lr():.6g} (fixed)"
        return f"{head}; min_lr = {self.resolved_min_lr():.6g} ({self.schedule.decay_style} decay)"


# -- rules across sections --------------------------------------------------------------------------
_SECTIONS = ("model", "parallelism", "data", "optimizer", "schedule", "hyperp", "checkpoint", "logging")


def cross_section_problems(cfg: HyperballConfig) -> list[tuple[str, str]]:
    """Problems between sections, as (key path, message). A section that is None (a key of it is
    invalid) is skipped, with every rule that reads it."""
    p: list[tuple[str, str]] = []
    m, par, data, opt = cfg.model, cfg.parallelism, cfg.data, cfg.optimizer
    if m is not None and data is not None and data.embedded and m.tokenizer.type != "byte":
        p.append(("model.tokenizer.type", f"'{m.tokenizer.type}' with data.data_path 'embedded', a byte-level "
                                          f"corpus; allowed: 'byte' (or point data.data_path at your own data)"))
    if m is not None and par is not None:
        if m.num_attention_heads % par.tp:
            p.append(("parallelism.tp", f"{par.tp} does not divide model.num_attention_heads="
                                        f"{m.num_attention_heads}; allowed: a divisor of it"))
        if m.num_query_groups is not None and m.num_query_groups % par.tp:
            p.append(("parallelism.tp", f"{par.tp} does not divide model.num_query_groups={m.num_query_groups}; "
                                        f"allowed: a divisor of it"))
        if m.resolved_ffn_hidden_size() % par.tp:
            p.append(("parallelism.tp", f"{par.tp} does not divide the MLP hidden size "
                                        f"{m.resolved_ffn_hidden_size()}; allowed: a divisor of it (or set "
                                        f"model.ffn_hidden_size)"))
        if m.num_layers % par.pp:
            p.append(("parallelism.pp", f"{par.pp} does not divide model.num_layers={m.num_layers}; "
                                        f"allowed: a divisor of it"))
        if par.sequence_parallel and m.seq_length % par.tp:
            p.append(("parallelism.sequence_parallel", f"model.seq_length={m.seq_length} is not divisible by "
                                                       f"parallelism.tp={par.tp}; allowed: false, or a seq_length "
                                                       f"divisible by tp"))
        if par.ep > 1 and m.moe is None:
            p.append(("parallelism.ep", f"{par.ep} without model.moe; allowed: 1 for a dense model"))
        if m.moe is not None and m.moe.num_experts % par.ep:
            p.append(("parallelism.ep", f"{par.ep} does not divide model.moe.num_experts={m.moe.num_experts}; "
                                        f"allowed: a divisor of it"))
    if m is not None and opt is not None:
        if m.moe is not None and m.moe.router_sphere == "frobenius" and not opt.sphere:
            p.append(("model.moe.router_sphere", f"'frobenius' makes the router a sphere matrix of the "
                                                 f"optimizer, but optimizer.name is '{opt.name}'; allowed with it: "
                                                 f"'row', 'none' (or use {' / '.join(names.HYPERBALL_OPTIMIZERS)})"))
        if m.tie_embeddings and opt.output_lr is not None:
            p.append(("optimizer.output_lr", "set with model.tie_embeddings true: the output layer is the "
                                             "embedding; allowed: optimizer.embedding_lr only"))
        if m.tie_embeddings and opt.output_layer_on_sphere:
            p.append(("optimizer.output_layer_on_sphere", "true with model.tie_embeddings true (the output "
                                                          "layer is the embedding, which is never on a sphere); "
                                                          "allowed: false"))
        if opt.md and m.moe is not None and m.moe.router_sphere == "row" and opt.resolved_gains() in ("row", "row_col"):
            # each expert's routing row has unit norm: a row gain would set the norm the sphere fixes
            p.append(("optimizer.gains", f"'{opt.resolved_gains()}' (row gains) with model.moe.router_sphere 'row' "
                                         f"(the router's rows are normalized, a row gain would undo it); allowed: "
                                         f"col, scalar, none (or router_sphere frobenius)"))
        lr_set = (opt.lr is None) != (opt.lr_law is None)  # else the optimizer section says so
        if cfg.schedule is not None and lr_set:
            try:
                lr = cfg.resolved_lr()
            except (ValueError, OverflowError, ZeroDivisionError) as e:
                lr = None
                p.append(("optimizer.lr_law", f"does not resolve: {e}"))
            if lr is not None and not (math.isfinite(lr) and lr > 0):
                p.append(("optimizer.lr_law", f"resolves to lr = {lr!r}; allowed: values for which the law gives "
                                              f"a positive finite lr"))
            elif lr is not None and opt.min_lr is not None and opt.min_lr > lr:
                p.append(("optimizer.min_lr", f"{opt.min_lr} > resolved lr {lr:.6g}; allowed: <= the lr"))
    ck = cfg.checkpoint
    if opt is not None and ck is not None and opt.md and opt.resolved_gains() != "none" and ck.format != "torch_dist":
        # the gains live in optimizer state that only the sharded (torch_dist) entries carry
        p.append(("checkpoint.format", f"'{ck.format}' cannot hold the gains of optimizer '{opt.name}'; allowed: "
                                       f"torch_dist (or optimizer.gains none)"))
    if par is not None and cfg.seed is not None and cfg.seed + 100 * (par.pp - 1) > SEED_MAX:
        p.append(("seed", f"{cfg.seed} + 100 * (parallelism.pp - 1) exceeds numpy's seed range 2**32 - 1 "
                          f"(Megatron seeds each pipeline stage with seed + 100 * stage); allowed: "
                          f"1 .. {SEED_MAX - 100 * (par.pp - 1)}"))
    return p


# -- pydantic errors -> (key path, message) ----------------------------------------------------------
def _section_fields(loc: tuple) -> list[str]:
    """The allowed keys of the section at ``loc`` (for 'unknown key' messages)."""
    model: Any = HyperballConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", None) or ()
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        model = nxt
    return list(model.model_fields)


def _field_at(loc: tuple):
    """The pydantic FieldInfo of the key at ``loc`` (None past a non-section)."""
    model: Any = HyperballConfig
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        info = fields[part]
        args = typing.get_args(info.annotation)
        model = next((c for c in (info.annotation, *args) if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return info


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _allowed(info) -> Optional[str]:
    """'an integer >= 1', 'a number > 0 or null', 'true or false', ... for a field."""
    ann = info.annotation
    args = typing.get_args(ann)
    optional = type(None) in args
    if optional:
        ann = next(a for a in args if a is not type(None))
    if typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    bounds = []
    for meta in info.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    if ann is bool:
        text = "true or false"
    elif ann is int:
        text = "an integer" + (" " + " and ".join(bounds) if bounds else "") + " (no decimal point, not a boolean)"
    elif ann is float:
        text = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    elif ann is str:
        text = "a string (quote it if it looks like a number)"
    elif typing.get_origin(ann) is Literal:
        text = ", ".join(repr(v) for v in typing.get_args(ann))
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        text = f"a mapping with keys {', '.join(ann.model_fields)}"
    elif typing.get_origin(ann) is tuple:
        text = f"a list of {len(typing.get_args(ann))} numbers"
    else:
        return None
    return text + (" or null" if optional else "")


def _problems_from_pydantic(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        loc = tuple(str(x) for x in e["loc"])
        path = ".".join(loc)
        kind = e["type"]
        section = e.get("ctx", {}).get("error")
        if isinstance(section, SectionProblems):
            problems += [(".".join(loc + (key,)) if key else path, msg) for key, msg in section.problems]
            continue
        if kind == "extra_forbidden":
            allowed = _section_fields(loc[:-1])
            where = ".".join(loc[:-1]) or "the top level"
            problems.append((path, f"unknown key; allowed keys of {where}: {', '.join(allowed)}"))
            continue
        if kind == "missing" and e["loc"] and isinstance(e["loc"][-1], int):  # a list key with too few items
            info = _field_at(tuple(e["loc"][:-1]))
            allowed = _allowed(info) if info is not None else "more items"
            problems.append((".".join(loc[:-1]), f"too few items (got {e.get('input')!r}); allowed: {allowed}"))
            continue
        if kind == "missing":
            info = _field_at(tuple(e["loc"]))
            allowed = _allowed(info) if info is not None else None
            problems.append((path, "required key is missing" + (f"; allowed: {allowed}" if allowed else "")))
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if kind != "value_error":
            msg = f"{msg} (got {e.get('input')!r})"
            info = _field_at(tuple(e["loc"]))
            if info is None and e["loc"] and isinstance(e["loc"][-1], int):  # an item of a list key
                info = _field_at(tuple(e["loc"][:-1]))
            allowed = _allowed(info) if info is not None else None
            if kind == "literal_error" and allowed:
                msg = f"{e.get('input')!r} is not one of the allowed values; allowed: {allowed}"
            elif allowed and "allowed:" not in msg:
                msg += f"; allowed: {allowed}"
        problems.append((path, msg))
    return problems


def _valid_sections(raw: dict) -> HyperballConfig:
    """A config (not validated as a whole) holding each section whose keys are valid (its own
    combination rules not checked), None for the others: the cross-section rules run on those."""
    sections = {}
    for key in _SECTIONS:
        field = HyperballConfig.model_fields[key]
        value = raw.get(key) if key in raw else field.get_default(call_default_factory=True)
        try:
            sections[key] = (field.annotation.model_validate(value, context={"fields_only": True})
                             if value is not None else None)
        except ValidationError:
            sections[key] = None
    seed = raw.get("seed", HyperballConfig.model_fields["seed"].default)
    sections["seed"] = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    return HyperballConfig.model_construct(**sections)


def _depth_law_problem(raw: dict) -> list[tuple[str, str]]:
    """With model.num_layers missing or invalid, a depth law for block_output_scale is reported too."""
    hyperp = raw.get("hyperp")
    value = hyperp.get("block_output_scale", "1/sqrt(2L)") if isinstance(hyperp, dict) else "1/sqrt(2L)"
    try:
        parsed = names.parse_block_output_scale(value)
    except ValueError:
        return []  # reported by pydantic already
    if not isinstance(parsed, str):
        return []
    layers = raw.get("model", {}).get("num_layers") if isinstance(raw.get("model"), dict) else None
    return [("hyperp.block_output_scale",
             f"{parsed!r} needs model.num_layers >= 1 (got {layers!r}); allowed without a depth: a positive "
             f"number or 'none'")]


def validate_config(raw: Any, source: Optional[str] = None) -> HyperballConfig:
    """Validate a config dict (as read from YAML, overrides applied); raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError([("", f"the config must be a mapping of sections, got {type(raw).__name__}")], source)
    try:
        return HyperballConfig.model_validate(raw)
    except ValidationError as e:
        problems = _problems_from_pydantic(e)
        cross_ran = any(not err["loc"] and isinstance(err.get("ctx", {}).get("error"), SectionProblems)
                        for err in e.errors(include_url=False))
    if not cross_ran:  # some section failed: still report the rules between the sections that passed
        problems += cross_section_problems(_valid_sections(raw))
    if any(path in ("model", "model.num_layers") for path, _ in problems):
        problems += _depth_law_problem(raw)
    raise ConfigError(problems, source)
