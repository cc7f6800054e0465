"""jaxlm <-> Hugging Face checkpoints: tensor names and layouts, config.json, safetensors shards.

Layouts: HF linear weights are [out, in]; jaxlm's are [in, out] with heads kept apart, so
q_proj = wq [D, H, d] reshaped to [D, H*d] and transposed; RoPE is rotate-half in both.

Where a plain HF model cannot say what a jaxlm model computes, the export writes an equivalent:
  * jaxlm's scaled tied head (model.scale_tied_logits) divides logits by sqrt(D). The export is
    untied, lm_head = embed / sqrt(D) (config.json "jaxlm" records the tie; the importer reads the
    embedding back and drops lm_head, so import(export(x)) == x bit for bit). An unscaled tied
    head is HF's own tie (tie_word_embeddings, no lm_head tensor).
  * Qwen2-MoE always gates its shared expert with sigmoid(w . x); a jaxlm model without
    moe.shared_gate gets w = 0 (sigmoid(0) = 1/2 exactly) and a doubled shared down-projection
    (exact in floating point). It always has q/k/v biases: zeros without model.attention_bias.
  * Llama's and Qwen3's attention_bias also puts a bias on o_proj: zeros (jaxlm has none).
Tensors jaxlm has nothing in place of ("zeros") must be exactly zero on import.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.export import params as P
from jaxlm.export.compat import LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN2_MOE, QWEN3, QWEN3_MOE

MODEL_TYPES = {LLAMA: "llama", MISTRAL: "mistral", MIXTRAL: "mixtral", QWEN2: "qwen2", QWEN3: "qwen3",
               QWEN2_MOE: "qwen2_moe", QWEN3_MOE: "qwen3_moe"}
MAX_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class HFTensor:
    name: str
    source: str | None  # canonical name (params.py); None for constants
    layer: int | None
    expert: int | None
    form: str  # how the canonical tensor maps to this one: see to_hf / from_hf
    shape: tuple


def hf_tied(cfg: ModelConfig) -> bool:
    """An HF-style tie: the head is the embedding itself, unscaled (no lm_head tensor)."""
    return cfg.tie_embeddings and not cfg.scale_tied_logits


def hf_tensors(arch: str, cfg: ModelConfig, moe: MoEConfig) -> list[HFTensor]:
    """Every tensor of the HF checkpoint, in file order."""
    D, V = cfg.d_model, cfg.vocab_size
    out = [HFTensor("model.embed_tokens.weight", "embed", None, None, "same", (V, D))]
    for i, kind in enumerate(P.layer_kinds(cfg, moe)):
        t = lambda name, src, form, shape, e=None, i=i: HFTensor(f"model.layers.{i}.{name}", src, i, e, form, shape)
        out += _attention(arch, cfg, t)
        out += _dense(cfg, t) if kind == "dense" else _experts(arch, cfg, moe, t)
    out.append(HFTensor("model.norm.weight", "final_norm", None, None, "same", (D,)))
    if not cfg.tie_embeddings:
        out.append(HFTensor("lm_head.weight", "lm_head", None, None, "T", (V, D)))
    elif cfg.scale_tied_logits:
        out.append(HFTensor("lm_head.weight", "embed", None, None, "tied_head", (V, D)))
    return out


def _attention(arch: str, cfg: ModelConfig, t) -> list[HFTensor]:
    D, H, K, d = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = [t("input_layernorm.weight", "norm1", "same", (D,)),
           t("self_attn.q_proj.weight", "attn.wq", "heads_in", (H * d, D)),
           t("self_attn.k_proj.weight", "attn.wk", "heads_in", (K * d, D)),
           t("self_attn.v_proj.weight", "attn.wv", "heads_in", (K * d, D)),
           t("self_attn.o_proj.weight", "attn.wo", "heads_out", (D, H * d))]
    if cfg.attention_bias or arch == QWEN2_MOE:
        out += [t(f"self_attn.{p}_proj.bias", f"attn.b{p}" if cfg.attention_bias else None,
                  "reshape" if cfg.attention_bias else "zeros", (n * d,)) for p, n in (("q", H), ("k", K), ("v", K))]
    if cfg.attention_bias and arch in (LLAMA, QWEN3, QWEN3_MOE):
        out.append(t("self_attn.o_proj.bias", None, "zeros", (D,)))
    if cfg.qk_norm:
        out += [t("self_attn.q_norm.weight", "attn.q_norm", "same", (d,)),
                t("self_attn.k_norm.weight", "attn.k_norm", "same", (d,))]
    return out + [t("post_attention_layernorm.weight", "norm2", "same", (D,))]


def _dense(cfg: ModelConfig, t) -> list[HFTensor]:
    D, F = cfg.d_model, cfg.d_ff
    return [t(f"mlp.{p}_proj.weight", f"mlp.{p}", "T", shape)
            for p, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F)))]


def _experts(arch: str, cfg: ModelConfig, moe: MoEConfig, t) -> list[HFTensor]:
    D, E, F = cfg.d_model, moe.n_experts, moe.d_ff or cfg.d_ff
    S = moe.n_shared * F
    if arch == MIXTRAL:
        out = [t("block_sparse_moe.gate.weight", "moe.router", "T", (E, D))]
        for e in range(E):
            out += [t(f"block_sparse_moe.experts.{e}.{w}.weight", f"moe.{p}", "T", shape, e)
                    for w, p, shape in (("w1", "gate", (F, D)), ("w2", "down", (D, F)), ("w3", "up", (F, D)))]
        return out
    out = [t("mlp.gate.weight", "moe.router", "T", (E, D))]
    for e in range(E):
        out += [t(f"mlp.experts.{e}.{p}_proj.weight", f"moe.{p}", "T", shape, e)
                for p, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F)))]
    if arch == QWEN3_MOE:
        return out
    if moe.n_shared:
        out += [t("mlp.shared_expert.gate_proj.weight", "moe.shared.gate", "T", (S, D)),
                t("mlp.shared_expert.up_proj.weight", "moe.shared.up", "T", (S, D)),
                t("mlp.shared_expert.down_proj.weight", "moe.shared.down", "T" if moe.shared_gate else "T2x", (D, S))]
    else:  # Qwen2-MoE always has one: a 1-unit expert with zero weights adds exactly 0
        out += [t(f"mlp.shared_expert.{p}_proj.weight", None, "zeros", shape)
                for p, shape in (("gate", (1, D)), ("up", (1, D)), ("down", (D, 1)))]
    gate = ("moe.shared_gate", "reshape") if moe.shared_gate else (None, "zeros")
    return out + [t("mlp.shared_expert_gate.weight", *gate, (1, D))]


def to_hf(t: HFTensor, canonical: np.ndarray | None) -> np.ndarray:
    """The HF tensor (float32) from the canonical one (already indexed by expert)."""
    if t.form == "zeros":
        return np.zeros(t.shape, np.float32)
    x = np.asarray(canonical, np.float32)
    if t.form == "same":
        return x
    if t.form == "reshape":
        return x.reshape(t.shape)
    if t.form == "T":
        return x.T
    if t.form == "T2x":
        return x.T * np.float32(2.0)
    if t.form == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if t.form == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if t.form == "tied_head":
        return x / np.float32(math.sqrt(x.shape[1]))
    raise ValueError(t.form)


def from_hf(t: HFTensor, x: np.ndarray, canonical_shape: tuple) -> np.ndarray:
    """The canonical tensor (one expert's, for expert tensors) from the HF one; inverse of to_hf."""
    if t.form == "same":
        return x
    if t.form == "reshape":
        return x.reshape(canonical_shape)
    if t.form == "T":
        return x.T
    if t.form == "T2x":
        return x.T * np.asarray(0.5, x.dtype)
    if t.form in ("heads_in", "heads_out"):
        return x.T.reshape(canonical_shape)
    raise ValueError(t.form)


def rope_json(cfg: ModelConfig) -> dict:
    """config.json's rope_parameters (transformers >= 5) and rope_scaling (earlier versions)."""
    r = cfg.rope_scaling
    if r.type == "none":
        return {"rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    scaling = {"rope_type": r.type, "factor": r.factor, "low_freq_factor": r.low_freq_factor,
               "high_freq_factor": r.high_freq_factor, "original_max_position_embeddings": r.original_max_seq_len}
    return {"rope_theta": cfg.rope_theta, "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta},
            "rope_scaling": scaling}


def config_json(arch: str, cfg: ModelConfig, moe: MoEConfig, dtype: str, eot: int | None, tokenizer: str) -> dict:
    c = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers * cfg.share_blocks,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        **rope_json(cfg), "tie_word_embeddings": hf_tied(cfg), "attention_bias": cfg.attention_bias,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": dtype,
        "bos_token_id": eot, "eos_token_id": eot,
        # read back by `jaxlm import` for an exact round trip (e.g. the tied head)
        "jaxlm": {"model": asdict(cfg), "moe": asdict(moe), "tokenizer": tokenizer},
    }
    F = moe.d_ff or cfg.d_ff
    no_window = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers * cfg.share_blocks}
    dense = [i for i, kind in enumerate(P.layer_kinds(cfg, moe)) if kind == "dense"]
    experts = {"num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "moe_intermediate_size": F,
               "norm_topk_prob": moe.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": dense,
               "router_aux_loss_coef": moe.aux_loss_coef, "output_router_logits": False}
    if arch == MIXTRAL:
        c.update(intermediate_size=F, num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
                 router_aux_loss_coef=moe.aux_loss_coef, output_router_logits=False, router_jitter_noise=0.0,
                 sliding_window=None)
    elif arch == QWEN2_MOE:
        c.update(**experts, **no_window, shared_expert_intermediate_size=moe.n_shared * F or 1, qkv_bias=True)
    elif arch == QWEN3_MOE:
        c.update(**experts, **no_window)
    elif arch in (QWEN2, QWEN3):
        c.update(**no_window)
    return c


def write_checkpoint(out: Path, arch: str, cfg: ModelConfig, moe: MoEConfig, params: dict, dtype,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """model.safetensors, or shards of at most max_shard_bytes plus model.safetensors.index.json.
    Each shard's tensors are made just before it is written, so memory holds one shard."""
    from safetensors.numpy import save_file

    slots = P.slots(cfg, moe)
    tensors = hf_tensors(arch, cfg, moe)
    itemsize = np.dtype(dtype).itemsize
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes

    def make(t: HFTensor) -> np.ndarray:
        src = None if t.source is None else P.read(params, slots[(t.source, t.layer)])
        if t.expert is not None:
            src = src[t.expert]
        x = to_hf(t, src)
        assert x.shape == t.shape, (t.name, x.shape, t.shape)
        return np.ascontiguousarray(x.astype(dtype))

    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        save_file({t.name: make(t) for t in shard}, out / fname, metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)  # safetensors creates its files 0600
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(math.prod(t.shape) * itemsize for t in tensors)},
                 "weight_map": {t.name: fname for fname, shard in zip(names, shards) for t in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
