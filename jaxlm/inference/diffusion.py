"""Samplers for masked diffusion LMs (checkpoints trained with `train.objective: mdlm`).

Generation starts from the prompt followed by `length` `<|mask|>` tokens and unmasks them in
`steps` model calls. Every sampler uses SUBS: the mask token is never predicted (so it is never
emitted) and tokens already unmasked stay as they are.

  sample_mdlm    MDLM ancestral sampling: at each step t -> s, a masked token is revealed with
                 probability (alpha_s - alpha_t) / (1 - alpha_t), drawn from the model's x0;
                 the last step (s = 0) reveals all that remain.
  sample_remask  LLaDA low-confidence remasking: predict every masked position, keep the k most
                 confident (k spreads the masks evenly over the steps), remask the rest.
  sample_block   block diffusion (semi-autoregressive): blocks of `block_size` positions, left
                 to right, each denoised by low-confidence remasking with steps/n_blocks steps,
                 conditioned on the finished blocks (later blocks are still masks).

sample_mdlm also takes a `block_size`: given, it goes block by block as sample_block does. Each
returns a `Sample` with its wall time and makes one call of one compiled step per denoising step
(compiled before the clock starts). `generate_mdlm` is the entry point for `jaxlm generate`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import Config
from jaxlm.errors import UserError
from jaxlm.objectives.mdlm import alpha, mask_id, subs_logits


@dataclass
class Sample:
    tokens: np.ndarray  # [B, P + length]: the prompt then the generated tokens
    new_tokens: int  # generated tokens over all rows
    seconds: float  # wall time of the denoising steps (compilation excluded)
    steps: int  # model calls made
    history: list = field(default_factory=list)  # the canvas after each step, if asked for

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def block_plan(length: int, steps: int, block_size: int | None) -> list[tuple[int, int, int]]:
    """[(first, end, steps)] per block, relative to the generation: `steps` split over the blocks
    as evenly as it goes, the earlier blocks taking the remainder; each block gets at least one
    (so fewer steps than blocks makes one call per block)."""
    size = length if block_size is None else max(1, min(block_size, length))
    bounds = [(lo, min(lo + size, length)) for lo in range(0, length, size)]
    base, extra = divmod(steps, len(bounds))
    return [(lo, hi, max(1, base + (i < extra))) for i, (lo, hi) in enumerate(bounds)]


def _draw(key, logits_BTV, temperature: float):
    """x0 from the (SUBS) logits: sampled at `temperature`, or the argmax when it is 0."""
    if temperature == 0:
        return jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_BTV / temperature, axis=-1).astype(jnp.int32)


class _Denoiser:
    """The model's SUBS logits on a canvas, inside one jitted step per sampler."""

    def __init__(self, model, vocab_size: int, temperature: float):
        self.graphdef, self.state = nnx.split(model)
        self.mask, self.temperature = mask_id(vocab_size), temperature

    def logits(self, state, x_BT):
        logits, _ = nnx.merge(self.graphdef, state)(x_BT)
        return subs_logits(logits, self.mask)

    def ancestral(self, state, x_BT, key, alpha_t, alpha_s, lo, hi):
        """One MDLM step t -> s on the masked positions in [lo, hi)."""
        draw_key, reveal_key = jax.random.split(key)
        x0_BT = _draw(draw_key, self.logits(state, x_BT), self.temperature)
        T = x_BT.shape[1]
        in_block = (jnp.arange(T) >= lo) & (jnp.arange(T) < hi)
        reveal = jax.random.uniform(reveal_key, x_BT.shape) < (alpha_s - alpha_t) / (1.0 - alpha_t)
        return jnp.where((x_BT == self.mask) & in_block & reveal, x0_BT, x_BT)

    def remask(self, state, x_BT, key, n_keep, lo, hi):
        """One low-confidence remasking step: of the masked positions in [lo, hi), the `n_keep`
        whose predicted token is most probable are revealed; the rest stay masked."""
        logits = self.logits(state, x_BT)
        x0_BT = _draw(key, logits, self.temperature)
        p_BTV = jax.nn.softmax(logits, axis=-1)
        conf_BT = jnp.take_along_axis(p_BTV, x0_BT[..., None], axis=-1)[..., 0]
        T = x_BT.shape[1]
        candidate = (x_BT == self.mask) & (jnp.arange(T) >= lo) & (jnp.arange(T) < hi)
        conf_BT = jnp.where(candidate, conf_BT, -1.0)
        rank_BT = jnp.argsort(jnp.argsort(-conf_BT, axis=-1, stable=True), axis=-1, stable=True)
        return jnp.where(candidate & (rank_BT < n_keep), x0_BT, x_BT)


def _canvas(prompt_ids, length: int, rows: int, mask: int, max_seq_len: int) -> jax.Array:
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    if prompt.size + length > max_seq_len:
        raise UserError(f"prompt ({prompt.size} tokens) + {length} new tokens exceed model.max_seq_len={max_seq_len}")
    row = np.concatenate([prompt, np.full(length, mask, np.int32)])
    return jnp.asarray(np.tile(row, (rows, 1)))


def _run(step_fn, state, x_BT, calls, history: bool, new_tokens: int) -> Sample:
    """Compiles `step_fn(state, x, key, *scalars)` for the canvas (the weights are an argument,
    not constants), then times the calls [(key, *scalars)] in order."""
    compiled = jax.jit(step_fn).lower(state, x_BT, *calls[0]).compile()
    kept = []
    start = time.perf_counter()
    for args in calls:
        x_BT = compiled(state, x_BT, *args)
        if history:
            kept.append(np.asarray(x_BT))
    x_BT = jax.block_until_ready(x_BT)
    return Sample(np.asarray(x_BT), new_tokens, time.perf_counter() - start, len(calls), kept)


