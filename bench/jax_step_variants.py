"""Whole train step of the bench-config Llama in plain JAX vs the torch peer, in one run.

Minimal model (plain functions, no jaxlm import): vocab 8192, d_model 256, 4 layers, 4 heads
(kv 4, head_dim 64), SwiGLU d_ff 688, RMSNorm pre-norm, RoPE (rotate-half), untied embeddings,
seq 256, batch 8, float32; mean next-token cross-entropy; optax clip_by_global_norm(1.0) + AdamW
(lr 1e-3, b=(0.9, 0.95), wd 0.1) - the same step as ``bench/torch_peer.py``'s HF Llama.

Variants change one whole-step choice at a time (attention formulation, loss formulation, remat,
scan over layers, donation, fused qkv) from the best-known configuration. Timing interleaves all
variants and the torch peer (eager, torch.compile) round by round, one synchronous step at a
time, and reports medians (and minima) of per-step times, so machine noise hits all alike.

    python bench/jax_step_variants.py                 # all variants + torch eager + compile
    python bench/jax_step_variants.py --quiet 0.15    # wall clock, each block waits for a quiet machine
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python bench/jax_step_variants.py
        # matmuls on Eigen instead of YNNPACK: measured faster for this model on this CPU
    python bench/jax_step_variants.py --only best naive --no-torch-compile
    taskset -c 0 python bench/jax_step_variants.py --clock cpu   # stable on a busy machine
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import partial

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_variants import (  # noqa: E402
    NEG, _causal, blocked64_bhtd, blocked128_bhtd, causal_attention, causal_attention_b64,
    causal_attention_b128, dense, flash_bhtd, savep_bhtd,
)

V, D, L, H, KV, DH, F, T, B = 8192, 256, 4, 4, 4, 64, 688, 256, 8
EPS, THETA = 1e-5, 10000.0


@dataclass(frozen=True)
class Opts:
    attention: str = "ca128"  # naive_bthd | naive_bhtd | dpa | flash | savep | blocked128 | blocked64 | ca | ca128 | ca64
    loss: str = "fused"  # logsoftmax | optax | onehot | fused | fused2 | fused4 | fused8 (token chunks)
    linear: str = "dense"  # einsum (autodiff weight grads) | dense (custom_vjp, dW = x^T g)
    remat: str = "none"  # none | full | dots
    scan: bool = False  # lax.scan over stacked layers instead of a Python loop
    donate: bool = True
    fused_qkv: bool = False


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def init_params(key, opts: Opts):
    ks = iter(jax.random.split(key, 8 * L + 4))
    n = lambda shape, std=0.02: std * jax.random.normal(next(ks), shape, jnp.float32)
    layers = []
    for _ in range(L):
        lp = dict(attn_norm=jnp.ones((D,)), mlp_norm=jnp.ones((D,)), wo=n((H, DH, D)),
                  w_gate=n((D, F)), w_up=n((D, F)), w_down=n((F, D)))
        if opts.fused_qkv:
            lp["wqkv"] = n((D, 3, H, DH))
        else:
            lp.update(wq=n((D, H, DH)), wk=n((D, KV, DH)), wv=n((D, KV, DH)))
        layers.append(lp)
    if opts.scan:
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return dict(embed=n((V, D)), layers=layers, final_norm=jnp.ones((D,)), head=n((D, V)))


def rmsnorm(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def rope_tables():
    half = DH // 2
    inv = THETA ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = jnp.arange(T, dtype=jnp.float32)[:, None] * inv  # [T, half]
    ang = jnp.concatenate([ang, ang], axis=-1)  # [T, DH] (rotate-half convention)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin, layout):
    if layout == "bthd":
        cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., : DH // 2], x[..., DH // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def naive_bthd(q, k, v):
    """The formulation jaxlm uses today: einsums in [B, T, H, d], where-mask, jax.nn.softmax."""
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(DH)
    s = jnp.where(_causal(T, T), s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def naive_bhtd(q, k, v):
    s = jnp.einsum("bhtd,bhsd->bhts", q / math.sqrt(DH), k)
    s = jnp.where(_causal(T, T), s, NEG)
    return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(s, axis=-1), v)


def dpa_bthd(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


ATTENTION = {  # name -> (layout, core)
    "naive_bthd": ("bthd", naive_bthd),
    "naive_bhtd": ("bhtd", naive_bhtd),
    "dpa": ("bthd", dpa_bthd),
    "flash": ("bhtd", flash_bhtd),
    "savep": ("bhtd", savep_bhtd),
    "blocked128": ("bhtd", blocked128_bhtd),
    "blocked64": ("bhtd", blocked64_bhtd),
    "ca": ("bthd", causal_attention),
    "ca128": ("bthd", causal_attention_b128),
    "ca64": ("bthd", causal_attention_b64),
}


def attention_block(lp, x, cos, sin, opts: Opts):
    layout, core = ATTENTION[opts.attention]
    h = rmsnorm(x, lp["attn_norm"])
    if opts.linear == "dense":
        # x @ W[D, H*d] through `dense`, free reshape to [B, T, H, d]; bhtd cores transpose.
        if opts.fused_qkv:
            qkv = dense(h, lp["wqkv"].reshape(D, 3 * H * DH)).reshape(B, T, 3, H, DH)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q, k, v = (dense(h, lp[w].reshape(D, H * DH)).reshape(B, T, H, DH) for w in ("wq", "wk", "wv"))
        q, k = apply_rope(q, cos, sin, "bthd"), apply_rope(k, cos, sin, "bthd")
        if layout == "bhtd":
            t = lambda a: a.transpose(0, 2, 1, 3)
            o = t(core(t(q), t(k), t(v)))
        else:
            o = core(q, k, v)
        return x + dense(o.reshape(B, T, H * DH), lp["wo"].reshape(H * DH, D))
    out_spec = "bhtd" if layout == "bhtd" else "bthd"
    if opts.fused_qkv:
        qkv = jnp.einsum(f"btD,Dnhd->n{out_spec}", h, lp["wqkv"])
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q, k, v = (jnp.einsum(f"btD,Dhd->{out_spec}", h, lp[w]) for w in ("wq", "wk", "wv"))
    q, k = apply_rope(q, cos, sin, layout), apply_rope(k, cos, sin, layout)
    o = core(q, k, v)
    return x + jnp.einsum(f"{out_spec},hdD->btD", o, lp["wo"])


def mlp_block(lp, x, opts: Opts):
    h = rmsnorm(x, lp["mlp_norm"])
    mm = dense if opts.linear == "dense" else jnp.matmul
    g = jax.nn.silu(mm(h, lp["w_gate"])) * mm(h, lp["w_up"])
    return x + mm(g, lp["w_down"])


def layer(lp, x, cos, sin, opts: Opts):
    return mlp_block(lp, attention_block(lp, x, cos, sin, opts), opts)


# --- losses: mean next-token cross-entropy from the final hidden state -------------------------


def loss_logsoftmax(h, w, y):
    logp = jax.nn.log_softmax(h @ w, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def loss_optax(h, w, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h @ w, y))


def loss_onehot(h, w, y):
    """logsumexp minus the label logit picked by a one-hot product (elementwise backward, no scatter)."""
    logits = h @ w
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.sum(jnp.where(jnp.arange(V)[None, :] == y[:, None], logits, 0.0), axis=-1)
    return jnp.mean(lse - picked)


@jax.custom_vjp
def loss_fused(h, w, y):
    """Fused LM head + cross-entropy: the gradient is formed in the forward pass (the loss is the
    step's final scalar), so logits are read twice in total and never kept for the backward."""
    return _loss_fused_fwd(h, w, y)[0]


def _loss_fused_fwd(h, w, y):
    logits = h @ w  # [N, V]
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    onehot = jnp.arange(V)[None, :] == y[:, None]
    picked = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1, keepdims=True)
    n = h.shape[0]
    loss = jnp.mean(m + jnp.log(s) - picked)
    dlogits = (e / s - onehot.astype(jnp.float32)) / n
    return loss, (dlogits @ w.T, h.T @ dlogits, y)


