"""The Decoder (a model's jitted prefill and decode step over a KV cache) and `generate`.

Prompts are right-padded (see the package docstring). The cache holds every position before a
row's *pending* token (the last one known, not yet run through the model): prefill writes
prompt[:-1]; each step runs the pending tokens, writes their keys and values, and samples the
next ones. MoE layers route dropless at decode (no token is ever dropped), without router noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxlm.compress.quantize import is_quantized, linear_codes, read_codes
from jaxlm.config import Config
from jaxlm.inference.budget import Budget, StepControls, mask_stop
from jaxlm.inference.cache import CACHE_AXES, bucket, init_caches
from jaxlm.inference.per_layer import cache_length, join_caches, join_params, split_caches, split_params
from jaxlm.inference.sampling import Sampling, sample
from jaxlm.model import kernels
from jaxlm.model.kernels import quantized_cpu
from jaxlm.model.transformer import Transformer
from jaxlm.parallel.sharding import constrain, resolve_rules, spec_for, use_mesh_rules

DECODE_ATTENTION = ("xla", "cpu")  # kernels that take a cache's mask (T queries over S slots)


def decode_config(cfg: Config, platform: str, unrolled: bool = True) -> Config:
    """The run's config as decoding runs it: kernels resolved, layers `unrolled` over per-layer
    weights (per_layer.py) or as the platform runs them, dropless MoE without noise."""
    model = kernels.resolve(cfg.model, platform)
    model = dataclasses.replace(model, scan_layers=False) if unrolled else model
    if model.attention_impl not in DECODE_ATTENTION:
        model = dataclasses.replace(model, attention_impl="xla")
    moe = dataclasses.replace(cfg.moe, impl="dropless", noise_std=0.0)
    return dataclasses.replace(cfg, model=model, moe=moe)


def place_params(params: dict, abstract: nnx.State, mesh: Mesh, rules: dict) -> dict:
    """Parameters onto the mesh by their logical axes; a quantized weight's codes and scales by
    the axes it carries (jaxlm/compress/quantize.py), each by the spec of its own shape."""
    out = jax.tree.map(lambda x: x, params)
    for path, var in nnx.to_flat_state(abstract):
        node = out
        for key in path[:-1]:
            node = node[key]
        axes = getattr(node[path[-1]], "axes", None) or var.get_metadata().get("axes", ())
        put = lambda a: jax.device_put(a, NamedSharding(mesh, spec_for(a.shape, axes, mesh, rules)))
        node[path[-1]] = jax.tree.map(put, node[path[-1]])
    return out


@dataclasses.dataclass(frozen=True)
class Program:
    """What a decoder's programs are compiled from (graph, mesh, rules), without its weights: the
    key of caches of compiled programs, which so keep no parameters alive. Equal configs on one
    mesh give equal programs."""

    key: tuple  # the model and MoE configs as decoded, the mesh, the rules table
    graphdef: Any = dataclasses.field(compare=False)
    mesh: Mesh = dataclasses.field(compare=False)
    rules: dict = dataclasses.field(compare=False)

    def forward(self, params, tokens_BT, positions_BT, caches) -> tuple[jax.Array, list]:
        """f32 logits [B, T, V] of T new tokens per row at their positions, and the updated caches
        (parameters and caches per layer, per_layer.py)."""
        with use_mesh_rules(self.mesh, self.rules):
            model = nnx.merge(self.graphdef, join_params(params))
            scanned = model.cfg.scan_layers  # then the model carries its caches stacked
            logits_BTV, caches = model.decode(tokens_BT, positions_BT, join_caches(caches) if scanned else caches)
        return logits_BTV.astype(jnp.float32), split_caches(caches) if scanned else caches


class Decoder:
    """One model ready to decode on one mesh: its graph, its parameters placed by the rules table
    (batch over data, heads over tensor) and held per layer (`params`: per_layer.py; assigning
    the model's stacked parameters places and splits them), and jitted programs over the cache."""

    def __init__(self, cfg: Config, params: dict, mesh: Mesh):
        # quantized weights are read as codes by the CPU kernel on one CPU device (linear schemes),
        # unrolled per layer like f32 ones; else they stay scanned: unrolled, XLA:CPU's scheduler
        # hoists every layer's dequantization to the start, all live at once (4x the codes' bytes)
        quantized = any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))
        platform = mesh.devices.flat[0].platform
        self.reads_codes = (platform == "cpu" and mesh.size == 1 and linear_codes(params)
                            and quantized_cpu.available())
        self.cfg = decode_config(cfg, platform, unrolled=not quantized or self.reads_codes)
        self.mesh, self.rules = mesh, resolve_rules(cfg.mesh.rules)
        model = nnx.eval_shape(lambda: Transformer(self.cfg.model, self.cfg.moe, nnx.Rngs(0)))
        self.graphdef, abstract = nnx.split(model)
        key = (repr(self.cfg.model), repr(self.cfg.moe), mesh, repr(sorted(self.rules.items())))
        self.program = Program(key, self.graphdef, mesh, self.rules)
        self._abstract = abstract
        self.params = params
        self.prefill_fn = jax.jit(lambda p, t, pos, c: self.forward(p, t, pos, c)[1], donate_argnums=3)
        self.step_fn = jax.jit(self.step, static_argnames="sampling", donate_argnums=1)
        self.expand_fn = jax.jit(self.expand)

    @property
    def params(self) -> dict:
        return self._params

    @params.setter
    def params(self, params: dict) -> None:
        placed = place_params(params, self._abstract, self.mesh, self.rules)
        placed = placed if self.cfg.model.scan_layers else split_params(placed)
        self._params = read_codes(placed) if self.reads_codes else placed

    @property
    def max_seq_len(self) -> int:
        return self.cfg.model.max_seq_len

    def new_caches(self, batch: int, length: int) -> list:
        return init_caches(self.cfg.model, self.cfg.moe, batch, length, self.mesh, self.rules)

    def expand(self, caches, rows_B) -> list:
        """Caches of B rows, row b a copy of row rows_B[b] of `caches` (per layer: [B, S, K, d])."""
        with use_mesh_rules(self.mesh, self.rules):
            return jax.tree.map(lambda c: constrain(jnp.take(c, rows_B, axis=0), CACHE_AXES), caches)

    def forward(self, params, tokens_BT, positions_BT, caches) -> tuple[jax.Array, list]:
        """f32 logits [B, T, V] of T new tokens per row at their positions, and the updated caches."""
        return self.program.forward(params, tokens_BT, positions_BT, caches)

    def step(self, params, caches, tokens_B, start_B, i, key, controls: StepControls, sampling: Sampling):
        """Step i: runs each row's pending token at position start_B + i, samples the next (a
        row's stop token masked out where `controls` suppress it; its forced token where it has one)."""
        logits_B1V, caches = self.forward(params, tokens_B[:, None], (start_B + i)[:, None], caches)
        logits_BV = mask_stop(logits_B1V[:, 0], controls)
        sampled_B = sample(logits_BV, jax.random.fold_in(key, i), sampling)
        return jnp.where(controls.force_B >= 0, controls.force_B, sampled_B), caches

    def prefill(self, caches, prompts: list[list[int]]):
        """Writes every prompt but its last token (right-padded; padding lands in slots that are
        overwritten before any query can see them), each distinct prompt once (GRPO samples a group
        from one prompt): repeated rows are copied. Returns (caches, pending tokens, positions)."""
        lengths = np.array([len(p) for p in prompts])
        n = int(lengths.max()) - 1
        if n > 0:
            first = {}
            rows_B = np.array([first.setdefault(tuple(p), len(first)) for p in prompts], np.int32)
            distinct = [list(p) for p in first]
            S = cache_length(caches)
            T = min(bucket(n, 16), S)
            tokens = np.zeros((len(distinct), T), np.int32)
            for row, p in enumerate(distinct):
                tokens[row, : len(p) - 1] = p[:-1]
            positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
            if len(distinct) < len(prompts):
                small = self.prefill_fn(self.params, tokens, positions, self.new_caches(len(distinct), S))
                caches = self.expand_fn(small, rows_B)
            else:
                caches = self.prefill_fn(self.params, tokens, positions, caches)
        pending = np.array([p[-1] for p in prompts], np.int32)
        return caches, jnp.asarray(pending), jnp.asarray(lengths - 1, jnp.int32)


