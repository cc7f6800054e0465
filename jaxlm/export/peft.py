"""LoRA adapters in the `peft` library's format: adapter_model.safetensors + adapter_config.json,
which `peft.PeftModel.from_pretrained` loads onto the Hugging Face export of the base model.

jaxlm's adapter of a weight w [*in, *out] is A [*in, R], B [R, *out] (model/lora.py); HF linear
weights are [out, in] with jaxlm's input (and output) dimensions flattened (hf.py), so
lora_A = A.reshape(-1, R).T [R, in] and lora_B = B.reshape(R, -1).T [out, R], and the update
(alpha / R) B_hf A_hf equals jaxlm's (alpha / R) (A B)^T in HF's layout. Where the HF tensor is a
scaled copy of jaxlm's (Qwen2-MoE's shared down projection is doubled), B is scaled the same way.
Routed experts have no per-expert linear modules in transformers' MoE models (their weights are
fused 3-D tensors), so their adapters cannot be expressed: export merged instead.

`lora.trainable_tokens` rows are peft's trainable tokens (trainable_token_indices): the trained rows
of embed_tokens and lm_head, which peft writes over the base's rows (values, not differences, so
they apply to any base export).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxlm.errors import UserError
from jaxlm.export import hf
from jaxlm.export import params as P
from jaxlm.model.lora import PREFIX

SCALE = {"heads_in": 1.0, "heads_out": 1.0, "T": 1.0, "T2x": 2.0}


def adapter_tensors(arch: str, cfg, params: dict, dtype) -> dict[str, np.ndarray]:
    """{peft tensor name: array} for every adapter of the run's parameters."""
    m, moe = cfg.model, cfg.moe
    if cfg.lora.experts:
        raise UserError("lora.experts=true: transformers keeps routed experts as fused tensors, which peft "
                        "adapters cannot target; export with --format hf --merge (or gguf --merge) instead")
    slots = P.slots(m, moe)
    out = {}
    for t in hf.hf_tensors(arch, m, moe):
        if t.source is None or t.form not in SCALE or t.expert is not None:
            continue
        slot = slots[(t.source, t.layer)]
        adapter = slot.path[:-1] + (PREFIX + slot.path[-1],)
        try:
            a, b = (P.read(params, P.Slot(adapter + (k,), slot.row)) for k in "ab")
        except KeyError:
            continue  # this weight has no adapter
        R = a.shape[-1]
        module = "base_model.model." + t.name.removesuffix(".weight")
        out[module + ".lora_A.weight"] = np.asarray(a, np.float32).reshape(-1, R).T
        out[module + ".lora_B.weight"] = np.asarray(b, np.float32).reshape(R, -1).T * np.float32(SCALE[t.form])
    out.update(token_tensors(arch, cfg, params))
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in out.items()}


TOKEN_MODULES = {"model.embed_tokens.weight": "model.embed_tokens", "lm_head.weight": "lm_head"}


def token_tensors(arch: str, cfg, params: dict) -> dict[str, np.ndarray]:
    """{peft tensor name: [n, D] rows} of the trained token rows of embed_tokens and lm_head."""
    ids = list(cfg.lora.trainable_tokens)
    if not ids:
        return {}
    slots, out = P.slots(cfg.model, cfg.moe), {}
    for t in hf.hf_tensors(arch, cfg.model, cfg.moe):
        if t.name in TOKEN_MODULES:
            rows = hf.to_hf(t, P.read(params, slots[(t.source, t.layer)]))[ids]
            out[f"base_model.model.{TOKEN_MODULES[t.name]}.token_adapter.trainable_tokens_delta"] = rows
    return out


def write_peft(out: Path, arch: str, cfg, params: dict, dtype, base: str | None = None) -> None:
    from safetensors.numpy import save_file

    tensors = adapter_tensors(arch, cfg, params, dtype)
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    a = cfg.lora
    tokens = {k.split(".token_adapter")[0].rsplit(".", 1)[-1]: list(a.trainable_tokens)  # embed_tokens, lm_head
              for k in tensors if ".token_adapter." in k} or None
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
        "r": a.rank, "lora_alpha": a.alpha, "lora_dropout": a.dropout, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "trainable_token_indices": tokens,
    }
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    os.chmod(out / "adapter_model.safetensors", 0o644)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