def _loss_fused_bwd(res, g):
    dh, dw, y = res
    return g * dh, g * dw, None


loss_fused.defvjp(_loss_fused_fwd, _loss_fused_bwd)


def make_loss_fused_chunked(n_chunks: int):
    """loss_fused over token chunks (N / n_chunks rows each), so each chunk's logits stay in cache
    between the head matmul, the softmax and the two gradient matmuls."""

    @jax.custom_vjp
    def f(h, w, y):
        return fwd(h, w, y)[0]

    def fwd(h, w, y):
        n = h.shape[0]
        c = n // n_chunks
        loss, dhs, dw = 0.0, [], None
        for i in range(n_chunks):
            hc, yc = h[i * c:(i + 1) * c], y[i * c:(i + 1) * c]
            logits = hc @ w
            m = jnp.max(logits, axis=-1, keepdims=True)
            e = jnp.exp(logits - m)
            s_ = jnp.sum(e, axis=-1, keepdims=True)
            onehot = jnp.arange(V)[None, :] == yc[:, None]
            picked = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1, keepdims=True)
            loss = loss + jnp.sum(m + jnp.log(s_) - picked) / n
            dlogits = (e / s_ - onehot.astype(jnp.float32)) / n
            dhs.append(dlogits @ w.T)
            dwc = hc.T @ dlogits
            dw = dwc if dw is None else dw + dwc
        return loss, (jnp.concatenate(dhs, axis=0), dw)

    def bwd(res, g):
        dh, dw = res
        return g * dh, g * dw, None

    f.defvjp(fwd, bwd)
    return f


