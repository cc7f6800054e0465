"""Config checks that need several keys together (each typed section is already checked key by
key while it is read). Device-dependent checks live in the mesh code."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

from jaxlm.errors import ConfigError

if TYPE_CHECKING:  # config.py imports this module
    from jaxlm.config import Config


def validate(cfg: Config) -> None:
    """Checks that need several keys together. Device-dependent checks live in the mesh code."""
    _check_finite(cfg, "")
    _check_ranges(cfg)
    _check_model(cfg)
    _check_optim_and_train(cfg)
    _check_data_and_moe(cfg)
    _validate_objective(cfg)
    _check_finetune(cfg)
    _check_prune(cfg)
    _check_grpo(cfg)
    _check_mesh(cfg)


def _check_finite(section, prefix: str) -> None:
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{field.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{field.name}={value} must be a finite number")


def _check_ranges(cfg: Config) -> None:
    """Single keys with a lower bound or an interval."""
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
        "optim.warmup_steps": (o.warmup_steps, 0, ""), "moe.n_experts": (cfg.moe.n_experts, 0, " (0 = a dense model)"),
        "train.freeze_layers": (t.freeze_layers, 0, ""),
        "train.profile.start_step": (t.profile.start_step, 0, ""),
        "train.profile.steps": (t.profile.steps, 0, " (0 = no trace)"),
        "model.share_blocks": (cfg.model.share_blocks, 1, " (1 = no sharing)"),
    }
    for key, (value, minimum, meaning) in at_least.items():
        if value < minimum:
            raise ConfigError(f"{key}={value} must be >= {minimum}{meaning}")
    in_unit = {"optim.beta1": o.beta1, "optim.beta2": o.beta2, "optim.momentum": o.momentum or 0.0, "model.dropout": m.dropout,
               "model.attention_dropout": m.attention_dropout, "data.val_fraction": d.val_fraction}
    for key, value in in_unit.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value} must be in [0, 1)")
    for key, value in (("model.norm_eps", m.norm_eps), ("optim.eps", o.eps), ("optim.lr", o.lr)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.clip_norm", o.clip_norm)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")


def _check_model(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    if m.d_head < 0:
        raise ConfigError(f"model.d_head={m.d_head} must be >= 0 (0 = d_model / n_heads)")
    if not m.d_head and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads} "
                          "(or set model.d_head)")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}")
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"head_dim={m.head_dim} (model.d_head, or model.d_model/model.n_heads) must be even for RoPE")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check_rope_scaling(cfg)


def _check_rope_scaling(cfg: Config) -> None:
    r = cfg.model.rope_scaling
    if r.type == "none":
        return
    if cfg.model.position != "rope":
        raise ConfigError(f"model.rope_scaling.type={r.type} scales RoPE, but model.position={cfg.model.position}")
    if r.factor < 1:
        raise ConfigError(f"model.rope_scaling.factor={r.factor} must be >= 1")
    if not 0 < r.low_freq_factor < r.high_freq_factor:
        raise ConfigError(f"model.rope_scaling.low_freq_factor={r.low_freq_factor} must be > 0 and below "
                          f"model.rope_scaling.high_freq_factor={r.high_freq_factor}")
    if r.original_max_seq_len <= 0:
        raise ConfigError(f"model.rope_scaling.original_max_seq_len={r.original_max_seq_len} must be positive")


def _check_optim_and_train(cfg: Config) -> None:
    o, t = cfg.optim, cfg.train
    if "://" in t.run_dir:
        raise ConfigError(f"train.run_dir={t.run_dir} is a URL; jaxlm writes run directories with plain file I/O, "
                          "so mount the bucket (e.g. gcsfuse) and give its local path")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    if o.schedule == "wsd" and o.warmup_steps + wsd_decay_steps(o.decay_fraction, t.steps) > t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} plus the WSD decay ({wsd_decay_steps(o.decay_fraction, t.steps)} "
                          f"steps: optim.decay_fraction={o.decay_fraction} of train.steps={t.steps}) exceed "
                          "train.steps; lower one of them")
    if t.global_batch % t.microbatches:
        raise ConfigError(
            f"train.global_batch={t.global_batch} must be divisible by train.microbatches={t.microbatches}")
    _check_init_from(t)
    if t.freeze_layers > cfg.model.n_layers:
        raise ConfigError(f"train.freeze_layers={t.freeze_layers} exceeds model.n_layers={cfg.model.n_layers}")


def is_run_dir(path: str) -> bool:
    """A jaxlm run directory, its checkpoints/ directory, or one step directory."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / "checkpoints").is_dir() or (p / "state").is_dir() or any(c.name.isdigit() for c in p.iterdir())


