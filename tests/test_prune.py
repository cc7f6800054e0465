"""Pruning: masks by hand, N:M that survives training and a SIGKILL with a bit-exact resume, the cubic
schedule, structured pruning that exports a genuinely smaller model, rewinding, one-line errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from flax import nnx

from conftest import REPO, run_cli
from jaxlm import checkpoint as ckpt
from jaxlm.checkpoint import runs
from jaxlm.compress import prune
from jaxlm.config import ConfigError, load_config, to_dict
from jaxlm.model.build import build_model
from jaxlm.tools.accounting import count_params, pruned_count, structured_model
from jaxlm.tools.prune import prune_run
from jaxlm.train.loop import train
from jaxlm.train.partition import flatten

SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=172",
         "data.seq_len=64", "model.max_seq_len=64", "train.global_batch=16", "train.progress=false",
         "train.peak_flops_per_device=1e11", "train.eval_every=0", "train.log_every=5"]


def config(run_dir: Path, data: Path, *overrides: str):
    return load_config("configs/tiny.yaml", SMALL + [f"data.path={data}", f"train.run_dir={run_dir}", *overrides])


def saved_state(step_dir: Path) -> dict:
    """Everything a checkpoint holds (params, optimizer state, masks) as numpy arrays."""
    with ocp.PyTreeCheckpointer() as c:
        return c.restore((step_dir / "state").absolute())


# ----------------------------------------------------------------------------- masks by hand


def numpy_keep(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """The reference: prune the round(s * n) smallest, ties broken by position."""
    flat = scores.reshape(-1)
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:round(sparsity * flat.size)]] = False
    return keep.reshape(scores.shape)


def test_magnitude_masks_equal_a_numpy_ranking_per_layer_and_global():
    rng = np.random.default_rng(0)
    # few distinct values: ties everywhere, so the tie rule is checked too
    weights = {("a",): np.round(rng.normal(size=(3, 8, 5)), 1).astype(np.float32),
               ("b",): np.round(rng.normal(size=(3, 5, 2, 4)), 1).astype(np.float32)}
    leads = {("a",): 1, ("b",): 1}
    for s in (0.3, 0.5, 0.8):
        got = prune.magnitude_masks(weights, leads, s, "layer")
        for path, w in weights.items():
            want = np.stack([numpy_keep(np.abs(w[i]), s) for i in range(w.shape[0])])
            np.testing.assert_array_equal(np.asarray(got[path]), want)
        got = prune.magnitude_masks(weights, leads, s, "global")
        want = numpy_keep(np.concatenate([np.abs(w).reshape(-1) for w in weights.values()]), s)
        np.testing.assert_array_equal(np.concatenate([np.asarray(got[p]).reshape(-1) for p in weights]), want)


def test_nm_mask_keeps_the_n_largest_of_each_m_consecutive_inputs_per_output():
    rng = np.random.default_rng(1)
    w_LHdD = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)  # wo: two input dims (H, d)
    for n, m in ((2, 4), (4, 8)):
        got = np.asarray(prune.nm_mask(w_LHdD, 1, 2, n, m))
        w_LKN = np.abs(w_LHdD).reshape(2, 16, 3)
        want = np.zeros_like(w_LKN, bool)
        for layer in range(2):
            for out in range(3):
                for g in range(16 // m):
                    group = w_LKN[layer, g * m:(g + 1) * m, out]
                    want[layer, g * m + np.argsort(-group, kind="stable")[:n], out] = True
        np.testing.assert_array_equal(got.reshape(2, 16, 3), want)


# ----------------------------------------------------------------------------- 2:4 through training and a kill


def assert_two_of_four(state: dict, cfg) -> None:
    """Every group of 4 consecutive inputs of every pruned matrix has at most 2 non-zeros, per output."""
    params, masks = flatten(state["params"]), flatten(state["masks"])
    which = {tuple(map(str, p)): dims for p, dims in prune.prunable(cfg).items()}  # a restore's keys are strings
    assert set(masks) == set(which) and len(which) == 7 * 1  # q k v o gate up down of the one layer stack
    for path, (first_in, n_in) in which.items():
        w = np.asarray(params[path])
        w_KN = w.reshape(*w.shape[:first_in], math.prod(w.shape[first_in:first_in + n_in]), -1)
        groups = (w_KN != 0).reshape(*w_KN.shape[:-2], -1, 4, w_KN.shape[-1]).sum(-2)
        assert groups.max() <= 2 and groups.mean() == 2.0, path  # 2 kept: trained weights are never exactly 0
        assert not np.any(w[~np.asarray(masks[path])]), path


def kill_after_first_checkpoint(cfg_file: Path, run_dir: Path) -> None:
    """Starts `jaxlm train` and SIGKILLs it once its first checkpoint is committed."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "train", str(cfg_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not ckpt.step_dirs(run_dir / ckpt.CHECKPOINTS) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.demo  # on demand: the n:m masks are tested by hand above, a killed pruning run resumes bit-exact below
