"""Hugging Face Llama / Mixtral / Qwen2-MoE safetensors -> jaxlm parameters, placed in their shardings.

(The file format only; `importer.py` is the `jaxlm import` verb, `train.init_from` calls `load_hf_params`.)

Each parameter is built with jax.make_array_from_callback: every device's shard reads only the
HF tensors (and, for experts, only the experts) it holds, one layer at a time, lazily through
safetensors' safe_open, so no process ever holds the whole model on the host.

A checkpoint written by `jaxlm export` carries jaxlm's own config sections in config.json
("jaxlm"), which the import takes as they are: the round trip is exact. Other checkpoints are
read from their HF config, and refused in one line where jaxlm cannot compute the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np

from jaxlm.config import Config, ConfigError, ModelConfig, MoEConfig, from_dict
from jaxlm.errors import UserError
from jaxlm.export import hf
from jaxlm.export import params as P
from jaxlm.export.compat import LLAMA, MIXTRAL, QWEN2_MOE
from jaxlm.model.build import abstract_params

# keys that define the function the parameters compute: the run's config must agree with the import
SAME_MODEL = ("vocab_size", "d_model", "n_layers", "share_blocks", "n_heads", "n_kv_heads", "norm", "mlp", "position",
              "rope_theta", "tie_embeddings", "norm_eps", "causal")
SAME_MOE = ("n_experts", "top_k", "every", "first_dense", "n_shared", "router")


@dataclasses.dataclass
class Source:
    """An HF checkpoint, read: the jaxlm config sections it maps to and its architecture."""

    path: Path
    arch: str
    model: ModelConfig
    moe: MoEConfig
    hf_tied: bool  # a tied HF head (no lm_head tensor): jaxlm gets an untied head = embedding^T
    tokenizer: str | None


def read_source(hf_dir: str | Path) -> Source:
    path = Path(hf_dir)
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no readable config.json ({type(e).__name__}); expected a Hugging Face model "
                        "directory") from None
    arch = (c.get("architectures") or [None])[0]
    if arch not in hf.MODEL_TYPES:
        raise UserError(f"{path}: architecture {arch!r} cannot be imported; expected one of {', '.join(hf.MODEL_TYPES)}")
    if "jaxlm" in c:  # written by `jaxlm export`: the exact sections
        mine = c["jaxlm"]
        return Source(path, arch, from_dict(ModelConfig, mine["model"], "model."), from_dict(MoEConfig, mine["moe"], "moe."),
                      False, mine.get("tokenizer"))
    model, moe = _sections(path, arch, c)
    readable = (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
    tok = str(path) if readable else None
    return Source(path, arch, model, moe, bool(c.get("tie_word_embeddings", False)), tok)


def _sections(path: Path, arch: str, c: dict) -> tuple[ModelConfig, MoEConfig]:
    D, H = c["hidden_size"], c["num_attention_heads"]
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    checks = [
        (c.get("hidden_act", "silu") != "silu", f"hidden_act={c.get('hidden_act')!r} (jaxlm's SwiGLU uses silu)"),
        (c.get("head_dim") not in (None, D // H), f"head_dim={c.get('head_dim')} != hidden_size/num_attention_heads"),
        (rope.get("rope_type", rope.get("type", "default")) != "default", f"RoPE scaling {rope!r}"),
        (bool(c.get("attention_bias")) and arch != QWEN2_MOE, "attention_bias=true"),
        (bool(c.get("mlp_bias")), "mlp_bias=true"),
        (arch == QWEN2_MOE and not c.get("norm_topk_prob"), "norm_topk_prob=false (jaxlm renormalises the top-k)"),
        (bool(c.get("use_sliding_window")) or (arch == MIXTRAL and c.get("sliding_window")), "sliding-window attention"),
    ]
    for bad, what in checks:
        if bad:
            raise UserError(f"{path}: {what} has no jaxlm equivalent")
    model = ModelConfig(
        vocab_size=c["vocab_size"], d_model=D, n_layers=c["num_hidden_layers"], n_heads=H,
        n_kv_heads=c.get("num_key_value_heads") or H, d_ff=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048), rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=False)
    if arch == LLAMA:
        return model, MoEConfig()
    if arch == MIXTRAL:
        return model, MoEConfig(n_experts=c["num_local_experts"], top_k=c["num_experts_per_tok"], d_ff=c["intermediate_size"])
    F, S = c["moe_intermediate_size"], c.get("shared_expert_intermediate_size", 0)
    if S % F:
        raise UserError(f"{path}: shared_expert_intermediate_size={S} is not a multiple of moe_intermediate_size={F}; "
                        "jaxlm's shared experts have the routed experts' size")
    sparse_step, only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or [])
    kinds = ["moe" if i not in only and (i + 1) % sparse_step == 0 else "dense" for i in range(model.n_layers)]
    moe = MoEConfig(n_experts=c["num_experts"], top_k=c["num_experts_per_tok"], d_ff=F, n_shared=S // F)
    for every in range(1, model.n_layers + 1):
        for first in range(model.n_layers + 1):
            candidate = dataclasses.replace(moe, every=every, first_dense=first)
            if P.layer_kinds(model, candidate) == kinds:
                return model, candidate
    raise UserError(f"{path}: the pattern of dense and MoE layers {kinds} is not jaxlm's (first_dense, every)")


def mismatches(src: Source, cfg: Config) -> list[str]:
    """'key (checkpoint -> config)' for every setting where the run's config and the import differ."""
    out = [f"model.{k} ({getattr(src.model, k)!r} -> {getattr(cfg.model, k)!r})"
           for k in SAME_MODEL if getattr(src.model, k) != getattr(cfg.model, k)]
    kinds = set(P.layer_kinds(src.model, src.moe))
    if "dense" in kinds and src.model.d_ff != cfg.model.d_ff:
        out.append(f"model.d_ff ({src.model.d_ff} -> {cfg.model.d_ff})")
    if src.moe.n_experts or cfg.moe.n_experts:
        out += [f"moe.{k} ({getattr(src.moe, k)!r} -> {getattr(cfg.moe, k)!r})"
                for k in SAME_MOE if getattr(src.moe, k) != getattr(cfg.moe, k)]
        ff = lambda m, e: e.d_ff or m.d_ff
        if "moe" in kinds and ff(src.model, src.moe) != ff(cfg.model, cfg.moe):
            out.append(f"moe.d_ff ({ff(src.model, src.moe)} -> {ff(cfg.model, cfg.moe)})")
    return out


