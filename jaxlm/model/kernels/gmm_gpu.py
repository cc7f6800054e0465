"""Grouped matmul for GPUs in Pallas (Triton): MoE's dropless experts without XLA's dense expansion.

XLA:GPU has no grouped GEMM for `ragged_dot`: its RaggedDotRewriter turns [M, K] x [G, K, N] into a
dense dot over all G groups (G times the FLOPs, and a [G, M, K] masked copy of the rows). Here the
rows, sorted by group, are cut into tiles of TM; a tile that two groups share is visited once per
group, and each visit stores only its group's rows (masked stores, so visits never race). The
backward pass is two more kernels, neither with atomics, so it is deterministic:

  dx = dy @ w[g]^T    the forward kernel with w read transposed
  dw[g] = x_g^T dy_g  a grid over (group, K tile, N tile) looping over the group's row tiles

Rows past sum(sizes) are 0 (and get no gradient), as `jax.lax.ragged_dot` gives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

TM = 64  # rows per tile
K_TILES = (64, 32, 16)  # the contraction's tile: the largest that divides it (Triton's dot needs 16)
N_TILES = (128, 64, 32, 16)


def _tile(n: int, options) -> int | None:
    return next((t for t in options if n % t == 0), None)


def _visits(sizes_G, M: int):
    """Per grid step: (group, row tile, first row, end row) of L = M/TM + G - 1 visits; steps past
    the real visits have an empty row range."""
    G = sizes_G.shape[0]
    L = M // TM + G - 1
    ends = jnp.cumsum(sizes_G)
    starts = ends - sizes_G
    tiles_G = jnp.where(sizes_G > 0, (ends + TM - 1) // TM - starts // TM, 0)
    first_G = jnp.cumsum(tiles_G) - tiles_G
    group_L = jnp.repeat(jnp.arange(G, dtype=jnp.int32), tiles_G, total_repeat_length=L)
    step = jnp.arange(L, dtype=jnp.int32)
    real = step < jnp.sum(tiles_G)
    tile_L = jnp.where(real, starts[group_L] // TM + step - first_G[group_L], 0)
    lo_L, hi_L = jnp.where(real, starts[group_L], 0), jnp.where(real, ends[group_L], 0)
    return group_L, tile_L.astype(jnp.int32), lo_L.astype(jnp.int32), hi_L.astype(jnp.int32)


def _gmm_kernel(group_ref, tile_ref, lo_ref, hi_ref, x_ref, w_ref, out_ref, *, tk, tn, transpose_w):
    from jax.experimental.pallas import triton as plgpu

    i, j = pl.program_id(0), pl.program_id(1)
    g, t, lo, hi = group_ref[i], tile_ref[i], lo_ref[i], hi_ref[i]
    rows = t * TM + jnp.arange(TM)
    mine = ((rows >= lo) & (rows < hi))[:, None]

    def body(kb, acc):
        x = plgpu.load(x_ref.at[pl.ds(t * TM, TM), pl.ds(kb * tk, tk)])
        if transpose_w:
            w = plgpu.load(w_ref.at[g, pl.ds(j * tn, tn), pl.ds(kb * tk, tk)]).T
        else:
            w = plgpu.load(w_ref.at[g, pl.ds(kb * tk, tk), pl.ds(j * tn, tn)])
        return acc + plgpu.dot(x, w).astype(jnp.float32)

    @pl.when(hi > lo)  # the grid's spare steps (and a buffer's unused tail) do no work
    def _():
        acc = lax.fori_loop(0, x_ref.shape[1] // tk, body, jnp.zeros((TM, tn), jnp.float32))
        plgpu.store(out_ref.at[pl.ds(t * TM, TM), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype), mask=mine)


def _gmm(x_MK, w, sizes_G, transpose_w: bool, interpret: bool):
    """[M, K] rows (M a multiple of TM) times w[G, K, N] (or w[G, N, K] read transposed)."""
    from jax.experimental.pallas import triton as plgpu

    M, K = x_MK.shape
    N = w.shape[1] if transpose_w else w.shape[2]
    tk, tn = _tile(K, K_TILES), _tile(N, N_TILES)
    kernel = functools.partial(_gmm_kernel, tk=tk, tn=tn, transpose_w=transpose_w)
    visits = _visits(sizes_G, M)
    return pl.pallas_call(
        kernel, grid=(visits[0].shape[0], N // tn), out_shape=jax.ShapeDtypeStruct((M, N), x_MK.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3), interpret=interpret,
        name="grouped_matmul")(*visits, x_MK, w)


def _tgmm_kernel(lo_ref, hi_ref, x_ref, dy_ref, dw_ref, *, tk, tn):
    from jax.experimental.pallas import triton as plgpu

    g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi = lo_ref[g], hi_ref[g]

    def body(t, acc):
        rows = t * TM + jnp.arange(TM)
        mine = ((rows >= lo) & (rows < hi))[:, None]
        x = plgpu.load(x_ref.at[pl.ds(t * TM, TM), pl.ds(a * tk, tk)], mask=mine, other=0.0)
        dy = plgpu.load(dy_ref.at[pl.ds(t * TM, TM), pl.ds(b * tn, tn)], mask=mine, other=0.0)
        return acc + plgpu.dot(x.T, dy).astype(jnp.float32)

    acc = lax.fori_loop(lo // TM, (hi + TM - 1) // TM, body, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(dw_ref.at[g, pl.ds(a * tk, tk), pl.ds(b * tn, tn)], acc.astype(dw_ref.dtype))


def _tgmm(x_MK, dy_MN, sizes_G, dtype, interpret: bool):
    """dw[g] = x_g^T dy_g for each group g: [G, K, N] (0 for an empty group)."""
    from jax.experimental.pallas import triton as plgpu

    (M, K), N, G = x_MK.shape, dy_MN.shape[1], sizes_G.shape[0]
    tk, tn = _tile(K, K_TILES), _tile(N, N_TILES)
    ends = jnp.cumsum(sizes_G).astype(jnp.int32)
    kernel = functools.partial(_tgmm_kernel, tk=tk, tn=tn)
    return pl.pallas_call(
        kernel, grid=(G, K // tk, N // tn), out_shape=jax.ShapeDtypeStruct((G, K, N), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3), interpret=interpret,
        name="grouped_matmul_dw")(ends - sizes_G, ends, x_MK, dy_MN)


def _used(sizes_G, M: int):
    return (jnp.arange(M) < jnp.sum(sizes_G))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x_MK, w_GKN, sizes_G, interpret):
    return jnp.where(_used(sizes_G, x_MK.shape[0]), _gmm(x_MK, w_GKN, sizes_G, False, interpret), 0)


def _grouped_fwd(x_MK, w_GKN, sizes_G, interpret):
    return _grouped(x_MK, w_GKN, sizes_G, interpret), (x_MK, w_GKN, sizes_G)


def _grouped_bwd(interpret, res, dy_MN):
    x_MK, w_GKN, sizes_G = res
    dx = jnp.where(_used(sizes_G, x_MK.shape[0]), _gmm(dy_MN, w_GKN, sizes_G, True, interpret), 0)
    dw = _tgmm(x_MK, dy_MN, sizes_G, w_GKN.dtype, interpret)
    return dx, dw, np.zeros(sizes_G.shape, jax.dtypes.float0)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_matmul(x_MK, w_GKN, sizes_G, interpret: bool = False):
    """Rows sorted by group (sizes_G rows each) times their group's [K, N] matrix: [M, N].
    K and N must be multiples of 16 (the smallest tile); M is padded to whole tiles here."""
    M = x_MK.shape[0]
    pad = -M % TM
    x = jnp.pad(x_MK, ((0, pad), (0, 0))) if pad else x_MK
    out = _grouped(x, w_GKN, sizes_G.astype(jnp.int32), interpret)
    return out[:M] if pad else out