def test_two_of_four_holds_after_training_and_a_sigkill_and_the_resume_is_bit_exact(tmp_path, shakespeare_path):
    # constant lr: the killed run may be given more steps than the others without changing a step
    args = ("prune.method=nm", "optim.schedule=constant", "optim.warmup_steps=5", "train.microbatches=2",
            "checkpoint.every=4")
    whole = config(tmp_path / "whole", shakespeare_path, "train.steps=24", *args)
    train(whole)
    final = saved_state(ckpt.find_step(tmp_path / "whole", 24))
    assert_two_of_four(final, whole)

    killed_dir = tmp_path / "killed"
    killed = config(killed_dir, shakespeare_path, "train.steps=100000", *args)
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(killed)))
    kill_after_first_checkpoint(cfg_file, killed_dir)
    newest = max(s for s, p in ckpt.step_dirs(killed_dir / ckpt.CHECKPOINTS) if ckpt.verify(p) is None)
    assert 4 <= newest < 24
    train(config(killed_dir, shakespeare_path, "train.steps=24", *args))  # resumes from the newest valid step
    resumed = saved_state(ckpt.find_step(killed_dir, 24))
    assert_two_of_four(resumed, whole)
    assert ckpt.state_equal(resumed, final)  # params, AdamW's moments and the masks, bit for bit


# ----------------------------------------------------------------------------- the gradual schedule


def test_gradual_pruning_follows_the_cubic_schedule(tmp_path, shakespeare_path):
    p = ["prune.method=magnitude", "prune.sparsity=0.8", "prune.start_step=2", "prune.end_step=10",
         "prune.every=4", "prune.initial_sparsity=0.1"]
    cfg = config(tmp_path / "gradual", shakespeare_path, "train.steps=12", "checkpoint.every=1",
                 "checkpoint.keep=20", *p)
    cubic = lambda t: 0.8 + (0.1 - 0.8) * (1 - (t - 2) / 8) ** 3
    assert [round(prune.sparsity_at(cfg.prune, t), 6) for t in (2, 6, 10, 12)] == \
        [round(cubic(t), 6) for t in (2, 6)] + [0.8, 0.8]
    assert [t for t in range(13) if prune.is_event(cfg.prune, t)] == [2, 6, 10]
    train(cfg)
    sizes = {path: math.prod(s.shape) for path, s in flatten(nnx.to_pure_dict(nnx.state(
        nnx.eval_shape(lambda: build_model(cfg, 0))))).items() if path in prune.prunable(cfg)}
    for step in range(1, 13):
        meta = ckpt.read_meta(ckpt.find_step(tmp_path / "gradual", step))
        event = max((t for t in (2, 6, 10) if t <= step), default=None)
        # per layer: round(s * n) zeros in each matrix of each of the 2 layers
        want = 0 if event is None else sum(2 * round(cubic(event) * n / 2) for n in sizes.values())
        assert meta["pruned"]["sparsity"] == pytest.approx(want / sum(sizes.values()), abs=1e-9), step
    assert pruned_count(cfg) == sum(2 * round(0.8 * n / 2) for n in sizes.values())  # accounting agrees


