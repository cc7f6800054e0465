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
from typing import Any, Literal, Optional

import yaml

from jaxlm.errors import UserError


class ConfigError(UserError):
    """A config problem; its message is one line meant for the user."""


@dataclass
class ModelConfig:
    vocab_size: int = 257  # bytes + <|endoftext|>
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 344
    max_seq_len: int = 1024  # maximum positions the model supports
    norm: Literal["pre", "post", "none"] = "pre"
    mlp: Literal["swiglu", "silu", "gelu"] = "swiglu"
    position: Literal["rope", "none"] = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    causal: bool = True  # false = bidirectional attention (masked-diffusion LMs)
    remat: Literal["none", "full", "dots_saveable"] = "none"
    scan_layers: bool = True
    # kernels (jaxlm/model/kernels.py); auto = the platform's best
    attention_impl: Literal["auto", "xla", "cpu", "cudnn", "pallas_gpu", "splash"] = "auto"
    projection_impl: Literal["auto", "xla", "cpu"] = "auto"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward; n_experts == 0 means a dense model."""

    n_experts: int = 0
    top_k: int = 2
    d_ff: int = 0  # expert hidden size; 0 = model.d_ff
    every: int = 1  # an MoE block in every `every`-th layer
    first_dense: int = 0  # leading dense layers before the first MoE layer
    n_shared: int = 0  # shared experts every token passes through
    router: Literal["softmax", "sigmoid"] = "softmax"
    noise_std: float = 0.0  # noisy top-k during training
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    impl: Literal["dropping", "dropless"] = "dropless"
    capacity_factor: float = 1.25


@dataclass
class MeshConfig:
    """Mesh axis sizes within a host/slice (ici) and across hosts (dcn); -1 fills."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1
    # logical axis -> mesh axis (or list of mesh axes, or null); merged over the defaults
    rules: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: final fraction of steps spent decaying
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    clip_norm: float = 1.0  # 0 disables clipping


@dataclass
class SourceConfig:
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # a text file / directory / glob, or a directory made by `jaxlm prepare`; null = embedded corpus
    path: Optional[str] = None
    mixture: list[SourceConfig] = field(default_factory=list)  # several sources with weights (instead of path)
    packing: bool = False  # pack whole documents into rows (segment ids, positions restart) vs plain windows
    tokenizer: str = "bytes"  # "bytes", a tokenizer directory, or a named tiktoken encoding
    seq_len: int = 128
    val_fraction: float = 0.05
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch: int = 16
    microbatches: int = 1  # gradient accumulation
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    run_dir: str = "runs/default"  # from a config file: runs/<file name> unless set
    peak_flops_per_device: float = 0.0  # 0 = measure a matmul on this machine
    z_loss_coef: float = 0.0
    # what the step minimises (train/objectives.py, train/diffusion.py, train/distill.py)
    objective: Literal["next_token", "mdlm", "distill"] = "next_token"
    teacher: Optional[str] = None  # distill: the teacher's run directory (its newest valid checkpoint)
    progress: bool = True


@dataclass
class DiffusionConfig:
    """Masked diffusion (train.objective=mdlm): the noise schedule and the ELBO evaluation."""

    schedule: Literal["linear", "loglinear", "cosine"] = "linear"
    t_min: float = 1e-3  # t ~ U(t_min, 1): keeps the 1/t weight of the ELBO finite
    low_discrepancy: bool = True  # stratified t across the batch (else i.i.d.)
    eval_t_samples: int = 4  # t samples per validation sequence (seeded, evenly spread)


@dataclass
class DistillConfig:
    """Distillation (train.objective=distill): weight * tau^2 * KL(teacher || student) at
    temperature tau + (1 - weight) * next-token cross-entropy."""

    temperature: float = 2.0
    weight: float = 0.5


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (and one at the last step); 0 disables
    keep: int = 3
    keep_every: int = 0  # also keep every n-th step forever; 0 = none
    async_save: bool = True


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
        node[leaf] = yaml.safe_load(value) if value != "" else None
    cfg = from_dict(Config, raw, prefix="")
    if path is not None and "run_dir" not in (raw.get("train") or {}):
        cfg.train.run_dir = f"runs/{path.stem}"
    validate(cfg)
    return cfg


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
            raise ConfigError(f"{key}={value!r} is not allowed; expected one of {'|'.join(map(str, allowed))}")
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
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "model.d_ff": m.d_ff,
        "model.max_seq_len": m.max_seq_len, "data.seq_len": d.seq_len, "train.steps": t.steps,
        "train.global_batch": t.global_batch, "train.microbatches": t.microbatches,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
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
