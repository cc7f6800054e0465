"""Masked diffusion runs (train.objective=mdlm) answer loglikelihood with the MDLM ELBO.

A diffusion model has no exact likelihood; its continuous-time ELBO bounds it from below. For a
continuation c of L tokens after a clean context x (only c is noised, as LLaDA evaluates
conditional likelihoods), integrating the MDLM bound over t (the masking rate r = 1 - alpha_t
takes every value in (0, 1) once, so the schedule drops out) leaves a sum over the number l of
masked tokens:

    log p(c | x) >= -sum_{l=1..L} (1/l) E_{M: l of c's positions} [ sum_{i in M} -log p(c_i | x, c with M masked) ]
                  = -E_{l ~ U{1..L}} [ (L/l) E_M [ ... ] ]

(with rate r, a given set of l masked positions has weight integral_0^1 r^(l-1) (1-r)^(L-l) dr =
1 / (l C(L, l))). That is the estimator here, LLaDA's lower-variance form of the same bound: n
samples per row with l evenly spread over 1..L (l_k = 1 + floor(L ((u + k/n) mod 1)) for one
uniform u per row) and M the l positions of c with the smallest random keys. A one-token
continuation is therefore exact: log p(c | x, c masked). u and the keys come from the row's own
stream (a digest of its tokens and the run's seed), so a request scores the same in any batch and
at any padded length. Padding is a segment of its own, which no real token attends to (the model
is bidirectional). is_greedy: with all of c masked, each of its tokens is the model's argmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import Config
from jaxlm.inference.per_layer import join_params
from jaxlm.objectives.mdlm import mask_id, subs_logits
from jaxlm.parallel.sharding import use_mesh_rules

KEY_SALT = 0x656C626F  # "elbo": this stream is not training's


def masked_positions(scored_BT, keys_BT, l_B):
    """The l_B scored positions of each row with the smallest keys (a uniform random l-subset)."""
    order_BT = jnp.argsort(jnp.where(scored_BT, keys_BT, 2.0), axis=1)
    rank_BT = jnp.argsort(order_BT, axis=1)
    return scored_BT & (rank_BT < l_B[:, None])


def scores(graphdef, mesh, rules, cfg: Config, n: int, max_len: int):
    """fn(params, x0, targets, scored, lengths, digests) -> (ELBO of the scored tokens [B], is greedy [B])."""
    mask = mask_id(cfg.model.vocab_size)
    base = jax.random.fold_in(jax.random.key(cfg.train.seed), KEY_SALT)

    def fn(params, x0_BT, targets_BT, scored_BT, lengths_B, digest_B):
        del targets_BT  # the clean tokens themselves
        B, T = x0_BT.shape
        segment_BT = (jnp.arange(T)[None, :] < lengths_B[:, None]).astype(jnp.int32)  # 0 = padding
        model = nnx.merge(graphdef, join_params(params))  # the decoder's per-layer parameters

        def logits(x_BT):
            with use_mesh_rules(mesh, rules):
                out_BTV, _ = model(x_BT, None, segment_BT)
            return subs_logits(out_BTV, mask)

        stream_B = jax.vmap(lambda k: jax.random.fold_in(base, k))(digest_B)
        u_B = jax.vmap(lambda k: jax.random.uniform(k, ()))(stream_B)
        L_B = jnp.sum(scored_BT, axis=1)

        def one(total_B, k):
            l_B = jnp.minimum(1 + jnp.floor(L_B * jnp.mod(u_B + k / n, 1.0)).astype(jnp.int32), L_B)
            # drawn at max_len, then cut: the same keys at any padded length
            keys_BT = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(s, k + 1), (max_len,)))(stream_B)
            masked_BT = masked_positions(scored_BT, keys_BT[:, :T], l_B)
            logits_BTV = logits(jnp.where(masked_BT, mask, x0_BT))
            ce_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - \
                jnp.take_along_axis(logits_BTV, x0_BT[..., None], axis=-1)[..., 0]
            weight_B = L_B / jnp.maximum(l_B, 1)
            return total_B + weight_B * jnp.sum(jnp.where(masked_BT, ce_BT, 0.0), axis=1), None

        total_B, _ = jax.lax.scan(one, jnp.zeros(B, jnp.float32), jnp.arange(n))
        denoised_BT = jnp.argmax(logits(jnp.where(scored_BT, mask, x0_BT)), axis=-1)
        return -total_B / n, jnp.all((denoised_BT == x0_BT) | ~scored_BT, axis=1)

    return fn
