"""The architectures people start from, each built from its own transformers config class with
random weights and its real switches on (llama3 RoPE scaling, q/k/v biases, q/k norms, an explicit
head_dim, tied heads, shared experts and their sigmoid gate, unnormalised top-k), saved with
`save_pretrained` and read by `jaxlm import`:

  * jaxlm's logits equal transformers' within 1e-4 and its greedy continuation is transformers'
    token for token (also through jaxlm's KV-cache decoder, for two of them), and jaxlm's
    parameter count is transformers';
  * `jaxlm export` writes the original safetensors again (same names, shapes, bytes; bf16 too),
    which transformers loads into the same function, and importing that export gives the same
    parameters bit for bit;
  * the GGUF export of the new switches (llama3 RoPE, biases, q/k norms) continues as jaxlm in llama.cpp;
  * what jaxlm cannot compute is refused in one line naming the field.

Tiny models (D=64, 2-3 layers, f32) so each architecture costs a few seconds.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm import cli
from jaxlm.checkpoint import runs
from jaxlm.config import MeshConfig
from jaxlm.export.cli import export
from jaxlm.export.hf_load import load_params, read_source
from jaxlm.export.importer import import_run
from jaxlm.model.build import build_model
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import param_shardings, resolve_rules
from jaxlm.tools.accounting import count_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
# a short original context, so that scaling shows within the test's positions; with head_dim 16 and
# theta 1e4 the wavelengths are 6.3 (kept), 19.9 (in the interpolated band 8..32) and >= 63 (scaled)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# name: (transformers config class, its arguments, the architecture `jaxlm export` writes back)
ARCHS = {
    "llama3": ("LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True, rope_theta=10000.0),
               "LlamaForCausalLM"),
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4), "LlamaForCausalLM"),
    "mistral": ("MistralConfig", dict(sliding_window=None), "LlamaForCausalLM"),  # the same tensors and function
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6), "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True), "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, num_experts=4, head_dim=32, norm_topk_prob=True), "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
                "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, num_experts=4, shared_expert_intermediate_size=64, norm_topk_prob=False,
                                         num_hidden_layers=3, mlp_only_layers=[0]), "Qwen2MoeForCausalLM"),
}
# what the import must have switched on for each (model.* / moe.* values)
SWITCHES = {
    "llama3": {"model.rope_scaling.type": "llama3", "model.rope_scaling.original_max_seq_len": 32,
               "model.tie_embeddings": True, "model.scale_tied_logits": False},
    "llama2": {"model.n_kv_heads": 4},
    "mistral": {},
    "qwen2": {"model.attention_bias": True, "model.tie_embeddings": True},
    "qwen3": {"model.qk_norm": True, "model.d_head": 32},
    "qwen3_moe": {"model.qk_norm": True, "model.d_head": 32, "moe.norm_topk_prob": True, "moe.n_experts": 4},
    "mixtral": {"moe.n_experts": 4, "moe.norm_topk_prob": True},
    "qwen2_moe": {"model.attention_bias": True, "moe.n_shared": 2, "moe.shared_gate": True,
                  "moe.norm_topk_prob": False, "moe.first_dense": 1},
}
ONE_DEVICE = slice(0, 1)
PROMPT = [5, 17, 42, 101, 7, 250, 33, 64, 12, 199, 3, 77]
N_NEW = 24
LENGTH = len(PROMPT) + N_NEW


def randomize(model, seed: int) -> None:
    """Random weights everywhere, biases and norm gains included (transformers inits biases to 0
    and gains to 1, which would hide a bias or norm that is dropped or misplaced)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (the transformers model, its save_pretrained directory, the jaxlm run imported from it)."""
    root = tmp_path_factory.mktemp("archs")

    @functools.cache
    def make(name: str):
        cls, kwargs, _ = ARCHS[name]
        hf_cfg = getattr(transformers, cls)(**{**COMMON, **kwargs})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
        randomize(model, seed=len(name))
        model.save_pretrained(root / name / "hf")
        import_run(root / name / "hf", root / name / "run", devices=jax.devices()[ONE_DEVICE])
        return model, root / name / "hf", root / name / "run"

    return make


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def hf_greedy(model) -> list[int]:
    """transformers' greedy continuation of PROMPT (its generate, with its KV cache)."""
    model.generation_config.eos_token_id = None  # continue for N_NEW tokens whatever comes
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@functools.cache
def jaxlm_run(run_dir: Path):
    return runs.load_run(str(run_dir), mesh=make_mesh(runs.config_of(ckpt.find_step(run_dir)).mesh,
                                                          jax.devices()[ONE_DEVICE]))


@functools.cache
def jaxlm_forward(run_dir: Path):
    run = jaxlm_run(run_dir)
    return jax.jit(lambda params, tokens: nnx.merge(nnx.graphdef(run.model()), params)(tokens)[0])


