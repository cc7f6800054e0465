"""Decoding benchmarks on CPU, each figure with its peer measured in the same run.

  1. KV-cache decode vs no cache (the full forward over the whole context per token) at a
     context of 1K tokens; goal >= 10x.
  2. jaxlm greedy decode vs Hugging Face transformers `generate` (torch CPU) on the same
     weights (a LlamaForCausalLM built from the jaxlm parameters here); goal >= 1.0x.
  3. Speculative decoding with a small draft vs the target alone at identical greedy output,
     with the acceptance rate; goal >= 1.5x. Needs two trained runs (--target, --draft).
  4. Quantized decode (jaxlm/compress): weight bytes and greedy tokens/s of f32, int8 and int4-g32
     (goal <= 0.16x the f32 bytes), each against llama.cpp (llama-cpp-python, 2 threads) on the
     same weights: a GGUF written from these parameters in F32, Q8_0 and Q4_0 (which holds
     int4-g32's weights bit for bit; Q8_0 has blocks of 32 where jaxlm's int8 has one scale per
     channel). The machine's load is printed with it: llama.cpp's threads collapse under load.
     With them, the bandwidth limit: a timed read of the f32 weights' bytes (GB/s), divided by
     each format's bytes (tok/s: a decode step reads every weight once).

Parts 1, 2 and 4 use --target's weights if given, else a random model (of --config's shape if given).
Timings are medians over --repeats runs after a warm-up (compilation excluded). Usage:

    python bench/generate.py [--target RUN_DIR --draft RUN_DIR] [--tokens 128] [--lookahead 4 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import Config, MeshConfig, ModelConfig
from jaxlm.parallel.mesh import make_mesh
from jaxlm.inference.decode import Decoder, generate
from jaxlm.inference.per_layer import join_params
from jaxlm.inference.sampling import Sampling
from jaxlm.model.build import build_model

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import bench_data  # noqa: E402

SHAKESPEARE = bench_data("tinyshakespeare/input.txt", required=False)
RANDOM_MODEL = ModelConfig(vocab_size=257, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=704,
                           max_seq_len=1024)
GREEDY = Sampling(temperature=0.0)


def timed(fns: dict, repeats: int) -> dict:
    """{name: (median seconds after a warm-up call, last result)}, the functions taking turns in
    each repeat so that a change in the machine's load hits all of them alike."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def text_tokens(n: int, offset: int = 0) -> list[int]:
    data = SHAKESPEARE.read_bytes() if SHAKESPEARE else bytes(range(32, 127)) * 64
    return list(data[offset: offset + n])


def model_and_params(run_dir: str | None, mesh, config: str | None = None):
    """(config, parameters, tokenizer) of the run, or of a random model (RANDOM_MODEL or the
    config file's model) with its tokenizer."""
    if run_dir:
        from jaxlm.checkpoint.runs import load_run

        run = load_run(run_dir, mesh=mesh)
        return run.cfg, run.params, run.tokenizer
    from jaxlm.config import load_config
    from jaxlm.tokenizer.tokenizer import load_tokenizer

    cfg = load_config(config, ["mesh.data=1"]) if config else Config(model=RANDOM_MODEL, mesh=MeshConfig(data=1))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg, 0))))()
    return cfg, params, load_tokenizer(cfg.data.tokenizer)


# ----------------------------------------------------------------------------- 1. cache vs none


def cache_vs_recompute(cfg, params, mesh, context: int, n: int, repeats: int) -> None:
    """Greedy tokens n after a prompt of context - n tokens: cached steps vs the full forward
    over a [1, context] buffer per token (causal, so the padding after the last token is unseen)."""
    dec = Decoder(cfg, params, mesh)
    prompt = text_tokens(context - n)
    full = jax.jit(lambda p, tokens: nnx.merge(dec.graphdef, join_params(p))(tokens)[0][0])

    def no_cache():
        buf = np.zeros((1, context), np.int32)
        buf[0, : len(prompt)] = prompt
        out = []
        for i in range(n):
            tok = int(jnp.argmax(full(dec.params, buf)[len(prompt) + i - 1]))
            buf[0, len(prompt) + i] = tok
            out.append(tok)
        return out

    r = timed({"prefill": lambda: generate(dec, [prompt], 1, GREEDY)[0],  # prefill + first token
               "cache": lambda: generate(dec, [prompt], n, GREEDY)[0], "none": no_cache}, repeats)
    (t_prefill, _), (t_all, got), (t_full, want) = r["prefill"], r["cache"], r["none"]
    t_cache, t_full = (t_all - t_prefill) / (n - 1), t_full / n
    print(f"1. context {context}, greedy tokens {len(prompt) + 1}..{context}: KV cache {1 / t_cache:8.1f} tok/s "
          f"(after a {t_prefill:.2f} s prefill), no cache {1 / t_full:6.1f} tok/s -> {t_full / t_cache:5.1f}x "
          f"(goal >= 10x); same tokens: {got == want}")


# ----------------------------------------------------------------------------- 2. vs HF transformers


