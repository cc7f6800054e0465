"""LoRA: a low-rank update beside a projection weight, and the merge that folds it in.

A targeted weight w [*in, *out] (jaxlm's layout: inputs first) gets an adapter `lora_<name>` with
A [*in, R] (drawn like a weight: normal, std 1/sqrt(fan_in)) and B [R, *out] (zero), so the
projection computes

    x @ w + (alpha / R) * (dropout(x) @ A) @ B

and training starts exactly at the base model. A and B carry w's logical axes on their in and out
sides (the rank axis is never sharded), so they are split over the mesh like the weight they
belong to. Leading axes (scanned layers, experts) are kept: A [E, D, R] for an expert weight
[E, D, F]. `merge` returns w + (alpha / R) A @ B, the weight inference and export use.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.model.kernels import project
from jaxlm.model.ops import dropout

PREFIX = "lora_"  # an adapter's attribute: lora_<weight name>, e.g. attn/lora_wq_DHd/{a, b}
# lora.targets -> (weight, its input axes): attention, dense and shared-expert MLPs; routed experts
WEIGHTS = {"q": ("wq_DHd", 1), "k": ("wk_DKd", 1), "v": ("wv_DKd", 1), "o": ("wo_HdD", 2),
           "gate": ("w_gate_DF", 1), "up": ("w_up_DF", 1), "down": ("w_down_FD", 1)}
EXPERT_WEIGHTS = {"gate": "w_gate_EDF", "up": "w_up_EDF", "down": "w_down_EFD"}


class LoRA(nnx.Module):
    def __init__(self, weight: nnx.Param, n_in: int, cfg, rngs: nnx.Rngs, lead: int = 0):
        """An adapter for `weight` whose axes after `lead` leading ones are n_in inputs, then outputs."""
        shape, axes = weight.shape, tuple(weight.get_metadata()["axes"])
        shape = shape[len(shape) - len(axes):]  # without the stacked-layer axis (vmap adds it)
        lead_shape, lead_axes = shape[:lead], axes[:lead]
        in_shape, out_shape = shape[lead: lead + n_in], shape[lead + n_in:]
        in_axes, out_axes = axes[lead: lead + n_in], axes[lead + n_in:]
        R, dtype = cfg.rank, weight.dtype
        std = 1.0 / math.sqrt(math.prod(in_shape))
        a = std * jax.random.normal(rngs.lora(), (*lead_shape, *in_shape, R), jnp.float32)
        self.a = nnx.Param(a.astype(dtype), axes=(*lead_axes, *in_axes, None))
        self.b = nnx.Param(jnp.zeros((*lead_shape, R, *out_shape), dtype), axes=(*lead_axes, None, *out_axes))
        self.scale, self.rate, self.n_in = cfg.scale, cfg.dropout, n_in

    def __call__(self, x, compute_dtype, impl: str = "auto", key=None) -> jax.Array:
        """(alpha / R) (dropout(x) @ A) @ B for x [..., *in] (no leading axes: dense weights)."""
        x = dropout(x, self.rate, key)
        h = project(x, self.a[...].astype(compute_dtype), n_in=self.n_in, impl=impl)
        return project(h, self.b[...].astype(compute_dtype), impl=impl) * jnp.asarray(self.scale, compute_dtype)


def add_adapters(module: nnx.Module, cfg, rngs: nnx.Rngs, experts: bool = False) -> None:
    """Gives `module` an adapter `lora_<weight>` for each of its weights that lora `cfg` targets
    (cfg None or rank 0: none); `experts`: the module's routed-expert weights [E, in, out]."""
    if cfg is None or not cfg.rank or (experts and not cfg.experts):
        return
    for target in cfg.targets:
        name, n_in = (EXPERT_WEIGHTS.get(target), 1) if experts else WEIGHTS[target]
        if name and hasattr(module, name):
            setattr(module, PREFIX + name, LoRA(getattr(module, name), n_in, cfg, rngs, lead=int(experts)))


