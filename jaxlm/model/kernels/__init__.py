"""The backend-specific kernels behind one seam: attention and dense projections.

The model says *what* to compute (`attention(q, k, v, mask, impl)`, `project(x, w, impl)`); this
package says *how* on each backend. Each kernel family has a plain reference (`xla`: the textbook
formula, autodiff's gradient) that every other implementation is tested against on CPU.

  model.attention_impl  auto | xla | cpu | cudnn | pallas_gpu | splash
  model.projection_impl auto | xla | cpu
  model.gmm_impl        auto | ragged_dot | pallas_gpu | megablox   (MoE's dropless grouped matmul)
  model.scan_layers     auto | true | false (not a kernel, but a per-backend choice of the same kind)

`auto` picks per platform (`AUTO`): the hand-tuned XLA:CPU kernels on CPU, cuDNN flash attention
on GPU (the deterministic Pallas kernel when train.deterministic is on), splash attention on TPU;
MoE's grouped matmul in Pallas on GPU (XLA:GPU expands `ragged_dot` into a dense dot over all
experts) and megablox on TPU.
`resolve()` turns the config's choice into a concrete one for the devices a run compiles for (so
`jaxlm compile --topology v5p:...` on a CPU machine picks the TPU kernel) and refuses a kernel the
platform lacks. The kernels live beside this file: `cpu.py`, `flash.py` (cuDNN, Triton and splash
attention) and `gmm_gpu.py`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlm.model.kernels.cpu import cpu_attention, cpu_matmul

# kernel -> the platforms it runs on
ATTENTION_IMPLS = {"xla": ("cpu", "gpu", "tpu"), "cpu": ("cpu", "gpu", "tpu"), "cudnn": ("gpu",),
                   "pallas_gpu": ("gpu",), "splash": ("tpu",)}
PROJECTION_IMPLS = {"xla": ("cpu", "gpu", "tpu"), "cpu": ("cpu", "gpu", "tpu")}
GMM_IMPLS = {"ragged_dot": ("cpu", "gpu", "tpu"), "pallas_gpu": ("gpu",), "megablox": ("tpu",)}
AUTO = {
    "attention_impl": {"cpu": "cpu", "gpu": "cudnn", "tpu": "splash"},
    "projection_impl": {"cpu": "cpu", "gpu": "xla", "tpu": "xla"},
    "gmm_impl": {"cpu": "ragged_dot", "gpu": "pallas_gpu", "tpu": "megablox"},
    "scan_layers": {"cpu": True, "gpu": False, "tpu": True},
}
DETERMINISTIC_AUTO = {"attention_impl": {"gpu": "pallas_gpu"}}  # cuDNN's backward uses atomics
NOT_DETERMINISTIC = {"attention_impl": {"cudnn"}}
# the multiple a grouped-matmul kernel's expert matrix sides must be: its tiles (megablox uses one
# tiling for K and N, forward and backward; Triton's smallest dot is 16)
GMM_SIDE_MULTIPLE = {"megablox": 128, "pallas_gpu": 16}
IMPLS = {"attention_impl": ATTENTION_IMPLS, "projection_impl": PROJECTION_IMPLS, "gmm_impl": GMM_IMPLS}


def resolve(model_cfg, platform: str, deterministic: bool = False, seq_len: int | None = None):
    """The model config with every `auto` kernel replaced by the platform's choice; a kernel that
    does not run on `platform`, or is not deterministic where that was asked for, is a one-line
    ConfigError. A flash kernel that cannot tile `seq_len` (training's) gives way to xla, with a
    warning, so the resolved config names the kernel that runs."""
    from jaxlm.errors import ConfigError
    from jaxlm.model.kernels import flash

    changes = {}
    for key, table in IMPLS.items():
        impl = getattr(model_cfg, key)
        if impl == "auto":
            auto = {**AUTO[key], **(DETERMINISTIC_AUTO.get(key, {}) if deterministic else {})}
            changes[key] = auto.get(platform, auto["cpu"])
        elif deterministic and impl in NOT_DETERMINISTIC.get(key, ()) and platform in table[impl]:
            raise ConfigError(f"model.{key}={impl!r} is not deterministic (its backward uses atomics); use auto or "
                              "pallas_gpu, or set train.deterministic=false")
        elif impl not in table:
            raise ConfigError(f"model.{key}={impl!r} is unknown; expected auto or one of {'|'.join(table)}")
        elif platform not in table[impl]:
            ok = [name for name, platforms in table.items() if platform in platforms]
            raise ConfigError(f"model.{key}={impl!r} needs a {' or '.join(table[impl]).upper()} backend, but this "
                              f"run's devices are {platform.upper()}; use auto or one of {'|'.join(ok)}")
    impl = changes.get("attention_impl", model_cfg.attention_impl)
    if seq_len and (why := flash.unsupported(impl, seq_len, seq_len, model_cfg.head_dim)):
        changes["attention_impl"] = _fallback(impl, "xla", why)
    if model_cfg.scan_layers == "auto":
        changes["scan_layers"] = AUTO["scan_layers"].get(platform, AUTO["scan_layers"]["cpu"])
    return dataclasses.replace(model_cfg, **changes)


def concrete(impl, key: str):
    """A config choice made concrete for the default backend (a model used outside a Trainer)."""
    return AUTO[key].get(jax.default_backend(), AUTO[key]["cpu"]) if impl == "auto" else impl


_WARNED: set[str] = set()


def _fallback(impl: str, instead: str, why: str, kind: str = "attention") -> str:
    """Says once (per reason) that a kernel cannot express this case and which one runs instead."""
    line = f"jaxlm: warning: {kind} kernel {impl} cannot express {why}; using {instead} for it"
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr)
    return instead


# ----------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, in the form flash kernels take (causal flag, segment ids)
    rather than a dense [T, S] matrix. Query row t is at key index t + (S - T) (a decode step's
    queries are the last T of the S cached positions); `kv_valid_BS` masks unwritten cache slots.
    With `q_positions_BT` (decoding over a KV cache whose slot s holds position s), query t of
    row b is instead at key index q_positions_BT[b, t], so rows may be at different lengths.
    """

    causal: bool
    segment_ids_BT: jax.Array | None = None  # query segments; keys share them when S == T
    kv_segment_ids_BS: jax.Array | None = None
    kv_valid_BS: jax.Array | None = None
    q_positions_BT: jax.Array | None = None

    def dense(self, T: int, S: int) -> jax.Array:
        """Boolean [B or 1, T, S]: True where query t may attend to key s."""
        mask = jnp.ones((1, T, S), bool)
        if self.causal and self.q_positions_BT is not None:
            mask = jnp.arange(S)[None, None, :] <= self.q_positions_BT[:, :, None]
        elif self.causal:
            mask = jnp.tril(mask, k=S - T)
        if self.segment_ids_BT is not None:
            kv = self.segment_ids_BT if self.kv_segment_ids_BS is None else self.kv_segment_ids_BS
            mask = mask & (self.segment_ids_BT[:, :, None] == kv[:, None, :])
        if self.kv_valid_BS is not None:
            mask = mask & self.kv_valid_BS[:, None, :]
        return mask


def attention_mask(T: int, causal: bool, segment_ids_BT: jax.Array | None) -> jax.Array:
    """Dense boolean mask [B or 1, T, T] of self-attention over T tokens."""
    return AttentionMask(causal, segment_ids_BT).dense(T, T)


# ----------------------------------------------------------------------------- attention


def attention(q_BTKGd, k_BSKd, v_BSKd, mask: AttentionMask, impl: str = "auto",
              dropout: tuple[float, jax.Array | None] = (0.0, None)) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over the keys `mask` allows; returns [B, T, K, G, d].

    Queries come grouped by the kv head they share (G = H / K), so K/V are never repeated.
    `dropout` = (rate, key) drops attention probabilities (training only: key None = off).
    """
    from jaxlm.model.kernels import flash

    impl = concrete(impl, "attention_impl")
    T, S = q_BTKGd.shape[1], k_BSKd.shape[1]
    if dropout[0] > 0 and dropout[1] is not None:
        if impl != "xla":
            impl = _fallback(impl, "xla", "dropout of attention probabilities (model.attention_dropout)")
        return reference_attention(q_BTKGd, k_BSKd, v_BSKd, mask, dropout)
    if impl in ("cudnn", "pallas_gpu", "splash") and (mask.kv_valid_BS is not None or T != S
                                                     or mask.kv_segment_ids_BS is not None):
        impl = _fallback(impl, "xla", "a decode step's cache mask")
    if impl == "cudnn" and mask.segment_ids_BT is not None:
        impl = _fallback(impl, "pallas_gpu", "segment ids (packed documents)")
    if why := flash.unsupported(impl, T, S, q_BTKGd.shape[-1]):
        impl = _fallback(impl, "xla", why)
    if impl == "xla":
        return reference_attention(q_BTKGd, k_BSKd, v_BSKd, mask)
    if impl == "cpu":
        return cpu_attention(q_BTKGd, k_BSKd, v_BSKd, mask.dense(T, S))
    if impl == "cudnn":
        return flash.cudnn_attention(q_BTKGd, k_BSKd, v_BSKd, mask.causal)
    if impl == "pallas_gpu":
        return flash.pallas_gpu_attention(q_BTKGd, k_BSKd, v_BSKd, mask.causal, mask.segment_ids_BT)
    if impl == "splash":
        return flash.splash_attention(q_BTKGd, k_BSKd, v_BSKd, mask.causal, mask.segment_ids_BT)
    raise ValueError(f"unknown attention impl {impl!r}")


def reference_attention(q_BTKGd, k_BSKd, v_BSKd, mask: AttentionMask, dropout=(0.0, None)) -> jax.Array:
    """The textbook formula in f32 with autodiff's gradient: the reference for every kernel."""
    from jaxlm.model.ops import dropout as drop

    d = q_BTKGd.shape[-1]
    s = jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, k_BSKd, preferred_element_type=jnp.float32) / math.sqrt(d)
    allowed = mask.dense(q_BTKGd.shape[1], k_BSKd.shape[1])[:, None, None]
    p = drop(jax.nn.softmax(jnp.where(allowed, s, jnp.finfo(jnp.float32).min), axis=-1), *dropout)
    return jnp.einsum("bkgts,bskd->btkgd", p.astype(v_BSKd.dtype), v_BSKd)


