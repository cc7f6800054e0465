"""Batched decoding and long-prompt prefill on CPU, each against its peer in the same run.

  5. Greedy decode of 8 and 32 prompts of mixed lengths (16..64 tokens) at once: jaxlm's ragged,
     right-padded batch against Hugging Face transformers `generate` (torch CPU, left-padded with
     an attention mask) on the same weights, f32; tokens/s counts new tokens of every row.
     (llama.cpp's Python binding decodes one sequence per context: no batched peer here.)
  6. Prefill of one 2K-token prompt: jaxlm with its CPU attention kernel (`cpu`: the flash
     algebra in XLA:CPU's fast dot forms) against the reference attention (`xla`) and against
     transformers' forward over the same prompt.

Usage:  python bench/batched_decode.py [--config configs/ckpt-100m.yaml] [--batches 8 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import GREEDY, hf_llama, model_and_params, text_tokens, timed  # noqa: E402

from jaxlm.config import MeshConfig  # noqa: E402
from jaxlm.inference.decode import Decoder, generate  # noqa: E402
from jaxlm.parallel.mesh import make_mesh  # noqa: E402


def mixed_prompts(batch: int, seed: int = 0) -> list[list[int]]:
    lengths = np.random.default_rng(seed).integers(16, 65, batch)
    return [text_tokens(int(n), offset=1000 * i) for i, n in enumerate(lengths)]


def hf_batch_generate(hf, prompts: list[list[int]], n: int):
    """Left-padded batch with an attention mask: the rows' new tokens."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1

    def run():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        return out[:, width:].tolist()

    return run


def batched(cfg, params, mesh, batches: list[int], n: int, repeats: int) -> None:
    dec = Decoder(cfg, params, mesh)
    hf = hf_llama(cfg, params)
    print(f"5. greedy, {n} new tokens per row, prompts of 16..64 tokens, f32\n")
    print("| rows | jaxlm tok/s | transformers tok/s | jaxlm / transformers | rows with the same tokens |\n|---|---|---|---|---|")
    for b in batches:
        prompts = mixed_prompts(b)
        r = timed({"jaxlm": lambda: generate(dec, prompts, n, GREEDY), "hf": hf_batch_generate(hf, prompts, n)}, repeats)
        (t, ours), (t_hf, theirs) = r["jaxlm"], r["hf"]
        same = sum(list(a) == list(b_) for a, b_ in zip(ours, theirs))
        print(f"| {b} | {b * n / t:.1f} | {b * n / t_hf:.1f} | {t_hf / t:.2f}x | {same} of {b} |")


def prefill(cfg, params, mesh, length: int, repeats: int) -> None:
    import torch

    model = dataclasses.replace(cfg.model, max_seq_len=max(cfg.model.max_seq_len, length))
    prompt = text_tokens(length, offset=20000)
    fns = {}
    for impl in ("cpu", "xla"):
        dec = Decoder(dataclasses.replace(cfg, model=dataclasses.replace(model, attention_impl=impl)), params, mesh)
        tokens, positions = np.asarray([prompt]), np.arange(length, dtype=np.int32)[None]
        fns[f"jaxlm {impl}"] = lambda dec=dec: jax.block_until_ready(
            dec.prefill_fn(dec.params, tokens, positions, dec.new_caches(1, length)))
    hf = hf_llama(dataclasses.replace(cfg, model=model), params)
    ids = torch.tensor([prompt])

    def hf_forward():
        with torch.no_grad():
            return hf(ids, use_cache=True).logits[0, -1]

    fns["transformers"] = hf_forward
    r = timed(fns, repeats)
    print(f"\n6. prefill of one {length}-token prompt (into the KV cache), f32\n")
    print("| path | seconds | tokens/s | vs jaxlm xla |\n|---|---|---|---|")
    for name, (t, _) in r.items():
        print(f"| {name} | {t:.3f} | {length / t:.0f} | {r['jaxlm xla'][0] / t:.2f}x |")


def torch_threads() -> None:
    import os

    import torch

    torch.set_num_threads(os.cpu_count())  # the same cores as XLA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/ckpt-100m.yaml", help="the model's shape (random weights)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=2048, help="part 6's prompt length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="56")
    args = ap.parse_args()
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    cfg, params, _ = model_and_params(None, mesh, args.config)
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1))
    torch_threads()
    if "5" in args.parts:
        batched(cfg, params, mesh, args.batches, args.tokens, args.repeats)
    if "6" in args.parts:
        prefill(cfg, params, mesh, args.prompt, args.repeats)


if __name__ == "__main__":
    main()
