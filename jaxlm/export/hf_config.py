"""A Hugging Face config.json -> jaxlm's model and moe sections, or a one-line refusal naming the
field jaxlm cannot compute the same way (sliding windows, RoPE variants other than llama3, MLP
biases, ...). The tensors themselves are hf.py's business."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxlm.config import ModelConfig, MoEConfig, RopeScalingConfig
from jaxlm.errors import UserError
from jaxlm.export import params as P
from jaxlm.export.compat import LLAMA, MIXTRAL, QWEN2, QWEN2_MOE, QWEN3, QWEN3_MOE


def sections(path: Path, arch: str, c: dict, tied: bool) -> tuple[ModelConfig, MoEConfig]:
    """`arch` is the tensor layout (Mistral reads as Llama); `tied`: the head is the embedding."""
    D, H = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or D // H
    refuse(path, c)
    model = ModelConfig(
        vocab_size=c["vocab_size"], d_model=D, n_layers=c["num_hidden_layers"], n_heads=H,
        n_kv_heads=c.get("num_key_value_heads") or H, d_head=0 if head_dim * H == D else head_dim,
        d_ff=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=float(_rope(c).get("rope_theta", c.get("rope_theta", 10000.0))), rope_scaling=rope_scaling(path, c),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=tied, scale_tied_logits=not tied,
        # Qwen2 always has q/k/v biases; Qwen2-MoE says so in qkv_bias; Llama/Qwen3 in attention_bias
        # (which also biases o_proj: those must be zero, hf.py)
        attention_bias=True if arch == QWEN2 else bool(c.get("qkv_bias", True)) if arch == QWEN2_MOE
        else bool(c.get("attention_bias")),
        qk_norm=arch in (QWEN3, QWEN3_MOE))
    if arch in (LLAMA, QWEN2, QWEN3):
        return model, MoEConfig()
    E = c.get("num_experts") or c.get("num_local_experts")
    if arch == MIXTRAL:
        return model, MoEConfig(n_experts=E, top_k=c["num_experts_per_tok"], d_ff=c["intermediate_size"])
    F, S = c["moe_intermediate_size"], c.get("shared_expert_intermediate_size", 0) if arch == QWEN2_MOE else 0
    if arch == QWEN2_MOE and (S <= 0 or S % F):
        raise UserError(f"{path}: shared_expert_intermediate_size={S} is not a positive multiple of "
                        f"moe_intermediate_size={F}; jaxlm's shared experts have the routed experts' size")
    moe = MoEConfig(n_experts=E, top_k=c["num_experts_per_tok"], d_ff=F, n_shared=S // F, shared_gate=S > 0,
                    norm_topk_prob=bool(c.get("norm_topk_prob", False)))
    return model, _layer_pattern(path, c, model, moe)


def refuse(path: Path, c: dict) -> None:
    """One line naming the first field jaxlm has no equivalent of."""
    rope = _rope(c)
    max_len = c.get("max_position_embeddings", 2048)
    window = c.get("sliding_window")
    # Mistral and Mixtral window every layer when sliding_window is set; Qwen only with use_sliding_window
    windowed = bool(window) and window < max_len and c.get("use_sliding_window", True)
    checks = [
        (c.get("hidden_act", "silu") != "silu", f"hidden_act={c.get('hidden_act')!r} (jaxlm's SwiGLU uses silu)"),
        (bool(c.get("mlp_bias")), "mlp_bias=true"),
        (rope.get("partial_rotary_factor", 1.0) != 1.0, f"partial_rotary_factor={rope.get('partial_rotary_factor')}"),
        (windowed, f"sliding_window={window} (below max_position_embeddings={max_len}: sliding-window attention)"),
        ("sliding_attention" in (c.get("layer_types") or []), "layer_types with sliding_attention"),
    ]
    for bad, what in checks:
        if bad:
            raise UserError(f"{path}: {what} has no jaxlm equivalent")


def _rope(c: dict) -> dict:
    return c.get("rope_parameters") or c.get("rope_scaling") or {}


def rope_scaling(path: Path, c: dict) -> RopeScalingConfig:
    rope = _rope(c)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return RopeScalingConfig()
    if kind != "llama3":
        raise UserError(f"{path}: rope_type={kind!r} has no jaxlm equivalent; expected default or llama3")
    return RopeScalingConfig(type="llama3", factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                             high_freq_factor=float(rope["high_freq_factor"]),
                             original_max_seq_len=int(rope["original_max_position_embeddings"]))


def _layer_pattern(path: Path, c: dict, model: ModelConfig, moe: MoEConfig) -> MoEConfig:
    """Qwen's mlp_only_layers / decoder_sparse_step as jaxlm's (first_dense, every)."""
    sparse_step, only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or [])
    kinds = ["moe" if i not in only and (i + 1) % sparse_step == 0 else "dense" for i in range(model.n_layers)]
    for every in range(1, model.n_layers + 1):
        for first in range(model.n_layers + 1):
            candidate = dataclasses.replace(moe, every=every, first_dense=first)
            if P.layer_kinds(model, candidate) == kinds:
                return candidate
    raise UserError(f"{path}: the pattern of dense and MoE layers {kinds} is not jaxlm's (first_dense, every)")