def adapted(module: nnx.Module, name: str, x, w, n_in: int, compute_dtype, impl: str, key=None) -> jax.Array:
    """x @ w (project) plus the adapter of weight `name` where `module` has one. In float32, without
    dropout and on a plain (not quantized) weight, the update is folded into w for the matmul
    (`merged_project`); in lower precision a small update would round away in w, so it is added."""
    adapter = getattr(module, PREFIX + name, None)
    if adapter is None:
        return project(x, w, n_in=n_in, impl=impl)
    if (adapter.rate and key is not None) or hasattr(w, "project") or w.dtype != jnp.float32:
        y = project(x, w, n_in=n_in, impl=impl)
        return y + adapter(x, compute_dtype, impl, key).astype(y.dtype)
    a, b = adapter.a[...].astype(w.dtype), adapter.b[...].astype(w.dtype)
    return merged_project(x, w, a, b, adapter.scale, n_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def merged_project(x, w, a, b, scale: float, n_in: int) -> jax.Array:
    """x @ (w + scale A @ B), the weight merged once per call ([in, out] from a rank-R product, no
    bigger than w), so the step makes one pass over the activations where x @ w + (x @ A) @ B
    makes three (the two products and the sum) and as many again in the backward. The gradient
    is LoRA's own: dA = scale x^T (g B^T) and dB = scale (x A)^T g never form the [in, out] dW
    (w's gradient, x^T g, is left for XLA to drop when w is frozen)."""
    return _merged_fwd(x, w, a, b, scale, n_in)[0]


def _merged_fwd(x, w, a, b, scale: float, n_in: int):
    k = math.prod(x.shape[x.ndim - n_in:])
    w_KM = (w + scale * delta(a, b, w.shape).astype(w.dtype)).reshape(k, -1)
    y = (x.reshape(-1, k) @ w_KM).reshape(*x.shape[: x.ndim - n_in], *w.shape[n_in:])
    return y, (x, w_KM, a, b)


def _merged_bwd(scale: float, n_in: int, res, g):
    x, w_KM, a, b = res
    (k, m), R = w_KM.shape, a.shape[-1]
    x_NK, g_NM = x.reshape(-1, k), g.reshape(-1, m)
    a_KR, b_RM = a.reshape(k, R), b.reshape(R, m)
    t = lambda p, q: jax.lax.dot_general(p, q, (((0,), (0,)), ((), ())))  # p^T q without a transposed copy
    dx = (g_NM @ w_KM.T).reshape(x.shape)
    da = scale * t(x_NK, g_NM @ b_RM.T)
    db = scale * t(x_NK @ a_KR, g_NM)
    dw = t(x_NK, g_NM).reshape(*a.shape[:-1], *b.shape[1:])
    return dx, dw, da.reshape(a.shape).astype(a.dtype), db.reshape(b.shape).astype(b.dtype)


merged_project.defvjp(_merged_fwd, _merged_bwd)


def is_adapter(path: tuple) -> bool:
    """Whether a parameter path (keys of the pure-dict tree) lies inside an adapter."""
    return any(str(k).startswith(PREFIX) for k in path)


def merge(params: dict, scale: float) -> dict:
    """The tree with every adapter folded into its weight (w + scale * A @ B, computed in f32 and
    cast to w's dtype) and the adapters removed. Works on jax and numpy arrays alike."""
    out = {}
    for key, value in params.items():
        if str(key).startswith(PREFIX):
            continue
        if isinstance(value, dict):
            out[key] = merge(value, scale)
        elif PREFIX + str(key) in params:
            ad = params[PREFIX + str(key)]
            out[key] = value + (scale * delta(ad["a"], ad["b"], value.shape)).astype(value.dtype)
        else:
            out[key] = value
    return out


def delta(a, b, shape: tuple):
    """A @ B over the rank axis, with leading axes (layers, experts) batched, in w's `shape`."""
    n_lead = a.ndim + b.ndim - 2 - len(shape)
    lead = shape[:n_lead]
    R = a.shape[-1]
    a2 = a.astype(np.float32).reshape(*lead, -1, R)
    return (a2 @ b.astype(np.float32).reshape(*lead, R, -1)).reshape(shape)


def without_adapters(params: dict) -> dict:
    """The tree with every adapter's B zeroed: the base model's function (x @ w + 0, exactly)."""
    return {k: (_zero_b(v) if str(k).startswith(PREFIX) else without_adapters(v) if isinstance(v, dict) else v)
            for k, v in params.items()}


def _zero_b(adapter: dict) -> dict:
    return {**adapter, "b": jnp.zeros_like(adapter["b"])}


def split_adapters(params: dict) -> tuple[dict, dict]:
    """(base, adapters): the tree without its adapters, and only the adapters (same nesting)."""
    base, adapters = {}, {}
    for k, v in params.items():
        if str(k).startswith(PREFIX):
            adapters[k] = v
        elif isinstance(v, dict):
            b, a = split_adapters(v)
            base[k] = b
            if a:
                adapters[k] = a
        else:
            base[k] = v
    return base, adapters


def join_adapters(base: dict, adapters: dict) -> dict:
    """The inverse of split_adapters."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = v if str(k).startswith(PREFIX) else join_adapters(base[k], v)
    return out
