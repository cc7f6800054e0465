"""Weight-only quantization for decoding and evaluation: any scheme (schemes.py), one mechanism.

A quantized matrix is a `QuantizedWeight` standing in for the array inside its nnx.Param: the
model reads `param[...]`, casts it (a no-op here) and hands it to `kernels.project`, which calls
its `project` (dequantize, then one matmul in the compute dtype). It is a pytree of arrays, so it
scans with the stacked layers, places on a mesh by its own logical axes, and can be the frozen
base that LoRA adapters are added to (QLoRA).

Layout: the matrix in `project`'s orientation, [K = the input dims flattened, N = the output dims
flattened], cut along K into G groups of g (K padded with zeros to G * g): codes [*lead, G, g/2, N]
(two 4-bit codes per byte: the group's first half in the low nibbles, its second half in the high
ones, as GGML's Q4_0 blocks) or [*lead, G, g, N] at 8 bits; scale (and offset) [*lead, G, 1, N].

Quantized: every matrix the model reads through `project` (attention q/k/v/o, dense and
shared-expert MLPs, the untied output head) and the embedding table, stored as the tied head's
[D, V] so that one set of groups (along D) serves the gather and the tied head, as llama.cpp's
GGUF quantizes token_embd. Kept: norms, the MoE router and routed experts (they run through
`ragged_dot`, which takes one dtype).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.compress.schemes import SCHEMES, Scheme
from jaxlm.config import Config
from jaxlm.model.attention import Attention
from jaxlm.model.build import build_model
from jaxlm.model.kernels import quantized_cpu
from jaxlm.model.layers import MLP, Embed

static = lambda: field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedWeight:
    """A matrix x @ w [K, N] as codes and group scales (see the module docstring for the layout)."""

    codes: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    scheme: Scheme = static()
    shape: tuple = static()  # the original (per-layer) weight's shape, e.g. [H, d, D] or the table's [V, D]
    n_in: int = static()  # how many of its leading dims are the input (K)
    transposed: bool = static()  # the embedding table: input dims last ([V, D] -> [D, V])
    axes: tuple = static()  # logical axes of codes, scale and offset (placement on a mesh)
    kernel: str = field(default="xla", metadata=dict(static=True))  # "cpu": read_codes() below

    def __getitem__(self, key):  # the model reads `param[...]`
        return self

    def astype(self, dtype):  # and casts it to the compute dtype: the codes stay as they are
        return self

    @property
    def k(self) -> int:
        dims = self.shape[-self.n_in:] if self.transposed else self.shape[: self.n_in]
        return math.prod(dims)

    def matrix(self, dtype=jnp.float32) -> jax.Array:
        """The dequantized [*lead, K, N] in `dtype`."""
        codes = self.codes
        if self.scheme.bits == 4:
            codes = jnp.concatenate([codes & 15, codes >> 4], axis=-2)
        w = self.scheme.levels(codes) * self.scale.astype(jnp.float32)
        if self.offset is not None:
            w = w + self.offset.astype(jnp.float32)
        w = w.reshape(*w.shape[:-3], -1, w.shape[-1])[..., : self.k, :]
        return w.astype(dtype)

    def dequantize(self) -> jax.Array:
        """The dequantized weight in its original layout, f32: the reference for every quantized path."""
        w_KN = self.matrix()
        lead = w_KN.shape[:-2]
        if self.transposed:
            w_KN = jnp.swapaxes(w_KN, -1, -2)
        return w_KN.reshape(*lead, *self.shape)

    def project(self, x: jax.Array, n_in: int) -> jax.Array:
        """x [..., *in] @ w: one matmul on the dequantized matrix, in x's dtype."""
        assert n_in == self.n_in, (n_in, self.n_in)
        lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
        out = self.shape[: len(self.shape) - self.n_in] if self.transposed else self.shape[self.n_in:]
        rows = x.reshape(-1, k)
        if self.kernel == "cpu" and rows.shape[0] <= quantized_cpu.MAX_ROWS:
            y = _codes_matmul(rows, self).astype(x.dtype)
        else:
            y = rows @ self.matrix(x.dtype)
        return y.reshape(*lead, *out)

    def gather_rows(self, ids: jax.Array) -> jax.Array:
        """Rows of a transposed (embedding) table: w[:, ids] as [*ids.shape, K], f32."""
        assert self.transposed
        pick = lambda a: None if a is None else jnp.take(a, ids.reshape(-1), axis=-1)
        rows = QuantizedWeight(pick(self.codes), pick(self.scale), pick(self.offset), self.scheme,
                               self.shape, self.n_in, self.transposed, self.axes).matrix()
        return jnp.swapaxes(rows, -1, -2).reshape(*ids.shape, self.k)


@jax.custom_vjp
def _codes_matmul(rows_MK: jax.Array, w: QuantizedWeight) -> jax.Array:
    """rows @ w read as codes (quantized_cpu.py), f32; its gradient (QLoRA's input gradient
    through a frozen base) is the dequantized reference's."""
    return quantized_cpu.quantized_matmul(rows_MK, w.codes, w.scale, w.offset, w.scheme.bits, w.scheme.zero_code)


