"""Exports read by llama.cpp (llama-cpp-python): greedy continuations equal jaxlm's in f32, f16
and the 4-bit types, Q8_0 logits close to jaxlm's. The models and helpers are test_export.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import llama_cpp
from jaxlm.export.cli import export
from test_export import N_NEW, PROMPT, TIE, forward, jaxlm_greedy
from test_export import make_run  # noqa: F401 (a fixture: imported, it makes its runs again for this module)

Q4 = {"q4_0": "int4-g32", "q4_1": "int4-g32-asym"}  # GGUF type -> the jaxlm scheme of the same weights


def llama_cpp_greedy(gguf: Path, n_vocab: int, kv: str = "f32") -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of PROMPT (token ids in, argmax out) and its logits per step."""
    llama = llama_cpp()
    kv_type = {"f32": llama.GGML_TYPE_F32, "f16": llama.GGML_TYPE_F16}[kv]
    llm = llama.Llama(str(gguf), n_ctx=128, n_batch=128, n_threads=2, n_threads_batch=2, logits_all=False,
                      type_k=kv_type, type_v=kv_type, verbose=False)
    assert llm.n_vocab() == n_vocab

    def eval_and_logits(tokens):  # logits of the last position: the only one computed (logits_all=False)
        llm.eval(tokens)
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

    try:
        ids, steps = [], [eval_and_logits(PROMPT)]
        for _ in range(N_NEW):
            ids.append(int(steps[-1].argmax()))
            if len(ids) < N_NEW:
                steps.append(eval_and_logits([ids[-1]]))
        return ids, np.stack(steps)
    finally:
        llm.close()  # explicitly: its __del__ at interpreter exit can fail on a torn-down FFI


@pytest.mark.parametrize("name,dtype", [("dense_gqa", "f32"), ("dense_gqa", "f16"), ("mixtral", "f32"),
                                        ("dense_tied", "f16"), ("dense_shared", "f32")])
def test_llama_cpp_greedy_continuation_equals_jaxlm(make_run, tmp_path, name, dtype):
    llama_cpp()
    run_dir = make_run(name)
    gguf = export(run_dir, "gguf", tmp_path / "model.gguf", dtype=dtype)
    want, gaps = jaxlm_greedy(run_dir)
    got, _ = llama_cpp_greedy(gguf, 257)
    # compared up to the first near tie: f16 weights move logits by up to ~4e-3 (measured), f32 by ~2e-6
    tie = next((i for i, g in enumerate(gaps) if g < TIE[dtype]), N_NEW)
    assert tie >= 8, f"jaxlm's continuation meets a near tie (gap {gaps[tie]:.4f}) at step {tie}; pick another prompt"
    assert got[:tie] == want[:tie], f"first {tie} greedy tokens differ; top-2 gaps {[round(g, 4) for g in gaps[:tie]]}"


def test_llama_cpp_q8_0_logits_are_close_to_jaxlms(make_run, tmp_path):
    """llama.cpp on the Q8_0 export (blocks of 32 weights, one f16 scale each) against jaxlm's own
    f32 logits on the same tokens (llama.cpp's Q8_0 continuation, teacher-forced through jaxlm):
    within 3% of the largest logit, and its greedy token is jaxlm's argmax wherever no near tie
    could flip it."""
    llama_cpp()
    run_dir = make_run("dense_gqa")
    ids8, logits8 = llama_cpp_greedy(export(run_dir, "gguf", tmp_path / "q8.gguf", dtype="q8_0"), 257)
    export(run_dir, "gguf", tmp_path / "f32.gguf", dtype="f32")
    assert (tmp_path / "q8.gguf").stat().st_size < 0.4 * (tmp_path / "f32.gguf").stat().st_size  # 8.5 bits a weight
    _, _, logits = forward(run_dir)
    want = logits(np.array([PROMPT + ids8[:-1]], np.int32))[0, len(PROMPT) - 1:]  # the logits of each step
    err_per_step = np.abs(logits8 - want).max(-1)
    assert err_per_step.max() < 0.03 * np.abs(want).max(), (err_per_step.max(), np.abs(want).max())
    # llama.cpp's greedy token is jaxlm's argmax at every step whose top-2 gap exceeds twice the error
    top2 = np.sort(want, axis=-1)[:, -2:]
    determined = top2[:, 1] - top2[:, 0] > 2 * err_per_step
    assert determined.sum() >= N_NEW // 2, determined
    np.testing.assert_array_equal(np.array(ids8)[determined], want.argmax(-1)[determined])


@pytest.mark.parametrize("dtype,name", [("q4_0", "dense_gqa"), ("q4_1", "dense_tied")])
def test_llama_cpp_q4_greedy_continuation_equals_jaxlm_int4_until_a_near_tie(make_run, tmp_path, dtype, name):
    """Q4_0 (Q4_1) holds the weights of jaxlm's int4-g32 (-asym) bit for bit; llama.cpp also rounds
    each block of 32 activations to 8 bits for its dot products, which moves the logits by up to
    0.05-0.06 (measured). So: the same greedy tokens up to the first top-2 gap under 0.1, and along
    llama.cpp's continuation logits within 0.075 of jaxlm's int4, where jaxlm's f32 ones are 0.8 away.
    (Tied: the GGUF's output matrix is embed / sqrt(D), quantized on its own; with D = 64 the
    factor is 1/8, a power of two, so it holds the same codes as jaxlm's quantized table.)"""
    llama_cpp()
    run_dir = make_run(name)
    gguf = export(run_dir, "gguf", tmp_path / "model.gguf", dtype=dtype)
    want, gaps = jaxlm_greedy(run_dir, Q4[dtype])
    got, theirs = llama_cpp_greedy(gguf, 257)
    tie = next((i for i, g in enumerate(gaps) if g < TIE[dtype]), N_NEW)
    assert tie >= 8, f"jaxlm's continuation meets a near tie (gap {gaps[tie]:.4f}) at step {tie}; pick another prompt"
    assert got[:tie] == want[:tie], f"first {tie} greedy tokens differ; top-2 gaps {[round(g, 4) for g in gaps[:tie]]}"
    row = np.asarray([PROMPT + got])  # the logits that predicted each of llama.cpp's tokens
    along = lambda quantize: forward(run_dir, quantize)[2](row)[0, len(PROMPT) - 1: -1]
    assert np.abs(along(Q4[dtype]) - theirs).max() < 0.075
    assert np.abs(along(None) - theirs).max() > 0.3


# ----------------------------------------------------------------------------- import


