"""Parameters, FLOPs and memory by hand, the way a person would count them.

FLOPs count matrix multiplies only (2 * m * n * k each), the convention of Kaplan et al. and
the CS336 notes: norms, softmax, RoPE and activations are left out. The training step costs
3x the forward (forward + backward that is twice the forward). Attention scores are counted
for the full T x T square (a causal kernel that skips the masked half does less work).

The roofline (`--device h100`) bounds one step on one chip by the larger of compute time
(train FLOPs / dense bf16 peak) and memory time (bytes moved / HBM bandwidth).

Shared blocks (model.share_blocks = k, MobileLLM): parameters count each block once, FLOPs and
activations count each of its k applications.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from jaxlm.tools import devices
from jaxlm.config import Config, ModelConfig, MoEConfig, load_config
from jaxlm.model.transformer import layer_plan


@dataclass
class Counts:
    embedding: int
    attention: int
    mlp: int  # dense MLPs + all experts + routers
    norms: int
    output: int  # untied LM head (0 when tied)
    active_mlp: int  # MLP parameters one token passes through

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.output

    @property
    def active(self) -> int:
        return self.total - self.mlp + self.active_mlp


def _layer_kinds(m: ModelConfig, moe: MoEConfig) -> list[str]:
    """The kind of every block of parameters."""
    return [kind for unit, n in layer_plan(m, moe) for _ in range(n) for kind in unit]


def _applied_kinds(m: ModelConfig, moe: MoEConfig) -> list[str]:
    """The kind of every layer of compute: each block applied model.share_blocks times."""
    return [kind for kind in _layer_kinds(m, moe) for _ in range(m.share_blocks)]


def _mlp_matrices(m: ModelConfig) -> int:
    return 3 if m.mlp == "swiglu" else 2


def count_params(m: ModelConfig, moe: MoEConfig) -> Counts:
    D, hd = m.d_model, m.head_dim
    attn = D * m.n_heads * hd * 2 + D * m.n_kv_heads * hd * 2
    attn += (m.n_heads + 2 * m.n_kv_heads) * hd if m.attention_bias else 0  # q, k, v biases
    dense_mlp = _mlp_matrices(m) * D * m.d_ff
    expert_ff = moe.d_ff or m.d_ff
    expert = _mlp_matrices(m) * D * expert_ff
    shared_gate = D if moe.shared_gate else 0
    moe_total = moe.n_experts * expert + moe.n_shared * expert + D * moe.n_experts + shared_gate
    moe_active = moe.top_k * expert + moe.n_shared * expert + D * moe.n_experts + shared_gate
    kinds = _layer_kinds(m, moe)
    n_moe = kinds.count("moe")
    n_dense = len(kinds) - n_moe
    norms = (2 * len(kinds) + (1 if m.norm == "pre" else 0)) * D if m.norm != "none" else 0
    norms += 2 * hd * len(kinds) if m.qk_norm else 0  # per-head q and k norms
    return Counts(
        embedding=m.vocab_size * D,
        attention=attn * len(kinds),
        mlp=n_dense * dense_mlp + n_moe * moe_total,
        norms=norms,
        output=0 if m.tie_embeddings else D * m.vocab_size,
        active_mlp=n_dense * dense_mlp + n_moe * moe_active,
    )


def forward_flops(m: ModelConfig, moe: MoEConfig, seq_len: int) -> dict[str, int]:
    """Matmul FLOPs of one forward pass over one sequence, by component (active experts only)."""
    T, D, hd = seq_len, m.d_model, m.head_dim
    kinds = _applied_kinds(m, moe)
    n_moe = kinds.count("moe")
    n_dense = len(kinds) - n_moe
    expert_ff = moe.d_ff or m.d_ff
    per_token_moe = (moe.top_k + moe.n_shared) * _mlp_matrices(m) * D * expert_ff + D * moe.n_experts
    return {
        "attention_projections": len(kinds) * 2 * T * D * hd * (2 * m.n_heads + 2 * m.n_kv_heads),
        "attention_scores": len(kinds) * 2 * 2 * T * T * m.n_heads * hd,
        "mlp": n_dense * 2 * T * _mlp_matrices(m) * D * m.d_ff + n_moe * 2 * T * per_token_moe,
        "lm_head": 2 * T * D * m.vocab_size,
    }


def train_flops_per_step(cfg: Config) -> int:
    """Forward + backward matmul FLOPs of one optimizer step over the global batch."""
    return 3 * sum(forward_flops(cfg.model, cfg.moe, cfg.data.seq_len).values()) * cfg.train.global_batch


def memory_bytes(counts: Counts) -> dict[str, int]:
    """Parameters, gradients and AdamW's two moments, all in f32 or all in bf16 (no activations)."""
    out = {}
    for name, size in (("f32", 4), ("bf16", 2)):
        out[f"params ({name})"] = counts.total * size
        out[f"gradients ({name})"] = counts.total * size
        out[f"adamw moments ({name})"] = 2 * counts.total * size
        out[f"total ({name})"] = 4 * counts.total * size
    return out


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def activation_bytes(cfg: Config) -> int:
    """Activations the backward pass reads, over the global batch, in the compute dtype.

    Per token and layer: the norm inputs and outputs (4 D), q, k, v and the attention output
    ((2 H + 2 K) hd), the softmax probabilities (H T, materialised as the CPU kernel does), and
    the MLP's hidden units (3 F for SwiGLU's gate, up and product, 2 F otherwise; MoE: the active
    experts' plus the router logits); once per sequence position, the final norm input and the
    logits (D + V). Remat changes which of these are kept, not the traffic (it writes them again).
    """
    m, moe = cfg.model, cfg.moe
    T, D, hd = cfg.data.seq_len, m.d_model, m.head_dim
    attention = 2 * D + (2 * m.n_heads + 2 * m.n_kv_heads) * hd + m.n_heads * T
    dense_ffn = 2 * D + _mlp_matrices(m) * m.d_ff
    moe_ffn = 2 * D + _mlp_matrices(m) * (moe.top_k + moe.n_shared) * (moe.d_ff or m.d_ff) + moe.n_experts
    kinds = _applied_kinds(m, moe)
    per_token = sum(attention + (moe_ffn if kind == "moe" else dense_ffn) for kind in kinds) + D + m.vocab_size
    return per_token * cfg.train.global_batch * T * _bytes(m.compute_dtype)


