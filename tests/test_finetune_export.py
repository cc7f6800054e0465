"""A LoRA run's exports (peft adapters on the HF base, merged HF) against transformers and peft,
and fine-tuning's starting points: a jaxlm run in train.init_from, and a refused resume's hint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm.checkpoint import runs
from jaxlm.checkpoint.resume import restore_for_training
from jaxlm.config import load_config
from jaxlm.errors import UserError
from jaxlm.export.cli import export
from jaxlm.model import lora
from jaxlm.model.build import build_model
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.step import make_trainer

BASE = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128", "model.n_layers=2",
        "data.seq_len=32", "train.global_batch=8", "train.eval_every=0", "train.progress=false",
        "checkpoint.async_save=false"]
QWEN = ["moe.n_experts=4", "moe.top_k=2", "moe.d_ff=64", "model.n_layers=3", "moe.n_shared=1", "moe.first_dense=1"]
MODELS = {"llama": ["lora.rank=4", "lora.alpha=8"], "qwen2_moe": ["lora.rank=4", "lora.alpha=8", *QWEN],
          "llama_tokens": ["lora.rank=4", "lora.alpha=8", "lora.trainable_tokens=[3,7,256]"]}
TOKENS = [3, 7, 256]


def config(*overrides: str):
    return load_config(None, BASE + list(overrides))


def lora_run(root, overrides) -> tuple:
    """A step-0 run whose adapters are far from zero (B random), so exports have something to show."""
    cfg = config(*overrides, f"train.run_dir={root}")
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    params = trainer.jit_init_params()
    keys = iter(jax.random.split(jax.random.key(3), 256))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(keys), x.shape) if "lora_" in jax.tree_util.keystr(p) else x,
        params)
    runs.write_step0(root, cfg, params, trainer)
    return cfg, jax.device_get(params)


def jaxlm_logits(cfg, params, tokens) -> np.ndarray:
    return np.asarray(nnx.merge(nnx.graphdef(build_model(cfg, 0)), params)(jnp.asarray(tokens))[0])


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_on_the_hf_base_export_and_the_merged_export_give_jaxlms_lora_logits(tmp_path, name, capfd):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg, params = lora_run(tmp_path / "run", MODELS[name])
    export(tmp_path / "run", "hf", tmp_path / "base")
    assert "exporting the base model without its LoRA adapters" in capfd.readouterr().err
    export(tmp_path / "run", "peft", tmp_path / "adapter")
    export(tmp_path / "run", "hf", tmp_path / "merged", merge=True)
    tokens = np.random.default_rng(0).integers(0, 257, (2, 24))
    want = jaxlm_logits(cfg, params, tokens)
    plain = config(*[o for o in MODELS[name] if not o.startswith("lora.")])
    base_logits = jaxlm_logits(plain, lora.split_adapters(params)[0], tokens)
    assert np.abs(want - base_logits).max() > 1e-2  # the adapters matter

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    if "tokens" in name:  # peft must write the trained rows over whatever the base holds there
        with torch.no_grad():
            base.model.embed_tokens.weight[TOKENS] = 0.0
            base.lm_head.weight[TOKENS] = 0.0
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(adapted(torch.tensor(tokens)).logits.numpy(), want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(merged(torch.tensor(tokens)).logits.numpy(), want, atol=1e-4, rtol=0)
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == 4 and config_json["lora_alpha"] == 8 and config_json["peft_type"] == "LORA"
    assert config_json["trainable_token_indices"] == ({"embed_tokens": TOKENS, "lm_head": TOKENS}
                                                      if "tokens" in name else None)
    # inference loads the run merged: its logits without adapters in the graph
    run = runs.load_run(str(tmp_path / "run"), mesh=make_mesh(cfg.mesh, jax.devices()[:1]))
    assert run.cfg.lora.rank == 0
    np.testing.assert_allclose(np.asarray(run.model()(jnp.asarray(tokens))[0]), want, atol=1e-5, rtol=0)


def test_exports_refuse_what_a_run_cannot_give(tmp_path):
    plain = config(f"train.run_dir={tmp_path / 'plain'}")
    trainer = make_trainer(plain, make_mesh(plain.mesh, jax.devices()[:1]))
    runs.write_step0(tmp_path / "plain", plain, trainer.jit_init_params(), trainer)
    with pytest.raises(UserError, match=r"--format peft exports LoRA adapters, but this run was trained without"):
        export(tmp_path / "plain", "peft", tmp_path / "x")
    with pytest.raises(UserError, match=r"--merge folds LoRA adapters .* this run has none"):
        export(tmp_path / "plain", "hf", tmp_path / "x", merge=True)
    assert not (tmp_path / "x").exists()


def test_init_from_a_lora_run_starts_from_its_merged_weights_with_fresh_adapters(tmp_path):
    cfg, params = lora_run(tmp_path / "src", MODELS["llama"])
    target = config("lora.rank=2", "lora.targets=[q,v]", f"train.init_from={tmp_path / 'src'}",
                    "train.init_from_step=0", f"train.run_dir={tmp_path / 'dst'}")
    trainer = make_trainer(target, make_mesh(target.mesh, jax.devices()[:1]))
    start = jax.device_get(trainer.initial_params())
    tokens = np.random.default_rng(1).integers(0, 257, (2, 16))
    np.testing.assert_allclose(jaxlm_logits(target, start, tokens), jaxlm_logits(cfg, params, tokens), atol=1e-5)
    adapters = lora.split_adapters(start)[1]
    assert all(not np.any(b) for path, b in jax.tree_util.tree_leaves_with_path(adapters)
               if jax.tree_util.keystr(path).endswith("['b']"))
    other = config("model.d_ff=96", f"train.init_from={tmp_path / 'src'}", f"train.run_dir={tmp_path / 'x'}")
    with pytest.raises(UserError, match=r"is a different model: model.d_ff \(128 -> 96\)"):
        make_trainer(other, make_mesh(other.mesh, jax.devices()[:1])).initial_params()
    # resuming that run's checkpoint in a new run_dir with another config: the way out is init_from
    with pytest.raises(UserError) as e:
        restore_for_training(target, None, tmp_path / "dst", str(tmp_path / "src" / "checkpoints" / "0"),
                             ckpt.tokenizer_identity("bytes"))
    assert "lora.rank (4 -> 2)" in str(e.value) and "use a new train.run_dir" not in str(e.value)
    assert f"drop --resume and set train.init_from={tmp_path / 'src'} train.init_from_step=0" in str(e.value)
