"""`jaxlm export RUN_DIR [--step N] --format hf|gguf|peft -o OUT [--merge] [--dtype ...] [--force]`.

hf:   a directory that transformers loads with no custom code (config.json,
      generation_config.json, model.safetensors or shards + index, tokenizer files).
gguf: one .gguf file for llama.cpp (weights, llama metadata, the tokenizer).
peft: a run trained with LoRA: its adapters (adapter_model.safetensors + adapter_config.json), which
      the `peft` library loads onto the hf export of the same run (the base model).
A LoRA run's hf or gguf export is its base model; with --merge, the adapters folded into the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.errors import UserError

DTYPES = {"hf": ("f32", "bf16", "f16"), "gguf": ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"),
          "peft": ("f32", "bf16", "f16")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (or its checkpoints/, or one step directory)")
    parser.add_argument("--step", type=ckpt.step_arg,
                        help="the checkpoint step to export, or 'best' (lowest eval loss); default: the newest valid one")
    parser.add_argument("--format", required=True, choices=sorted(DTYPES),
                        help="hf (transformers), gguf (llama.cpp) or peft (a LoRA run's adapters)")
    parser.add_argument("-o", "--output", required=True, help="output directory (hf, peft) or .gguf file (gguf)")
    parser.add_argument("--merge", action="store_true", help="a LoRA run: fold the adapters into the weights "
                                                             "(hf, gguf); without it the export is the base model")
    parser.add_argument("--dtype", help="weights: f32, bf16, f16 (and q8_0, q4_0, q4_1 for gguf); default: the checkpoint's "
                                        "param_dtype (f32 or bf16)")
    parser.add_argument("--tokenizer", help="tokenizer spec to ship with the model (default: the one the run "
                                            "recorded, data.tokenizer)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def numpy_dtype(name: str):
    import ml_dtypes

    return {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}[name]


def load_tokenizer_for(step_dir: Path, spec: str | None, cfg):
    from jaxlm.tokenizer.tokenizer import load_tokenizer

    recorded = ckpt.read_meta(step_dir).get("tokenizer") or {}
    tok = load_tokenizer(spec or recorded.get("spec") or cfg.data.tokenizer)
    if spec is None and recorded.get("hash") and recorded["hash"] != tok.hash:
        raise UserError(f"the run's tokenizer {recorded.get('spec')!r} changed since training (hash "
                        f"{recorded['hash'][:12]} -> {tok.hash[:12]}); pass --tokenizer with the one it was trained with")
    return tok


def export(run_dir: Path, fmt: str, output: Path, step: int | None = None, dtype: str | None = None,
           tokenizer: str | None = None, force: bool = False, max_shard_bytes: int | None = None,
           merge: bool = False) -> Path:
    from jaxlm.checkpoint import runs
    from jaxlm.export.atomic import atomic_output
    from jaxlm.export.compat import check_exportable

    step_dir = ckpt.find_step(run_dir, step)
    cfg = runs.config_of(step_dir)
    arch = check_exportable(cfg.model, cfg.moe, fmt)
    dtype = dtype or ("f32" if cfg.model.param_dtype == "float32" else "bf16")
    if dtype not in DTYPES[fmt]:
        raise UserError(f"--dtype {dtype} is not available for --format {fmt}; expected one of {', '.join(DTYPES[fmt])}")
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    check_lora_export(cfg, fmt, merge)
    tok = load_tokenizer_for(step_dir, tokenizer, cfg)
    _, params = runs.load_params(step_dir)
    params = adapters_for(fmt, merge, cfg, params)
    m, moe = cfg.model, cfg.moe
    with atomic_output(output, force, directory=fmt in ("hf", "peft")) as tmp:
        if fmt == "peft":
            from jaxlm.export.peft import write_peft

            write_peft(tmp, arch, cfg, params, numpy_dtype(dtype), base=str(run_dir))
        elif fmt == "gguf":
            from jaxlm.export.gguf import write_gguf

            write_gguf(tmp, m, moe, params, tok, dtype, name=run_dir.absolute().name)
        else:
            write_hf(tmp, arch, cfg, params, tok, dtype, tokenizer or cfg.data.tokenizer, max_shard_bytes)
    return output


def check_lora_export(cfg, fmt: str, merge: bool) -> None:
    if fmt == "peft" and not cfg.lora.rank:
        raise UserError("--format peft exports LoRA adapters, but this run was trained without them (lora.rank=0); "
                        "use --format hf")
    if merge and (fmt == "peft" or not cfg.lora.rank):
        raise UserError("--merge folds LoRA adapters into the weights of an hf or gguf export of a run trained with "
                        f"LoRA; this {'is a peft export' if fmt == 'peft' else 'run has none (lora.rank=0)'}")


def adapters_for(fmt: str, merge: bool, cfg, params: dict) -> dict:
    """A LoRA run's parameters as the format takes them: all (peft), merged (--merge) or the base."""
    from jaxlm.model import lora

    if not cfg.lora.rank or fmt == "peft":
        return params
    if merge:
        return lora.merge(params, cfg.lora.scale)
    print("jaxlm: note: exporting the base model without its LoRA adapters (--merge folds them in; "
          "--format peft writes them)", file=sys.stderr)
    return lora.split_adapters(params)[0]


def write_hf(out: Path, arch: str, cfg, params: dict, tok, dtype: str, tokenizer_spec: str,
             max_shard_bytes: int | None) -> None:
    from jaxlm.export import hf
    from jaxlm.export.tokenizer_files import write_hf_tokenizer

    m = cfg.model
    torch_dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype]
    config = hf.config_json(arch, m, cfg.moe, torch_dtype, tok.eot_id, tokenizer_spec)
    bos = tok.eot_id if getattr(tok, "bos_id", None) is None else tok.bos_id  # a Hugging Face tokenizer's own BOS
    config["bos_token_id"] = bos
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(tok, bos), indent=2))
    write_hf_tokenizer(tok, out, m.vocab_size, m.max_seq_len)
    hf.write_checkpoint(out, arch, m, cfg.moe, params, numpy_dtype(dtype),
                        max_shard_bytes=max_shard_bytes or hf.MAX_SHARD_BYTES)


def generation_config(tok, bos: int | None) -> dict:
    """What is true of the model, and nothing about how long to generate (a max_length here would
    make every transformers `generate(max_new_tokens=...)` warn that both are set). The end of text
    also pads (jaxlm masks padding, so any id would do; this one needs no new token)."""
    ids = {"bos_token_id": bos, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
    return {k: v for k, v in ids.items() if v is not None}


def main(args: argparse.Namespace) -> int:
    out = export(Path(args.run_dir), args.format, Path(args.output), args.step, args.dtype, args.tokenizer, args.force,
                 merge=args.merge)
    print(f"exported {args.run_dir} to {out} ({args.format})", file=sys.stderr)
    return 0
