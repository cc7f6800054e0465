"""What a run says and writes besides its metrics, from one short CLI run: the start-up block
(parameters, data, devices, mesh, kernels, MFU's peak and where it came from), a jax.profiler trace
of the steps `train.profile` names, and a wandb offline run holding the config and the metrics."""

import gzip
import json
import struct

import jax
import pytest
from conftest import run_cli

from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.model.build import build_model
from jaxlm.train import metrics

ARGS = ["configs/tiny.yaml", "model.n_layers=2", "train.steps=6", "train.log_every=1", "train.eval_every=0",
        "train.progress=false", "checkpoint.every=0", "train.profile.start_step=2", "train.profile.steps=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("extras")
    result = run_cli("train", *ARGS, f"train.run_dir={tmp / 'run'}", "train.wandb.project=jaxlm-tests",
                     "train.wandb.mode=offline", env_extra={"JAXLM_CACHE_DIR": str(tmp / "cache"),
                                                            "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr
    return tmp / "run", result.stderr


def test_start_up_block_names_parameters_data_devices_mesh_kernels_and_the_peak(run):
    run_dir, stderr = run
    cfg = load_config(*ARGS[:1], ARGS[1:])
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: jax.tree.leaves(build_model(cfg, 0)))))
    lines = stderr[stderr.index("jaxlm: training"):].splitlines()[:5]
    assert lines[0] == f"jaxlm: training {n:,} parameters (2 layers, d_model 128) for 6 steps: " \
                       "objective next_token, optimizer adamw"
    assert lines[1] == "  data     the embedded default corpus (the Python standard library's source files); " \
                       "tokenizer bytes"
    assert lines[2] == "  devices  8 x cpu (cpu), 1 process; mesh data 8"
    assert lines[3] == "  kernels  attention cpu, projections cpu, layers scanned"
    cache = run_dir.parent / "cache" / "peak_flops.json"
    assert lines[4].startswith("  MFU peak ") and lines[4].endswith(f"a float32 matmul measured now, cached in {cache}")


def test_measured_peak_is_cached_per_host_so_runs_report_the_same_mfu(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
    measured = iter([3e9, 5e9])
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda dtype: next(measured))
    cfg = load_config(None)
    first, second = metrics.mfu_peak(cfg), metrics.mfu_peak(cfg)
    assert first[0] == second[0] == 3e9 * jax.process_count()  # the second run reads the first's measurement
    assert "measured now, cached in" in first[1] and "measured earlier, cached in" in second[1]
    (key,) = json.loads((tmp_path / "peak_flops.json").read_text())
    assert key.endswith("|cpu|cpu|float32")  # host | platform | device kind | dtype
    table = metrics.mfu_peak(load_config(None, ["train.peak_flops_per_device=2e12"]))
    assert table == (2e12 * jax.device_count(), "2 TFLOP/s per device from train.peak_flops_per_device")


def test_profile_writes_a_trace_of_the_named_steps_that_names_the_train_step(run):
    run_dir, stderr = run
    (trace_dir,) = (run_dir / "profile" / "plugins" / "profile").iterdir()
    assert f"jaxlm: profiled steps 3-4: trace in {trace_dir}" in stderr
    assert (next(trace_dir.glob("*.xplane.pb"))).read_bytes().count(b"train_step") > 0  # TensorBoard's file
    events = json.loads(gzip.decompress((trace_dir / "perfetto_trace.json.gz").read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = [e.get("name", "") for e in events]
    assert names.count("train") == 2  # one step annotation per traced step
    assert "PjitFunction(train_step)" in names


@pytest.mark.parametrize("start,steps,resumed_at,traced", [(2, 2, 0, [3, 4]), (0, 1, 0, [1]), (2, 3, 3, [4, 5]),
                                                          (2, 2, 4, None), (5, 0, 0, None)])
def test_profile_traces_exactly_its_window_also_after_a_resume(tmp_path, start, steps, resumed_at, traced):
    from jaxlm.config import ProfileConfig
    from jaxlm.train.profile import Profiler

    said = []
    profiler = Profiler(ProfileConfig(start_step=start, steps=steps), tmp_path, resumed_at, said.append)
    for done in range(resumed_at + 1, 9):
        profiler.step(done)
    profiler.close()
    assert profiler.traced == (traced or [])
    assert (tmp_path / "profile").exists() == bool(traced)
    assert len(said) == (1 if traced else 0)


def wandb_records(path):
    """The records of a wandb run file: LevelDB's log format (32 KiB blocks of chunks with a 7-byte
    header: crc, length, type) after a 7-byte file header, each record a wandb protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_run_holds_the_config_and_every_logged_metric(run):
    run_dir, _ = run
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.project == "jaxlm-tests" and start.display_name == "run"
    assert start.run_id == (run_dir / "wandb_run_id").read_text()  # a resume continues this run
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config["model"]["n_layers"] == 2 and config["train"]["profile"]["steps"] == 2
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    for h, r in zip(history, logged):
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-12) and h["lr"] == pytest.approx(r["lr"], rel=1e-12)


def test_wandb_without_the_package_is_one_line_before_anything_is_written(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run_dir = tmp_path / "run"
    assert cli.main(["train", "configs/tiny.yaml", "train.wandb.project=p", f"train.run_dir={run_dir}"]) == 2
    assert capsys.readouterr().err == ("jaxlm train: error: train.wandb.project='p' needs the wandb package, which is "
                                       "not installed: pip install -e '.[wandb]' (or pip install wandb)\n")
    assert not run_dir.exists()