LOSSES = dict(logsoftmax=loss_logsoftmax, optax=loss_optax, onehot=loss_onehot, fused=loss_fused,
              fused2=make_loss_fused_chunked(2), fused4=make_loss_fused_chunked(4),
              fused8=make_loss_fused_chunked(8))


def loss_fn(params, tokens, opts: Opts):
    x_in, y = tokens[:, :-1], tokens[:, 1:]
    cos, sin = rope_tables()
    x = jnp.take(params["embed"], x_in, axis=0)
    f = partial(layer, cos=cos, sin=sin, opts=opts)
    if opts.remat == "full":
        f = jax.checkpoint(f)
    elif opts.remat == "dots":
        f = jax.checkpoint(f, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if opts.scan:
        x, _ = jax.lax.scan(lambda c, lp: (f(lp, c), None), x, params["layers"])
    else:
        for lp in params["layers"]:
            x = f(lp, x)
    h = rmsnorm(x, params["final_norm"]).reshape(B * T, D)
    return LOSSES[opts.loss](h, params["head"], y.reshape(B * T))


def make_tx():
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))


def make_step(opts: Opts):
    tx = make_tx()

    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, opts)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(train_step, donate_argnums=(0, 1) if opts.donate else ())


class JaxRunner:
    def __init__(self, opts: Opts, seed=0):
        self.opts = opts
        tx, self.fn = make_step(opts)
        self.params = init_params(jax.random.PRNGKey(seed), opts)
        self.opt_state = tx.init(self.params)
        rng = np.random.default_rng(seed)
        self.batches = [jnp.asarray(rng.integers(0, V, (B, T + 1)), jnp.int32) for _ in range(4)]
        self.i = 0

    def step(self) -> float:
        tok = self.batches[self.i % 4]
        self.i += 1
        self.params, self.opt_state, loss = self.fn(self.params, self.opt_state, tok)
        return float(loss)


def check_losses_agree(variants: dict[str, Opts]):
    """Every formulation must give the same loss and gradients (same init, same batch)."""
    ref_opts = Opts(attention="naive_bthd", loss="logsoftmax", linear="einsum", remat="none", donate=False)
    rng = np.random.default_rng(1)
    tok = jnp.asarray(rng.integers(0, V, (B, T + 1)), jnp.int32)
    ref_l, ref_g = jax.jit(jax.value_and_grad(partial(loss_fn, opts=ref_opts)))(init_params(jax.random.PRNGKey(0), ref_opts), tok)
    for name, o in variants.items():
        if o.fused_qkv or o.scan:
            continue  # different parameter structure; same math
        l, g = jax.jit(jax.value_and_grad(partial(loss_fn, opts=o)))(init_params(jax.random.PRNGKey(0), o), tok)
        err = max(float(jnp.max(jnp.abs(a - b))) / max(1.0, float(jnp.max(jnp.abs(b))))
                  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)))
        assert abs(float(l) - float(ref_l)) < 1e-5 and err < 1e-5, (name, float(l), float(ref_l), err)


BEST = Opts()
VARIANTS = {
    "best (dense, causal_attention b128, fused CE)": BEST,
    "attn causal_attention (no blocks)": replace(BEST, attention="ca"),
    "attn causal_attention b64": replace(BEST, attention="ca64"),
    "attn naive_bthd (jaxlm today)": replace(BEST, attention="naive_bthd"),
    "attn naive_bhtd": replace(BEST, attention="naive_bhtd"),
    "attn jax.nn.dpa": replace(BEST, attention="dpa"),
    "attn flash bhtd": replace(BEST, attention="flash"),
    "attn savep": replace(BEST, attention="savep"),
    "attn blocked64 bhtd": replace(BEST, attention="blocked64"),
    "linear einsum (autodiff weight grads)": replace(BEST, linear="einsum"),
    "loss log_softmax+take": replace(BEST, loss="logsoftmax"),
    "loss optax CE": replace(BEST, loss="optax"),
    "loss onehot lse": replace(BEST, loss="onehot"),
    "loss fused, 2 chunks": replace(BEST, loss="fused2"),
    "loss fused, 4 chunks": replace(BEST, loss="fused4"),
    "loss fused, 8 chunks": replace(BEST, loss="fused8"),
    "remat full": replace(BEST, remat="full"),
    "remat dots": replace(BEST, remat="dots"),
    "scan layers": replace(BEST, scan=True),
    "no donation": replace(BEST, donate=False),
    "fused qkv": replace(BEST, fused_qkv=True),
    "baseline (einsum, naive_bthd, log_softmax)": replace(BEST, attention="naive_bthd", loss="logsoftmax",
                                                          linear="einsum"),
}