def test_gradual_pruning_interrupted_between_mask_steps_resumes_bit_exact_on_an_fsdp_mesh(tmp_path, shakespeare_path):
    # masks sharded as their weights (fsdp 2 x data 4); constant lr, so a shorter first start is the same steps
    args = ("prune.method=magnitude", "prune.scope=global", "prune.sparsity=0.7", "prune.start_step=2",
            "prune.end_step=8", "prune.every=3", "optim.schedule=constant", "optim.warmup_steps=2", "mesh.fsdp=2",
            "mesh.data=4",
            "checkpoint.every=5")
    train(config(tmp_path / "whole", shakespeare_path, "train.steps=10", *args))
    # masks are computed after steps 2, 5 and 8; the first start stops at 6, so the resumed one trains a step
    # (7) on the restored masks before it computes new ones
    train(config(tmp_path / "split", shakespeare_path, "train.steps=6", *args))
    train(config(tmp_path / "split", shakespeare_path, "train.steps=10", *args))
    whole = saved_state(ckpt.find_step(tmp_path / "whole", 10))
    assert ckpt.state_equal(saved_state(ckpt.find_step(tmp_path / "split", 10)), whole)
    kept = sum(int(m.sum()) for m in flatten(whole["masks"]).values())
    assert kept == 90624 - round(0.7 * 90624)  # the schedule's end: 70% of the 90,624 prunable weights


# ----------------------------------------------------------------------------- one-shot, structured, rewinding


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shakespeare_path):
    run_dir = tmp_path_factory.mktemp("prune") / "dense"
    train(config(run_dir, shakespeare_path, "train.steps=8", "checkpoint.every=4"))
    return run_dir


def test_one_shot_magnitude_run_retrains_with_its_pruned_weights_held_at_zero(trained_run, tmp_path):
    out = tmp_path / "mag"
    cfg, report = prune_run(str(trained_run), out, ["prune.method=magnitude", "prune.scope=global",
                                                    "prune.sparsity=0.6", "train.steps=4"])
    assert report["sparsity"] == pytest.approx(round(0.6 * 90624) / 90624, abs=1e-12)  # 90,624 prunable weights
    before = saved_state(ckpt.find_step(out, 0))
    train(cfg)
    after = saved_state(ckpt.find_step(out, 4))
    for path, keep in flatten(before["masks"]).items():
        np.testing.assert_array_equal(flatten(after["masks"])[path], keep)
        w0, w4 = flatten(before["params"])[path], flatten(after["params"])[path]
        assert not np.any(w4[~keep]) and np.any(w4[keep] != w0[keep])  # zeros stayed, survivors trained
    ls = run_cli("checkpoint", "ls", str(out))
    assert "pruned magnitude: sparsity 0.6000" in ls.stdout, ls.stdout + ls.stderr


def test_init_from_a_pruned_run_pruning_alike_keeps_its_masks_and_otherwise_warns(trained_run, tmp_path,
                                                                                   shakespeare_path, capfd):
    """Fine-tuning a pruned run (train.init_from) with the same prune settings recomputes its masks
    from its zeros at step 0 (the same masks); without them its zeros train again, which is said."""
    args = ["prune.method=magnitude", "prune.scope=global", "prune.sparsity=0.6"]
    cfg, _ = prune_run(str(trained_run), tmp_path / "pruned", [*args, "train.steps=2"])
    train(cfg)
    masks = flatten(saved_state(ckpt.find_step(tmp_path / "pruned", 2))["masks"])
    capfd.readouterr()
    alike = tmp_path / "alike"
    train(config(alike, shakespeare_path, *args, f"train.init_from={tmp_path / 'pruned'}", "train.steps=1"))
    assert "was pruned" not in capfd.readouterr().err
    for path, keep in flatten(saved_state(ckpt.find_step(alike, 1))["masks"]).items():
        np.testing.assert_array_equal(keep, masks[path])
    train(config(tmp_path / "dense", shakespeare_path, f"train.init_from={tmp_path / 'pruned'}", "train.steps=1"))
    assert "was pruned (prune.method=magnitude) but this config prunes nothing" in capfd.readouterr().err