class Completions(list):
    """The generated tokens of each row (a list of lists), and which rows ended at the stop token."""

    def __init__(self, rows: int):
        super().__init__([] for _ in range(rows))
        self.stopped = np.zeros(rows, bool)


class Outputs:
    """Generated tokens per row; a row ends at the stop token (not kept), at `limit` tokens, or
    when `until(row, its tokens)` says so (stop strings: the caller cuts the text)."""

    def __init__(self, rows: int, limit: int, stop_id: int | None,
                 until: Callable[[int, list[int]], bool] | None = None):
        self.tokens = Completions(rows)
        self.done = np.zeros(rows, bool)
        self.limit, self.stop_id, self.until = limit, stop_id, until

    def add(self, row: int, new: list[int]) -> list[int]:
        """Appends to an unfinished row; returns what was kept."""
        kept = []
        for t in new:
            if self.done[row]:
                break
            if t == self.stop_id:
                self.done[row] = self.tokens.stopped[row] = True
                break
            kept.append(int(t))
            self.done[row] = len(self.tokens[row]) + len(kept) >= self.limit
        self.tokens[row] += kept
        if kept and self.until is not None and self.until(row, self.tokens[row]):
            self.done[row] = True
        return kept


def check_room(dec: Decoder, prompts: list[list[int]], max_new: int) -> int:
    """max_new, or fewer so that no row passes max_seq_len (said once on stderr)."""
    import sys

    from jaxlm.errors import UserError

    longest = max(len(p) for p in prompts)
    if longest > dec.max_seq_len:
        raise UserError(f"a prompt has {longest} tokens, more than the model's max_seq_len={dec.max_seq_len}; "
                        "shorten it")
    if any(len(p) == 0 for p in prompts):
        raise UserError("a prompt is empty; give at least one token")
    room = dec.max_seq_len - longest
    if max_new > room and jax.process_index() == 0:
        print(f"jaxlm: asked for {max_new} new tokens but only {room} fit after the longest prompt "
              f"({longest} tokens) because of max_seq_len={dec.max_seq_len}; generating {room}",
              file=sys.stderr, flush=True)
    return max(0, min(max_new, room))


