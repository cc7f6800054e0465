"""The device table: lookup by jax device_kind, MFU's peak, and the roofline of `accounting --device`."""

import re

import jax
import pytest
from conftest import run_cli

from jaxlm.tools import devices
from jaxlm.tools.accounting import activation_bytes, count_params, train_flops_per_step
from jaxlm.config import load_config
from jaxlm.train import metrics


@pytest.mark.parametrize("kind, name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100-PCIE-40GB", "a100"), ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"),
    ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e")])
def test_known_device_kinds_map_to_their_table_entry(kind, name):
    assert devices.lookup(kind).name == name


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA GH200 480GB", "TPU v4 lite",
                                  "NVIDIA GeForce RTX 4090"])
def test_devices_with_other_peaks_are_unknown(kind):
    assert devices.lookup(kind) is None


def test_h100_peak_is_989_dense_bf16_teraflops():
    h100 = devices.by_name("H100")
    assert h100.bf16_flops == 989e12 and h100.hbm_bytes_per_s == 3350e9
    assert devices.by_name("NVIDIA H100 80GB HBM3") is h100


def test_mfu_peak_comes_from_the_table_on_a_known_device_and_is_measured_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))  # measured peaks are cached per host: not the user's
    bf16 = load_config(None, ["model.compute_dtype=bfloat16"])
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda dtype: {"bfloat16": 1e9, "float32": 2e9}[str(dtype)])
    # this machine: CPU, unknown -> measured in the compute dtype, counted once per host
    assert metrics.peak_flops(bf16) == 1e9 * jax.process_count()
    assert metrics.peak_flops(load_config(None, ["train.peak_flops_per_device=5"])) == 5 * jax.device_count()

    class FakeH100:
        device_kind, platform = "NVIDIA H100 80GB HBM3", "gpu"

    monkeypatch.setattr(jax, "devices", lambda: [FakeH100()])
    assert metrics.peak_flops(bf16) == 989e12 * jax.device_count()
    assert metrics.peak_flops(load_config(None)) == 2e9 * jax.device_count()  # f32 is measured


def _ms(stdout: str, row: str) -> float:
    return float(re.search(rf"^  {re.escape(row)}.*?([\d,.]+) ms$", stdout, re.M).group(1).replace(",", ""))


def test_accounting_device_prints_the_roofline_step_time_computed_by_hand():
    result = run_cli("accounting", "configs/gpt2-xl.yaml", "--device", "h100")
    assert result.returncode == 0, result.stderr
    cfg = load_config("configs/gpt2-xl.yaml")
    flops = 3 * 4_513_336_524_800 * 16  # 3x forward, global batch 16 of 1024 tokens
    assert train_flops_per_step(cfg) == flops
    compute_ms = flops / 989e12 * 1e3  # 219.05 ms
    # memory: params (4 passes), grads (2), two AdamW moments (4) in f32; activations written + read
    per_token_layer = 4 * 1600 + 4 * 25 * 64 + 25 * 1024 + 3 * 6400
    assert activation_bytes(cfg) == 16 * 1024 * (48 * per_token_layer + 1600 + 50257) * 4
    memory_ms = (10 * 2_127_057_600 * 4 + 2 * activation_bytes(cfg)) / 3350e9 * 1e3  # 135.6 ms
    assert count_params(cfg.model, cfg.moe).total == 2_127_057_600
    assert _ms(result.stdout, "compute time") == pytest.approx(compute_ms, rel=1e-3)
    assert _ms(result.stdout, "memory time") == pytest.approx(memory_ms, rel=1e-3)
    assert _ms(result.stdout, "step time (compute-bound)") == pytest.approx(219.05, abs=0.01)
    assert re.search(r"tokens/s\s+74,79\d$", result.stdout, re.M)  # 16384 tokens / 219.05 ms


def test_accounting_unknown_device_exits_2_with_one_line_naming_the_known_ones():
    result = run_cli("accounting", "configs/gpt2-xl.yaml", "--device", "h800")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "unknown device 'h800'" in result.stderr and "h100, h200, a100, v4, v5e, v5p, v6e" in result.stderr