def _cpu_busy_fraction(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat), while we sleep."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    i0, t0 = snap()
    time.sleep(interval)
    i1, t1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(max_busy: float, max_wait_s: float) -> bool:
    """Block until other processes leave the CPUs (nearly) idle; False if max_wait_s ran out."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        if _cpu_busy_fraction() <= max_busy:
            return True
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of variant names")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--torch-attn", default="sdpa")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time per step (use with taskset -c 0 on a busy machine)")
    ap.add_argument("--quiet", type=float, default=None, metavar="BUSY",
                    help="before each timed block wait (up to --quiet-wait s) until other load keeps at "
                         "most this fraction of the CPUs busy, e.g. 0.1 (for wall-clock on a shared machine)")
    ap.add_argument("--quiet-wait", type=float, default=120.0)
    args = ap.parse_args()

    variants = {n: o for n, o in VARIANTS.items() if not args.only or any(s in n for s in args.only)}
    print(f"jax {jax.__version__}, cpus={os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), clock={args.clock}, "
          f"load avg {os.getloadavg()[0]:.1f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if not args.no_check:
        t0 = time.perf_counter()
        check_losses_agree(variants)
        print(f"loss/grad agreement check passed ({time.perf_counter() - t0:.0f}s)")

    runners, setup = {}, {}
    for n, o in variants.items():
        t0 = time.perf_counter()
        r = JaxRunner(o)
        r.step()
        r.step()
        runners[n] = r
        setup[n] = time.perf_counter() - t0
    if not args.no_torch:
        from torch_peer import BENCH_CONFIG, build_torch_llama_step

        modes = [False] + ([] if args.no_torch_compile else [True])
        for c in modes:
            name = f"torch {'compile' if c else 'eager'} ({args.torch_attn})"
            t0 = time.perf_counter()
            step, info = build_torch_llama_step(**BENCH_CONFIG, compile=c, attn_implementation=args.torch_attn)
            for _ in range(3):
                step()
            runners[name] = type("TorchRunner", (), {"step": staticmethod(step)})()
            setup[name] = time.perf_counter() - t0
            print(f"{name}: setup+3 warmup steps {setup[name]:.1f}s, {info['optimizer']}, "
                  f"attn={info['attn_implementation']}, torch {info['torch_version']}")

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {n: [] for n in runners}
    order = list(runners)
    rnd = random.Random(0)
    t_all = time.perf_counter()
    n_loud = 0
    for _ in range(args.rounds):
        rnd.shuffle(order)
        for n in order:
            if args.quiet is not None and not wait_for_quiet(args.quiet, args.quiet_wait):
                n_loud += 1
            runners[n].step()  # untimed: lets the previous runner's threads go quiet
            for _ in range(args.iters):
                t0 = clock()
                runners[n].step()
                times[n].append(clock() - t0)
    print(f"timing took {time.perf_counter() - t_all:.0f}s; load avg {os.getloadavg()[0]:.1f}"
          + (f"; {n_loud} timed blocks started without a quiet machine" if args.quiet is not None else ""))

    med = {n: statistics.median(t) for n, t in times.items()}
    ref = {k: med[k] for k in med if k.startswith("torch")}
    hdr = "".join(f" {'x ' + k.split()[1]:>10}" for k in ref)
    print(f"\n{args.clock} time per step, median of {args.rounds} rounds x {args.iters} steps")
    print(f"{'variant':42} {'med ms':>8} {'min ms':>8} {'tok/s':>8}{hdr}")
    for n in sorted(med, key=med.get):
        rat = "".join(f" {ref[k] / med[n]:10.2f}" for k in ref)
        print(f"{n:42} {med[n] * 1e3:8.1f} {min(times[n]) * 1e3:8.1f} {B * T / med[n]:8.0f}{rat}")
    print("(x eager / x compile: torch step time / this step time; > 1 means faster than torch)")


if __name__ == "__main__":
    main()