def test_rewound_survivors_take_their_values_at_the_early_step(trained_run, tmp_path):
    args = ["prune.method=magnitude", "prune.sparsity=0.8"]
    prune_run(str(trained_run), tmp_path / "late", args)
    prune_run(str(trained_run), tmp_path / "rewound", args, rewind=4)
    late = saved_state(ckpt.find_step(tmp_path / "late", 0))
    rewound = saved_state(ckpt.find_step(tmp_path / "rewound", 0))
    early = flatten(saved_state(ckpt.find_step(trained_run, 4))["params"])
    for path, keep in flatten(late["masks"]).items():  # the mask is chosen on the trained weights
        np.testing.assert_array_equal(flatten(rewound["masks"])[path], keep)
        np.testing.assert_array_equal(flatten(rewound["params"])[path], np.where(keep, early[path], 0))


@pytest.mark.parametrize("method", ["ffn", "heads"])
def test_structured_half_exports_a_half_sized_hf_model_with_equal_logits(trained_run, tmp_path, method):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxlm.export.cli import export

    out = tmp_path / method
    cfg, report = prune_run(str(trained_run), out, [f"prune.method={method}", "prune.sparsity=0.5", "train.steps=2"])
    m = cfg.model
    planned = load_config(trained_run / "config.yaml", [f"prune.method={method}", "prune.sparsity=0.5"])
    assert report["params"] == count_params(structured_model(planned), planned.moe).total  # accounting agrees
    assert (m.d_ff, m.n_heads, m.n_kv_heads) == ((86, 4, 2) if method == "ffn" else (172, 2, 1))
    assert not cfg.prune.masked
    train(cfg)  # the smaller model trains as any other
    export(out, "hf", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    c = model.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (m.d_ff, m.n_heads, m.n_kv_heads)
    tokens = np.random.default_rng(0).integers(0, 257, (2, 40))
    with torch.no_grad():
        got = model(torch.tensor(tokens)).logits.numpy()
    small, params = runs.load_params(ckpt.find_step(out))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(small, 0)))
    want = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_structured_pruning_keeps_the_channels_and_heads_with_the_largest_norms(trained_run, tmp_path):
    from jaxlm.compress import structured

    _, params = runs.load_params(ckpt.find_step(trained_run))
    flat = flatten(params)
    for method, norm in (("ffn", "l1"), ("heads", "l2")):
        cfg = load_config(None, SMALL + [f"prune.method={method}", "prune.sparsity=0.5", f"prune.norm={norm}"])
        (block, (kept, _)), = structured.plan(cfg, flat).items()
        if method == "ffn":
            vec = np.concatenate([flat[(*block, n)] for n in ("w_gate_DF", "w_up_DF")], axis=1)  # [L, 2D, F]
            score = np.abs(vec).sum(1) + np.abs(flat[(*block, "w_down_FD")]).sum(2)
        else:  # kv group k: query heads 2k, 2k+1 and kv head k (squared L2 ranks as L2)
            q_LDKGd = flat[(*block, "wq_DHd")].reshape(2, 64, 2, 2, 16)
            o_LKGdD = flat[(*block, "wo_HdD")].reshape(2, 2, 2, 16, 64)
            score = (q_LDKGd ** 2).sum((1, 3, 4)) + (o_LKGdD ** 2).sum((2, 3, 4)) + \
                sum((flat[(*block, n)] ** 2).sum((1, 3)) for n in ("wk_DKd", "wv_DKd"))
        want = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :score.shape[1] // 2], axis=1)
        np.testing.assert_array_equal(kept, want)