def generate(dec: Decoder, prompts: list[list[int]], max_new: int, sampling: Sampling, seed: int = 0,
             stop_id: int | None = None, on_tokens: Callable[[int, list[int]], None] | None = None,
             until: Callable[[int, list[int]], bool] | None = None, budget: Budget = Budget()) -> Completions:
    """Continues each prompt by up to `max_new` tokens (fewer at `stop_id`, where `until(row, its
    tokens)` is true, or at max_seq_len); decoding ends when every row has ended. `budget` forces
    (budget.py): no stop before its min_new tokens, its cue after its thinking tokens, then up to
    `max_new` more.

    `on_tokens(row, tokens)` sees each row's new tokens as they come (streaming). The step after
    the one being read is already queued on the device, so reading a token costs no idle time.
    """
    max_new = check_room(dec, prompts, budget.total(max_new))
    out = Outputs(len(prompts), max_new, stop_id, until)
    if max_new == 0:
        return out.tokens
    caches = dec.new_caches(len(prompts), bucket(max(len(p) for p in prompts) + max_new))
    caches, tokens, start = dec.prefill(caches, prompts)
    key = jax.random.key(seed)

    def read(tokens_B) -> bool:
        for row, t in enumerate(np.asarray(tokens_B).tolist()):
            kept = out.add(row, [t]) if not out.done[row] else []
            if kept and on_tokens is not None:
                on_tokens(row, kept)
        return bool(out.done.all())

    queued = None
    for i in range(max_new):
        controls = budget.controls(i, len(prompts), stop_id)
        tokens, caches = dec.step_fn(dec.params, caches, tokens, start, i, key, controls, sampling=sampling)
        if queued is not None and read(queued):
            return out.tokens
        queued = tokens
    read(queued)
    return out.tokens
