"""Which outside architecture expresses a jaxlm model exactly, and what none can.

  dense                                    -> LlamaForCausalLM    (GGUF: llama)
    + model.attention_bias                 -> Qwen2ForCausalLM    (GGUF: qwen2)
    + model.qk_norm                        -> Qwen3ForCausalLM    (GGUF: qwen3)
  MoE in every layer, no shared experts, softmax, renormalised top-k, no attention biases
                                           -> MixtralForCausalLM  (GGUF: llama + experts)
  MoE + model.qk_norm, no shared experts   -> Qwen3MoeForCausalLM (no GGUF)
  any other MoE (shared experts, leading dense or interleaved layers, attention biases,
  moe.norm_topk_prob=false)                -> Qwen2MoeForCausalLM (no GGUF)

Routing: jaxlm takes softmax over all experts, then the top k, and renormalises the k weights to
sum 1 if moe.norm_topk_prob: Mixtral's router always does; Qwen2-MoE's and Qwen3-MoE's follow
their norm_topk_prob. llama.cpp's qwen2moe graph does not renormalise, and its qwen3moe graph
always does, so neither is offered for GGUF today.
"""

from __future__ import annotations

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.errors import UserError, warn

LLAMA, MIXTRAL, QWEN2_MOE = "LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM"
QWEN2, QWEN3, QWEN3_MOE = "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
MISTRAL = "MistralForCausalLM"  # imported only: the same tensors and function as Llama, exported as Llama
GGUF_ARCHS = {LLAMA: "llama", MIXTRAL: "llama", QWEN2: "qwen2", QWEN3: "qwen3"}


def check_exportable(cfg: ModelConfig, moe: MoEConfig, fmt: str) -> str:
    """The Hugging Face architecture for the model; a UserError naming the first setting that
    no target expresses. Prints a warning for the dropping MoE path."""
    refusals = [
        (cfg.norm == "post", "model.norm=post (post-norm) has no equivalent: the targets are pre-norm; "
                             "expected model.norm=pre"),
        (cfg.norm == "none", "model.norm=none has no equivalent: the targets normalise every block; "
                             "expected model.norm=pre"),
        (cfg.mlp != "swiglu", f"model.mlp={cfg.mlp} (a non-gated MLP) has no equivalent: the targets use "
                              "SwiGLU; expected model.mlp=swiglu"),
        (cfg.position == "none", "model.position=none has no equivalent: the targets use RoPE; "
                                 "expected model.position=rope"),
        (not cfg.causal, "model.causal=false (bidirectional attention) has no equivalent: the targets are "
                         "causal LMs; expected model.causal=true"),
        (bool(moe.n_experts) and moe.router == "sigmoid",
         "moe.router=sigmoid has no equivalent: Mixtral and Qwen-MoE route with a softmax; "
         "expected moe.router=softmax"),
        (bool(moe.n_experts and moe.n_shared) and cfg.qk_norm,
         "model.qk_norm=true with moe.n_shared experts has no equivalent: Qwen3-MoE, the one target with q/k "
         "norms and experts, has no shared experts"),
    ]
    for refused, message in refusals:
        if refused:
            raise UserError(f"cannot export: {message}")
    arch = architecture(cfg, moe)
    if fmt == "gguf":
        check_gguf(arch, cfg, moe)
    if moe.n_experts and moe.impl == "dropping":
        warn("moe.impl=dropping: the export runs every token through its experts, so it equals the trained "
             "model only where nothing was dropped (capacity_factor)")
    return arch


def check_gguf(arch: str, cfg: ModelConfig, moe: MoEConfig) -> None:
    if cfg.rope_scaling.type != "none" and GGUF_ARCHS.get(arch) not in (None, "llama"):
        raise UserError(f"cannot export to gguf: model.rope_scaling.type={cfg.rope_scaling.type} is written for "
                        f"llama.cpp's llama graph only, and this model needs its {GGUF_ARCHS[arch]} graph; "
                        "use --format hf")
    if arch in GGUF_ARCHS:
        return
    if arch == QWEN3_MOE:
        what = "experts with model.qk_norm=true (Qwen3-MoE)"
    elif moe.n_shared:
        what = "shared experts (moe.n_shared)"
    elif cfg.attention_bias:
        what = "experts with model.attention_bias=true"
    elif not moe.norm_topk_prob:
        what = "moe.norm_topk_prob=false"
    else:
        what = "dense layers between MoE layers (moe.first_dense/every)"
    raise UserError(f"cannot export to gguf: {what} has no llama.cpp graph here (llama's experts renormalise "
                    "the top-k and have no attention biases, q/k norms or shared experts); use --format hf")


def architecture(cfg: ModelConfig, moe: MoEConfig) -> str:
    if not moe.n_experts:
        return QWEN3 if cfg.qk_norm else QWEN2 if cfg.attention_bias else LLAMA
    if cfg.qk_norm:
        return QWEN3_MOE
    mixtral = (moe.every == 1 and moe.first_dense == 0 and not moe.n_shared and moe.norm_topk_prob
               and not cfg.attention_bias)
    return MIXTRAL if mixtral else QWEN2_MOE