# ----------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize("overrides, message", [
    (["prune.method=nm", "prune.n=4"], "prune.n=4, prune.m=4: keep 0 < n < m"),
    (["prune.method=magnitude", "prune.sparsity=1.0"], "prune.sparsity=1.0 must be in [0, 1)"),
    (["prune.method=ffn", "prune.every=5"], "prune.method=ffn is structured: it is one-shot"),
    (["prune.method=magnitude", "prune.targets=[q,x]"], "prune.targets=['q', 'x'] names no matrix or unknown"),
    (["prune.method=magnitude", "lora.rank=4"], "cannot be combined with lora"),
    (["prune.method=magnitude", "prune.every=2", "prune.start_step=5", "prune.end_step=3"], "end_step >= start_step"),
])
def test_config_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_prune_verb_mistakes_are_one_line_errors(trained_run, tmp_path):
    for args, message in ((["--nm", "2:5"], "prune.m=5 must divide the input size 64"),
                          ([], "no pruning method given: expected --method"), (["--nm", "two:4"], "expected N:M")):
        r = run_cli("prune", str(trained_run), "-o", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "x").exists()
    # masks cannot appear in (or vanish from) a run that was trained without (with) them
    with pytest.raises(Exception, match=r"prune.method \('none' -> 'magnitude', masks on/off"):
        train(load_config(trained_run / "config.yaml", ["prune.method=magnitude", "train.steps=10"]))


# ----------------------------------------------------------------------------- the experiments (slow)


def final_eval(run_dir: Path) -> float:
    return ckpt.read_meta(ckpt.find_step(run_dir))["eval_loss"]


@pytest.fixture(scope="module")
def dense_300(tmp_path_factory, shakespeare_path):
    """A tiny model trained 300 steps, with its step-20 checkpoint kept (rewinding)."""
    run_dir = tmp_path_factory.mktemp("prune_slow") / "dense"
    train(config(run_dir, shakespeare_path, "train.steps=300", "train.eval_every=300", "train.eval_batches=8",
                 "checkpoint.every=20", "checkpoint.keep_every=20"))
    return run_dir


@pytest.mark.demo  # python -m pytest -m demo tests/test_prune.py
def test_magnitude_half_retrained_200_steps_is_within_005_nats_of_the_dense_model(dense_300, tmp_path):
    cfg, _ = prune_run(str(dense_300), tmp_path / "half", ["prune.method=magnitude", "prune.sparsity=0.5",
                                                           "train.steps=200", "optim.warmup_steps=10"])
    train(cfg)
    dense, pruned = final_eval(dense_300), final_eval(tmp_path / "half")
    print(f"dense {dense:.4f}, magnitude 50% retrained 200 steps {pruned:.4f}")
    assert pruned < dense + 0.05


@pytest.mark.demo
def test_rewinding_at_80_percent_beats_the_same_mask_from_a_fresh_random_init(dense_300, tmp_path):
    args = ["prune.method=magnitude", "prune.sparsity=0.8", "train.steps=300"]
    rewound, _ = prune_run(str(dense_300), tmp_path / "rewound", args, rewind=20)
    # --rewind 0 rebuilds the init from train.seed: another seed is a fresh random initialisation
    fresh, _ = prune_run(str(dense_300), tmp_path / "fresh", args + ["train.seed=7"], rewind=0)
    train(rewound)
    train(fresh)
    a, b = final_eval(tmp_path / "rewound"), final_eval(tmp_path / "fresh")
    print(f"80%: rewound to step 20 {a:.4f}, same mask from a fresh init {b:.4f} (dense {final_eval(dense_300):.4f})")
    assert a < b
