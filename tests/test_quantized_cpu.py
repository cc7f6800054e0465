"""The CPU kernel that reads quantized weights as codes (jaxlm/model/kernels/quantized_cpu.py):
equal to the matmul on the dequantized matrix (its reference) for every linear scheme, padded
groups, block edges and several rows; its gradient; the decoder that uses it; the XLA fallback."""

import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.compress.quantize import quantize, read_codes
from jaxlm.compress.schemes import SCHEMES, Symmetric
from jaxlm.model.kernels import quantized_cpu

SCHEMES_READ = {**{n: SCHEMES[n] for n in ("int8", "int4-g32", "int4-g32-asym", "int4-g64")},
                "int4-channel": Symmetric("int4-channel", 4, 0)}  # f32 scales, one group the whole input


def weights(K, N, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (K, N)) * 0.05


@pytest.fixture(scope="module", autouse=True)
def built():
    assert quantized_cpu.available(), "the CPU kernel must build on the test machines"


@pytest.mark.parametrize("name", SCHEMES_READ)
@pytest.mark.parametrize("K,N,M", [(100, 50, 1), (256, 300, 3), (96, 520, 9), (64, 17, 20)])
def test_the_kernel_equals_the_matmul_on_the_dequantized_matrix(name, K, N, M):
    """K = 100 pads its last group; N = 300 and 520 cross the 256-column blocks and the two
    threads' shares unevenly; M = 9 and 20 cross the 8 rows that share one read of the codes."""
    q = quantize(weights(K, N), SCHEMES_READ[name], 0, 1)
    x = jax.random.normal(jax.random.PRNGKey(1), (M, K))
    want = x @ q.matrix()
    got = jax.jit(lambda x, q: quantized_cpu.quantized_matmul(x, q.codes, q.scale, q.offset, q.scheme.bits,
                                                              q.scheme.zero_code))(x, q)
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.abs(want).max()), rtol=0)


def test_a_weight_read_as_codes_projects_and_differentiates_as_its_reference():
    """kernel="cpu" (what the decoder sets): project() of 6 rows (the kernel) and 80 (XLA's
    dequantize-then-dot), and its input gradient (QLoRA's, through a frozen base), equal the XLA
    path's; the head of a tied embedding ([V, D] stored as [D, V]) too;
    a log4 weight is not read as codes (its levels are not linear in the code)."""
    w = quantize(weights(64, 48), SCHEMES["int4-g32"], 0, 1)
    table = quantize(weights(97, 64, seed=2), SCHEMES["int8"], 0, 1, transposed=True)
    log4 = quantize(weights(64, 48), SCHEMES["log4-g32"], 0, 1)
    marked = read_codes({"w": w, "table": table, "log4": log4})
    assert (marked["w"].kernel, marked["table"].kernel, marked["log4"].kernel) == ("cpu", "cpu", "xla")
    inputs = [jax.random.normal(jax.random.PRNGKey(3), (2, 3, 64)),  # the kernel
              jax.random.normal(jax.random.PRNGKey(4), (2, 40, 64))]  # more than MAX_ROWS: XLA
    for x, (ref, read) in itertools.product(inputs, [(w, marked["w"]), (table, marked["table"])]):
        loss = lambda x, q: jnp.sum(jnp.sin(q.project(x, 1)))
        np.testing.assert_allclose(jax.jit(lambda x: read.project(x, 1))(x), ref.project(x, 1), atol=1e-5, rtol=0)
        np.testing.assert_allclose(jax.grad(loss)(x, read), jax.grad(loss)(x, ref), atol=1e-5, rtol=0)


def test_without_a_compiler_one_warning_line_and_the_decoder_keeps_the_xla_path(tmp_path):
    """A machine that cannot build the kernel: one line says so, and quantized decoding still
    runs (scanned, dequantizing) with the same greedy tokens as the dequantized model."""
    script = textwrap.dedent("""
        import jax
        from jaxlm.config import Config, MeshConfig, ModelConfig
        from jaxlm.compress.quantize import quantize_params, dequantize_params
        from jaxlm.inference.decode import Decoder, generate
        from jaxlm.inference.sampling import Sampling
        from jaxlm.model.build import build_model
        from jaxlm.parallel.mesh import make_mesh
        from flax import nnx
        cfg = Config(model=ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32),
                     mesh=MeshConfig(data=1))
        params = nnx.to_pure_dict(nnx.state(build_model(cfg, 0)))
        q = quantize_params(params, cfg, "int8")
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        dec = Decoder(cfg, q, mesh)
        prompt = [[1, 2, 3, 4]]
        got = generate(dec, prompt, 8, Sampling(temperature=0.0))
        want = generate(Decoder(cfg, dequantize_params(q), mesh), prompt, 8, Sampling(temperature=0.0))
        print("reads_codes", dec.reads_codes, "same", list(got) == list(want) and len(got[0]) == 8)
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "JAXLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reads_codes False same True" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "quantized-matmul kernel" in line]
    assert len(warnings) == 1 and "could not be built" in warnings[0], done.stderr[-2000:]
