"""Quantization schemes: how a group of weights becomes small integer codes and back.

Every scheme cuts a matrix's input dimension into groups of `group` weights (0: one group per
output channel, the whole input) and stores, per group, codes of `bits` bits plus a scale (and,
asymmetric, an offset). Dequantized: w = level(code) * scale [+ offset]. A scheme only says how
codes are chosen and what level a code stands for; grouping, padding and packing two 4-bit codes
per byte are shared (quantize.py).

  Symmetric(bits, g)   levels -2^(b-1) .. 2^(b-1)-1. As llama.cpp's Q4_0 (and bit for bit with
                       it at 4 bits, g32): the group's value of largest magnitude, signed, maps to
                       -2^(b-1) exactly, d = peak / -2^(b-1), code = trunc(w / d + 2^(b-1) + 0.5)
                       clipped (round half up): at most half a step off, except a weight of the
                       other sign beyond 2^(b-1) - 0.5 steps, clipped to the last level (one step).
  Asymmetric(bits, g)  levels 0 .. 2^b-1 over [min, max] of the group: d = (max - min) / (2^b - 1),
                       offset = min. As Q4_1 at 4 bits, g32.
  Logarithmic(g)       4 bits: sign + 3-bit exponent, levels +-scale * 2^-e for e = 0..6 and 0
                       (e = 7), scale = the group's largest magnitude. The nearest level in value
                       (not in log2) is chosen, so for |w| >= scale * 2^-6 the error is at most
                       |w| / 3 (worst midway between two powers: 0.75 * 2^-e), below that at most
                       scale * 2^-7. Its levels are tiny floats, decoded by building f32 bits.

As in GGML, a grouped scale (and offset) is stored in float16, computed in float32 first: codes
use the f32 scale, dequantization the f16 one (bit-identical to gguf's Q4_0 / Q4_1). Per-channel
scales stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Scheme:
    """Codes of `bits` bits per weight, a scale per `group` input weights (0 = per channel)."""

    name: str
    bits: int
    group: int

    @property
    def scale_dtype(self):
        return jnp.float16 if self.group else jnp.float32

    @property
    def zero_code(self) -> float | None:
        """The code c0 with level(c) = c - c0 when levels are linear in the code (the CPU kernel
        reads such codes directly); None for schemes whose levels are not."""
        return None

    def encode(self, w_GgN: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """f32 weights grouped along axis 1 -> (uint8 codes [G, g, N], f32 scale [G, 1, N], offset or None)."""
        raise NotImplementedError

    def levels(self, codes: jax.Array) -> jax.Array:
        """uint8 codes -> f32 levels (multiplied by the scale, plus the offset, they are the weights)."""
        raise NotImplementedError


def _reciprocal(d: jax.Array) -> jax.Array:
    return jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))


@dataclass(frozen=True)
class Symmetric(Scheme):
    @property
    def zero_code(self):
        return 2 ** (self.bits - 1)

    def encode(self, w_GgN):
        half = 2 ** (self.bits - 1)
        peak = jnp.take_along_axis(w_GgN, jnp.argmax(jnp.abs(w_GgN), axis=1, keepdims=True), axis=1)
        d = peak / -half
        codes = jnp.trunc(w_GgN * _reciprocal(d) + (half + 0.5))
        return jnp.clip(codes, 0, 2 * half - 1).astype(jnp.uint8), d, None

    def levels(self, codes):
        return codes.astype(jnp.float32) - 2 ** (self.bits - 1)


@dataclass(frozen=True)
class Asymmetric(Scheme):
    @property
    def zero_code(self):
        return 0

    def encode(self, w_GgN):
        lo, hi = jnp.min(w_GgN, axis=1, keepdims=True), jnp.max(w_GgN, axis=1, keepdims=True)
        top = 2 ** self.bits - 1
        d = (hi - lo) / top
        codes = jnp.trunc((w_GgN - lo) * _reciprocal(d) + 0.5)
        return jnp.clip(codes, 0, top).astype(jnp.uint8), d, lo

    def levels(self, codes):
        return codes.astype(jnp.float32)


ZERO_EXPONENT = 7  # the exponent code that stands for 0


@dataclass(frozen=True)
class Logarithmic(Scheme):
    def encode(self, w_GgN):
        scale = jnp.max(jnp.abs(w_GgN), axis=1, keepdims=True)
        r = jnp.abs(w_GgN) * _reciprocal(scale)  # in [0, 1]
        mantissa, exponent = jnp.frexp(r)  # r = mantissa * 2^exponent, mantissa in [0.5, 1)
        e = -(exponent - (mantissa < 0.75).astype(exponent.dtype))  # the nearest power of two is 2^-e
        e = jnp.where(r < 2.0 ** -(ZERO_EXPONENT), ZERO_EXPONENT, jnp.minimum(e, ZERO_EXPONENT - 1))
        sign = (w_GgN < 0).astype(jnp.uint8)
        return (sign << 3 | e.astype(jnp.uint8)), scale, None

    def levels(self, codes):
        e = (codes & 7).astype(jnp.int32)
        bits = (codes >> 3).astype(jnp.int32) << 31 | (127 - e) << 23  # the f32 +-2^-e
        return jnp.where(e == ZERO_EXPONENT, 0.0, jax.lax.bitcast_convert_type(bits, jnp.float32))


def _schemes() -> dict[str, Scheme]:
    out: dict[str, Scheme] = {"int8": Symmetric("int8", 8, 0)}
    for g in (32, 64, 128):
        out[f"int4-g{g}"] = Symmetric(f"int4-g{g}", 4, g)
        out[f"int4-g{g}-asym"] = Asymmetric(f"int4-g{g}-asym", 4, g)
    for g in (32, 64, 128):
        out[f"log4-g{g}"] = Logarithmic(f"log4-g{g}", 4, g)
    return out


# `--quantize` names -> schemes; int4-g32 is llama.cpp's Q4_0, int4-g32-asym its Q4_1
SCHEMES: dict[str, Scheme] = _schemes()
