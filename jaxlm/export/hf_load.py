"""Hugging Face safetensors (the architectures of compat.py) -> jaxlm parameters, placed in their shardings.

(The file format only; `importer.py` is the `jaxlm import` verb, `train.init_from` calls `load_hf_params`.)

Each parameter is built with jax.make_array_from_callback: every device's shard reads only the
HF tensors (and, for experts, only the experts) it holds, one tensor at a time (safetensors_read),
so no process ever holds more than its parameters and one HF tensor.

A checkpoint written by `jaxlm export` carries jaxlm's own config sections in config.json
("jaxlm"), which the import takes as they are: the round trip is exact. Other checkpoints are
read from their HF config (hf_config.py), and refused in one line where jaxlm cannot compute the same
function.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np

from jaxlm.config import Config, ConfigError, ModelConfig, MoEConfig, from_dict
from jaxlm.errors import UserError
from jaxlm.export import hf, hf_config
from jaxlm.export import params as P
from jaxlm.export.compat import LLAMA, MISTRAL
from jaxlm.export.safetensors_read import SafetensorsFiles, aligned_empty
from jaxlm.model.build import abstract_params

# keys that define the function the parameters compute: the run's config must agree with the import
SAME_MODEL = ("vocab_size", "d_model", "n_layers", "share_blocks", "n_heads", "n_kv_heads", "head_dim", "norm", "mlp",
              "position", "rope_theta", "rope_scaling", "attention_bias", "qk_norm", "tie_embeddings",
              "scale_tied_logits", "norm_eps", "causal")
SAME_MOE = ("n_experts", "top_k", "every", "first_dense", "n_shared", "shared_gate", "router", "norm_topk_prob")


@dataclasses.dataclass
class Source:
    """An HF checkpoint, read: the jaxlm config sections it maps to and the architecture whose
    tensor names it uses."""

    path: Path
    arch: str
    model: ModelConfig
    moe: MoEConfig
    tokenizer: str | None


def read_source(hf_dir: str | Path) -> Source:
    path = Path(hf_dir)
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no readable config.json ({type(e).__name__}); expected a Hugging Face model "
                        "directory") from None
    arch = (c.get("architectures") or [None])[0]
    if arch not in hf.MODEL_TYPES:
        raise UserError(f"{path}: architecture {arch!r} cannot be imported; expected one of {', '.join(hf.MODEL_TYPES)}")
    arch = LLAMA if arch == MISTRAL else arch  # Mistral's tensors and function are Llama's
    if "jaxlm" in c:  # written by `jaxlm export`: the exact sections
        mine = c["jaxlm"]
        return Source(path, arch, from_dict(ModelConfig, mine["model"], "model."), from_dict(MoEConfig, mine["moe"], "moe."),
                      mine.get("tokenizer"))
    tied = c["tie_word_embeddings"] if "tie_word_embeddings" in c else not _has_lm_head(path)
    model, moe = hf_config.sections(path, arch, c, bool(tied))
    return Source(path, arch, model, moe, _tokenizer_spec(path))


def _tokenizer_spec(path: Path) -> str | None:
    """The model directory as data.tokenizer when it holds a tokenizer: GPT-2 files, or a
    tokenizer.json (read by `load_tokenizer` once it takes Hugging Face tokenizer.json files)."""
    has = lambda *names: all((path / n).is_file() for n in names)
    return str(path) if has("vocab.json", "merges.txt") or has("tokenizer.json") else None


def _has_lm_head(path: Path) -> bool:
    try:
        return "lm_head.weight" in SafetensorsFiles(path).where
    except UserError:
        return True


def mismatches(src: Source, cfg: Config) -> list[str]:
    """'key (checkpoint -> config)' for every setting where the run's config and the import differ."""
    out = [f"model.{'d_head' if k == 'head_dim' else k} ({getattr(src.model, k)!r} -> {getattr(cfg.model, k)!r})"
           for k in SAME_MODEL if getattr(src.model, k) != getattr(cfg.model, k)]
    kinds = set(P.layer_kinds(src.model, src.moe))
    if "dense" in kinds and src.model.d_ff != cfg.model.d_ff:
        out.append(f"model.d_ff ({src.model.d_ff} -> {cfg.model.d_ff})")
    if src.moe.n_experts or cfg.moe.n_experts:
        out += [f"moe.{k} ({getattr(src.moe, k)!r} -> {getattr(cfg.moe, k)!r})"
                for k in SAME_MOE if getattr(src.moe, k) != getattr(cfg.moe, k)]
        ff = lambda m, e: e.d_ff or m.d_ff
        if "moe" in kinds and ff(src.model, src.moe) != ff(cfg.model, cfg.moe):
            out.append(f"moe.d_ff ({ff(src.model, src.moe)} -> {ff(cfg.model, cfg.moe)})")
    return out