def _check_init_from(t) -> None:
    if t.init_from is not None and not Path(t.init_from, "config.json").is_file() and not is_run_dir(t.init_from):
        raise ConfigError(f"train.init_from={t.init_from!r} is neither a Hugging Face model directory (no config.json) "
                          "nor a jaxlm run directory (no checkpoints/)")
    step = t.init_from_step
    if step is not None:
        if isinstance(step, bool) or not (step == "best" or isinstance(step, int) and step >= 0):
            raise ConfigError(f"train.init_from_step={step!r} must be a step number or 'best'")
        if t.init_from is None or Path(t.init_from, "config.json").is_file():
            raise ConfigError("train.init_from_step selects a checkpoint of a jaxlm run; set train.init_from=RUN_DIR")


def wsd_decay_steps(decay_fraction: float, steps: int) -> int:
    """The steps of WSD's final decay: the last `decay_fraction` of the run, at least one."""
    return max(int(round(decay_fraction * steps)), 1)


def _check_data_and_moe(cfg: Config) -> None:
    d, e = cfg.data, cfg.moe
    if d.path is not None and d.mixture:
        raise ConfigError("data.path and data.mixture are both set; use data.mixture alone for several sources")
    for i, src in enumerate(d.mixture):
        if src.weight <= 0:
            raise ConfigError(f"data.mixture[{i}].weight={src.weight} must be > 0")
    if e.n_experts:
        if not 1 <= e.top_k <= e.n_experts:
            raise ConfigError(f"moe.top_k={e.top_k} must be between 1 and moe.n_experts={e.n_experts}")
        if e.every < 1:
            raise ConfigError(f"moe.every={e.every} must be >= 1")
        if e.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor={e.capacity_factor} must be > 0")
    if e.shared_gate and not (e.n_experts and e.n_shared):
        raise ConfigError("moe.shared_gate=true gates the shared experts, but there are none: set moe.n_shared "
                          "(and moe.n_experts) or moe.shared_gate=false")


def _check_mesh(cfg: Config) -> None:
    for name in ("data", "fsdp", "expert", "tensor"):
        for key in (name, f"dcn_{name}"):
            size = getattr(cfg.mesh, key)
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{key}={size} must be a positive size or -1 (fill)")
    from jaxlm.parallel.sharding import resolve_rules

    resolve_rules(cfg.mesh.rules)  # names: logical axes onto mesh axes


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


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _check_finetune(cfg: Config) -> None:
    """sft and dpo (records), lora."""
    a, o = cfg.lora, cfg.train.objective
    if o in ("sft", "dpo") and not cfg.model.causal:
        raise ConfigError(f"train.objective={o} trains a next-token model: set model.causal=true")
    if o in ("sft", "dpo") and (cfg.data.path is None or cfg.data.mixture):
        raise ConfigError(f"train.objective={o} reads records (JSONL or Parquet): set data.path (not data.mixture)")
    if o == "dpo" and cfg.data.packing:
        raise ConfigError("train.objective=dpo holds one preference pair per row: set data.packing=false")
    if cfg.dpo.beta <= 0:
        raise ConfigError(f"dpo.beta={cfg.dpo.beta} must be > 0")
    if a.rank < 0:
        raise ConfigError(f"lora.rank={a.rank} must be >= 0 (0 = no adapters)")
    if not a.rank:
        if a.quantize != "none":
            raise ConfigError(f"lora.quantize={a.quantize} holds the frozen base of LoRA: set lora.rank > 0")
        if a.trainable_tokens:
            raise ConfigError(f"lora.trainable_tokens={a.trainable_tokens} trains rows of LoRA's frozen base: set "
                              "lora.rank > 0 (without LoRA every row is trained)")
        return
    bad = [t for t in a.trainable_tokens if not 0 <= t < cfg.model.vocab_size]
    if bad or len(set(a.trainable_tokens)) != len(a.trainable_tokens):
        raise ConfigError(f"lora.trainable_tokens={a.trainable_tokens} must be distinct token ids in "
                          f"[0, model.vocab_size={cfg.model.vocab_size})")
    if a.alpha <= 0 or not 0 <= a.dropout < 1:
        raise ConfigError(f"lora.alpha={a.alpha} must be > 0 and lora.dropout={a.dropout} in [0, 1)")
    unknown = [x for x in a.targets if x not in LORA_TARGETS]
    if unknown or not a.targets and not a.experts:
        raise ConfigError(f"lora.targets={a.targets} names no projection or unknown ones ({', '.join(unknown)}); "
                          f"expected some of {', '.join(LORA_TARGETS)}")
    if a.experts and not cfg.moe.n_experts:
        raise ConfigError("lora.experts=true but the model has no experts (moe.n_experts=0)")
    if a.experts and a.dropout:
        raise ConfigError(f"lora.dropout={a.dropout} is not applied inside routed experts: set lora.dropout=0 "
                          "or lora.experts=false")


