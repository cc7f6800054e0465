"""Accounting reproduces the hand computation for GPT-2 XL (CS336) exactly."""

from conftest import run_cli

from jaxlm.tools.accounting import count_params, forward_flops, train_flops_per_step
from jaxlm.config import load_config


def test_gpt2_xl_parameters_and_forward_flops_match_the_hand_computation():
    cfg = load_config("configs/gpt2-xl.yaml")
    c = count_params(cfg.model, cfg.moe)
    assert c.total == 2_127_057_600
    assert c.embedding == c.output == 50257 * 1600
    assert c.attention == 48 * 4 * 1600 * 1600 and c.mlp == 48 * 3 * 1600 * 6400
    flops = forward_flops(cfg.model, cfg.moe, 1024)
    assert sum(flops.values()) == 4_513_336_524_800
    assert flops["mlp"] == 48 * 3 * 2 * 1024 * 1600 * 6400
    assert train_flops_per_step(cfg) == 3 * 4_513_336_524_800 * cfg.train.global_batch


def test_gqa_and_tied_embeddings_reduce_counts():
    cfg = load_config("configs/gpt2-xl.yaml", ["model.n_kv_heads=5", "model.tie_embeddings=true"])
    c = count_params(cfg.model, cfg.moe)
    assert c.output == 0
    assert c.attention == 48 * (2 * 1600 * 1600 + 2 * 1600 * 5 * 64)


def test_accounting_cli_prints_the_figures():
    result = run_cli("accounting", "configs/gpt2-xl.yaml")
    assert result.returncode == 0
    assert "2,127,057,600" in result.stdout and "4,513,336,524,800" in result.stdout
    assert "total (f32)" in result.stdout and "31.70 GiB" in result.stdout