def jaxlm_logits(run_dir: Path, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(jaxlm_forward(run_dir)(jaxlm_run(run_dir).params, tokens))


def jaxlm_greedy(run_dir: Path) -> list[int]:
    """Greedy by full forwards over a fixed [2, LENGTH] batch (causal: the padding after the
    tokens does not matter), so it reuses the logits test's compiled program."""
    ids = list(PROMPT)
    for _ in range(N_NEW):
        rows = np.zeros((2, LENGTH), np.int32)
        rows[0, :len(ids)] = ids
        ids.append(int(jaxlm_logits(run_dir, rows)[0, len(ids) - 1].argmax()))
    return ids[len(PROMPT):]


def jaxlm_decoder_greedy(run_dir: Path) -> list[int]:
    """Greedy with jaxlm's KV-cache decoder (`jaxlm generate`)."""
    from jaxlm.inference.decode import Decoder, generate
    from jaxlm.inference.sampling import Sampling

    run = jaxlm_run(run_dir)
    return generate(Decoder(run.cfg, run.params, run.mesh), [PROMPT], N_NEW, Sampling(temperature=0.0))[0]


def flat(cfg) -> dict:
    out = {}
    for section in ("model", "moe"):
        for key, value in vars(getattr(cfg, section)).items():
            if hasattr(value, "__dataclass_fields__"):
                out.update({f"{section}.{key}.{k}": v for k, v in vars(value).items()})
            else:
                out[f"{section}.{key}"] = value
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_import_gives_transformers_logits_and_greedy_continuation(built, name):
    model, _, run_dir = built(name)
    cfg = jaxlm_run(run_dir).cfg
    assert {k: flat(cfg)[k] for k in SWITCHES[name]} == SWITCHES[name]
    assert count_params(cfg.model, cfg.moe).total == model.num_parameters()  # accounting counts every switch
    tokens = np.random.default_rng(1).integers(0, 300, (2, LENGTH))
    np.testing.assert_allclose(jaxlm_logits(run_dir, tokens), hf_logits(model, tokens), atol=1e-4, rtol=0)
    assert jaxlm_greedy(run_dir) == hf_greedy(model)


@pytest.mark.parametrize("name", ["llama3", "qwen3"])  # RoPE scaling at cached positions; q/k norms, d_head caches
def test_kv_cache_decoder_continues_as_transformers(built, name):
    model, _, run_dir = built(name)
    assert jaxlm_decoder_greedy(run_dir) == hf_greedy(model)


def tensors(directory: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """{name: (dtype, shape, bytes)} of every tensor in a directory's safetensors files (read with
    torch, the reader that takes bf16)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update({k: (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
                    for k, t in load_file(f).items()})
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_export_writes_the_original_safetensors_and_imports_back_bit_exact(built, tmp_path, name):
    model, hf_dir, run_dir = built(name)
    out = export(run_dir, "hf", tmp_path / "hf")
    original, written = tensors(hf_dir), tensors(out)
    assert sorted(written) == sorted(original)
    for key, x in original.items():
        assert written[key] == x, key  # dtype, shape and bytes
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHS[name][2]]
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again).__name__ == ARCHS[name][2]
    tokens = np.random.default_rng(2).integers(0, 300, (2, 40))
    np.testing.assert_allclose(hf_logits(again, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)
    # import(export(x)) == x: the export's parameters, read on a mesh that splits them, are the run's
    run = jaxlm_run(run_dir)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2 if run.cfg.moe.n_experts else 1), jax.devices()[:4 if run.cfg.moe.n_experts else 2])
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(run.cfg, 0)))
    back = load_params(read_source(out), run.cfg, param_shardings(abstract, mesh, resolve_rules({})))
    assert jax.tree.structure(back) == jax.tree.structure(run.params)
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- llama.cpp


def llama_cpp_greedy(gguf: Path) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy continuation of PROMPT (ids in, argmax out) and its top-2 gap per step."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as e:
        pytest.skip(f"llama-cpp-python does not load here: {str(e).splitlines()[0][:200]}")
    llm = llama_cpp.Llama(str(gguf), n_ctx=64, n_batch=64, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        ids, gaps, tokens = [], [], list(PROMPT)
        for _ in range(N_NEW):
            llm.eval(tokens)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(300,))
            top2 = np.sort(logits)[-2:]
            ids.append(int(logits.argmax()))
            gaps.append(float(top2[1] - top2[0]))
            tokens = [ids[-1]]
        return ids, gaps
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3"])  # rope_freqs + tied head; biases; q/k norms, d_head
def test_llama_cpp_continues_as_jaxlm(built, tmp_path, name):
    _, _, run_dir = built(name)
    got, gaps = llama_cpp_greedy(export(run_dir, "gguf", tmp_path / "m.gguf", dtype="f32"))
    want = jaxlm_greedy(run_dir)
    tie = next((i for i, g in enumerate(gaps) if g < 1e-4), N_NEW)  # f32 logits differ by ~1e-6
    assert tie >= 12 and got[:tie] == want[:tie], (got, want, gaps)


# ----------------------------------------------------------------------------- the parts


def test_llama3_frequencies_are_transformers_own():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxlm.config import RopeScalingConfig
    from jaxlm.model.layers import rope_frequencies

    hf_cfg = transformers.LlamaConfig(**{**COMMON, "rope_scaling": LLAMA3_ROPE, "rope_theta": 10000.0})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    scaling = RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_seq_len=32)
    got = rope_frequencies(16, 10000.0, scaling)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    plain = rope_frequencies(16, 10000.0)
    assert got[0] == plain[0] and plain[1] / 8 < got[1] < plain[1] and np.all(got[2:] == plain[2:] / 8)


def saved_config(built, name: str, tmp_path: Path, **changes) -> Path:
    """A copy of an architecture's HF directory whose config.json has `changes`."""
    import shutil

    _, hf_dir, _ = built(name)
    out = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    c = json.loads((out / "config.json").read_text())
    c.update(changes)
    (out / "config.json").write_text(json.dumps(c))
    return out


@pytest.mark.parametrize("name,changes,named", [
    ("mistral", {"sliding_window": 64}, "sliding_window=64"),  # below max_position_embeddings=128
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32}, "sliding_window=32"),
    ("llama2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type='yarn'"),
    ("llama2", {"mlp_bias": True}, "mlp_bias=true"),
    ("llama2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama2", {"architectures": ["GPT2LMHeadModel"]}, "'GPT2LMHeadModel'"),
])
def test_what_jaxlm_cannot_compute_is_refused_in_one_line(built, tmp_path, capsys, name, changes, named):
    hf_dir = saved_config(built, name, tmp_path, **changes)
    capsys.readouterr()
    assert cli.main(["import", str(hf_dir), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err, err
    assert not (tmp_path / "run").exists()


def test_mistral_window_at_least_the_context_is_full_attention(built, tmp_path):
    hf_dir = saved_config(built, "mistral", tmp_path, sliding_window=128)  # = max_position_embeddings
    assert read_source(hf_dir).model.max_seq_len == 128


def test_a_nonzero_o_proj_bias_is_refused_naming_the_tensor(tmp_path, capsys):
    """Qwen3's (and Llama's) attention_bias also biases o_proj, which jaxlm has no place for: it
    imports only where that bias is zero, and names the tensor where it is not."""
    hf_cfg = transformers.Qwen3Config(**{**COMMON, "attention_bias": True})
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    model.save_pretrained(tmp_path / "zero")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias[3] = 0.5
    model.save_pretrained(tmp_path / "nonzero")
    cfg = import_run(tmp_path / "zero", tmp_path / "run", devices=jax.devices()[ONE_DEVICE])
    assert cfg.model.attention_bias and cfg.model.qk_norm
    capsys.readouterr()
    assert cli.main(["import", str(tmp_path / "nonzero"), "-o", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.layers.1.self_attn.o_proj.bias is not zero" in err, err


def test_import_writes_fine_tuning_defaults_and_says_to_set_the_data(built, tmp_path, capsys):
    from jaxlm.config import load_config

    _, hf_dir, _ = built("llama2")
    mine = tmp_path / "mine.yaml"
    mine.write_text("optim:\n  lr: 5.0e-5\n")
    assert cli.main(["import", str(hf_dir), "-o", str(tmp_path / "run"), "--config", str(mine),
                     "optim.warmup_steps=3"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (5e-5, 3)  # what the user set wins
    assert (cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.schedule) == (2e-6, 0.0, "cosine")
    assert cfg.data.path is None and "set data.path" in out
    assert f"jaxlm train {tmp_path / 'run' / 'config.yaml'} data.path=YOUR_DATA" in out


def test_a_bf16_checkpoint_imports_exactly_and_exports_back_to_its_bytes(built, tmp_path):
    """Llama 3 and Qwen ship bf16: read (as f32 parameters, exactly) and written back as bf16."""
    import copy

    model, _, _ = built("qwen2")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    import_run(tmp_path / "bf16", tmp_path / "run", devices=jax.devices()[ONE_DEVICE])
    out = export(tmp_path / "run", "hf", tmp_path / "out", dtype="bf16")
    original, written = tensors(tmp_path / "bf16"), tensors(out)
    assert written == original and all(dtype == "torch.bfloat16" for dtype, _, _ in original.values())