def step_bytes(cfg: Config) -> dict[str, int]:
    """HBM traffic of one AdamW step: what must cross memory at least once.

    Parameters are read by the forward, the backward and the update, and written by the update
    (4 passes); gradients are written and read once (2); AdamW's two moments are read and written
    (4). All three live in the parameter dtype. Activations are written in the forward and read
    in the backward (2 passes over `activation_bytes`).
    """
    P = count_params(cfg.model, cfg.moe).total * _bytes(cfg.model.param_dtype)
    return {"parameters": 4 * P, "gradients": 2 * P, "adamw moments": 4 * P, "activations": 2 * activation_bytes(cfg)}


def roofline(cfg: Config, device: devices.Device) -> dict[str, float]:
    """Step time on one chip bounded by compute or memory, and the tokens/s and MFU it implies."""
    compute_s = train_flops_per_step(cfg) / device.bf16_flops
    memory_s = sum(step_bytes(cfg).values()) / device.hbm_bytes_per_s
    step_s = max(compute_s, memory_s)
    return {"compute_s": compute_s, "memory_s": memory_s, "step_s": step_s,
            "tokens_per_s": cfg.train.global_batch * cfg.data.seq_len / step_s, "mfu": compute_s / step_s}


def roofline_report(cfg: Config, device: devices.Device) -> list[tuple[str, str]]:
    r = roofline(cfg, device)
    moved = step_bytes(cfg)
    rows = [(f"roofline on one {device.name} (batch {cfg.train.global_batch} x {cfg.data.seq_len}, "
             f"{device.bf16_flops / 1e12:g} TFLOP/s bf16, {device.hbm_bytes_per_s / 1e9:g} GB/s)", "")]
    rows.append(("  train FLOPs per step", f"{train_flops_per_step(cfg):,}"))
    rows += [(f"  bytes moved: {k}", f"{v / 1e9:,.4g} GB") for k, v in moved.items()]
    rows += [
        ("  compute time", f"{r['compute_s'] * 1e3:,.5g} ms"),
        ("  memory time", f"{r['memory_s'] * 1e3:,.5g} ms"),
        ("  step time (" + ("compute" if r["compute_s"] >= r["memory_s"] else "memory") + "-bound)",
         f"{r['step_s'] * 1e3:,.5g} ms"),
        ("  tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("  MFU at that step time", f"{r['mfu']:.1%}"),
    ]
    if cfg.model.compute_dtype != "bfloat16":
        rows.append((f"  (peak is bf16; this config computes in {cfg.model.compute_dtype})", ""))
    return rows


def prunable_sizes(cfg: Config) -> list[int]:
    """Sizes of the matrices prune.targets selects, one per matrix per block of parameters (attention
    in every layer, the MLP in dense layers; MoE experts are not pruned)."""
    m = cfg.model
    D, hd, H, K, F = m.d_model, m.head_dim, m.n_heads, m.n_kv_heads, m.d_ff
    size = {"q": D * H * hd, "k": D * K * hd, "v": D * K * hd, "o": H * hd * D,
            "gate": D * F if m.mlp == "swiglu" else 0, "up": D * F, "down": F * D}
    kinds = _layer_kinds(m, cfg.moe)
    out = []
    for kind in kinds:
        out += [size[t] for t in cfg.prune.targets if size[t] and (t in "qkvo" or kind == "dense")]
    return out


def pruned_count(cfg: Config) -> int:
    """Weights a prune config sets to zero at its final sparsity: round(s * n) per matrix of each layer,
    or of them all (global); nm: (m - n) of every m."""
    p, sizes = cfg.prune, prunable_sizes(cfg)
    if p.method == "nm":
        return sum(n * (p.m - p.n) // p.m for n in sizes)
    if p.scope == "global":
        return round(p.sparsity * sum(sizes))
    return sum(round(p.sparsity * n) for n in sizes)


def structured_model(cfg: Config) -> ModelConfig:
    """The model config `jaxlm prune` gives with prune.method ffn or heads (each layer keeps the same number)."""
    m, s = cfg.model, cfg.prune.sparsity
    if cfg.prune.method == "ffn":
        return dataclasses.replace(m, d_ff=m.d_ff - round(s * m.d_ff))
    g, k = m.n_heads // m.n_kv_heads, m.n_kv_heads - round(s * m.n_kv_heads)
    return dataclasses.replace(m, n_heads=k * g, n_kv_heads=k, d_head=m.head_dim)


def pruning_report(cfg: Config, total: int) -> list[tuple[str, str]]:
    p = cfg.prune
    if p.masked:
        sizes, pruned = prunable_sizes(cfg), pruned_count(cfg)
        how = f"{p.n}:{p.m}" if p.method == "nm" else f"magnitude {p.sparsity:g} ({p.scope})"
        return [(f"pruning ({how})", ""), ("  prunable weights", f"{sum(sizes):,}"), ("  pruned", f"{pruned:,}"),
                ("  sparsity of the pruned matrices", f"{pruned / max(sum(sizes), 1):.4f}"),
                ("  effective parameters", f"{total - pruned:,}")]
    if p.method in ("ffn", "heads"):
        small = structured_model(cfg)
        shape = f"d_ff {small.d_ff}" if p.method == "ffn" else f"{small.n_heads} heads, {small.n_kv_heads} kv"
        return [(f"pruning ({p.method} {p.sparsity:g}: {shape})", ""),
                ("  parameters after jaxlm prune", f"{count_params(small, cfg.moe).total:,}")]
    return []


def report(cfg: Config, device: devices.Device | None = None) -> str:
    m, moe = cfg.model, cfg.moe
    c = count_params(m, moe)
    flops = forward_flops(m, moe, m.max_seq_len)
    rows = [
        ("parameters", ""),
        ("  embedding", f"{c.embedding:,}"),
        ("  attention", f"{c.attention:,}"),
        ("  mlp" + (" (all experts + routers)" if moe.n_experts else ""), f"{c.mlp:,}"),
        ("  norms", f"{c.norms:,}"),
        ("  lm head", f"{c.output:,}" + (" (tied)" if m.tie_embeddings else "")),
        ("  total" + (f" (unique: {m.n_layers} blocks, each applied {m.share_blocks} times)"
                      if m.share_blocks > 1 else ""), f"{c.total:,}"),
    ]
    if moe.n_experts:
        rows.append(("  active per token", f"{c.active:,}"))
    rows += pruning_report(cfg, c.total)
    rows.append((f"forward FLOPs per sequence (T={m.max_seq_len}"
                 + (f", {m.n_layers * m.share_blocks} layers applied)" if m.share_blocks > 1 else ")"), ""))
    rows += [(f"  {k}", f"{v:,}") for k, v in flops.items()]
    rows.append(("  total", f"{sum(flops.values()):,}"))
    rows.append(("memory", ""))
    rows += [(f"  {k}", f"{v / 2**30:,.2f} GiB") for k, v in memory_bytes(c).items()]
    batch = f"{cfg.train.global_batch} x {cfg.data.seq_len}, {m.compute_dtype}"
    rows.append((f"  activations for backward ({batch})", f"{activation_bytes(cfg) / 2**30:,.2f} GiB"))
    if device is not None:
        rows += roofline_report(cfg, device)
    width = max(len(k) for k, v in rows if v) + 2
    return "\n".join(f"{k:<{width}}{v:>24}" if v else k for k, v in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=48")
    parser.add_argument("--device", help="add a roofline estimate of the step time on one chip: "
                                         + ", ".join(d.name for d in devices.DEVICES))


def main(args: argparse.Namespace) -> int:
    device = devices.by_name(args.device) if args.device else None
    print(report(load_config(args.config, args.overrides), device))
    return 0
