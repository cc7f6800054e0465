"""Flash attention kernels for accelerators, behind the seam in `kernels.py`.

  cudnn       GPU: cuDNN's fused flash attention through `jax.nn.dot_product_attention`; causal or
              bidirectional, GQA natively; no segment ids (packed rows fall back, with a warning).
              Its backward is not deterministic.
  pallas_gpu  GPU: the Pallas (Triton) flash attention of `jax.experimental.pallas.ops.gpu`; causal,
              segment ids; its backward computes dq and dk/dv in separate passes without atomics,
              so it is deterministic. GQA maps the kernel over the G query heads of each kv head
              (a grid axis), so K and V are never repeated in memory.
  splash      TPU: Pallas splash attention; causal or bidirectional, segment ids, GQA natively.

None of them materialises the T x T scores. Each runs per device inside `shard_map` (batch over the
data-parallel axes, kv heads over `tensor`), since a Pallas call cannot be partitioned by XLA.
`interpret=True` runs a kernel in the Pallas interpreter, which is how CPU tests check them.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec

from jaxlm.parallel.sharding import active_mesh_rules, spec_for


def per_device(fn, q_BTKGd, k_BSKd, v_BSKd, segment_ids_BT):
    """Runs fn(q, k, v, segment_ids) on each device's rows and kv heads under the active mesh."""
    active = active_mesh_rules()
    if active is None or active[0].size == 1:
        return fn(q_BTKGd, k_BSKd, v_BSKd, segment_ids_BT)
    mesh, rules = active
    # the sequence stays whole (attention needs every key), whatever the rules say of `length`
    q_spec = spec_for(q_BTKGd.shape, ("batch", None, "kv_heads", None, None), mesh, rules)
    kv_spec = PartitionSpec(q_spec[0], None, q_spec[2], None)
    seg_spec = PartitionSpec(q_spec[0], None)
    if segment_ids_BT is None:
        body = lambda q, k, v: fn(q, k, v, None)
        return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q_BTKGd, k_BSKd, v_BSKd)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_BTKGd, k_BSKd, v_BSKd, segment_ids_BT)


def cudnn_attention(q_BTKGd, k_BSKd, v_BSKd, causal: bool):
    B, T, K, G, d = q_BTKGd.shape

    def fn(q, k, v, _):
        b, t = q.shape[:2]
        out = jax.nn.dot_product_attention(q.reshape(b, t, -1, d), k, v, is_causal=causal, implementation="cudnn")
        return out.reshape(q.shape)

    return per_device(fn, q_BTKGd, k_BSKd, v_BSKd, None)


# the tile each kernel's sequence lengths must be a multiple of: Triton's smallest dot, and
# splash's block, which is a multiple of the TPU's 128 lanes
SEQUENCE_MULTIPLE = {"pallas_gpu": 16, "splash": 128}


def unsupported(impl: str, T: int, S: int, d: int) -> str | None:
    """Why kernel `impl` cannot run T queries over S keys of head dim d (None: it can)."""
    multiple = SEQUENCE_MULTIPLE.get(impl, 1)
    if T % multiple or S % multiple:
        return f"sequence length {T if T % multiple else S} (it tiles by multiples of {multiple})"
    if impl == "cudnn":
        largest = cudnn_head_dim_max()  # asks the device once
        if d % 8 or d > largest:
            return f"head dim {d} (cuDNN flash needs a multiple of 8, at most {largest} on this GPU)"
    return None


def cudnn_head_dim_max() -> int:
    """cuDNN's flash attention takes head dims up to 256 on Hopper and later, 128 before (as JAX
    checks it). Without a local GPU (lowering for CUDA elsewhere) the Hopper limit is assumed."""
    try:
        capability = jax.devices("gpu")[0].compute_capability
    except (RuntimeError, AttributeError):
        return 256
    return 256 if tuple(int(x) for x in capability.split(".")) >= (9, 0) else 128


def _blocks(T: int, S: int, largest: int = 128) -> tuple[int, int]:
    """Block sizes that divide the sequence lengths (the kernels tile them exactly)."""
    return math.gcd(T, largest), math.gcd(S, largest)


def pallas_gpu_attention(q_BTKGd, k_BSKd, v_BSKd, causal: bool, segment_ids_BT=None, interpret: bool = False):
    from jax.experimental.pallas.ops.gpu import attention as gpu

    d = q_BTKGd.shape[-1]

    def fn(q, k, v, seg):
        bq, bk = _blocks(q.shape[1], k.shape[1])
        small_q, small_k = _blocks(q.shape[1], k.shape[1], 64)
        sizes = gpu.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=small_q, block_kv_dkv=small_k,
                               block_q_dq=small_q, block_kv_dq=small_k)
        one_group = lambda q_BTKd: gpu.mha(q_BTKd, k, v, seg, sm_scale=1.0 / math.sqrt(d), causal=causal,
                                           block_sizes=sizes, interpret=interpret)
        # the G query heads of a kv head: a mapped (grid) axis, K and V shared, not repeated
        return jax.vmap(one_group, in_axes=3, out_axes=3)(q)

    return per_device(fn, q_BTKGd, k_BSKd, v_BSKd, segment_ids_BT)


def splash_attention(q_BTKGd, k_BSKd, v_BSKd, causal: bool, segment_ids_BT=None, interpret: bool = False):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    d = q_BTKGd.shape[-1]

    def fn(q, k, v, seg):
        B, T, K, G, _ = q.shape
        S = k.shape[1]
        base = masks.CausalMask((T, S)) if causal else masks.FullMask((T, S))
        bq, bk = _blocks(T, S, 512)
        sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                                  block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
        kernel = splash.make_splash_mha(masks.MultiHeadMask([base] * (K * G)), head_shards=1, q_seq_shards=1,
                                        block_sizes=sizes, interpret=interpret)
        # heads kv-major (h = k*G + g): splash maps query head h to kv head h // G
        q_BHTd = (q / math.sqrt(d)).transpose(0, 2, 3, 1, 4).reshape(B, K * G, T, d)
        k_BKSd, v_BKSd = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if seg is None:
            out = jax.vmap(kernel)(q_BHTd, k_BKSd, v_BKSd)
        else:
            out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(
                q_BHTd, k_BKSd, v_BKSd, seg)
        return out.reshape(B, K, G, T, d).transpose(0, 3, 1, 2, 4)

    return per_device(fn, q_BTKGd, k_BSKd, v_BSKd, segment_ids_BT)
