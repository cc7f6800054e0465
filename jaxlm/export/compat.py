"""Which outside architecture expresses a jaxlm model exactly, and what none can.

  dense                                              -> LlamaForCausalLM   (GGUF: llama)
  MoE in every layer, no shared experts, softmax     -> MixtralForCausalLM (GGUF: llama + experts)
  shared experts, leading dense or interleaved MoE   -> Qwen2MoeForCausalLM (no GGUF)

Routing: jaxlm takes softmax over all experts, the top k, then renormalises the k weights to
sum 1: exactly Mixtral's router, and Qwen2-MoE's with norm_topk_prob=true (llama.cpp's
qwen2moe graph does not renormalise, hence no GGUF for those models).
"""

from __future__ import annotations

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.errors import UserError, warn

LLAMA, MIXTRAL, QWEN2_MOE = "LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM"


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
         "moe.router=sigmoid has no equivalent: Mixtral and Qwen2-MoE route with a softmax; "
         "expected moe.router=softmax"),
    ]
    for refused, message in refusals:
        if refused:
            raise UserError(f"cannot export: {message}")
    arch = architecture(cfg, moe)
    if fmt == "gguf" and arch == QWEN2_MOE:
        what = "shared experts" if moe.n_shared else "dense layers between MoE layers (moe.first_dense/every)"
        raise UserError(f"cannot export to gguf: {what} have no llama.cpp equivalent that renormalises the "
                        "top-k weights as jaxlm does; use --format hf")
    if moe.n_experts and moe.impl == "dropping":
        warn("moe.impl=dropping: the export runs every token through its experts, so it equals the trained "
             "model only where nothing was dropped (capacity_factor)")
    return arch


def architecture(cfg: ModelConfig, moe: MoEConfig) -> str:
    if not moe.n_experts:
        return LLAMA
    every_layer_moe = moe.every == 1 and moe.first_dense == 0
    return MIXTRAL if every_layer_moe and not moe.n_shared else QWEN2_MOE
