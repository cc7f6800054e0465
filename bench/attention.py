"""Attention forward+backward: jaxlm's kernels against jax.nn.dot_product_attention and torch sdpa.

Times `jit(value_and_grad(sum(attention(q, k, v) * cotangent)))` for every attention kernel behind
jaxlm's seam (`jaxlm.model.kernels.attention`, each impl that runs on this backend), for
`jax.nn.dot_product_attention` (implementation chosen by JAX, and cuDNN on a GPU) and for torch's
`F.scaled_dot_product_attention` (on CUDA when torch sees a GPU). Every variant's loss and
gradients are checked against jaxlm's reference attention first (f32: 1e-5 relative to the
tensor's scale; bf16: 3e-2). Timing interleaves the variants round by round (bench/harness.py).

    python bench/attention.py                           # B8 T256 H4 K4 d64, f32, causal
    python bench/attention.py --shape 8 1024 12 4 64 --dtype bfloat16 --packed 4
    taskset -c 0 python bench/attention.py              # read the cpu-ms column on a busy machine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, summary, table, time_interleaved  # noqa: E402

from jaxlm.model import kernels  # noqa: E402
from jaxlm.model.kernels import AttentionMask  # noqa: E402


def inputs(B, T, H, K, d, dtype, packed: int, seed: int = 0):
    """q [B, T, K, H/K, d], k, v [B, T, K, d], the cotangent, and segment ids (None unless packed)."""
    rng = np.random.default_rng(seed)
    q, ct = (jnp.asarray(rng.standard_normal((B, T, K, H // K, d)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, d)), dtype) for _ in range(2))
    seg = None
    if packed > 1:  # `packed` documents of random lengths per row
        cuts = np.sort(rng.choice(np.arange(1, T), packed - 1, replace=False), axis=-1)
        seg = jnp.asarray(np.broadcast_to(np.searchsorted(cuts, np.arange(T), side="right"), (B, T)), jnp.int32)
    return (q, k, v), ct, seg


def jax_variants(mask: AttentionMask, platform: str) -> dict:
    """name -> attention(q_BTKGd, k, v) for jaxlm's kernels on `platform` and jax.nn's."""
    out = {f"jaxlm {impl}": (lambda impl: lambda q, k, v: kernels.attention(q, k, v, mask, impl))(impl)
           for impl, platforms in kernels.ATTENTION_IMPLS.items() if platform in platforms}

    def jax_nn(implementation):
        def f(q, k, v):
            B, T, K, G, d = q.shape
            dense = None if mask.segment_ids_BT is None else mask.dense(T, T)[:, None]
            o = jax.nn.dot_product_attention(q.reshape(B, T, K * G, d), k, v, mask=dense,
                                             is_causal=mask.causal and dense is None, implementation=implementation)
            return o.reshape(q.shape)
        return f

    out["jax.nn.dot_product_attention"] = jax_nn(None)
    if platform == "gpu" and mask.segment_ids_BT is None:
        out["jax.nn.dot_product_attention cudnn"] = jax_nn("cudnn")
    return out


def value_and_grads(f, ct):
    loss = lambda q, k, v: jnp.sum((f(q, k, v) * ct).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def error(got, ref) -> float:
    """Max over the loss and the three gradients of |got - ref| / max(1, max |ref|)."""
    (lv, gs), (rv, rs) = got, ref
    errs = [abs(float(lv) - float(rv)) / max(1.0, abs(float(rv)))]
    for g, r in zip(gs, rs):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        errs.append(float(np.max(np.abs(g - r)) / max(1.0, float(np.max(np.abs(r))))))
    return max(errs)


def torch_sdpa(qkv, ct, seg, causal: bool):
    """torch F.scaled_dot_product_attention forward+backward, laid out as HF Llama does."""
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    as_torch = lambda x: torch.tensor(np.asarray(x, np.float32)).to(device, getattr(torch, str(x.dtype)))
    q, k, v = (as_torch(x).requires_grad_(True) for x in qkv)
    tct = as_torch(ct)
    B, T, K, G, d = q.shape
    mask = None if seg is None else torch.from_numpy(np.asarray(AttentionMask(causal, seg).dense(T, T)))[:, None]
    mask = None if mask is None else mask.to(device)

    def step():
        for x in (q, k, v):
            x.grad = None
        # [B, T, H, d] -> [B, H, T, d] views; query head h = k*G + g uses kv head k (enable_gqa)
        o = F.scaled_dot_product_attention(q.reshape(B, T, K * G, d).transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=mask, is_causal=causal and mask is None,
                                           enable_gqa=G > 1)
        loss = (o.transpose(1, 2).reshape(q.shape) * tct).float().sum()
        loss.backward()
        return loss.detach(), (q.grad, k.grad, v.grad)

    def to_jax(result):
        loss, grads = result
        return float(loss), [np.asarray(g.float().cpu()) for g in grads]

    return (lambda: step()[0], lambda loss: loss.item()), lambda: to_jax(step())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=5, default=[8, 256, 4, 4, 64], metavar=("B", "T", "H", "K", "d"))
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--packed", type=int, default=0, metavar="N", help="N documents per row (segment ids)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    B, T, H, K, d = args.shape
    dtype = jnp.dtype(args.dtype)
    qkv, ct, seg = inputs(B, T, H, K, d, dtype, args.packed)
    mask = AttentionMask(not args.bidirectional, seg)
    platform = jax.default_backend()
    print(f"jax {jax.__version__} on {platform} ({jax.devices()[0].device_kind}); {machine_line()}")
    print(f"B={B} T={T} H={H} K={K} d={d} {args.dtype}, {'causal' if mask.causal else 'bidirectional'}"
          f"{f', {args.packed} documents per row' if seg is not None else ''}")

    ref = value_and_grads(lambda q, k, v: kernels.reference_attention(q, k, v, mask), ct)(*qkv)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    runners, errs = {}, {}
    for name, f in jax_variants(mask, platform).items():
        g = value_and_grads(f, ct)
        try:
            errs[name] = error(g(*qkv), ref)
        except Exception as e:  # a kernel this backend or shape cannot run: say so, time the rest
            print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        runners[name] = ((lambda g: lambda: g(*qkv))(g), jax.block_until_ready)
    if not args.no_torch:
        runner, once = torch_sdpa(qkv, ct, seg, mask.causal)
        errs["torch sdpa"] = error(once(), ref)
        runners["torch sdpa"] = runner
    for name, err in errs.items():
        assert err <= tol, f"{name} differs from the reference attention: max error {err:.3g} > {tol}"

    results = time_interleaved(runners, args.rounds, args.iters)
    rows = [dict(name=n, **summary(t), err=errs[n]) for n, t in results.items()]
    base = next((r["step_time_s"] for r in rows if r["name"] == "torch sdpa"), None)
    for r in sorted(rows, key=lambda r: r["step_time_s"]):
        r.update(ms=r["step_time_s"] * 1e3, min_ms=r["min_step_time_s"] * 1e3, cpu_ms=r["cpu_step_time_s"] * 1e3,
                 vs_torch=base / r["step_time_s"] if base else None)
    print(f"\nforward+backward per call, median of {args.rounds} interleaved rounds x {args.iters}; "
          "torch/this > 1: faster than torch sdpa")
    print(table(sorted(rows, key=lambda r: r["ms"]),
                [("variant", "name", "<36"), ("ms", "ms", "9.2f"), ("min ms", "min_ms", "8.2f"),
                 ("cpu ms", "cpu_ms", "8.2f"), ("torch/this", "vs_torch", "10.2f"), ("max err", "err", "9.1e")]))


if __name__ == "__main__":
    main()
