"""The YAML schema of a pretraining run (pydantic v2, unknown keys refused everywhere).

One file, eight sections plus two top-level keys (see ``README_SECTION.md`` for the table):

    seed, precision
    model        shape, tokenizer, normalization, position embedding, MoE block
    parallelism  tp, pp, ep (dp = world_size / (tp * pp), implied)
    data         data_path ('embedded' or Megatron prefixes), split, num_workers
    optimizer    name, lr | lr_law, min_lr, weight decay, sphere options, per-group lrs, betas...
    schedule     train_iters, warmup, decay style, batch sizes, evaluation
    hyperp       block_output_scale (Depth-muP)
    checkpoint   save, load, save_interval, format
    logging      log_interval, tensorboard_dir, wandb, metrics_interval

Validation has two stages, both before anything else happens: pydantic checks every key, type
and allowed value; :func:`cross_checks` then checks combinations (divisibility, optimizer vs.
options, ...). Every problem is reported as ``key.path: message`` with the allowed values, in one
:class:`ConfigError`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from megatron_hyperball.config import lr_law
from megatron_hyperball.models.depth_mup import BLOCK_OUTPUT_SCALES, parse_block_output_scale, \
    resolve_block_output_scale
from megatron_hyperball.optim.sphere import RADIUS_MODES, check_radius, check_update_norm

__all__ = [
    "ConfigError", "HyperballConfig", "ModelConfig", "TokenizerConfig", "MoEConfig", "ParallelismConfig",
    "DataConfig", "LRLawConfig", "OptimizerSection", "ScheduleConfig", "HyperPConfig", "CheckpointConfig",
    "WandbConfig", "LoggingConfig", "OPTIMIZER_NAMES", "OPTIMIZER_ALIASES", "SPHERE_OPTIMIZERS",
    "canonical_optimizer", "validate_config", "cross_checks",
]

# canonical name -> the --optimizer value Megatron's argparse accepts
OPTIMIZER_NAMES = {"adamw": "adam", "muon": "muon", "adamh": "adam", "muonh": "muon"}
OPTIMIZER_ALIASES = {"adam": "adamw", "adam_hyperball": "adamh", "muon_hyperball": "muonh"}
SPHERE_OPTIMIZERS = ("adamh", "muonh")
MUON_OPTIMIZERS = ("muon", "muonh")


def _allowed_optimizers() -> str:
    names = list(OPTIMIZER_NAMES) + [f"{a} (= {c})" for a, c in OPTIMIZER_ALIASES.items()]
    return ", ".join(names)


def canonical_optimizer(name: Any) -> str:
    """'adam' -> 'adamw', 'adam_hyperball' -> 'adamh', ...; ValueError naming the allowed names."""
    if not isinstance(name, str):
        raise ValueError(f"optimizer name must be a string; allowed: {_allowed_optimizers()}")
    key = name.strip().lower()
    key = OPTIMIZER_ALIASES.get(key, key)
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {_allowed_optimizers()}")
    return key


class ConfigError(ValueError):
    """An invalid config: ``problems`` is a list of (key path, message)."""

    def __init__(self, problems: list[tuple[str, str]], source: Optional[str] = None):
        self.problems = list(problems)
        self.source = source
        where = f" ({source})" if source else ""
        lines = [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in self.problems]
        super().__init__(f"invalid config{where}:\n" + "\n".join(lines))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


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
    router_sphere: Literal["frobenius", "row", "none"] = "none"
    """frobenius: the router is a sphere matrix of the optimizer (HyperP); row: unit-norm rows (MD)."""
    aux_loss_coeff: float = Field(0.0, ge=0)
    token_dispatcher: Literal["allgather", "alltoall", "flex"] = "allgather"
    grouped_gemm: bool = False
    layer_freq: int = Field(1, ge=1)
    """One MoE layer every layer_freq layers (Megatron's --moe-layer-freq)."""


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
    norm_epsilon: float = Field(1e-5, gt=0)
    position_embedding: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: int = Field(10000, ge=1)
    swiglu: bool = True
    bias: bool = False
    """Biases in the linear layers (False: --disable-bias-linear)."""
    qk_layernorm: bool = False
    tie_embeddings: bool = False
    init_method_std: float = Field(0.02, gt=0)
    hidden_dropout: float = Field(0.0, ge=0, lt=1)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
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


class DataConfig(_Section):
    data_path: Any = "embedded"
    """'embedded' (the Python-stdlib byte corpus, see data/prepare.py) or Megatron data prefixes:
    one string or a list, optionally weighted ('0.3 /p/a 0.7 /p/b' / ['0.3', '/p/a', ...])."""
    embedded_dir: str = "data/pystdlib"
    embedded_max_mb: float = Field(20.0, gt=0)
    split: Optional[str] = None
    """Megatron's --split for your own data_path (default '969,30,1'); the embedded corpus has
    its own held-out validation prefix."""
    num_workers: int = Field(2, ge=0)

    @field_validator("data_path", mode="before")
    @classmethod
    def _data_path(cls, v):
        if isinstance(v, str):
            v = v.strip()
            if not v:
                raise ValueError("data_path is empty; allowed: 'embedded', a prefix, or a list of prefixes")
            return v if v == "embedded" else v.split()
        if isinstance(v, list) and v and all(isinstance(x, (str, int, float)) for x in v):
            return [str(x) for x in v]
        raise ValueError("data_path must be 'embedded', a prefix string, or a non-empty list of prefixes "
                         "(optionally with weights)")

    @field_validator("split")
    @classmethod
    def _split(cls, v):
        if v is None:
            return v
        parts = str(v).replace("/", ",").split(",")
        try:
            nums = [float(x) for x in parts]
        except ValueError:
            raise ValueError(f"split={v!r} must be comma-separated numbers like '969,30,1'") from None
        if len(nums) > 3 or any(n < 0 or not math.isfinite(n) for n in nums) or sum(nums) <= 0:
            raise ValueError(f"split={v!r} must be up to 3 non-negative numbers with a positive sum, "
                             f"like '969,30,1'")
        return str(v)

    @property
    def embedded(self) -> bool:
        return self.data_path == "embedded"


# -- optimizer, schedule ---------------------------------------------------------------------------
class LRLawConfig(_Section):
    """lr = eta0 * sqrt(B/B0) * sqrt(d0/depth) * (T/T0)^(-exponent)."""

    eta0: float = Field(gt=0)
    B0: float = Field(lr_law.DEFAULT_B0, gt=0)
    """Base tokens per batch."""
    d0: float = Field(lr_law.DEFAULT_D0, gt=0)
    """Base depth (layers)."""
    T0: float = Field(lr_law.DEFAULT_T0, gt=0)
    """Base total training tokens."""
    exponent: float = lr_law.DEFAULT_EXPONENT


class OptimizerSection(_Section):
    name: str
    lr: Optional[float] = Field(None, gt=0)
    lr_law: Optional[LRLawConfig] = None
    min_lr: Optional[float] = Field(None, ge=0)
    """Absolute final lr; default min_lr_ratio * lr."""
    min_lr_ratio: Optional[float] = Field(None, ge=0, le=1)
    """Final lr as a fraction of lr (default 0.1: linear decay to 0.1 lr, HyperP)."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay of the Adam groups (embeddings, output layer; with adamw/muon also
    the matrices). Norm gains and biases never take weight decay (Megatron's rule)."""
    sphere_weight_decay: float = Field(0.0, ge=0)
    """Weight decay on sphere matrices: must be 0 (a first-order no-op on the sphere)."""
    radius: Any = None
    """Sphere optimizers: 'init' (default), 'sqrt_max_dim' or a positive number."""
    update_norm: Optional[str] = None
    """Sphere optimizers: 'exact' (default) or 'shape'."""
    output_layer_on_sphere: bool = False
    """adamh: put the output layer on a sphere too (HyperP, Marin)."""
    embedding_lr: Optional[float] = Field(None, gt=0)
    output_lr: Optional[float] = Field(None, gt=0)
    scalar_lr: Optional[float] = Field(None, gt=0)
    """lr of 1-D parameters (norm gains, biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)
    momentum: Optional[float] = Field(None, ge=0, lt=1)
    """muon / muonh momentum (default 0.95)."""
    nesterov: Optional[bool] = None
    """muon / muonh Nesterov momentum (default true)."""
    ns_steps: Optional[int] = Field(None, ge=1)
    """muon / muonh Newton-Schulz steps (default 5)."""

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v):
        return canonical_optimizer(v)

    @field_validator("radius")
    @classmethod
    def _radius(cls, v):
        if v is None:
            return v
        try:
            return check_radius(v)
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if "allowed" in msg else f"{msg}; allowed: {', '.join(RADIUS_MODES)}") from None

    @field_validator("update_norm", mode="before")
    @classmethod
    def _update_norm(cls, v):
        return v if v is None else check_update_norm(v)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas={list(v)} must both be in [0, 1)")
        return v

    @property
    def sphere(self) -> bool:
        return self.name in SPHERE_OPTIMIZERS

    @property
    def muon_family(self) -> bool:
        return self.name in MUON_OPTIMIZERS


class ScheduleConfig(_Section):
    train_iters: int = Field(ge=1)
    global_batch_size: int = Field(ge=1)
    micro_batch_size: int = Field(1, ge=1)
    warmup_iters: int = Field(0, ge=0)
    """HyperP: none."""
    decay_style: Literal["linear", "cosine", "constant", "WSD", "inverse-square-root"] = "linear"
    decay_iters: Optional[int] = Field(None, ge=1)
    """Default: train_iters."""
    eval_interval: Optional[int] = Field(None, ge=1)
    """Default: train_iters (one evaluation at the end)."""
    eval_iters: int = Field(10, ge=0)


class HyperPConfig(_Section):
    block_output_scale: Any = "1/sqrt(2L)"
    """Depth-muP multiplier of every attention / MLP output before the residual add:
    '1/sqrt(2L)' (HyperP), '1/L' (MD), a positive number, or 'none'."""

    @field_validator("block_output_scale")
    @classmethod
    def _scale(cls, v):
        parsed = parse_block_output_scale(v)
        return "none" if parsed is None else parsed


class CheckpointConfig(_Section):
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = Field(None, ge=1)
    """Default with save: train_iters (save at the end)."""
    format: Literal["torch_dist", "torch"] = "torch_dist"


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


class LoggingConfig(_Section):
    log_interval: int = Field(10, ge=1)
    tensorboard_dir: Optional[str] = None
    """Default when W&B is on: runs/<name>/tensorboard (Megatron sends most W&B scalars only
    when a TensorBoard dir is set)."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    metrics_interval: Optional[int] = Field(None, ge=1)
    """Interval of the instability indicators (default: log_interval)."""


class HyperballConfig(_Section):
    seed: int = 1234
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    model: ModelConfig
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerSection
    schedule: ScheduleConfig
    hyperp: HyperPConfig = Field(default_factory=HyperPConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

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
        return resolve_block_output_scale(self.hyperp.block_output_scale, self.model.num_layers)

    def resolved_metrics_interval(self) -> int:
        """Interval of the instability indicators (logging.metrics_interval or log_interval)."""
        return self.logging.metrics_interval or self.logging.log_interval

    def run_name(self) -> str:
        return self.logging.wandb.name or f"{self.optimizer.name}-L{self.model.num_layers}-d{self.model.hidden_size}"

    def lr_summary(self) -> str:
        result = self.lr_law_result()
        head = result.summary() if result is not None else f"lr = {self.resolved_lr():.6g} (fixed)"
        return f"{head}; min_lr = {self.resolved_min_lr():.6g} ({self.schedule.decay_style} decay)"


# -- combinations -----------------------------------------------------------------------------------
def cross_checks(cfg: HyperballConfig) -> list[tuple[str, str]]:
    """Problems with combinations of keys, as (key path, message); empty when fine."""
    p: list[tuple[str, str]] = []
    m, par, opt, sch = cfg.model, cfg.parallelism, cfg.optimizer, cfg.schedule

    # model shape
    if m.hidden_size % m.num_attention_heads:
        p.append(("model.hidden_size", f"{m.hidden_size} is not divisible by model.num_attention_heads="
                                       f"{m.num_attention_heads}; allowed: a multiple of it"))
    if m.num_query_groups is not None and m.num_attention_heads % m.num_query_groups:
        p.append(("model.num_query_groups", f"{m.num_query_groups} does not divide model.num_attention_heads="
                                            f"{m.num_attention_heads}; allowed: a divisor of it"))
    ffn = m.resolved_ffn_hidden_size()
    if ffn < 1:
        p.append(("model.ffn_hidden_size", f"not set and Megatron's swiglu default int(8h/3/64)*64 is 0 for "
                                           f"hidden_size={m.hidden_size}; set it explicitly"))
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        p.append(("model.max_position_embeddings", f"{m.max_position_embeddings} < model.seq_length="
                                                   f"{m.seq_length}; allowed: >= seq_length"))

    # tokenizer / vocabulary
    tok = m.tokenizer
    if tok.type == "null_tokenizer" and m.vocab_size is None:
        p.append(("model.vocab_size", "required with model.tokenizer.type 'null_tokenizer'"))
    if tok.type == "byte" and m.vocab_size not in (None, 257):
        p.append(("model.vocab_size", f"{m.vocab_size} with the byte tokenizer, whose vocabulary is 257 "
                                      f"(256 bytes + eod); allowed: leave it out"))
    if tok.type not in ("byte", "null_tokenizer", "tiktoken") and m.vocab_size is not None:
        p.append(("model.vocab_size", f"set with model.tokenizer.type '{tok.type}', which defines its own "
                                      f"vocabulary; allowed: leave it out"))
    if tok.type in ("huggingface", "sentencepiece", "tiktoken") and not tok.model:
        p.append(("model.tokenizer.model", f"required with model.tokenizer.type '{tok.type}'"))
    if tok.type == "gpt2bpe" and not (tok.vocab_file and tok.merge_file):
        p.append(("model.tokenizer", "type 'gpt2bpe' needs vocab_file and merge_file"))
    if cfg.data.embedded and tok.type != "byte":
        p.append(("model.tokenizer.type", f"'{tok.type}' with data.data_path 'embedded', a byte-level corpus; "
                                          f"allowed: 'byte' (or point data.data_path at your own data)"))
    if cfg.data.embedded and cfg.data.split is not None:
        p.append(("data.split", "set with data.data_path 'embedded', which has its own held-out "
                                "validation prefix; allowed: leave it out"))

    # parallelism
    if m.num_attention_heads % par.tp:
        p.append(("parallelism.tp", f"{par.tp} does not divide model.num_attention_heads="
                                    f"{m.num_attention_heads}; allowed: a divisor of it"))
    if m.num_query_groups is not None and m.num_query_groups % par.tp:
        p.append(("parallelism.tp", f"{par.tp} does not divide model.num_query_groups={m.num_query_groups}"))
    if ffn >= 1 and ffn % par.tp:
        p.append(("parallelism.tp", f"{par.tp} does not divide the MLP hidden size {ffn}"))
    if m.num_layers % par.pp:
        p.append(("parallelism.pp", f"{par.pp} does not divide model.num_layers={m.num_layers}; "
                                    f"allowed: a divisor of it"))
    if par.sequence_parallel and par.tp == 1:
        p.append(("parallelism.sequence_parallel", "needs parallelism.tp > 1"))
    if par.sequence_parallel and m.seq_length % par.tp:
        p.append(("parallelism.sequence_parallel", f"model.seq_length={m.seq_length} is not divisible by "
                                                   f"parallelism.tp={par.tp}"))
    if par.ep > 1 and m.moe is None:
        p.append(("parallelism.ep", f"{par.ep} without model.moe; allowed: 1 for a dense model"))
    if m.moe is not None:
        moe = m.moe
        if moe.topk > moe.num_experts:
            p.append(("model.moe.topk", f"{moe.topk} > model.moe.num_experts={moe.num_experts}"))
        if moe.num_experts % par.ep:
            p.append(("parallelism.ep", f"{par.ep} does not divide model.moe.num_experts={moe.num_experts}"))
        if moe.router_sphere == "frobenius" and not opt.sphere:
            p.append(("model.moe.router_sphere", f"'frobenius' makes the router a sphere matrix of the "
                                                 f"optimizer, but optimizer.name is '{opt.name}'; allowed with "
                                                 f"it: 'row', 'none' (or use {' / '.join(SPHERE_OPTIMIZERS)})"))

    # optimizer
    if (opt.lr is None) == (opt.lr_law is None):
        p.append(("optimizer.lr", "set exactly one of optimizer.lr and optimizer.lr_law "
                                  + ("(both are set)" if opt.lr is not None else "(neither is set)")))
    if opt.min_lr is not None and opt.min_lr_ratio is not None:
        p.append(("optimizer.min_lr", "set at most one of optimizer.min_lr and optimizer.min_lr_ratio"))
    if opt.sphere_weight_decay != 0:
        why = ("weight decay is a first-order no-op on the sphere, so sphere matrices take none"
               if opt.sphere else f"optimizer '{opt.name}' has no sphere matrices (use optimizer.weight_decay)")
        p.append(("optimizer.sphere_weight_decay", f"{opt.sphere_weight_decay}: {why}; allowed: 0"))
    if not opt.sphere:
        for key in ("radius", "update_norm"):
            if getattr(opt, key) is not None:
                p.append((f"optimizer.{key}", f"set for optimizer '{opt.name}', which has no spheres; allowed "
                                              f"only with {', '.join(SPHERE_OPTIMIZERS)}"))
    if opt.output_layer_on_sphere and opt.name != "adamh":
        p.append(("optimizer.output_layer_on_sphere", f"true with optimizer '{opt.name}'; allowed only with "
                                                      f"adamh (muonh gives the output layer Adam)"))
    if not opt.muon_family:
        for key in ("momentum", "nesterov", "ns_steps"):
            if getattr(opt, key) is not None:
                p.append((f"optimizer.{key}", f"set for optimizer '{opt.name}'; allowed only with muon, muonh"))
    if m.tie_embeddings and opt.output_lr is not None:
        p.append(("optimizer.output_lr", "set with model.tie_embeddings true: the output layer is the "
                                         "embedding; allowed: optimizer.embedding_lr only"))
    if m.tie_embeddings and opt.output_layer_on_sphere:
        p.append(("optimizer.output_layer_on_sphere", "true with model.tie_embeddings true (the output layer "
                                                      "is the embedding, which is never on a sphere)"))
    if not p:  # the resolved lr needs a valid shape/optimizer
        lr = cfg.resolved_lr()
        if opt.min_lr is not None and opt.min_lr > lr:
            p.append(("optimizer.min_lr", f"{opt.min_lr} > resolved lr {lr:.6g}"))

    # schedule
    if sch.global_batch_size % sch.micro_batch_size:
        p.append(("schedule.global_batch_size", f"{sch.global_batch_size} is not divisible by "
                                                f"schedule.micro_batch_size={sch.micro_batch_size}"))
    if sch.warmup_iters >= sch.train_iters and sch.warmup_iters > 0:
        p.append(("schedule.warmup_iters", f"{sch.warmup_iters} >= schedule.train_iters={sch.train_iters}"))
    if sch.decay_iters is not None and sch.decay_iters <= sch.warmup_iters:
        p.append(("schedule.decay_iters", f"{sch.decay_iters} <= schedule.warmup_iters={sch.warmup_iters}"))

    # hyperp: the laws need a depth (num_layers >= 1 is enforced above; kept for clarity)
    try:
        cfg.block_output_alpha()
    except ValueError as e:
        p.append(("hyperp.block_output_scale", f"{e}; allowed: {', '.join(BLOCK_OUTPUT_SCALES)}"))

    # checkpoint, logging
    ck = cfg.checkpoint
    if ck.save_interval is not None and ck.save is None:
        p.append(("checkpoint.save_interval", "set without checkpoint.save"))
    wb = cfg.logging.wandb
    if wb.mode == "online" and not wb.project:
        p.append(("logging.wandb.project", "required with logging.wandb.mode 'online'"))
    return p


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


def _problems_from_pydantic(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        loc = tuple(str(x) for x in e["loc"])
        path = ".".join(loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = _section_fields(loc[:-1])
            section = ".".join(loc[:-1]) or "the top level"
            problems.append((path, f"unknown key; allowed keys of {section}: {', '.join(allowed)}"))
            continue
        if kind == "missing":
            problems.append((path, "required key is missing"))
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if kind != "value_error":
            msg = f"{msg} (got {e.get('input')!r})"
        problems.append((path, msg))
    return problems


def _depth_law_problem(raw: dict) -> list[tuple[str, str]]:
    """With model.num_layers missing or invalid, a depth law for block_output_scale is reported too."""
    hyperp = raw.get("hyperp")
    value = hyperp.get("block_output_scale", "1/sqrt(2L)") if isinstance(hyperp, dict) else "1/sqrt(2L)"
    try:
        parsed = parse_block_output_scale(value)
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
        cfg = HyperballConfig.model_validate(raw)
    except ValidationError as e:
        problems = _problems_from_pydantic(e)
        if any(path in ("model", "model.num_layers") for path, _ in problems):
            problems += _depth_law_problem(raw)
        raise ConfigError(problems, source) from None
    problems = cross_checks(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg
