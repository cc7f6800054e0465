"""Typed config tree: YAML file + dotted CLI overrides -> validated dataclasses.

Each section is a dataclass handed to the code that owns it. Every error is a
`ConfigError` whose message is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml

from jaxlm.errors import UserError


class ConfigError(UserError):
    """A config problem; its message is one line meant for the user."""


# Every key carries a one-line description (`Doc[type, "..."]`); `jaxlm config` lists them.
Doc = Annotated


@dataclass
class ModelConfig:
    vocab_size: Doc[int, "vocabulary size; at least the tokenizer's (257 = 256 bytes + <|endoftext|>)"] = 257
    d_model: Doc[int, "width of the residual stream"] = 128
    n_layers: Doc[int, "number of transformer blocks"] = 4
    n_heads: Doc[int, "attention (query) heads; must divide d_model"] = 4
    n_kv_heads: Doc[int, "key/value heads (grouped-query attention); must divide n_heads"] = 4
    d_ff: Doc[int, "hidden size of the dense feed-forward block"] = 344
    max_seq_len: Doc[int, "maximum positions the model supports (>= data.seq_len)"] = 1024
    norm: Doc[Literal["pre", "post", "none"], "where RMSNorm sits in each block"] = "pre"
    mlp: Doc[Literal["swiglu", "silu", "gelu"], "feed-forward activation (swiglu is gated)"] = "swiglu"
    position: Doc[Literal["rope", "none"], "positional encoding: rotary or none"] = "rope"
    rope_theta: Doc[float, "RoPE base frequency"] = 10000.0
    tie_embeddings: Doc[bool, "share the input embedding with the output projection"] = False
    norm_eps: Doc[float, "RMSNorm epsilon (> 0)"] = 1e-5
    param_dtype: Doc[Literal["float32", "bfloat16"], "dtype the parameters are stored in"] = "float32"
    compute_dtype: Doc[Literal["float32", "bfloat16"], "dtype of matmuls and activations"] = "float32"
    causal: Doc[bool, "causal attention; false = bidirectional (masked-diffusion LMs)"] = True
    remat: Doc[Literal["none", "full", "dots_saveable"], "activation recomputation in the backward pass"] = "none"
    dropout: Doc[float, "dropout rate on the embedding output and on each residual branch (training only)"] = 0.0
    attention_dropout: Doc[float, "dropout rate on attention probabilities (training only; runs the xla "
                                  "attention kernel, the fast ones cannot drop out)"] = 0.0
    scan_layers: Doc[Literal["auto", True, False],
                     "compile one block and scan it over the layers (fast compiles) or unroll them; auto: "
                     "unrolled on GPU, where the scan cost 1.4x in step time, scanned elsewhere"] = "auto"
    attention_impl: Doc[Literal["auto", "xla", "cpu", "cudnn", "pallas_gpu", "splash"],
                        "attention kernel (model/kernels.py); auto: cpu on CPU, cudnn on GPU (pallas_gpu when "
                        "deterministic), splash on TPU"] = "auto"
    projection_impl: Doc[Literal["auto", "xla", "cpu"], "dense projection kernel; auto: cpu on CPU, else xla"] = "auto"
    gmm_impl: Doc[Literal["auto", "ragged_dot", "megablox"],
                  "MoE dropless grouped matmul; auto: megablox on TPU, else ragged_dot"] = "auto"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward; n_experts == 0 means a dense model."""

    n_experts: Doc[int, "experts per MoE layer; 0 = dense model"] = 0
    top_k: Doc[int, "experts each token is routed to"] = 2
    d_ff: Doc[int, "expert hidden size; 0 = model.d_ff"] = 0
    every: Doc[int, "an MoE block in every `every`-th layer (>= 1)"] = 1
    first_dense: Doc[int, "leading dense layers before the first MoE layer"] = 0
    n_shared: Doc[int, "shared experts every token passes through"] = 0
    router: Doc[Literal["softmax", "sigmoid"], "router score function"] = "softmax"
    noise_std: Doc[float, "noise added to router logits during training (noisy top-k); 0 = off"] = 0.0
    aux_loss_coef: Doc[float, "weight of the load-balancing loss"] = 0.01
    z_loss_coef: Doc[float, "weight of the router z-loss"] = 0.001
    impl: Doc[Literal["dropping", "dropless"], "dropping: fixed expert capacity; dropless: every token"] = "dropless"
    capacity_factor: Doc[float, "dropping: expert capacity as a multiple of the fair share"] = 1.25


@dataclass
class MeshConfig:
    """Mesh axis sizes within a host/slice (ici) and across hosts (dcn); -1 fills."""

    data: Doc[int, "data-parallel size within a host/slice; -1 = fill with the remaining devices"] = -1
    fsdp: Doc[int, "fully-sharded data-parallel size within a host/slice"] = 1
    expert: Doc[int, "expert-parallel size within a host/slice"] = 1
    tensor: Doc[int, "tensor-parallel size within a host/slice"] = 1
    dcn_data: Doc[int, "data-parallel size across hosts/slices"] = 1
    dcn_fsdp: Doc[int, "fsdp size across hosts/slices"] = 1
    dcn_expert: Doc[int, "expert-parallel size across hosts/slices"] = 1
    dcn_tensor: Doc[int, "tensor-parallel size across hosts/slices"] = 1
    rules: Doc[dict[str, Any], "logical axis -> mesh axis, list of axes or null; merged over the defaults, "
               "e.g. '{embed: null}'"] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: Doc[float, "peak learning rate (> 0)"] = 1e-3
    min_lr: Doc[float, "final learning rate of the cosine and WSD schedules"] = 1e-4
    schedule: Doc[Literal["cosine", "wsd", "constant"], "learning-rate schedule after warmup"] = "cosine"
    warmup_steps: Doc[int, "linear warmup from 0 to lr (>= 0)"] = 100
    decay_fraction: Doc[float, "WSD: final fraction of steps spent decaying"] = 0.2
    beta1: Doc[float, "AdamW first-moment decay, in [0, 1)"] = 0.9
    beta2: Doc[float, "AdamW second-moment decay, in [0, 1)"] = 0.95
    eps: Doc[float, "AdamW epsilon"] = 1e-8
    weight_decay: Doc[float, "AdamW decoupled weight decay (not on norm gains)"] = 0.1
    decay_embeddings: Doc[bool, "also decay the embedding table"] = False
    clip_norm: Doc[float, "clip gradients to this global norm; 0 disables clipping"] = 1.0


@dataclass
class SourceConfig:
    path: Doc[str, "a text file, directory, glob or prepared corpus"] = ""
    weight: Doc[float, "share of the training rows drawn from this source (> 0)"] = 1.0


@dataclass
class DataConfig:
    path: Doc[Optional[str], "a text file, directory, glob, or a directory made by `jaxlm prepare`; "
              "null = the embedded default corpus"] = None
    mixture: Doc[list[SourceConfig], "several sources with weights, [{path, weight}, ...] (instead of path)"] = \
        field(default_factory=list)
    packing: Doc[bool, "pack whole documents into rows (segment ids, positions restart) vs plain windows"] = False
    tokenizer: Doc[str, "'bytes', a tokenizer directory, or a tiktoken encoding name"] = "bytes"
    seq_len: Doc[int, "tokens per training row"] = 128
    val_fraction: Doc[float, "share of raw text held out for evaluation (prepared data has its own split)"] = 0.05
    seed: Doc[int, "seed of the row shuffle"] = 0


@dataclass
class TrainConfig:
    steps: Doc[int, "total optimizer steps (raise it to continue a finished run)"] = 300
    global_batch: Doc[int, "rows per step over all devices"] = 16
    microbatches: Doc[int, "gradient accumulation: global_batch is split into this many microbatches"] = 1
    seed: Doc[int, "seed of initialization and of training randomness"] = 0
    eval_every: Doc[int, "steps between evaluations (and one at the last step); 0 = off"] = 100
    eval_batches: Doc[int, "global batches of validation data per evaluation"] = 4
    log_every: Doc[int, "steps between metric records (>= 1)"] = 10
    run_dir: Doc[str, "metrics, TensorBoard events and checkpoints; from a config file: runs/<file name> "
                 "unless set"] = "runs/default"
    peak_flops_per_device: Doc[float, "for MFU; 0 = measure a matmul on this machine"] = 0.0
    z_loss_coef: Doc[float, "weight of the output z-loss (log-partition squared)"] = 0.0
    objective: Doc[Literal["next_token", "mdlm", "distill"],
                   "what the step minimises (train/objectives.py, diffusion.py, distill.py)"] = "next_token"
    teacher: Doc[Optional[str], "distill: the teacher's run directory (its newest valid checkpoint)"] = None
    deterministic: Doc[Literal["auto", True, False],
                       "bit-exact runs and resumes; auto: where free (CPU, TPU), not on GPU"] = "auto"
    progress: Doc[bool, "show a progress bar"] = True
    early_stop_patience: Doc[int, "stop after this many evaluations without a new best eval loss; 0 = never"] = 0
    allow_data_change: Doc[bool, "resume even though the data files changed since the checkpoint"] = False
    init_from: Doc[Optional[str], "a Hugging Face model directory (Llama, Mixtral, Qwen2-MoE) whose weights "
                   "start the run when run_dir has no checkpoint"] = None


@dataclass
class DiffusionConfig:
    """Masked diffusion (train.objective=mdlm): the noise schedule and the ELBO evaluation."""

    schedule: Doc[Literal["linear", "loglinear", "cosine"], "alpha_t: 1 - t, MDLM's log-linear (1 - (1 - 1e-3) t), "
                  "or cos(pi t / 2)"] = "linear"
    t_min: Doc[float, "t ~ U(t_min, 1): keeps the 1/t weight of the ELBO finite"] = 1e-3
    low_discrepancy: Doc[bool, "t stratified across the batch (else i.i.d.)"] = True
    eval_t_samples: Doc[int, "t per validation sequence for the ELBO bound (seeded, evenly spread)"] = 4


@dataclass
class DistillConfig:
    """Distillation (train.objective=distill): weight * tau^2 * KL(teacher || student) at
    temperature tau + (1 - weight) * next-token cross-entropy."""

    temperature: Doc[float, "tau: both distributions are softened by it in the KL term"] = 2.0
    weight: Doc[float, "share of the KL term; 1 - weight goes to the next-token loss"] = 0.5


@dataclass
class CheckpointConfig:
    every: Doc[int, "steps between checkpoints (and one at the last step); 0 disables checkpoints"] = 1000
    keep: Doc[int, "newest checkpoints to keep (>= 1)"] = 3
    keep_every: Doc[int, "also keep every n-th step forever; 0 = none"] = 0
    keep_best: Doc[int, "also keep the n checkpoints with the lowest eval loss (saved at eval steps); 0 = none"] = 0
    async_save: Doc[bool, "write checkpoints in the background while training goes on"] = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads YAML (or defaults when path is None), applies `a.b=value` overrides, validates."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; expected a YAML file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = _parse_override_value(item, value)
    cfg = from_dict(Config, raw, prefix="")
    if path is not None and "run_dir" not in (raw.get("train") or {}):
        cfg.train.run_dir = f"runs/{path.stem}"
    validate(cfg)
    return cfg


def _parse_override_value(item: str, value: str):
    if value == "":
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value does not parse as YAML ({problem}); quote the whole "
                          "override so the shell passes it as one argument, e.g. 'mesh.rules={embed: null}'") from None