# ----------------------------------------------------------------------------- projections


def project(x: jax.Array, w: jax.Array, n_in: int = 1, impl: str = "auto") -> jax.Array:
    """x [..., *in] @ w [*in, *out], contracting x's last n_in dims with w's first n_in, as one
    2-D matmul."""
    if hasattr(w, "project"):  # a weight-only quantized matrix (jaxlm/compress/quantize.py)
        return w.project(x, n_in)
    lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    out = w.shape[n_in:]
    matmul = cpu_matmul if concrete(impl, "projection_impl") == "cpu" else jnp.matmul
    return matmul(x.reshape(-1, k), w.reshape(k, -1)).reshape(*lead, *out)


# ----------------------------------------------------------------------------- grouped matmul


def grouped_matmul(x_MK, w_GKN, sizes_G, impl: str = "auto", interpret: bool = False) -> jax.Array:
    """Rows sorted by group (sizes_G rows each) times their group's matrix: [M, N], with the rows
    past sum(sizes_G) zero. MoE's dropless experts: one matmul for all experts, no capacity."""
    from jaxlm.model.kernels import gmm_gpu

    impl = concrete(impl, "gmm_impl")
    (M, K), N = x_MK.shape, w_GKN.shape[-1]
    multiple = GMM_SIDE_MULTIPLE.get(impl, 1)
    if K % multiple or N % multiple:
        impl = _fallback(impl, "ragged_dot", f"expert matrices whose sides are not multiples of {multiple}",
                         "grouped matmul")
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x_MK, w_GKN, sizes_G)
    if impl == "pallas_gpu":
        return gmm_gpu.grouped_matmul(x_MK, w_GKN, sizes_G, interpret=interpret)
    from jax.experimental.pallas.ops.tpu.megablox import ops

    # megablox leaves rows past the last group unwritten (and their gradient): select them away
    used = (jnp.arange(M) < jnp.sum(sizes_G))[:, None]
    tiling = (128 if M % 128 == 0 else M, 128, 128)  # Mosaic tiles: multiples of 128 or a whole dim
    out = ops.gmm(jnp.where(used, x_MK, 0), w_GKN, sizes_G, x_MK.dtype, tiling, interpret=interpret)
    return jnp.where(used, out, 0)