def _check_prune(cfg: Config) -> None:
    p = cfg.prune
    if p.method == "none":
        return
    if not 0 <= p.sparsity < 1 or not 0 <= p.initial_sparsity <= p.sparsity:
        raise ConfigError(f"prune.sparsity={p.sparsity} must be in [0, 1) and prune.initial_sparsity="
                          f"{p.initial_sparsity} in [0, prune.sparsity]")
    unknown = [x for x in p.targets if x not in LORA_TARGETS]
    if unknown or not p.targets:
        raise ConfigError(f"prune.targets={p.targets} names no matrix or unknown ones ({', '.join(unknown)}); "
                          f"expected some of {', '.join(LORA_TARGETS)}")
    if p.method == "nm" and not 0 < p.n < p.m:
        raise ConfigError(f"prune.n={p.n}, prune.m={p.m}: keep 0 < n < m weights of each group (e.g. 2:4, 4:8)")
    if p.start_step < 0 or p.every < 0 or (p.every and p.end_step < p.start_step):
        raise ConfigError(f"prune: start_step={p.start_step}, end_step={p.end_step}, every={p.every} must be >= 0 "
                          "with end_step >= start_step when every > 0 (gradual pruning)")
    if p.masked and (cfg.lora.rank or cfg.train.freeze or cfg.train.freeze_layers):
        raise ConfigError(f"prune.method={p.method} masks the trained weights: it cannot be combined with lora, "
                          "train.freeze or train.freeze_layers")
    if not p.masked and p.every:
        raise ConfigError(f"prune.method={p.method} is structured: it is one-shot (jaxlm prune RUN -o NEW_RUN), "
                          "set prune.every=0")


def _check_grpo(cfg: Config) -> None:
    """grpo: rows are whole rollouts (prompt + completion), and a rollout batch is trained mu times."""
    g, t = cfg.grpo, cfg.train
    if g.group_size < 2 or g.prompts_per_step < 1 or g.mu < 1 or g.max_new_tokens < 1:
        raise ConfigError(f"grpo.group_size={g.group_size} must be >= 2, grpo.prompts_per_step={g.prompts_per_step}, "
                          f"grpo.mu={g.mu} and grpo.max_new_tokens={g.max_new_tokens} >= 1")
    if g.temperature <= 0 or not 0 < g.top_p <= 1 or g.beta < 0 or not 0 <= g.clip_low < 1 or g.clip_high < 0:
        raise ConfigError(f"grpo.temperature={g.temperature} must be > 0, grpo.top_p={g.top_p} in (0, 1], "
                          f"grpo.beta={g.beta} >= 0, grpo.clip_low={g.clip_low} in [0, 1), "
                          f"grpo.clip_high={g.clip_high} >= 0")
    if t.objective != "grpo":
        return
    if t.global_batch != g.prompts_per_step * g.group_size:
        raise ConfigError(f"train.global_batch={t.global_batch} must equal grpo.prompts_per_step * grpo.group_size = "
                          f"{g.prompts_per_step * g.group_size} (one row per completion)")
    if t.steps % g.mu or cfg.checkpoint.every % g.mu:
        raise ConfigError(f"train.steps={t.steps} and checkpoint.every={cfg.checkpoint.every} must be multiples of "
                          f"grpo.mu={g.mu}: a run stops and resumes only between rollout batches")
    if not cfg.model.causal or cfg.data.packing or cfg.data.path is None or cfg.data.mixture:
        raise ConfigError("train.objective=grpo samples from a causal model over prompt records: set "
                          "model.causal=true, data.packing=false and data.path (JSONL or Parquet with a 'prompt' column)")


def check_data_paths(cfg: Config) -> None:
    """That the data exists (and wandb is installed when train.wandb asks for it): checked by
    training before it writes anything, not by `load_config`, so that verbs which only look at the
    config (accounting, compile) work without them."""
    _check_wandb_installed(cfg)
    d = cfg.data
    named = [("data.path", d.path)] if d.path is not None else []
    named += [(f"data.mixture[{i}].path", src.path) for i, src in enumerate(d.mixture)]
    for key, path in named:
        if not _path_exists(path):
            raise ConfigError(f"{key}={path!r} does not exist; expected a text file, directory, glob or prepared data")


def _path_exists(path: str) -> bool:
    import glob

    return Path(path).exists() or bool(glob.glob(path))


def _check_wandb_installed(cfg: Config) -> None:
    import importlib.util

    if cfg.train.wandb.project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb.project={cfg.train.wandb.project!r} needs the wandb package, which is not "
                          "installed: pip install -e '.[wandb]' (or pip install wandb)")