def from_dict(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; allowed: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; expected one of {'|'.join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a list")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a mapping")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a string")
        return value
    return value


def validate(cfg: Config) -> None:
    """Checks that need several keys together. Device-dependent checks live in the mesh code."""
    m, o, t, d, c = cfg.model, cfg.optim, cfg.train, cfg.data, cfg.checkpoint
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "model.d_ff": m.d_ff,
        "model.max_seq_len": m.max_seq_len, "data.seq_len": d.seq_len, "train.steps": t.steps,
        "train.global_batch": t.global_batch, "train.microbatches": t.microbatches,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    at_least = {  # key: (value, minimum, what the minimum means)
        "train.log_every": (t.log_every, 1, ""), "train.eval_every": (t.eval_every, 0, " (0 = no evaluation)"),
        "train.eval_batches": (t.eval_batches, 1, ""),
        "checkpoint.every": (c.every, 0, " (0 = no checkpoints)"), "checkpoint.keep": (c.keep, 1, ""),
        "checkpoint.keep_every": (c.keep_every, 0, " (0 = none kept forever)"),
        "checkpoint.keep_best": (c.keep_best, 0, " (0 = none)"),
        "train.early_stop_patience": (cfg.train.early_stop_patience, 0, " (0 = never)"),
        "optim.warmup_steps": (o.warmup_steps, 0, ""),
    }
    for key, (value, minimum, meaning) in at_least.items():
        if value < minimum:
            raise ConfigError(f"{key}={value} must be >= {minimum}{meaning}")
    for key, value in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value} must be in [0, 1)")
    for key, value in (("model.norm_eps", m.norm_eps), ("optim.eps", o.eps)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.clip_norm", o.clip_norm)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    for key, rate in (("model.dropout", m.dropout), ("model.attention_dropout", m.attention_dropout)):
        if not 0 <= rate < 1:
            raise ConfigError(f"{key}={rate} must be in [0, 1)")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}")
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"head_dim={m.head_dim} (model.d_model/model.n_heads) must be even for RoPE")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    if t.global_batch % t.microbatches:
        raise ConfigError(
            f"train.global_batch={t.global_batch} must be divisible by train.microbatches={t.microbatches}")
    if t.init_from is not None and not Path(t.init_from, "config.json").is_file():
        raise ConfigError(f"train.init_from={t.init_from!r} is not a Hugging Face model directory (no config.json)")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    if d.path is not None and not _path_exists(d.path):
        raise ConfigError(f"data.path={d.path!r} does not exist; expected a text file, directory, glob or prepared data")
    if d.path is not None and d.mixture:
        raise ConfigError("data.path and data.mixture are both set; use data.mixture alone for several sources")
    for i, src in enumerate(d.mixture):
        if not _path_exists(src.path):
            raise ConfigError(f"data.mixture[{i}].path={src.path!r} does not exist; expected a text file, directory, "
                              "glob or prepared data")
        if src.weight <= 0:
            raise ConfigError(f"data.mixture[{i}].weight={src.weight} must be > 0")
    e = cfg.moe
    if e.n_experts:
        if not 1 <= e.top_k <= e.n_experts:
            raise ConfigError(f"moe.top_k={e.top_k} must be between 1 and moe.n_experts={e.n_experts}")
        if e.every < 1:
            raise ConfigError(f"moe.every={e.every} must be >= 1")
        if e.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor={e.capacity_factor} must be > 0")
    _validate_objective(cfg)
    for name in ("data", "fsdp", "expert", "tensor"):
        for key in (name, f"dcn_{name}"):
            size = getattr(cfg.mesh, key)
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{key}={size} must be a positive size or -1 (fill)")


def _validate_objective(cfg: Config) -> None:
    t, m, f, s = cfg.train, cfg.model, cfg.diffusion, cfg.distill
    if t.objective == "mdlm":
        if m.causal:
            raise ConfigError("train.objective=mdlm needs bidirectional attention: set model.causal=false")
        if m.vocab_size < 2:
            raise ConfigError(f"model.vocab_size={m.vocab_size} has no room for <|mask|> (id vocab_size-1)")
        if not 0 < f.t_min < 1:
            raise ConfigError(f"diffusion.t_min={f.t_min} must be in (0, 1)")
        if f.eval_t_samples < 1:
            raise ConfigError(f"diffusion.eval_t_samples={f.eval_t_samples} must be >= 1")
    if t.objective == "distill":
        if not t.teacher:
            raise ConfigError("train.objective=distill needs train.teacher=RUN_DIR (the teacher's run directory)")
        if not m.causal:
            raise ConfigError("train.objective=distill trains a next-token student: set model.causal=true")
        if s.temperature <= 0 or not 0 <= s.weight <= 1:
            raise ConfigError(f"distill.temperature={s.temperature} must be > 0 and distill.weight={s.weight} "
                              "in [0, 1]")
    elif t.teacher:
        raise ConfigError(f"train.teacher is set but train.objective={t.objective}; use train.objective=distill")


def _path_exists(path: str) -> bool:
    import glob

    return Path(path).exists() or bool(glob.glob(path))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
