"""A digest of each saved array's values that does not depend on how the array is sharded.

digest(x) = sum over elements i of fmix32(word_i + i * 0x9E3779B9) mod 2^32, where word_i is
element i's bit pattern widened to 32 bits (a 64-bit element is two words) and i its row-major
index. Each device sums its own shard and the sums combine across devices and processes, so a
save costs one pass over device memory and reads nothing back from disk; a restore checks the
arrays it has just read the same way. fmix32 (MurmurHash3's finaliser) is a bijection, so a change
to any one element always changes the digest; other damage escapes with probability about 2^-32,
as with a crc32. The same code runs on numpy arrays (a checkpoint read to the host).

Arrays are named as orbax names them on disk ("params.embed.table_VD").
"""

from __future__ import annotations

import logging
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

_GOLDEN, _M1, _M2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _fmix(h, xp):
    h = h ^ (h >> 16)
    h = h * xp.uint32(_M1)
    h = h ^ (h >> 13)
    h = h * xp.uint32(_M2)
    return h ^ (h >> 16)


def _words(x, xp):
    """Element bit patterns as uint32; 64-bit elements get a trailing axis of two words."""
    if x.dtype == bool:
        x = x.astype(xp.uint8)
    unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32, 8: xp.uint32}[x.dtype.itemsize]
    if xp is np:
        x = np.ascontiguousarray(x)
        w = x[..., None].view(unsigned) if x.dtype.itemsize == 8 else x.view(unsigned)
    else:
        w = jax.lax.bitcast_convert_type(x, unsigned)
    return w.astype(xp.uint32)


def array_digest(x, xp=jnp):
    """The digest of one array (xp: jax.numpy inside jit, or numpy)."""
    w = _words(x, xp)
    index, stride = xp.zeros((), xp.uint32), 1
    for d in reversed(range(w.ndim)):  # the row-major index by broadcasting, so no shard is moved
        shape = [-1 if k == d else 1 for k in range(w.ndim)]
        index = index + xp.arange(w.shape[d], dtype=xp.uint32).reshape(shape) * xp.uint32(stride % 2**32)
        stride *= w.shape[d]
    return xp.sum(_fmix(w + index * xp.uint32(_GOLDEN), xp), dtype=xp.uint32)


def _named(tree) -> tuple[list[str], list]:
    names = ocp.tree.get_param_names(tree, include_empty_nodes=False)
    return jax.tree.leaves(names), jax.tree.leaves(tree)


@lru_cache(maxsize=8)
def _jitted(out_sharding):
    return jax.jit(lambda leaves: [array_digest(x) for x in leaves], out_shardings=out_sharding)


def start(tree) -> dict:
    """Dispatches the digests of a tree of jax arrays, on their devices (all processes call it, as
    they call save; the results are replicated, so any process can read them); `finish` waits for
    them. Other arrays (numpy) are digested on the host at once."""
    names, leaves = _named(tree)
    if not (leaves and all(isinstance(x, jax.Array) for x in leaves)):
        with np.errstate(over="ignore"):
            return {n: array_digest(np.asarray(x), np) for n, x in zip(names, jax.device_get(leaves))}
    sharding = next((x.sharding for x in leaves if isinstance(x.sharding, NamedSharding)), None)
    out = None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec())
    return dict(zip(names, _jitted(out)(leaves)))


def finish(pending: dict) -> dict[str, int]:
    return {name: int(np.asarray(v)) for name, v in pending.items()}


def digests(tree) -> dict[str, int]:
    """{orbax name: digest} of a tree of jax arrays (digested on their devices) or numpy arrays."""
    return finish(start(tree))


def read_digests(state_dir) -> dict[str, int]:
    """Reads every array of a saved state to the host and digests it: the full check, on request."""
    return digests(read_host(state_dir))


def read_host(state_dir) -> dict:
    """A saved state (the tree orbax recorded) as host numpy arrays."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that a state item has no step metadata of its own
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(state_dir).item_metadata.tree
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        absl.setLevel(level)


def mismatches(want: dict[str, int], got: dict[str, int]) -> list[str]:
    """Names of arrays both know whose digests differ."""
    return [n for n, d in got.items() if n in want and want[n] != d]