class _Files:
    """Lazy access to the tensors of model.safetensors or its shards."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"{path}: no model.safetensors (or index); only safetensors checkpoints are imported")
        self.handles = [safe_open(str(path / f), "numpy") for f in files]
        self.where = {name: h for h in self.handles for name in h.keys()}
        self.path = path

    def get(self, t: hf.HFTensor) -> np.ndarray:
        h = self.where.get(t.name)
        if h is None:
            raise UserError(f"{self.path}: tensor {t.name} is missing")
        x = h.get_tensor(t.name)
        if tuple(x.shape) != t.shape:
            raise UserError(f"{self.path}: tensor {t.name} has shape {tuple(x.shape)}, expected {t.shape}")
        return x


def load_params(src: Source, cfg: Config, shardings) -> dict:
    """jaxlm params for `cfg` (which must agree with `src`), each a jax.Array in `shardings`."""
    bad = mismatches(src, cfg)
    if bad:
        raise ConfigError(f"{src.path} does not fit the config: {', '.join(bad)}; set these as in the checkpoint")
    m, moe = cfg.model, cfg.moe
    files = _Files(src.path)
    tensors = hf.hf_tensors(src.arch, m, moe)
    for t in tensors:  # jaxlm has nothing in place of these: they must be exactly zero
        if t.form == "zeros" and np.any(files.get(t)):
            raise UserError(f"{src.path}: tensor {t.name} is not zero; jaxlm has no equivalent of it")
    sources: dict[tuple, list[hf.HFTensor]] = {}
    for t in tensors:
        if t.form == "tied_head" or t.form == "zeros":
            continue
        if src.hf_tied and t.name == "lm_head.weight":  # a tied HF head: jaxlm's untied head is embed^T
            t = dataclasses.replace(t, name="model.embed_tokens.weight")
        sources.setdefault((t.source, t.layer), []).append(t)
    reader = _Reader(files, sources)
    rows_of = P.leaf_rows(m, moe)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, sharding: reader.array(rows_of[tuple(k.key for k in path)], spec, sharding),
        abstract_params(cfg), shardings)


EXPERT_ROWS = ("moe.gate", "moe.up", "moe.down")  # leaves with an expert dimension after the layer one


@dataclasses.dataclass
class _Reader:
    """Builds each jaxlm leaf from the HF tensors its device shards hold, read on demand."""

    files: _Files
    sources: dict  # (jaxlm row name, layer) -> the HF tensors that form it (one per expert)

    def array(self, rows: list, spec: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        """The leaf `spec` (its rows: (name, layer) per leading index) in `sharding`."""
        return jax.make_array_from_callback(spec.shape, sharding, functools.partial(self.shard, rows, spec))

    def shard(self, rows: list, spec: jax.ShapeDtypeStruct, index: tuple) -> np.ndarray:
        """One device's slice `index` of the leaf: only its layers (and experts) are read."""
        if rows[0][1] is None:  # a global tensor
            return np.asarray(self.canonical(rows[0][0], None, spec.shape, None)[index], spec.dtype)
        out = []
        for r in range(*index[0].indices(spec.shape[0])):
            name, layer = rows[r]
            if name in EXPERT_ROWS:
                experts = range(*index[1].indices(spec.shape[1]))
                out.append(self.canonical(name, layer, spec.shape[1:], experts)[(slice(None), *index[2:])])
            else:
                out.append(self.canonical(name, layer, spec.shape[1:], None)[index[1:]])
        return np.asarray(np.stack(out), spec.dtype)

    def canonical(self, name: str, layer, shape: tuple, experts: range | None) -> np.ndarray:
        """jaxlm's layout of one layer's tensor (stacked over `experts` when given)."""
        ts = self.sources[(name, layer)]
        if experts is None:
            return hf.from_hf(ts[0], self.files.get(ts[0]), shape)
        return np.stack([hf.from_hf(ts[e], self.files.get(ts[e]), shape[1:]) for e in experts])


def load_hf_params(hf_dir: str | Path, cfg: Config, shardings) -> dict:
    """`train.init_from`: the HF checkpoint's weights as the params of `cfg`, in `shardings`."""
    return load_params(read_source(hf_dir), cfg, shardings)
