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


def test_shared_blocks_count_parameters_once_and_flops_per_application():
    """share_blocks=2 (MobileLLM): the parameters of 48 blocks, the FLOPs and activations of 96 layers."""
    from jaxlm.tools.accounting import activation_bytes

    shared = load_config("configs/gpt2-xl.yaml", ["model.share_blocks=2"])
    deeper = load_config("configs/gpt2-xl.yaml", ["model.n_layers=96"])
    base = load_config("configs/gpt2-xl.yaml")
    assert count_params(shared.model, shared.moe) == count_params(base.model, base.moe)
    assert forward_flops(shared.model, shared.moe, 1024) == forward_flops(deeper.model, deeper.moe, 1024)
    assert activation_bytes(shared) == activation_bytes(deeper)
    result = run_cli("accounting", "configs/gpt2-xl.yaml", "model.share_blocks=2")
    assert "2,127,057,600" in result.stdout and "each applied 2 times" in result.stdout
