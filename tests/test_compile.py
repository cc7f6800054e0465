"""`jaxlm compile`: the real train step compiled for TPU topologies on this CPU machine.

Each compile runs in its own process (libtpu loads there, not in the 8-CPU-device test process).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxlm.tools.compile import parse_topology
from jaxlm.errors import UserError

from conftest import REPO, run_cli

needs_libtpu = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import libtpu"], capture_output=True).returncode != 0,
    reason="libtpu not installed (pip install -e '.[tpu]')")


def compile_cli(tmp_path, config: str, *args: str):
    out = tmp_path / f"{config.replace('/', '_')}.json"
    proc = run_cli("compile", config, "--topology", "v5p:2x2x2", "--json", str(out), *args, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def hand_count(vocab, d, layers, heads, kv_heads, d_ff, seq_len, global_batch, chips=8) -> tuple[int, int, int]:
    """(parameters, state bytes, batch bytes) per chip of an untied SwiGLU Llama on mesh data=8,
    counted by hand: f32 params + AdamW mu and nu, 3 int32 scalars (the step, AdamW's and the
    schedule's counts); a batch row is int32 inputs, int32 targets and a f32 loss mask per token."""
    head = d // heads
    layer = d * heads * head * 2 + d * kv_heads * head * 2 + 3 * d * d_ff + 2 * d  # wq wo, wk wv, ffn, norms
    params = 2 * vocab * d + layers * layer + d
    return params, 12 * params + 3 * 4, global_batch // chips * seq_len * 12


HAND = {"configs/tiny.yaml": hand_count(257, 128, 4, 4, 2, 344, 128, 16),
        "configs/bench.yaml": hand_count(8192, 256, 4, 4, 4, 688, 256, 8)}


@needs_libtpu
@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/bench.yaml"])
def test_config_compiles_for_v5p_2x2x2_and_reports_memory_and_flops(tmp_path, config):
    proc, r = compile_cli(tmp_path, config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["n_devices"] == 8 and r["n_hosts"] == 2 and r["fits"]
    assert r["attention_impl"] == "splash" and "attention kernel splash" in proc.stdout  # TPU flash kernel
    params, state, batch = HAND[config]
    assert (r["params"], r["state_bytes"], r["batch_bytes"]) == (params, state, batch)
    # XLA's own buffer sizes against the hand count: its arguments are the state and batch shards
    # one chip holds (+ TPU tile padding), and the donated state is updated in place
    assert state + batch <= r["arguments"] <= 1.01 * (state + batch) + 2**16
    assert r["aliased"] > 0.99 * state
    # the reported total bounds XLA's peak (buffer assignment) plus the code, and not loosely
    assert r["peak"] + r["code"] <= r["total"] <= 1.25 * (r["peak"] + r["code"])
    assert r["total"] < r["hbm"] and r["flops"] > 0
    for words in ("memory per chip", "temporaries", "FLOPs per step", "fits: yes", "95.00 GiB"):
        assert words in proc.stdout


@needs_libtpu
def test_model_far_larger_than_hbm_fails_with_the_memory_numbers(tmp_path):
    big = ["model.d_model=8192", "model.n_heads=64", "model.n_kv_heads=64", "model.d_ff=32768", "model.n_layers=16"]
    proc, r = compile_cli(tmp_path, "configs/tiny.yaml", *big)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not r["fits"]
    assert r["state_bytes"] > 150 * 2**30  # 17B parameters x 12 bytes, replicated over data=8
    assert "fits: NO" in proc.stdout and "GiB" in proc.stdout and "arguments" in proc.stdout
    assert "of 95.00 GiB per chip, over by" in proc.stdout


@needs_libtpu
def test_every_generation_name_gives_one_device_per_chip():
    code = ("from jaxlm.tools.compile import parse_topology, topology_devices\n"
            "for t in ['v4:2x2x2', 'v5p:2x2x2', 'v5e:4x4', 'v6e:2x2']:\n"
            "    d = topology_devices(*parse_topology(t), 1)\n"
            "    print(t, len(d), len({x.process_index for x in d}), d[0].device_kind)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0].startswith("v4:2x2x2 8 2 TPU v4")
    assert lines[1].startswith("v5p:2x2x2 8 2 TPU v5")
    assert lines[2].startswith("v5e:4x4 16 4 TPU v5 lite")
    assert lines[3].startswith("v6e:2x2 4 1 TPU v6 lite")


def test_missing_libtpu_is_one_line_naming_the_install_command():
    code = ("import sys; sys.modules['libtpu'] = None\n"
            "from jaxlm.cli import main; sys.exit(main(['compile', 'configs/tiny.yaml', '--topology', 'v5e:2x2']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "libtpu" in err and "pip install 'libtpu" in err


@pytest.mark.parametrize("text,expected", [("v5p:2x4x4", ("v5p", (2, 4, 4))), ("V5E:16x16", ("v5e", (16, 16)))])
def test_topology_names_parse(text, expected):
    assert parse_topology(text) == expected


@pytest.mark.parametrize("text,words", [("v5p-64", "GEN:SHAPE"), ("v3:2x2", "v4|v5e|v5p|v6e"),
                                        ("v5e:4x4x4", "v5e topologies are AxB"), ("v4:2x2", "AxBxC")])
def test_bad_topology_names_say_what_is_expected(text, words):
    with pytest.raises(UserError, match=words.replace("|", r"\|")):
        parse_topology(text)


@needs_libtpu
def test_a_distillation_run_compiles_without_reading_its_teacher_and_counts_it(tmp_path):
    """Compile-only TPU devices hold no arrays: the teacher is lowered from its shapes, never restored."""
    from jaxlm.config import load_config
    from jaxlm.train.loop import train

    small = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=128",
             "train.global_batch=8", "train.progress=false", "train.eval_every=0"]
    teacher = tmp_path / "teacher"
    train(load_config("configs/tiny.yaml", small + ["train.steps=2", "checkpoint.every=2",
                                                    "checkpoint.async_save=false", f"train.run_dir={teacher}"]))
    proc, r = compile_cli(tmp_path, "configs/tiny.yaml", *small, "model.n_layers=1", "train.objective=distill",
                          f"train.teacher={teacher}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # untied embedding and head; per layer two norms, q k v o (one kv head of 32) and SwiGLU; final norm
    teacher_params = 257 * 64 * 2 + 2 * (2 * 64 + 64 * (64 + 2 * 32 + 64) + 3 * 64 * 128) + 64
    assert r["frozen_bytes"] == 4 * teacher_params  # replicated over data=8: every chip holds all of it
    assert r["arguments"] >= r["state_bytes"] + r["batch_bytes"] + r["frozen_bytes"]
    assert "(state + batch + teacher shards)" in proc.stdout


@needs_libtpu
def test_a_sequence_splash_cannot_tile_compiles_with_xla_attention_and_says_so(tmp_path):
    proc, r = compile_cli(tmp_path, "configs/tiny.yaml", "data.seq_len=100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["attention_impl"] == "xla" and "attention kernel xla" in proc.stdout
    assert "attention kernel splash cannot express sequence length 100" in proc.stderr
