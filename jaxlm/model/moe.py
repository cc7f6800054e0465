"""Mixture-of-Experts feed-forward: router, dispatch/combine, experts, aux losses, expert parallelism.

Letters beyond DESIGN.md's: K = top-k choices, N = tokens (flattened B*T, or one device's share),
S = token-slots (N*K), G = experts held by one device, P = devices along the expert axis, M = rows.

Slot order: slot s = k*N + n (choice rank major). In the *dropping* path this is the priority
order for the capacity C = ceil(capacity_factor * N * K / E) of each expert: every token's first
choice claims a slot before any second choice (GShard), and within a rank earlier tokens go first.
A slot past capacity skips its expert (contributes 0; the residual carries the token). The
*dropless* path sorts slots by expert and runs one grouped matmul (`lax.ragged_dot`); on CPU XLA
lowers ragged_dot to a masked dense matmul against every expert (E times the expert FLOPs, about
2.5-3x the dense step of bench/moe_throughput.py), so `dropping` is the fast path there.

Padding (packed rows' segment id 0, given as `valid_BT` False) takes no part: it is left out of the
router losses and metrics, claims no capacity, and capacity is reckoned from the real tokens, so
a packed batch's real tokens get exactly what the same batch without its padding would give.

Routing and the aux losses run on the global batch (GSPMD), so they do not depend on the mesh.
Dispatch, experts and combine run per device inside `shard_map`: tokens travel to the devices
that hold their experts over the `expert` mesh axes and back (all-to-all). Capacity is per
device's tokens (a GShard "group"), so when tokens are dropped, which ones depends on the mesh.
Expert weights are sharded by the rules' "expert" (E) and "expert_mlp" (F, partial sums psum'd);
"embed" is gathered. If the tokens cannot be split over the expert axes, experts are replicated.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.model.kernels import grouped_matmul
from jaxlm.model.layers import MLP, weight
from jaxlm.model.lora import PREFIX, add_adapters
from jaxlm.model.ops import dtype_of
from jaxlm.parallel.sharding import active_mesh_rules, spec_for

# Use `ragged_all_to_all` for dropless expert parallelism where XLA implements it (not XLA:CPU).
# None = decide from the backend; tests set it to exercise the path with an emulated collective.
USE_RAGGED_A2A: bool | None = None
RAGGED_A2A = jax.lax.ragged_all_to_all


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, rngs: nnx.Rngs, lora=None):
        pdt = dtype_of(cfg.param_dtype)
        E, D, F = moe.n_experts, cfg.d_model, moe.d_ff or cfg.d_ff
        self.moe, self.kind, self.compute_dtype = moe, cfg.mlp, dtype_of(cfg.compute_dtype)
        self.gmm_impl = cfg.gmm_impl
        self.router_DE = weight(rngs, (D, E), ("embed", None), D, pdt)  # tiny: replicated over experts
        if cfg.mlp == "swiglu":
            self.w_gate_EDF = weight(rngs, (E, D, F), ("expert", "embed", "expert_mlp"), D, pdt)
        self.w_up_EDF = weight(rngs, (E, D, F), ("expert", "embed", "expert_mlp"), D, pdt)
        self.w_down_EFD = weight(rngs, (E, F, D), ("expert", "expert_mlp", "embed"), F, pdt)
        # n shared experts == one MLP with n*F hidden units (the activation is per unit)
        self.shared = MLP(cfg, moe.n_shared * F, rngs, lora) if moe.n_shared else None
        if moe.shared_gate:  # Qwen2-MoE: the shared experts' output times sigmoid(w . x), per token
            self.shared_gate_D = weight(rngs, (D,), ("embed",), D, pdt)
        add_adapters(self, lora, rngs, experts=True)
        self.lora_scale = lora.scale if lora is not None and lora.experts else 0.0

    def __call__(self, x_BTD: jax.Array, rng: jax.Array | None = None,
                 valid_BT: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """(output, aux); `valid_BT` (bool) marks real tokens, None = all are (padding gets no expert)."""
        moe = self.moe
        B, T, D = x_BTD.shape
        logits_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), self.router_DE[...].astype(jnp.float32))
        idx_BTK, gate_BTK, aux = route(logits_BTE, moe, rng, valid_BT)
        ws = {k: getattr(self, k)[...].astype(self.compute_dtype)
              for k in ("w_gate_EDF", "w_up_EDF", "w_down_EFD") if hasattr(self, k)}
        for k in list(ws):  # LoRA adapters of the experts: "<weight>/a" [E, in, R], "<weight>/b" [E, R, out]
            if hasattr(self, PREFIX + k):
                adapter = getattr(self, PREFIX + k)
                ws[k + "/a"], ws[k + "/b"] = (getattr(adapter, ab)[...].astype(self.compute_dtype) for ab in "ab")
        valid_N = None if valid_BT is None else valid_BT.reshape(B * T)
        out_ND, keep_NK = run_experts(x_BTD.reshape(B * T, D), idx_BTK.reshape(B * T, -1),
                                      gate_BTK.reshape(B * T, -1), ws, moe,
                                      ExpertMLP(self.kind, self.gmm_impl, self.lora_scale), valid_N)
        served = keep_NK.astype(jnp.float32)
        dropped = 1.0 - (jnp.mean(served) if valid_N is None else token_mean(jnp.mean(served, axis=-1), valid_N))
        aux["moe_dropped_frac"] = jax.lax.stop_gradient(dropped)
        out_BTD = out_ND.reshape(B, T, D)
        if self.shared is not None:
            shared_BTD = self.shared(x_BTD, rng)[0]
            if self.moe.shared_gate:
                w_D = self.shared_gate_D[...].astype(self.compute_dtype)
                shared_BTD = jax.nn.sigmoid(jnp.einsum("btd,d->bt", x_BTD, w_D))[..., None] * shared_BTD
            out_BTD = out_BTD + shared_BTD
        return out_BTD, aux


def token_mean(a_BT, valid_BT=None):
    """Mean over the leading token dimensions of `a` (as many as `valid` has; all of them when
    valid is None), counting only the tokens where `valid` is True."""
    if valid_BT is None:
        return jnp.mean(a_BT, axis=(0, 1))
    w = valid_BT.astype(jnp.float32).reshape(valid_BT.shape + (1,) * (a_BT.ndim - valid_BT.ndim))
    axes = tuple(range(valid_BT.ndim))
    return jnp.sum(a_BT * w, axis=axes) / jnp.maximum(jnp.sum(w), 1.0)


def route(logits_BTE: jax.Array, moe: MoEConfig, rng, valid_BT=None) -> tuple[jax.Array, jax.Array, dict]:
    """Top-k experts per token, their gates (f32; renormalised to sum 1 if moe.norm_topk_prob), and
    the router losses/metrics.

    aux: moe_aux_loss = E * sum_e f_e * P_e (Switch), f_e = share of token-slots routed to e,
    P_e = mean router probability of e (sigmoid scores normalised per token); moe_z_loss =
    mean logsumexp(logits)^2 (ST-MoE, on the noise-free logits); moe_max_share / moe_min_share =
    max / min over experts of E * f_e (1.0 = perfectly balanced). Means are over the tokens
    `valid_BT` marks (None: all).
    """
    E, K = logits_BTE.shape[-1], moe.top_k
    clean_BTE = logits_BTE
    if rng is not None and moe.noise_std > 0:  # noisy top-k: explore experts during training
        logits_BTE = logits_BTE + moe.noise_std * jax.random.normal(rng, logits_BTE.shape, logits_BTE.dtype)
    if moe.router == "softmax":
        scores_BTE = probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    else:
        scores_BTE = jax.nn.sigmoid(logits_BTE)
        probs_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)
    top_BTK, idx_BTK = jax.lax.top_k(scores_BTE, K)
    gate_BTK = top_BTK / jnp.sum(top_BTK, axis=-1, keepdims=True) if moe.norm_topk_prob else top_BTK
    f_E = token_mean(jnp.sum(jax.nn.one_hot(idx_BTK, E, dtype=jnp.float32), axis=-2), valid_BT) / K
    P_E = token_mean(probs_BTE, valid_BT)
    share_E = jax.lax.stop_gradient(E * f_E)
    aux = {
        "moe_aux_loss": E * jnp.sum(f_E * P_E),
        "moe_z_loss": token_mean(jax.nn.logsumexp(clean_BTE, axis=-1) ** 2, valid_BT),
        "moe_max_share": jnp.max(share_E),
        "moe_min_share": jnp.min(share_E),
    }
    return idx_BTK, gate_BTK, aux


# ----------------------------------------------------------------------------- placement


class ExpertMLP(NamedTuple):
    activation: str  # model.mlp: swiglu | silu | gelu
    gmm_impl: str  # the dropless path's grouped-matmul kernel (model.gmm_impl)
    lora_scale: float = 0.0  # alpha / rank of the experts' LoRA adapters (ws "<weight>/a", "/b")


def run_experts(x_ND, idx_NK, gate_NK, ws: dict, moe: MoEConfig, kind: ExpertMLP,
                valid_N=None) -> tuple[jax.Array, jax.Array]:
    """Routed expert output [N, D] and which slots were served [N, K]; per device under a mesh.
    `valid_N` (bool, None = all) marks real tokens: padding is never served."""
    active = active_mesh_rules()
    if active is None or active[0].size == 1:
        return _local(x_ND, idx_NK, gate_NK, ws, moe, kind, (), 1, (), valid_N)
    mesh, rules = active
    E, D, F = ws["w_up_EDF"].shape
    w_spec = spec_for((E, D, F), ("expert", None, "expert_mlp"), mesh, rules)
    ep_axes, tp_axes = _axes(w_spec[0]), _axes(w_spec[2])
    # tokens are whole on every tensor-parallel device (each holds a slice of every expert's F)
    tok_axes = tuple(a for a in _axes(spec_for((x_ND.shape[0], D), ("batch", None), mesh, rules)[0])
                     if a not in tp_axes)
    if not set(ep_axes) <= set(tok_axes):  # too few tokens to split over the expert axes: no EP
        ep_axes, w_spec = (), PartitionSpec(None, None, w_spec[2])
    if not (ep_axes or tp_axes or tok_axes):
        return _local(x_ND, idx_NK, gate_NK, ws, moe, kind, (), 1, (), valid_N)
    tok = PartitionSpec(tok_axes or None, None)
    w_specs = _weight_specs(ws, w_spec)
    ep_size = math.prod(mesh.shape[a] for a in ep_axes)

    def body(x, idx, gate, w, *valid):
        return _local(x, idx, gate, w, moe, kind, ep_axes, ep_size, tp_axes, *valid)

    args, specs = (x_ND, idx_NK, gate_NK, ws), (tok, tok, tok, w_specs)
    if valid_N is not None:
        args, specs = args + (valid_N,), specs + (PartitionSpec(tok_axes or None),)
    # check_vma off: Pallas kernels inside (megablox) do not declare how outputs vary over the mesh
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tok, tok), check_vma=False)(*args)


def _weight_specs(ws: dict, w_spec: PartitionSpec) -> dict:
    """Per-device specs of the expert weights (E over the expert axes, F over tensor) and of their
    LoRA factors (the rank axis whole; A of gate/up and B of down need no F)."""
    E, _, F = w_spec
    specs = {"w_gate_EDF": w_spec, "w_up_EDF": w_spec, "w_down_EFD": PartitionSpec(E, F, None),
             "w_gate_EDF/a": PartitionSpec(E, None, None), "w_up_EDF/a": PartitionSpec(E, None, None),
             "w_gate_EDF/b": PartitionSpec(E, None, F), "w_up_EDF/b": PartitionSpec(E, None, F),
             "w_down_EFD/a": PartitionSpec(E, F, None), "w_down_EFD/b": PartitionSpec(E, None, None)}
    return {k: specs[k] for k in ws}


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _local(x_ND, idx_NK, gate_NK, ws, moe, kind, ep_axes, P, tp_axes, valid_N=None):
    """One device's tokens against all experts; ws holds this device's G = E / P experts."""
    N, K = idx_NK.shape
    G = ws["w_up_EDF"].shape[0]
    E = G * P
    e_S = idx_NK.T.reshape(-1)  # slot s = k*N + n
    tok_S = jnp.tile(jnp.arange(N, dtype=jnp.int32), K)
    valid_S = None if valid_N is None else jnp.tile(valid_N, K)
    ep = ep_axes[0] if len(ep_axes) == 1 else ep_axes
    mlp = lambda rows, sizes: _psum(_ragged_mlp(rows, ws, sizes, kind), tp_axes)
    if moe.impl == "dropping":
        C = math.ceil(moe.capacity_factor * N * K / E)
        y_SD, keep_S = _dropping(x_ND, e_S, tok_S, E, C, lambda x: _psum(_batched_mlp(x, ws, kind), tp_axes), ep, P,
                                 valid_S, moe.capacity_factor)
    elif P == 1:
        if valid_S is not None:  # padding sorts after every expert's rows: not computed, output 0
            e_S = jnp.where(valid_S, e_S, E)
        order_S = jnp.argsort(e_S, stable=True)
        y_sorted = mlp(x_ND[tok_S[order_S]], jnp.bincount(e_S, length=E).astype(jnp.int32))
        y_SD = _unsort(y_sorted, order_S)
        keep_S = jnp.ones(e_S.shape, bool) if valid_S is None else valid_S
    else:
        ragged = USE_RAGGED_A2A if USE_RAGGED_A2A is not None else jax.default_backend() in ("gpu", "tpu")
        y_SD = _dropless_ep(x_ND, e_S, tok_S, G, P, mlp, ep, ragged)
        keep_S = jnp.ones(e_S.shape, bool) if valid_S is None else valid_S
    y_KND = y_SD.reshape(K, N, -1)
    out_ND = jnp.einsum("knd,nk->nd", y_KND, gate_NK.astype(y_KND.dtype))
    return out_ND, keep_S.reshape(K, N).T


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def _unsort(y_sorted, order_S):
    inv_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(order_S.shape[0], dtype=order_S.dtype))
    return y_sorted[inv_S]


# ----------------------------------------------------------------------------- expert MLPs


def _act(kind, gate, up):
    if kind == "swiglu":
        return jax.nn.silu(gate) * up
    return jax.nn.silu(up) if kind == "silu" else jax.nn.gelu(up)


def _batched_mlp(x_GMD, ws, kind):
    """Every local expert on its own [M, D] rows (capacity buffers). F may be a tensor shard."""
    def mm(x, w):  # x @ w per expert, plus its LoRA update where it has one
        y = jnp.einsum("gmi,gio->gmo", x, ws[w])
        if w + "/a" not in ws:
            return y
        h = jnp.einsum("gmi,gir->gmr", x, ws[w + "/a"])
        return y + kind.lora_scale * jnp.einsum("gmr,gro->gmo", h, ws[w + "/b"])

    act = kind.activation
    up = mm(x_GMD, "w_up_EDF")
    gate = mm(x_GMD, "w_gate_EDF") if act == "swiglu" else None
    return mm(_act(act, gate, up), "w_down_EFD")


def _ragged_mlp(x_MD, ws, sizes_G, kind):
    """Rows sorted by local expert, sizes_G rows each; rows past sum(sizes_G) come out 0."""
    def gmm(x, w):  # grouped x @ w, plus its LoRA update where it has one
        y = grouped_matmul(x, ws[w], sizes_G, kind.gmm_impl)
        if w + "/a" not in ws:
            return y
        h = grouped_matmul(x, ws[w + "/a"], sizes_G, kind.gmm_impl)
        return y + kind.lora_scale * grouped_matmul(h, ws[w + "/b"], sizes_G, kind.gmm_impl)

    act = kind.activation
    up = gmm(x_MD, "w_up_EDF")
    gate = gmm(x_MD, "w_gate_EDF") if act == "swiglu" else None
    return gmm(_act(act, gate, up), "w_down_EFD")


# ----------------------------------------------------------------------------- dispatch / combine


def _dropping(x_ND, e_S, tok_S, E, C, mlp, ep, P, valid_S=None, capacity_factor=1.0):
    """GShard dispatch into [E, C, D] capacity buffers (as gathers, not one-hot einsums).
    With `valid_S`, padding slots take no place in the queue and the capacity is that of the real
    tokens, ceil(capacity_factor * real slots / E) (the buffers keep their static size C)."""
    N, D = x_ND.shape
    onehot_SE = jax.nn.one_hot(e_S, E, dtype=jnp.int32)
    if valid_S is not None:
        onehot_SE = onehot_SE * valid_S[:, None].astype(jnp.int32)
    pos_S = jnp.sum((jnp.cumsum(onehot_SE, axis=0) - 1) * onehot_SE, axis=-1)  # rank within expert
    if valid_S is None:
        keep_S = pos_S < C
    else:
        slots = jnp.sum(valid_S.astype(jnp.int32)).astype(jnp.float32)
        keep_S = valid_S & (pos_S < jnp.minimum(jnp.ceil(capacity_factor * slots / E).astype(jnp.int32), C))
    dest_S = jnp.where(keep_S, e_S * C + pos_S, E * C)  # E*C: a discard row
    src_M = jnp.full((E * C + 1,), N, jnp.int32).at[dest_S].set(tok_S)[: E * C]  # N: empty slot
    x_pad = jnp.concatenate([x_ND, jnp.zeros((1, D), x_ND.dtype)])
    x_ECD = x_pad[src_M].reshape(E, C, D)
    if P > 1:  # [P dest, G, C, D] -> [P src, G, C, D]: each device gets its experts' buffers
        x_PGCD = jax.lax.all_to_all(x_ECD.reshape(P, E // P, C, D), ep, 0, 0)
        y_GPCD = mlp(jnp.swapaxes(x_PGCD, 0, 1).reshape(E // P, P * C, D)).reshape(E // P, P, C, D)
        y_ECD = jax.lax.all_to_all(jnp.swapaxes(y_GPCD, 0, 1), ep, 0, 0).reshape(E, C, D)
    else:
        y_ECD = mlp(x_ECD)
    y_pad = jnp.concatenate([y_ECD.reshape(E * C, D), jnp.zeros((1, D), y_ECD.dtype)])
    return y_pad[dest_S], keep_S


def _dropless_ep(x_ND, e_S, tok_S, G, P, mlp, ep, ragged: bool):
    """Dropless expert parallelism. Slots sorted by expert are contiguous per destination device.

    Padded (any backend): a [P, S, D] all-to-all, since all S slots may go to one device.
    Ragged (GPU/TPU): `ragged_all_to_all` sends only the real rows into a [P*S, D] buffer.
    """
    S, D = e_S.shape[0], x_ND.shape[1]
    order_S = jnp.argsort(e_S, stable=True)
    x_sorted = x_ND[tok_S[order_S]]
    sizes_PG = jnp.bincount(e_S, length=G * P).astype(jnp.int32).reshape(P, G)
    count_P = jnp.sum(sizes_PG, axis=1)
    start_P = jnp.cumsum(count_P) - count_P
    recv_sizes_PG = jax.lax.all_to_all(sizes_PG, ep, 0, 0)  # from each source, rows per local expert
    recv_count_P = jnp.sum(recv_sizes_PG, axis=1)
    if ragged:
        recv_off_P = jnp.cumsum(recv_count_P) - recv_count_P  # sources packed back to back
        off_in_dest_P = jax.lax.all_to_all(recv_off_P, ep, 0, 0, tiled=True)
        rows_MD = RAGGED_A2A(x_sorted, jnp.zeros((P * S, D), x_ND.dtype), start_P, count_P, off_in_dest_P,
                             recv_count_P, axis_name=ep)
    else:
        recv_off_P = jnp.arange(P, dtype=jnp.int32) * S
        j_S = jnp.arange(S, dtype=jnp.int32)
        send_PSD = jnp.where((j_S < count_P[:, None])[..., None],
                             x_sorted[jnp.minimum(start_P[:, None] + j_S, S - 1)], 0)
        rows_MD = jax.lax.all_to_all(send_PSD, ep, 0, 0).reshape(P * S, D)
    # local expert of each received row (G = no token), then group rows by it for ragged_dot
    starts_Q = (recv_off_P[:, None] + jnp.cumsum(recv_sizes_PG, axis=1) - recv_sizes_PG).reshape(-1)
    ends_Q = starts_Q + recv_sizes_PG.reshape(-1)
    r_M = jnp.arange(P * S, dtype=jnp.int32)
    q_M = jnp.searchsorted(starts_Q, r_M, side="right") - 1  # last group starting at or before r
    g_M = jnp.where(r_M < ends_Q[q_M], q_M % G, G)
    order_M = jnp.argsort(g_M, stable=True)
    y_MD = _unsort(mlp(rows_MD[order_M], jnp.sum(recv_sizes_PG, axis=0)), order_M)
    if ragged:
        src_start_P = jax.lax.all_to_all(start_P, ep, 0, 0, tiled=True)  # where each source keeps them
        y_sorted = RAGGED_A2A(y_MD, jnp.zeros((S, D), y_MD.dtype), recv_off_P, recv_count_P, src_start_P,
                              count_P, axis_name=ep)
    else:
        back_PSD = jax.lax.all_to_all(y_MD.reshape(P, S, D), ep, 0, 0)
        i_S = jnp.arange(S, dtype=jnp.int32)
        p_S = e_S[order_S] // G
        y_sorted = back_PSD[p_S, i_S - start_P[p_S]]
    return _unsort(y_sorted, order_S)

