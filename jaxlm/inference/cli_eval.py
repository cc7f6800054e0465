"""`jaxlm eval RUN_DIR --data PATH`: loss, perplexity and bits per byte of a checkpoint, as JSON.

PATH is a text file, a directory or glob of text files, or a corpus made by `jaxlm prepare`
(its validation split unless --split says otherwise). The text is tokenized with the run's
tokenizer and cut into the rows the run trained on (non-overlapping windows of data.seq_len, or
packed documents with data.packing), covering every token after the first exactly once; the
loss is the run's objective's eval sums (the trainer's jitted eval step). Bits per byte divide
the summed loss in bits by the UTF-8 bytes of the scored tokens (special tokens count 0 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os

import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (with checkpoints/) written by `jaxlm train`")
    parser.add_argument("--data", required=True, help="a text file, directory or glob, or a prepared corpus")
    parser.add_argument("--split", choices=["train", "val"], default="val",
                        help="which split of a prepared corpus (default val); text is scored whole")
    parser.add_argument("--step", type=ckpt.step_arg,
                        help="the checkpoint step to load, or 'best' (lowest eval loss); default: the newest valid one")
    parser.add_argument("--max-tokens", type=int, default=0, help="score about this many tokens at most (0 = all)")
    from jaxlm.compress.schemes import SCHEMES

    parser.add_argument("--quantize", choices=list(SCHEMES), metavar="SCHEME",
                        help=f"score with weight-only quantized weights: {', '.join(SCHEMES)}")


def token_stream(path: str, split: str, cfg, tokenizer):
    from jaxlm.data.sources import is_prepared, load_streams

    train, val = load_streams(path, dataclasses.replace(cfg.data, val_fraction=0.0), tokenizer)
    return (val if split == "val" else train) if is_prepared(path) else train


def rows(stream, seq_len: int, packing: bool) -> list[dict]:
    """Rows covering every target once: packed documents, or windows plus a last partial one."""
    from jaxlm.data.pipeline import PackedRows, Windows

    source = PackedRows(stream, seq_len) if packing else Windows(stream, seq_len)
    out = [source[i] for i in range(len(source))]
    done = len(source) * seq_len if not packing else len(stream) - 1
    if done < len(stream) - 1:
        tail = stream.read(done, len(stream) - done)
        row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "loss_mask")}
        n = len(tail) - 1
        row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = tail[:-1], tail[1:], 1
        out.append(row)
    return out


def quantized_eval_step(trainer, params: dict, scheme: str):
    """(quantized params placed on the trainer's mesh, the eval step jitted for them): the trainer's
    own step fixes its parameters' shardings to the unquantized tree's."""
    import functools

    import jax
    from flax import nnx

    from jaxlm.compress.quantize import quantize_params
    from jaxlm.inference.decode import place_params
    from jaxlm.model.build import build_model
    from jaxlm.train.step import eval_step

    abstract = nnx.state(nnx.eval_shape(lambda: build_model(trainer.cfg, 0)))
    params = place_params(quantize_params(params, trainer.cfg, scheme), abstract, trainer.mesh, trainer.rules)
    step = jax.jit(functools.partial(eval_step, spec=trainer.spec))
    return params, lambda p, batch: step(p, batch, trainer.frozen)


def evaluate(run_dir: str, data: str, split: str = "val", step: int | None = None, max_tokens: int = 0,
             quantize: str | None = None) -> dict:
    from jaxlm.data.batch import Batch
    from jaxlm.data.pipeline import to_global
    from jaxlm.parallel.mesh import data_parallel_size
    from jaxlm.checkpoint.runs import inference_mesh, load_run
    from jaxlm.train.step import make_trainer

    if max_tokens < 0:
        raise UserError(f"--max-tokens {max_tokens} must be >= 0 (0 = all)")
    if not os.path.exists(data) and not glob.glob(data):
        raise UserError(f"--data {data}: no such file, directory or glob; expected text or a prepared corpus")
    from jaxlm.config import Config, from_dict

    path = ckpt.find_step(run_dir, step)
    cfg = from_dict(Config, ckpt.read_meta(path)["config"], prefix="")
    mesh = inference_mesh(cfg.mesh)
    run = load_run(run_dir, step, mesh)
    trainer = make_trainer(cfg, mesh)
    stream = token_stream(data, split, cfg, run.tokenizer)
    if len(stream) < 2:
        raise UserError(f"--data {data} has {len(stream)} tokens; at least 2 are needed to score one")
    all_rows = rows(stream, cfg.data.seq_len, cfg.data.packing)
    if max_tokens:
        all_rows = all_rows[: max(1, -(-max_tokens // cfg.data.seq_len))]
    dp = data_parallel_size(mesh, trainer.rules)
    per_batch = -(-cfg.train.global_batch // dp) * dp
    params, eval_step = run.params, trainer.eval_step
    if quantize:
        params, eval_step = quantized_eval_step(trainer, params, quantize)
    token_bytes = np.array([0 if i in run.tokenizer.special_tokens.values() else
                            len(run.tokenizer.decode_single_token_bytes(i)) for i in range(run.tokenizer.n_vocab)])
    loss_sum = count = n_bytes = 0.0
    for start in range(0, len(all_rows), per_batch):
        chunk = all_rows[start: start + per_batch]
        chunk += [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (per_batch - len(chunk))  # mask 0
        batch = Batch.stack(chunk)
        sums = eval_step(params, to_global(batch, trainer.batch_sharding))
        loss_sum += float(sums["loss_sum"])
        count += float(sums["count"])
        n_bytes += float(np.sum(token_bytes[batch.targets] * batch.loss_mask))
    loss = loss_sum / max(count, 1.0)
    return {"run": run_dir, "step": run.step, "data": data, **({"quantize": quantize} if quantize else {}),
            "tokens": int(count), "bytes": int(n_bytes),
            "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss_sum / math.log(2) / n_bytes if n_bytes else None}


def main(args: argparse.Namespace) -> int:
    print(json.dumps(evaluate(args.run_dir, args.data, args.split, args.step, args.max_tokens, args.quantize)))
    return 0