def hf_llama(cfg: Config, params: dict):
    """A LlamaForCausalLM holding the jaxlm weights (same RoPE convention: rotate-half)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    assert m.norm == "pre" and m.mlp == "swiglu" and not m.tie_embeddings and cfg.moe.n_experts == 0
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim, hidden_act="silu",
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)).to(torch.float32).eval()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))
    sd = {"model.embed_tokens.weight": t(params["embed"]["table_VD"]), "model.norm.weight": t(params["final_norm"]["scale"]),
          "lm_head.weight": t(np.asarray(params["lm_head_DV"]).T)}
    block = params["segments"][0]["units"]["blocks"][0]
    for i in range(m.n_layers):
        a, f, pre = block["attn"], block["ffn"], f"model.layers.{i}."
        flat_out = lambda w: np.asarray(w[i]).reshape(m.d_model, -1).T  # [D, *out] -> [out, D]
        sd |= {pre + "self_attn.q_proj.weight": t(flat_out(a["wq_DHd"])),
               pre + "self_attn.k_proj.weight": t(flat_out(a["wk_DKd"])),
               pre + "self_attn.v_proj.weight": t(flat_out(a["wv_DKd"])),
               pre + "self_attn.o_proj.weight": t(np.asarray(a["wo_HdD"][i]).reshape(-1, m.d_model).T),
               pre + "mlp.gate_proj.weight": t(np.asarray(f["w_gate_DF"][i]).T),
               pre + "mlp.up_proj.weight": t(np.asarray(f["w_up_DF"][i]).T),
               pre + "mlp.down_proj.weight": t(np.asarray(f["w_down_FD"][i]).T),
               pre + "input_layernorm.weight": t(block["norm1"]["scale"][i]),
               pre + "post_attention_layernorm.weight": t(block["norm2"]["scale"][i])}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def versus_hf(cfg, params, mesh, prompt_len: int, n: int, repeats: int) -> None:
    import torch

    dec = Decoder(cfg, params, mesh)
    hf = hf_llama(cfg, params)
    prompt = text_tokens(prompt_len, offset=5000)
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the same function: logits of the prompt
        want = hf(ids).logits[0].numpy()
    got = np.asarray(jax.jit(lambda p, x: nnx.merge(dec.graphdef, join_params(p))(x)[0])(dec.params,
                                                                                       np.asarray([prompt]))[0])
    max_diff = float(np.abs(got - want).max())

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    r = timed({"jaxlm": lambda: generate(dec, [prompt], n, GREEDY)[0], "hf": hf_generate}, repeats)
    (t_jax, ours), (t_hf, theirs) = r["jaxlm"], r["hf"]
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"2. {n} greedy tokens after {prompt_len} (prefill included): jaxlm {n / t_jax:8.1f} tok/s, HF transformers "
          f"generate (torch {torch.__version__}, {torch.get_num_threads()} threads) {n / t_hf:6.1f} tok/s -> "
          f"{t_hf / t_jax:5.2f}x (goal >= 1.0x); prompt logits max diff {max_diff:.1e}, same tokens {same}/{n}")


# ----------------------------------------------------------------------------- 3. speculative


def speculative(target_dir: str, draft_dir: str, mesh, n: int, lookaheads: list[int], repeats: int) -> None:
    from jaxlm.checkpoint.runs import load_run
    from jaxlm.inference.speculative import check_pair, speculative_generate

    t_run, d_run = load_run(target_dir, mesh=mesh), load_run(draft_dir, mesh=mesh)
    target, draft = Decoder(t_run.cfg, t_run.params, mesh), Decoder(d_run.cfg, d_run.params, mesh)
    check_pair(target, draft, t_run.tokenizer, d_run.tokenizer)
    prompt = text_tokens(64, offset=20000)
    fns = {"target": lambda: generate(target, [prompt], n, GREEDY)[0],
           "draft": lambda: generate(draft, [prompt], n, GREEDY)[0]}
    for k in lookaheads:
        fns[k] = lambda k=k: speculative_generate(target, draft, [prompt], n, k, GREEDY)
    r = timed(fns, repeats)
    (t_plain, want), (t_draft, _) = r["target"], r["draft"]
    print(f"3. {n} greedy tokens: target alone {n / t_plain:7.1f} tok/s, draft alone {n / t_draft:7.1f} tok/s "
          f"(target {t_run.cfg.model.d_model}x{t_run.cfg.model.n_layers}, draft "
          f"{d_run.cfg.model.d_model}x{d_run.cfg.model.n_layers})")
    for k in lookaheads:
        t_spec, (got, stats) = r[k]
        print(f"   speculative, lookahead {k}: {n / t_spec:7.1f} tok/s -> {t_plain / t_spec:4.2f}x (goal >= 1.5x), "
              f"acceptance {stats.acceptance_rate:.1%}, identical output: {got[0] == want}")
    print(f"   sample: {bytes(want[:80]).decode('utf-8', 'replace')!r}")


# ----------------------------------------------------------------------------- 4. quantized


LLAMA_CPP_PEER = {"f32": "f32", "int8": "q8_0", "int4-g32": "q4_0"}  # jaxlm weights -> GGUF type


def llama_cpp_decoder(cfg: Config, params: dict, tok, dtype: str, where: Path):
    """(generate(prompt, n) -> greedy ids, GGUF bytes) of llama.cpp on a GGUF of these weights."""
    import llama_cpp

    from jaxlm.export.gguf import write_gguf

    path = where / f"model-{dtype}.gguf"
    write_gguf(path, cfg.model, cfg.moe, jax.tree.map(np.asarray, params), tok, dtype, name="bench")
    llm = llama_cpp.Llama(str(path), n_ctx=cfg.model.max_seq_len, n_batch=512, n_threads=2, n_threads_batch=2,
                          logits_all=False, verbose=False)
    V = cfg.model.vocab_size

    def greedy(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out = []
        for i in range(n):
            out.append(int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(V,)).argmax()))
            if i + 1 < n:
                llm.eval([out[-1]])
        return out

    return greedy, path.stat().st_size


def read_bandwidth(params, repeats: int) -> float:
    """Bytes per second of a timed read of every weight, one thread per core each summing its
    share (numpy releases the GIL): the limit a decode step, which reads each weight once, can
    approach. (A jitted sum under-measured it: XLA:CPU runs most reductions on one core.)"""
    from concurrent.futures import ThreadPoolExecutor

    flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in jax.tree.leaves(params)])
    shares = np.array_split(flat, os.cpu_count())
    with ThreadPoolExecutor(len(shares)) as pool:
        read = lambda: sum(pool.map(np.sum, shares))
        r = timed({"read": read}, repeats)
    return flat.nbytes / r["read"][0]


def quantized_decode(cfg, params, tok, mesh, n: int, repeats: int) -> None:
    import tempfile

    from jaxlm.compress.quantize import quantize_params, weight_bytes

    prompt = text_tokens(64, offset=40000)
    weights = {"f32": params, **{s: quantize_params(params, cfg, s) for s in LLAMA_CPP_PEER if s != "f32"}}
    fns = {name: (lambda d=Decoder(cfg, w, mesh): generate(d, [prompt], n, GREEDY)[0]) for name, w in weights.items()}
    gguf_bytes = {}
    with tempfile.TemporaryDirectory() as where:
        try:
            for name, dtype in LLAMA_CPP_PEER.items():
                greedy, gguf_bytes[name] = llama_cpp_decoder(cfg, params, tok, dtype, Path(where))
                fns[f"llama.cpp {name}"] = lambda greedy=greedy: greedy(prompt, n)
        except ImportError as e:
            print(f"   (llama.cpp peer skipped: {e})")
        load = os.getloadavg()[0]
        bandwidth = read_bandwidth(params, repeats)
        r = timed(fns, repeats)
    f32_bytes = weight_bytes(params)
    print(f"4. {n} greedy tokens after 64 (prefill included), load {load:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; timed read of the f32 weights: {bandwidth / 1e9:.1f} GB/s, the limit "
          "(tok/s) = that / the format's bytes\n")
    print("| weights | jaxlm bytes (vs f32) | limit tok/s | jaxlm tok/s (of limit) | llama.cpp GGUF bytes | llama.cpp tok/s "
          "| jaxlm / llama.cpp | same greedy tokens |\n|---|---|---|---|---|---|---|---|")
    for name, w in weights.items():
        t, ours = r[name]
        limit = bandwidth / weight_bytes(w)
        row = (f"| {name} | {weight_bytes(w):,} ({weight_bytes(w) / f32_bytes:.3f}) | {limit:.1f} | {n / t:.1f} "
               f"({n / t / limit:.0%}) |")
        if f"llama.cpp {name}" in r:
            t_peer, theirs = r[f"llama.cpp {name}"]
            agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
            row += (f" {LLAMA_CPP_PEER[name].upper()} {gguf_bytes[name]:,} | {n / t_peer:.1f} | {t_peer / t:.2f}x "
                    f"| first {agree} of {n} |")
        print(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="a trained run (parts 1-4); default: random weights for 1, 2 and 4")
    ap.add_argument("--draft", help="a smaller trained run with the same tokenizer (part 3)")
    ap.add_argument("--config", help="without --target: a random model of this config (e.g. configs/ckpt-100m.yaml)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--lookahead", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="1234")
    args = ap.parse_args()
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    cfg, params, tok = model_and_params(args.target, mesh, args.config)
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1))
    m = cfg.model
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; model d_model={m.d_model} n_layers={m.n_layers} "
          f"heads={m.n_heads}/{m.n_kv_heads} d_ff={m.d_ff} vocab={m.vocab_size} ({'trained' if args.target else 'random'})")
    if "1" in args.parts:
        cache_vs_recompute(cfg, params, mesh, args.context, min(args.tokens, 64), args.repeats)
    if "2" in args.parts:
        versus_hf(cfg, params, mesh, 64, args.tokens, args.repeats)
    if "3" in args.parts and args.target and args.draft:
        speculative(args.target, args.draft, mesh, args.tokens * 2, args.lookahead, args.repeats)
    elif "3" in args.parts:
        print("3. speculative: skipped (give --target and --draft runs)")
    if "4" in args.parts:
        quantized_decode(cfg, params, tok, mesh, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