def _scalars(*values):
    return tuple(jnp.asarray(v) for v in values)


def sample_mdlm(model, prompt_ids, length: int, steps: int, seed: int = 0, *, schedule: str = "linear",
                block_size: int | None = None, temperature: float = 1.0, rows: int = 1,
                history: bool = False) -> Sample:
    """MDLM ancestral sampling: `steps` steps from t = 1 to 0 (per block, block by block)."""
    cfg = model.cfg
    d = _Denoiser(model, cfg.vocab_size, temperature)
    x_BT = _canvas(prompt_ids, length, rows, d.mask, cfg.max_seq_len)
    P, key, calls = x_BT.shape[1] - length, jax.random.key(seed), []
    for lo, hi, n in block_plan(length, steps, block_size):
        for i in range(n, 0, -1):  # t = i/n -> s = (i-1)/n
            a_t, a_s = alpha(schedule, i / n), alpha(schedule, (i - 1) / n)
            calls.append((jax.random.fold_in(key, len(calls)), *_scalars(a_t, a_s, P + lo, P + hi)))
    return _run(d.ancestral, d.state, x_BT, calls, history, rows * length)


def _remasking(model, prompt_ids, length: int, plan, seed: int, temperature: float, rows: int,
               history: bool) -> Sample:
    """Low-confidence remasking over the blocks of `plan` in order: each block's masks revealed
    in near-equal parts per step (the first steps take the remainder, as in LLaDA)."""
    cfg = model.cfg
    d = _Denoiser(model, cfg.vocab_size, temperature)
    x_BT = _canvas(prompt_ids, length, rows, d.mask, cfg.max_seq_len)
    P, key, calls = x_BT.shape[1] - length, jax.random.key(seed), []
    for lo, hi, n in plan:
        base, extra = divmod(hi - lo, n)
        for i in range(n):
            calls.append((jax.random.fold_in(key, len(calls)), *_scalars(base + (i < extra), P + lo, P + hi)))
    return _run(d.remask, d.state, x_BT, calls, history, rows * length)


def sample_remask(model, prompt_ids, length: int, steps: int, seed: int = 0, *, temperature: float = 1.0,
                  rows: int = 1, history: bool = False) -> Sample:
    """LLaDA low-confidence remasking over the whole generation at once."""
    return _remasking(model, prompt_ids, length, [(0, length, max(1, steps))], seed, temperature, rows, history)


def sample_block(model, prompt_ids, length: int, steps: int, block_size: int, seed: int = 0, *,
                 temperature: float = 1.0, rows: int = 1, history: bool = False) -> Sample:
    """Block diffusion: remasking block by block, left to right; `steps` in all (see block_plan)."""
    plan = block_plan(length, steps, block_size)
    return _remasking(model, prompt_ids, length, plan, seed, temperature, rows, history)


# ----------------------------------------------------------------------------- `jaxlm generate`

SAMPLERS = ("block", "llada", "mdlm")
DEFAULT_BLOCK = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `generate_mdlm` reads (a generate CLI that already has some keeps its own)."""
    have = {a.dest for a in parser._actions}
    flags = [("--sampler", dict(choices=SAMPLERS, default="block", help="masked-diffusion sampler")),
             ("--steps", dict(type=int, default=64, help="denoising steps (model calls) in all")),
             ("--block-size", dict(type=int, default=None,
                                   help=f"positions per block: block sampler (default {DEFAULT_BLOCK}); mdlm "
                                        "sampler block by block when given")),
             ("--max-new-tokens", dict(type=int, default=128, help="tokens to generate")),
             ("--temperature", dict(type=float, default=1.0, help="0 = argmax")),
             ("--seed", dict(type=int, default=0, help="sampling seed"))]
    for flag, kwargs in flags:
        if flag[2:].replace("-", "_") not in have:
            parser.add_argument(flag, **kwargs)


def generate_mdlm(model, cfg: Config, tokenizer, prompt: str, args: argparse.Namespace) -> Sample:
    """Samples a continuation of `prompt` from an mdlm checkpoint's model with `args.sampler`
    (cli_generate prints it as every generator prints)."""
    sampler = getattr(args, "sampler", "block")
    steps, block = getattr(args, "steps", 64), getattr(args, "block_size", None)
    length, seed = getattr(args, "max_new_tokens", 128), getattr(args, "seed", 0)
    temperature = getattr(args, "temperature", 1.0)
    for flag, value in (("--steps", steps), ("--max-new-tokens", length), ("--block-size", block)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be >= 1")
    ids = tokenizer.encode(prompt, allowed_special="all")
    if sampler == "mdlm":
        return sample_mdlm(model, ids, length, steps, seed, schedule=cfg.diffusion.schedule, block_size=block,
                           temperature=temperature)
    if sampler == "llada":
        return sample_remask(model, ids, length, steps, seed, temperature=temperature)
    return sample_block(model, ids, length, steps, block or DEFAULT_BLOCK, seed, temperature=temperature)


def completion(sample: Sample, stop_id: int | None) -> tuple[list[int], bool]:
    """The new tokens of the sample's first row, cut before the first stop token (what follows
    it belongs to another document), and whether there was one."""
    new = sample.tokens[0, sample.tokens.shape[1] - sample.new_tokens // len(sample.tokens):].tolist()
    if stop_id in new:
        return new[: new.index(stop_id)], True
    return new, False


def speed(sampler: str, sample: Sample) -> str:
    return (f"{sampler}: {sample.new_tokens} tokens in {sample.steps} steps, {sample.seconds:.2f} s, "
            f"{sample.tokens_per_s:.1f} tokens/s")