def load_params(src: Source, cfg: Config, shardings) -> dict:
    """jaxlm params for `cfg` (which must agree with `src`), each a jax.Array in `shardings`."""
    bad = mismatches(src, cfg)
    if bad:
        raise ConfigError(f"{src.path} does not fit the config: {', '.join(bad)}; set these as in the checkpoint")
    m, moe = cfg.model, cfg.moe
    files = SafetensorsFiles(src.path)
    tensors = hf.hf_tensors(src.arch, m, moe)
    for t in tensors:  # jaxlm has nothing in place of these: they must be exactly zero
        if t.form == "zeros" and np.any(files.get(t.name, t.shape)):
            raise UserError(f"{src.path}: tensor {t.name} is not zero; jaxlm has no equivalent of it")
    sources: dict[tuple, list[hf.HFTensor]] = {}
    for t in tensors:
        if t.form not in ("tied_head", "zeros"):
            sources.setdefault((t.source, t.layer), []).append(t)
    reader = _Reader(files, sources)
    rows_of = P.leaf_rows(m, moe)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, sharding: reader.array(rows_of[tuple(k.key for k in path)], spec, sharding),
        abstract_params(cfg), shardings)


EXPERT_ROWS = ("moe.gate", "moe.up", "moe.down")  # leaves with an expert dimension after the layer one


@dataclasses.dataclass
class _Reader:
    """Builds each jaxlm leaf from the HF tensors its device shards hold, read on demand."""

    files: SafetensorsFiles
    sources: dict  # (jaxlm row name, layer) -> the HF tensors that form it (one per expert)

    def array(self, rows: list, spec: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        """The leaf `spec` (its rows: (name, layer) per leading index) in `sharding`."""
        return jax.make_array_from_callback(spec.shape, sharding, functools.partial(self.shard, rows, spec))

    def shard(self, rows: list, spec: jax.ShapeDtypeStruct, index: tuple) -> np.ndarray:
        """One device's slice `index` of the leaf: only its layers (and experts) are read, each
        HF tensor mapped while it is copied into the slice (which JAX then takes as is)."""
        ranges = [range(*sl.indices(n)) for sl, n in zip(index, spec.shape)]
        out = aligned_empty(tuple(len(r) for r in ranges), spec.dtype)
        if rows[0][1] is None:  # a global tensor
            t = self.sources[(rows[0][0], None)][0]
            if t.form == "same" and out.shape == t.shape and self.files.dtype(t.name, t.shape) == out.dtype:
                return self.files.read_into(t.name, t.shape, out)  # the embedding: no copy at all
            self.fill(out, t, index, spec.shape)
            return out
        for j, r in enumerate(ranges[0]):
            name, layer = rows[r]
            ts = self.sources[(name, layer)]
            if name in EXPERT_ROWS:
                for k, e in enumerate(ranges[1]):
                    self.fill(out[j, k], ts[e], index[2:], spec.shape[2:])
            else:
                self.fill(out[j], ts[0], index[1:], spec.shape[1:])
        return out

    def fill(self, dst: np.ndarray, t: hf.HFTensor, index: tuple, shape: tuple) -> None:
        """dst = slice `index` of jaxlm's layout (`shape`) of the HF tensor `t`."""
        x = self.files.get(t.name, t.shape)
        whole = dst.shape == tuple(shape)
        if whole and t.form in ("T", "T2x", "heads_in", "heads_out"):  # a transpose, reshaped or not
            transpose_into(dst.reshape(x.shape[::-1]), x)
            if t.form == "T2x":
                dst *= np.asarray(0.5, dst.dtype)  # exact, as from_hf
        else:
            dst[...] = hf.from_hf(t, x, shape)[index]


TRANSPOSE_BLOCK = 256


def transpose_into(dst: np.ndarray, x: np.ndarray) -> None:
    """dst[...] = x.T for 2-D arrays, in cache-sized blocks (3x faster than numpy's strided copy),
    dst's rows in order: its fresh pages are touched one after another (1.5x faster on a first
    load than sweeping every page of dst once per block column)."""
    n, m = x.shape
    for j in range(0, m, TRANSPOSE_BLOCK):
        for i in range(0, n, TRANSPOSE_BLOCK):
            dst[j:j + TRANSPOSE_BLOCK, i:i + TRANSPOSE_BLOCK] = x[i:i + TRANSPOSE_BLOCK, j:j + TRANSPOSE_BLOCK].T


def load_hf_params(hf_dir: str | Path, cfg: Config, shardings) -> dict:
    """`train.init_from`: the HF checkpoint's weights as the params of `cfg`, in `shardings`."""
    return load_params(read_source(hf_dir), cfg, shardings)
