"""jaxlm's parameter tree as named per-layer tensors: the one place that knows the tree's paths.

Exporters and the importer never walk the tree themselves; they ask for a tensor by its
canonical name, in jaxlm's own layout (letters as in the model package):

  global:    embed [V, D], final_norm [D], lm_head [D, V] (untied models only)
  per layer: norm1, norm2 [D]; attn.wq [D, H, d], attn.wk / attn.wv [D, K, d], attn.wo [H, d, D];
             model.attention_bias: attn.bq [H, d], attn.bk / attn.bv [K, d];
             model.qk_norm: attn.q_norm / attn.k_norm [d];
             dense layers: mlp.gate / mlp.up [D, F], mlp.down [F, D];
             MoE layers:   moe.router [D, E], moe.gate / moe.up [E, D, F], moe.down [E, F, D],
                           moe.shared.gate / moe.shared.up [D, S], moe.shared.down [S, D],
                           moe.shared_gate [D] (moe.shared_gate)

Layers are stored stacked per segment (transformer.layer_plan): layer i lives at position r of
the leading axis of segment s's block j. With model.share_blocks = k, layers are the applied
ones: k consecutive layers read the same block (an export repeats it, an import reads the first).
If the model renames a parameter, fix it here.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.model.transformer import layer_plan

GLOBAL_PATHS = {
    "embed": ("embed", "table_VD"),
    "final_norm": ("final_norm", "scale"),
    "lm_head": ("lm_head_DV",),
}
BLOCK_PATHS = {
    "norm1": ("norm1", "scale"),
    "norm2": ("norm2", "scale"),
    "attn.wq": ("attn", "wq_DHd"),
    "attn.wk": ("attn", "wk_DKd"),
    "attn.wv": ("attn", "wv_DKd"),
    "attn.wo": ("attn", "wo_HdD"),
    "attn.bq": ("attn", "bq_Hd"),
    "attn.bk": ("attn", "bk_Kd"),
    "attn.bv": ("attn", "bv_Kd"),
    "attn.q_norm": ("attn", "q_norm", "scale"),
    "attn.k_norm": ("attn", "k_norm", "scale"),
    "mlp.gate": ("ffn", "w_gate_DF"),
    "mlp.up": ("ffn", "w_up_DF"),
    "mlp.down": ("ffn", "w_down_FD"),
    "moe.router": ("ffn", "router_DE"),
    "moe.gate": ("ffn", "w_gate_EDF"),
    "moe.up": ("ffn", "w_up_EDF"),
    "moe.down": ("ffn", "w_down_EFD"),
    "moe.shared.gate": ("ffn", "shared", "w_gate_DF"),
    "moe.shared.up": ("ffn", "shared", "w_up_DF"),
    "moe.shared.down": ("ffn", "shared", "w_down_FD"),
    "moe.shared_gate": ("ffn", "shared_gate_D"),
}


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives: a leaf of the tree and, for stacked layers, its row on axis 0."""

    path: tuple
    row: int | None = None


def global_names(cfg: ModelConfig) -> list[str]:
    names = ["embed"]
    if cfg.norm == "pre":
        names.append("final_norm")
    if not cfg.tie_embeddings:
        names.append("lm_head")
    return names


def block_names(cfg: ModelConfig, moe: MoEConfig, kind: str) -> list[str]:
    names = ["norm1", "norm2"] if cfg.norm != "none" else []
    names += ["attn.wq", "attn.wk", "attn.wv", "attn.wo"]
    names += ["attn.bq", "attn.bk", "attn.bv"] * cfg.attention_bias + ["attn.q_norm", "attn.k_norm"] * cfg.qk_norm
    gated = cfg.mlp == "swiglu"
    if kind == "dense":
        names += ["mlp.gate"] * gated + ["mlp.up", "mlp.down"]
    else:
        names += ["moe.router"] + ["moe.gate"] * gated + ["moe.up", "moe.down"]
        if moe.n_shared:
            names += ["moe.shared.gate"] * gated + ["moe.shared.up", "moe.shared.down"]
            names += ["moe.shared_gate"] * moe.shared_gate
    return names


def layer_kinds(cfg: ModelConfig, moe: MoEConfig) -> list[str]:
    """'dense' or 'moe' for every applied layer, in order."""
    return [kind for kinds, n in layer_plan(cfg, moe) for _ in range(n) for kind in kinds
            for _ in range(cfg.share_blocks)]


def slots(cfg: ModelConfig, moe: MoEConfig) -> dict[tuple[str, int | None], Slot]:
    """{(name, layer or None): Slot} for every tensor of the model, applied layers in order."""
    out = {(name, None): Slot(GLOBAL_PATHS[name]) for name in global_names(cfg)}
    layer = 0
    for s, (kinds, n) in enumerate(layer_plan(cfg, moe)):
        for r in range(n):
            for j, kind in enumerate(kinds):
                prefix = ("segments", s, "units", "blocks", j)
                for _ in range(cfg.share_blocks):
                    for name in block_names(cfg, moe, kind):
                        out[(name, layer)] = Slot(prefix + BLOCK_PATHS[name], r)
                    layer += 1
    return out


def read(params: dict, slot: Slot):
    """The tensor at `slot` (a view into the leaf where the leaf is a numpy array)."""
    leaf = params
    for key in slot.path:
        leaf = leaf[key]
    return leaf if slot.row is None else leaf[slot.row]


def leaf_rows(cfg: ModelConfig, moe: MoEConfig) -> dict[tuple, list[tuple[str, int | None]]]:
    """{leaf path: [(name, layer) for each row]} (one entry, layer None, for global leaves); a
    shared block's row names the first layer that applies it."""
    out: dict[tuple, list] = {}
    seen: set = set()
    for (name, layer), slot in slots(cfg, moe).items():
        if slot not in seen:
            seen.add(slot)
            out.setdefault(slot.path, []).append((name, layer))
    return out
