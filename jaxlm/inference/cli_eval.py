"""`jaxlm eval RUN_DIR --data PATH`: loss, perplexity and bits per byte of a checkpoint, as JSON.

PATH is a text file, a directory or glob of text files, or a corpus made by `jaxlm prepare`; for
an sft or dpo run, chat or preference records (JSONL or Parquet), scored as training scores them:
rendered by the run's chat template, the loss over assistant tokens only (sft), or the DPO loss per
pair against the run's reference (dpo), with the run's val_fraction deciding the splits.
--split val scores what training held out: a prepared corpus's validation split, or the part of
the text the run's data.val_fraction sets aside (split as training split it); train the rest; all
everything. The default is val when PATH is a prepared corpus or the run's own data (the same
files, by the content fingerprint the checkpoint recorded), else all; the JSON says which text was
scored ("split", "scored"). The text is tokenized with the run's
tokenizer and cut into the rows the run trained on (non-overlapping windows of data.seq_len, or
packed documents with data.packing), covering every token after the first exactly once; the
loss is the run's objective's eval sums (the trainer's jitted eval step). Bits per byte divide
the summed loss in bits by the UTF-8 bytes of the scored tokens (special tokens count 0 bytes).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os

import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.data.records import RECORD_OBJECTIVES
from jaxlm.errors import UserError

SPLITS = ("val", "train", "all")


def is_run_data(path: str, cfg, meta: dict) -> bool:
    """Whether PATH holds the same files as one of the run's data sources (by the content
    fingerprint the checkpoint recorded, so another path to the same files counts)."""
    from jaxlm.data.sources import data_fingerprint

    recorded = {d.get("sha256") for d in meta.get("data_fingerprint") or []}
    mine = data_fingerprint(dataclasses.replace(cfg.data, path=path, mixture=[]))[0]["sha256"]
    return mine in recorded


def token_streams(path: str, split: str, cfg, tokenizer) -> tuple[list, str]:
    """(the token streams to score, a sentence saying which text they are)."""
    from jaxlm.data.sources import is_prepared, load_streams

    if is_prepared(path):
        train, val = load_streams(path, cfg.data, tokenizer)
        what = {"val": "the validation split", "train": "the training split", "all": "both splits"}[split]
        return {"val": [val], "train": [train], "all": [train, val]}[split], f"{what} of the prepared corpus {path}"
    if split == "all":
        return [load_streams(path, dataclasses.replace(cfg.data, val_fraction=0.0), tokenizer)[0]], f"all of {path}"
    train, val = load_streams(path, cfg.data, tokenizer)
    f = cfg.data.val_fraction
    if split == "val":
        return [val], f"the part of {path} held out for validation by the run's data.val_fraction={f}"
    return [train], f"the part of {path} trained on (all but the run's data.val_fraction={f})"


def text_rows(data: str, split: str, cfg, tokenizer) -> tuple[list[dict], str]:
    """(rows of the text to score, a sentence saying which text it is)."""
    streams, scored = token_streams(data, split, cfg, tokenizer)
    if sum(len(s) for s in streams) < 2:
        raise UserError(f"--data {data} --split {split} has {sum(len(s) for s in streams)} tokens ({scored}); at "
                        "least 2 are needed to score one" + ("; --split all scores the whole text" if split != "all"
                                                              else ""))
    return [row for s in streams if len(s) >= 2 for row in rows(s, cfg.data.seq_len, cfg.data.packing)], scored


def record_rows(data: str, split: str, cfg, tokenizer) -> tuple[list[dict], str]:
    """An sft or dpo run's records (chat or preference), split and rendered as training rendered
    them (the run's chat template, assistant-only masks, data.seq_len): the rows and which they are."""
    from jaxlm.data import records as R
    from jaxlm.data.chat import chat_format

    every = R.read_records(data)
    train, val = R.split_records(every, cfg.data.val_fraction)
    chosen = {"val": val, "train": train, "all": every}[split]
    f = cfg.data.val_fraction
    scored = {"val": f"the records of {data} held out for validation by the run's data.val_fraction={f}",
              "train": f"the records of {data} trained on (all but the run's data.val_fraction={f})",
              "all": f"all records of {data}"}[split]
    if not chosen:
        raise UserError(f"--data {data} --split {split} has no records ({scored})"
                        + ("; --split all scores every record" if split != "all" else ""))
    with_data = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data))
    out = R.record_rows(with_data, chat_format(tokenizer, cfg.data.chat_template), chosen, f"--data {data}")
    return [out[i] for i in range(len(out))], scored


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


def evaluate(run_dir: str, data: str, split: str | None = None, step: int | None = None, max_tokens: int = 0,
             quantize: str | None = None) -> dict:
    from jaxlm.data.batch import Batch
    from jaxlm.data.pipeline import to_global
    from jaxlm.data.sources import is_prepared
    from jaxlm.parallel.mesh import data_parallel_size
    from jaxlm.checkpoint.runs import inference_mesh, load_run
    from jaxlm.train.step import make_trainer

    if max_tokens < 0:
        raise UserError(f"--max-tokens {max_tokens} must be >= 0 (0 = all)")
    if split is not None and split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    if not os.path.exists(data) and not glob.glob(data):
        raise UserError(f"--data {data}: no such file, directory or glob; expected text or a prepared corpus")
    from jaxlm.config import Config, from_dict

    path = ckpt.find_step(run_dir, step)
    meta = ckpt.read_meta(path)
    cfg = from_dict(Config, meta["config"], prefix="")
    if split is None:
        split = "val" if is_prepared(data) or is_run_data(data, cfg, meta) else "all"
    mesh = inference_mesh(cfg.mesh)
    # the training eval step as training ran it: unmerged LoRA adapters, the base and a dpo
    # reference frozen; a quantized model is the merged one, quantized (the inference path)
    run = load_run(run_dir, step, mesh, merge=bool(quantize))
    trainer = make_trainer(run.cfg, mesh)
    all_rows, scored = (record_rows(data, split, cfg, run.tokenizer) if cfg.train.objective in RECORD_OBJECTIVES
                        else text_rows(data, split, cfg, run.tokenizer))
    if max_tokens:
        all_rows = all_rows[: max(1, -(-max_tokens // cfg.data.seq_len))]
    dp = data_parallel_size(mesh, trainer.rules)
    per_batch = -(-cfg.train.global_batch // dp) * dp
    if quantize:
        params, eval_step = quantized_eval_step(trainer, run.params, quantize)
    else:
        params, eval_step = trainer.adopt({"params": run.params})["params"], trainer.eval_step
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
    head = {"run": run_dir, "step": run.step, "objective": cfg.train.objective, "data": data, "split": split,
            "scored": scored, **({"quantize": quantize} if quantize else {})}
    if cfg.train.objective == "dpo":  # a loss per preference pair: no tokens, perplexity or bytes to speak of
        return {**head, "pairs": int(count), "loss": loss}
    return {**head, "tokens": int(count), "bytes": int(n_bytes),
            "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss_sum / math.log(2) / n_bytes if n_bytes else None}
