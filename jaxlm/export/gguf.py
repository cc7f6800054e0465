"""jaxlm -> one GGUF file for llama.cpp: the "llama" architecture (experts for Mixtral-style MoE),
"qwen2" (q/k/v biases) or "qwen3" (q/k norms), as compat.py picks.

Written with the `gguf` package's GGUFWriter, one tensor at a time (header and tensor table
first, then each tensor's data), so memory holds the parameters plus one converted tensor.

llama.cpp's "llama" graph applies RoPE to adjacent pairs (2i, 2i+1), jaxlm (like HF) to the
halves (i, i + d/2): the q and k rows of each head are permuted accordingly, exactly as
llama.cpp's convert_hf_to_gguf.py does. Its qwen2 and qwen3 graphs rotate halves ("neox"), so
their rows stay as they are. Llama 3's RoPE scaling is the "rope_freqs" tensor of per-frequency
divisors, as the converter writes it. Types: 1-D norms, biases and the router stay f32 (as
llama.cpp's converter keeps them); matrices take the chosen type (Q8_0, Q4_0 or Q4_1 where the row
length allows blocks of 32, f32 elsewhere), the embedding and output matrices included. Q4_0 and
Q4_1 are the weights of jaxlm's `--quantize int4-g32` and `int4-g32-asym` bit for bit
(compress/schemes.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.errors import warn
from jaxlm.export import params as P
from jaxlm.export.compat import GGUF_ARCHS, architecture
from jaxlm.export.tokenizer_files import gguf_vocab
from jaxlm.model.layers import rope_frequencies

QTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}


def _rope_rows(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head reordered from rotate-half (i, i + d/2) to adjacent pairs (2i, 2i+1)."""
    rows, cols = w_out_in.shape
    return w_out_in.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(cfg: ModelConfig, moe: MoEConfig, params: dict) -> list[tuple[str, object, bool]]:
    """[(GGUF name, () -> float32 array in GGUF's row-major layout, is a matrix to convert)]."""
    import gguf

    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    slots = P.slots(cfg, moe)
    get = lambda name, layer=None: np.asarray(P.read(params, slots[(name, layer)]), np.float32)
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_model
    pairs = GGUF_ARCHS[architecture(cfg, moe)] == "llama"  # llama's RoPE rotates adjacent pairs
    rows = (lambda w, n: _rope_rows(w, n)) if pairs else (lambda w, n: w)
    out = [(N[T.TOKEN_EMBD] + ".weight", lambda: get("embed"), True)]
    for i, kind in enumerate(P.layer_kinds(cfg, moe)):
        name = lambda t, i=i, part="weight": f"{N[t].format(bid=i)}.{part}"
        out += [
            (name(T.ATTN_NORM), lambda i=i: get("norm1", i), False),
            (name(T.ATTN_Q), lambda i=i: rows(get("attn.wq", i).reshape(D, -1).T, H), True),
            (name(T.ATTN_K), lambda i=i: rows(get("attn.wk", i).reshape(D, -1).T, K), True),
            (name(T.ATTN_V), lambda i=i: get("attn.wv", i).reshape(D, -1).T, True),
            (name(T.ATTN_OUT), lambda i=i: get("attn.wo", i).reshape(-1, D).T, True),
            (name(T.FFN_NORM), lambda i=i: get("norm2", i), False),
        ]
        if cfg.attention_bias:
            out += [(name(t, part="bias"), lambda i=i, s=s: get(s, i).reshape(-1), False)
                    for t, s in ((T.ATTN_Q, "attn.bq"), (T.ATTN_K, "attn.bk"), (T.ATTN_V, "attn.bv"))]
        if cfg.qk_norm:
            out += [(name(t), lambda i=i, s=s: get(s, i), False)
                    for t, s in ((T.ATTN_Q_NORM, "attn.q_norm"), (T.ATTN_K_NORM, "attn.k_norm"))]
        if kind == "dense":
            out += [(name(t), lambda i=i, s=s: get(s, i).T, True)
                    for t, s in ((T.FFN_GATE, "mlp.gate"), (T.FFN_UP, "mlp.up"), (T.FFN_DOWN, "mlp.down"))]
        else:
            out.append((name(T.FFN_GATE_INP), lambda i=i: get("moe.router", i).T, False))
            out += [(name(t), lambda i=i, s=s: get(s, i).transpose(0, 2, 1), True)
                    for t, s in ((T.FFN_GATE_EXP, "moe.gate"), (T.FFN_UP_EXP, "moe.up"), (T.FFN_DOWN_EXP, "moe.down"))]
    out.append((N[T.OUTPUT_NORM] + ".weight", lambda: get("final_norm"), False))
    if not cfg.tie_embeddings:
        out.append((N[T.OUTPUT] + ".weight", lambda: get("lm_head").T, True))
    elif cfg.scale_tied_logits:  # jaxlm divides tied logits by sqrt(D): a separate, scaled output matrix
        out.append((N[T.OUTPUT] + ".weight", lambda: get("embed") / np.float32(math.sqrt(D)), True))
    else:
        out.append((N[T.OUTPUT] + ".weight", lambda: get("embed"), True))
    if cfg.rope_scaling.type == "llama3":  # llama.cpp divides each frequency by its factor
        plain = rope_frequencies(cfg.head_dim, cfg.rope_theta)
        scaled = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        out.append((N[T.ROPE_FREQS] + ".weight", lambda: plain / scaled, False))
    return out


def write_gguf(path: Path, cfg: ModelConfig, moe: MoEConfig, params: dict, tok, dtype: str, name: str) -> None:
    import gguf

    arch = GGUF_ARCHS[architecture(cfg, moe)]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers * cfg.share_blocks)  # a shared block is written once per application
    w.add_feed_forward_length((moe.d_ff or cfg.d_ff) if moe.n_experts else cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if moe.n_experts:
        w.add_expert_count(moe.n_experts)
        w.add_expert_used_count(moe.top_k)
    _add_tokenizer(w, tok, cfg.vocab_size)

    chosen = getattr(gguf.GGMLQuantizationType, QTYPES[dtype])
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    plan = gguf_tensors(cfg, moe, params)
    # pass 1: the tensor table needs every tensor's type and size before any data
    qtypes = []
    for tname, make, matrix in plan:
        shape = make().shape  # views, mostly: cheap
        qtype = chosen if matrix and shape[-1] % gguf.GGML_QUANT_SIZES[chosen][0] == 0 else F32
        qtypes.append(qtype)
        if qtype in (F32, F16):
            dt = np.dtype(np.float32 if qtype == F32 else np.float16)
            w.add_tensor_info(tname, shape, dt, math.prod(shape) * dt.itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # pass 2: the data, one tensor at a time
    for (_, make, _), qtype in zip(plan, qtypes):
        w.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(make()), qtype))
    w.close()


def _add_tokenizer(w, tok, n_vocab: int) -> None:
    v = gguf_vocab(tok, n_vocab)
    if v.model == "gpt2" and v.pre is None:
        warn(f"llama.cpp has no pre-tokenizer for {tok.name}'s pattern; 'gpt-2' is written, so llama.cpp may "
             "split raw text differently (token ids given directly are unaffected)")
    w.add_tokenizer_model(v.model)
    if v.model == "gpt2":
        w.add_tokenizer_pre(v.pre or "gpt-2")
        w.add_token_merges(v.merges)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    for add, token_id in ((w.add_bos_token_id, v.bos_id), (w.add_eos_token_id, v.eos_id), (w.add_unk_token_id, v.unk_id)):
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(False)