def _codes_matmul_fwd(rows_MK, w):
    return _codes_matmul(rows_MK, w), w


def _codes_matmul_bwd(w, g_MN):
    return (g_MN @ w.matrix(g_MN.dtype).T).astype(g_MN.dtype), None


_codes_matmul.defvjp(_codes_matmul_fwd, _codes_matmul_bwd)


def linear(x) -> bool:
    """A quantized weight whose scheme's levels are linear in the code: the CPU kernel reads it."""
    return is_quantized(x) and x.scheme.zero_code is not None


def linear_codes(params) -> bool:
    """Whether the parameters hold quantized weights, all of them linear."""
    found = [x for x in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(x)]
    return bool(found) and all(map(linear, found))


def read_codes(params):
    """The parameters with every per-layer (unstacked: stacked codes would be sliced, so copied,
    per call) linear QuantizedWeight read as codes by the CPU kernel when few rows are projected
    (decoding), instead of dequantized to f32 before each matmul. The caller checks
    quantized_cpu.available() and that the program runs on one CPU device (the custom call has
    no partitioning rule)."""
    mark = lambda x: dataclasses.replace(x, kernel="cpu") if linear(x) and x.codes.ndim == 3 else x
    return jax.tree.map(mark, params, is_leaf=is_quantized)


def quantize(w: jax.Array, scheme: Scheme, first_in: int, n_in: int, transposed: bool = False,
             axes: tuple = ()) -> QuantizedWeight:
    """w [*lead, *in, *out] (the input dims start at first_in; `transposed`: [*lead, *out, *in])."""
    lead, shape = w.shape[:first_in], w.shape[first_in:]
    w32 = w.astype(jnp.float32)
    if transposed:
        w_KN = jnp.swapaxes(w32.reshape(*lead, -1, math.prod(shape[-n_in:])), -1, -2)
    else:
        w_KN = w32.reshape(*lead, math.prod(shape[:n_in]), -1)
    K, N = w_KN.shape[-2:]
    per_byte = 8 // scheme.bits
    g = scheme.group or K + (-K) % per_byte
    w_KN = jnp.pad(w_KN, [(0, 0)] * len(lead) + [(0, -K % g), (0, 0)])
    w_GgN = w_KN.reshape(-1, g, N)
    codes, scale, offset = scheme.encode(w_GgN)
    if per_byte == 2:
        codes = codes[:, : g // 2] | codes[:, g // 2:] << 4
    shaped = lambda a: None if a is None else a.reshape(*lead, -1, *a.shape[1:])
    return QuantizedWeight(shaped(codes), shaped(scale.astype(scheme.scale_dtype)),
                           shaped(None if offset is None else offset.astype(scheme.scale_dtype)),
                           scheme, tuple(shape), n_in, transposed, tuple(axes))


def quantized_weights(cfg: Config) -> dict[tuple, tuple[int, int, bool, tuple]]:
    """{parameter path: (first input dim, number of input dims, transposed, logical axes of the
    quantized arrays)} of every weight a scheme quantizes."""
    model = nnx.eval_shape(lambda: build_model(cfg, 0))
    names = {Attention: ("wq_DHd", "wk_DKd", "wv_DKd", "wo_HdD"), MLP: ("w_gate_DF", "w_up_DF", "w_down_FD"),
             Embed: ("table_VD",)}
    found = {}
    for path, node in nnx.iter_graph(model):
        for name in next((v for k, v in names.items() if isinstance(node, k)), ()):
            if hasattr(node, name):
                var = getattr(node, name)
                axes = var.get_metadata()["axes"]
                lead = len(var.shape) - len(axes)
                n_in, transposed = (2, False) if name == "wo_HdD" else (1, name == "table_VD")
                first_out = 0 if transposed else n_in
                k_axis = axes[-1] if transposed else axes[0]
                found[(*path, name)] = (lead, n_in, transposed, (k_axis, None, axes[first_out]))
    if not cfg.model.tie_embeddings:
        found[("lm_head_DV",)] = (0, 1, False, ("embed", None, "vocab"))
    return found


def quantize_params(params: dict, cfg: Config, scheme: Scheme | str) -> dict:
    """The parameters with every quantized weight replaced by its QuantizedWeight (one jitted program)."""
    scheme = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    which = quantized_weights(cfg)

    def replace(params):
        out = jax.tree.map(lambda x: x, params)
        for path, (first_in, n_in, transposed, axes) in which.items():
            node = out
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = quantize(node[path[-1]], scheme, first_in, n_in, transposed, axes)
        return out

    return jax.jit(replace)(params)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def dequantize_params(params: dict) -> dict:
    """Every QuantizedWeight replaced by its f32 dequantization: the reference the quantized paths equal."""
    return jax.jit(lambda p: jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, p,
                                          is_leaf=is_quantized))(params)


def weight_bytes(params) -> int:
    """Bytes of every array (codes, scales and offsets of quantized weights included)."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
