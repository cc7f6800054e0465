"""Export to transformers and llama.cpp, import back: logit parity, exact round trips, refusals.

Small random models (D=64, byte tokenizer) in f32 on CPU; norm scales are randomised so that a
swapped or missing norm would show. transformers/torch and llama.cpp (llama-cpp-python) are
optional: only the tests that run them skip without them.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm import cli
from jaxlm.config import OptimConfig, load_config
from jaxlm.tokenizer.tokenizer import byte_tokenizer, load_gpt2_files
from jaxlm.parallel.mesh import make_mesh
from jaxlm.checkpoint import runs
from jaxlm.export.cli import export
from jaxlm.export.importer import import_run
from jaxlm.train.loop import train
from jaxlm.model.build import build_model
from jaxlm.train.step import make_trainer

from conftest import SHARED_DATA

BASE = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128", "model.n_layers=2",
        "data.seq_len=32", "train.global_batch=8", "train.eval_every=0", "train.progress=false",
        "train.peak_flops_per_device=1e12", "optim.schedule=constant", "checkpoint.async_save=false"]
MOE = ["moe.n_experts=4", "moe.top_k=2", "moe.d_ff=64"]
MODELS = {
    "dense_gqa": [],
    "dense_tied": ["model.tie_embeddings=true"],
    "dense_shared": ["model.share_blocks=2"],  # MobileLLM: blocks A B applied A A B B; exports repeat them
    "mixtral": MOE,
    "shared_and_leading_dense": MOE + ["model.n_layers=3", "moe.n_shared=1", "moe.first_dense=1"],
    # the switches Hugging Face architectures need, on a model made by jaxlm: Qwen2-MoE with an
    # ungated shared expert (written as a zero gate and a doubled down-projection), unnormalised
    # top-k, q/k/v biases, wider heads, llama3 RoPE and an HF-style tied head
    "switches": MOE + ["moe.n_shared=1", "moe.norm_topk_prob=false", "model.attention_bias=true", "model.d_head=32",
                       "model.rope_scaling.type=llama3", "model.rope_scaling.original_max_seq_len=16",
                       "model.tie_embeddings=true", "model.scale_tied_logits=false"],
    "qk_norm_moe": MOE + ["model.qk_norm=true", "model.d_head=8", "moe.first_dense=1", "model.n_layers=3"],
}
ONE_DEVICE = slice(0, 1)  # tiny models: one device compiles and saves fastest
PROMPT = list(b"To be, or not to be: that is")
N_NEW = 32
TIE = {"f32": 1e-4, "f16": 1e-2, "q4_0": 0.1, "q4_1": 0.1}  # a top-2 logit gap below this may flip in
# that GGUF dtype (~3x its error; q4 against jaxlm's int4, whose weights it holds)


def config(*overrides: str):
    return load_config(None, BASE + list(overrides))


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    """name -> a run directory with a step-0 checkpoint of a random model (made once per module)."""
    root = tmp_path_factory.mktemp("runs")

    @functools.cache
    def make(name: str) -> Path:
        run_dir = root / name
        cfg = config(*MODELS[name], f"train.run_dir={run_dir}")
        trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[ONE_DEVICE]))
        params = trainer.init_state()["params"]
        keys = iter(jax.random.split(jax.random.key(7), 64))
        def randomize(path, x):  # norm gains around 1, biases around 0: a misplaced one would show
            name = jax.tree_util.keystr(path)
            if "scale" in name:
                return x * jax.random.uniform(next(keys), x.shape, x.dtype, 0.5, 1.5)
            bias = str(path[-1].key) in ("bq_Hd", "bk_Kd", "bv_Kd")
            return x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype) if bias else x

        params = jax.tree_util.tree_map_with_path(randomize, params)
        runs.write_step0(run_dir, cfg, params, trainer)
        return run_dir

    return make


@functools.cache
def forward(run_dir: Path, quantize: str | None = None):
    """(config, params, jitted logits of a [B, T] batch) for the run's step-0 checkpoint, its
    weights quantized with the scheme `quantize` if given."""
    cfg, params = runs.load_params(ckpt.find_step(run_dir))
    if quantize:
        from jaxlm.compress.quantize import quantize_params

        params = quantize_params(params, cfg, quantize)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 0)))
    fn = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens)[0])
    return cfg, params, lambda tokens: np.asarray(fn(params, jnp.asarray(tokens)))


def jaxlm_greedy(run_dir: Path, quantize: str | None = None) -> tuple[list[int], list[float]]:
    """Greedy continuation of PROMPT by full forwards over a fixed-length (causal, so padded) row;
    also the top-1 vs top-2 logit gap at each step (a near tie may go either way in lower precision)."""
    _, _, logits = forward(run_dir, quantize)
    ids, gaps = list(PROMPT), []
    for _ in range(N_NEW):
        row = np.zeros((1, len(PROMPT) + N_NEW), np.int32)
        row[0, :len(ids)] = ids
        last = logits(row)[0, len(ids) - 1]
        top2 = np.sort(last)[-2:]
        gaps.append(top2[1] - top2[0])
        ids.append(int(last.argmax()))
    return ids[len(PROMPT):], [float(g) for g in gaps]


# ----------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_logits_match_jaxlm_within_1e4(make_run, tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run_dir = make_run(name)
    out = tmp_path / "hf"
    # the MoE model also goes through the sharded layout (several files + index)
    export(run_dir, "hf", out, max_shard_bytes=200_000 if name == "shared_and_leading_dense" else None)
    if name == "shared_and_leading_dense":
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = {"dense_gqa": "LlamaForCausalLM", "dense_tied": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                "shared_and_leading_dense": "Qwen2MoeForCausalLM", "dense_shared": "LlamaForCausalLM",
                "switches": "Qwen2MoeForCausalLM", "qk_norm_moe": "Qwen3MoeForCausalLM"}[name]
    assert type(model).__name__ == expected
    applied = {"dense_shared": 4, "shared_and_leading_dense": 3, "qk_norm_moe": 3}.get(name, 2)
    assert model.config.num_hidden_layers == applied
    tokens = np.random.default_rng(0).integers(0, 257, (2, 40))
    with torch.no_grad():
        got = model(torch.tensor(tokens)).logits.numpy()
    want = forward(run_dir)[2](tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


MIXED_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.<|endoftext|>ALL: Speak, speak!\n\n"
              "  It's 2024 -- naïve café, 東京 🚀\t tabs\r\nwe'll they've<|endoftext|><|endoftext|>end   ")


@pytest.mark.parametrize("kind", ["bytes", "gpt2"])
def test_exported_hf_tokenizer_gives_jaxlm_ids_on_mixed_text_with_special_tokens(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    from jaxlm.export.tokenizer_files import write_hf_tokenizer

    if kind == "bytes":
        tok = byte_tokenizer()
    else:
        vocab, merges = SHARED_DATA / "cs336_fixtures" / "gpt2_vocab.json", SHARED_DATA / "cs336_fixtures" / "gpt2_merges.txt"
        if not vocab.is_file():
            pytest.skip("GPT-2 tokenizer files not in shared data")
        tok = load_gpt2_files(str(vocab), str(merges))
    write_hf_tokenizer(tok, tmp_path, tok.n_vocab, 1024)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = tok.encode(MIXED_TEXT, allowed_special="all")
    assert hf_tok(MIXED_TEXT, add_special_tokens=False)["input_ids"] == want
    assert hf_tok.decode(want) == MIXED_TEXT
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"


@pytest.mark.parametrize("name", ["dense_tied", "shared_and_leading_dense", "dense_shared", "switches"])
def test_import_of_export_is_bit_exact_on_a_sharded_mesh(make_run, tmp_path, name):
    run_dir = make_run(name)
    export(run_dir, "hf", tmp_path / "hf")
    # experts split over 2 devices, embed over 2: each shard reads only its own slices
    import_run(tmp_path / "hf", tmp_path / "imported", overrides=["mesh.fsdp=2", "mesh.expert=2"],
               devices=jax.devices()[:4])
    _, original = runs.load_params(ckpt.find_step(run_dir))
    _, imported = runs.load_params(ckpt.find_step(tmp_path / "imported"))
    assert jax.tree.structure(original) == jax.tree.structure(imported)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(imported)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_import_of_a_transformers_made_tied_llama_reproduces_its_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                      rms_norm_eps=1e-6, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf")
    cfg = import_run(tmp_path / "hf", tmp_path / "run", devices=jax.devices()[ONE_DEVICE])
    # HF's tie: the head is the embedding itself, unscaled
    assert cfg.model.tie_embeddings and not cfg.model.scale_tied_logits and cfg.model.n_kv_heads == 1
    tokens = np.random.default_rng(1).integers(0, 300, (2, 20))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(forward(tmp_path / "run")[2](tokens), want, atol=1e-4, rtol=0)


def test_init_from_and_imported_run_train_exactly_alike(make_run, tmp_path):
    """`train.init_from` an HF export and `jaxlm train` of its `jaxlm import` start from the same
    weights (the round trip above shows they are the original's): the same losses, bit for bit."""
    export(make_run("dense_gqa"), "hf", tmp_path / "hf")
    text = tmp_path / "text.txt"  # a small corpus: tokenizing the default one would dominate the test
    text.write_text(" ".join(f"word{i % 97} and {i % 13}." for i in range(4000)))
    steps = ["train.steps=2", "checkpoint.every=0", "train.log_every=1", f"data.path={text}"]
    mesh = make_mesh(config().mesh, jax.devices()[ONE_DEVICE])
    init_from = train(config(*steps, f"train.init_from={tmp_path / 'hf'}", f"train.run_dir={tmp_path / 'a'}"), mesh)
    pretraining = [f"optim.{k}={getattr(OptimConfig(), k)}" for k in ("lr", "min_lr", "warmup_steps", "weight_decay")]
    import_run(tmp_path / "hf", tmp_path / "imported", overrides=BASE + steps + pretraining,
               devices=jax.devices()[ONE_DEVICE])
    imported = train(load_config(tmp_path / "imported" / "config.yaml"), mesh)
    assert [r["step"] for r in imported] == [1, 2]
    assert [r["loss"] for r in init_from] == [r["loss"] for r in imported]


# ----------------------------------------------------------------------------- refusals, atomic writes


def run_with_config(make_run, tmp_path, base="dense_gqa", **changes) -> Path:
    """A copy of a run whose recorded config has `changes` ({"model.norm": "post"})."""
    run_dir = Path(shutil.copytree(make_run(base), tmp_path / "run"))
    (step, step_dir), = ckpt.step_dirs(run_dir / ckpt.CHECKPOINTS)
    meta = ckpt.read_meta(step_dir)
    for key, value in changes.items():
        section, leaf = key.split(".")
        meta["config"][section][leaf] = value
    (step_dir / ckpt.META_FILE).write_text(json.dumps(meta))
    ckpt.write_manifest(step_dir)
    return run_dir


@pytest.mark.parametrize("changes,named", [
    ({"model.norm": "post"}, "model.norm=post"),
    ({"model.norm": "none"}, "model.norm=none"),
    ({"model.mlp": "gelu"}, "model.mlp=gelu"),
    ({"model.position": "none"}, "model.position=none"),
    ({"model.causal": False}, "model.causal=false"),
    ({"moe.n_experts": 4, "moe.router": "sigmoid"}, "moe.router=sigmoid"),
    ({"moe.n_experts": 4, "moe.n_shared": 1, "model.qk_norm": True}, "model.qk_norm=true with moe.n_shared"),
])
def test_each_refusal_exits_2_with_one_line_naming_the_setting(make_run, tmp_path, capsys, changes, named):
    run_dir = run_with_config(make_run, tmp_path, **changes)
    code = cli.main(["export", str(run_dir), "--format", "hf", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err, err
    assert not (tmp_path / "out").exists()


def test_gguf_refuses_shared_experts_in_one_line(make_run, tmp_path, capsys):
    run_dir = run_with_config(make_run, tmp_path, **{"moe.n_experts": 4, "moe.n_shared": 1})
    assert cli.main(["export", str(run_dir), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "shared experts" in err and "--format hf" in err


def test_gguf_refuses_llama3_rope_scaling_outside_the_llama_graph_in_one_line(make_run, tmp_path, capsys):
    llama3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_seq_len": 64}
    run_dir = run_with_config(make_run, tmp_path, **{"model.rope_scaling": llama3, "model.qk_norm": True})
    assert cli.main(["export", str(run_dir), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.rope_scaling.type=llama3" in err and "qwen3" in err, err


def test_dropping_moe_exports_with_a_warning(make_run, tmp_path, capsys):
    run_dir = run_with_config(make_run, tmp_path, "mixtral", **{"moe.impl": "dropping"})
    export(run_dir, "hf", tmp_path / "out")
    assert "only where nothing was dropped" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_interrupted_export_leaves_nothing_and_existing_output_needs_force(make_run, tmp_path, monkeypatch, fmt):
    run_dir = make_run("dense_gqa")
    out = tmp_path / ("out" if fmt == "hf" else "out.gguf")
    calls = {"n": 0}
    if fmt == "hf":
        import safetensors.numpy

        real, target, attr = safetensors.numpy.save_file, safetensors.numpy, "save_file"
    else:
        import gguf

        real, target, attr = gguf.GGUFWriter.write_tensor_data, gguf.GGUFWriter, "write_tensor_data"

    def fail_second_time(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after one shard / tensor is already on disk
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(target, attr, fail_second_time)
        with pytest.raises(KeyboardInterrupt):
            export(run_dir, fmt, out, max_shard_bytes=100_000)
    assert calls["n"] == 2 and list(tmp_path.iterdir()) == []

    export(run_dir, fmt, out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = cli.main(["export", str(run_dir), "--format", fmt, "-o", str(out)])
    assert code == 2 and sorted(p.name for p in tmp_path.rglob("*")) == before
    assert cli.main(["export", str(run_dir), "--format", fmt, "-o", str(out), "--force", "--dtype", "bf16"]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # replaced whole, nothing left beside it


def test_hf_generation_config_says_what_is_true_and_generate_does_not_warn(make_run, tmp_path, capfd):
    """No max_length (every `generate(max_new_tokens=...)` would warn that both are set), and the
    ids jaxlm starts, ends and pads with, so generate needs no pad_token_id either."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = export(make_run("dense_gqa"), "hf", tmp_path / "hf")
    assert json.loads((out / "generation_config.json").read_text()) == \
        {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    capfd.readouterr()
    transformers.logging.set_verbosity_warning()
    model.generate(torch.tensor([PROMPT]), max_new_tokens=3, do_sample=False)
    err = capfd.readouterr().err
    assert "max_length" not in err and "pad_token_id" not in err, err
