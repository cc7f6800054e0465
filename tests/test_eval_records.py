"""`jaxlm eval RUN --data RECORDS` on sft and dpo runs, LoRA ones included: the records are scored
as training scores them (the run's chat template, the loss over assistant tokens, the DPO loss
against the run's reference), checked against the loss computed by hand."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.checkpoint.runs import load_run, write_step0
from jaxlm.cli import main
from jaxlm.config import Config, DataConfig, LoraConfig, ModelConfig, TrainConfig
from jaxlm.data.chat import chat_format, render
from jaxlm.eval.tasks.arithmetic import arithmetic, write_jsonl
from jaxlm.model import lora
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.step import make_trainer

MODEL = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
TEMPLATE = ("{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'a:' }}{% endif %}")
ADAPTERS = LoraConfig(rank=2, targets=["q", "v", "up"])


def save(run_dir, objective: str, records, lora_cfg: LoraConfig, seed: int) -> str:
    """A step-0 run of a random model whose LoRA B matrices are random too (so the merged model,
    the base and the adapted one all differ), its base unlike the seeded initialisation."""
    path = write_jsonl(records, run_dir.parent / f"{objective}.jsonl")
    cfg = Config(model=MODEL, lora=lora_cfg, data=DataConfig(seq_len=48, path=str(path), chat_template=TEMPLATE),
                 train=TrainConfig(objective=objective))
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    base, adapters = lora.split_adapters(trainer.jit_init_params())
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    adapters = jax.tree.map(lambda b: 0.5 * jax.random.normal(next(keys), b.shape, b.dtype), adapters)
    base = jax.tree.map(lambda w: w + 0.05 * jax.random.normal(next(keys), w.shape, w.dtype), base)
    write_step0(run_dir, cfg, lora.join_adapters(base, adapters), trainer)
    return str(run_dir)


def evaluated(run_dir: str, data, capsys) -> dict:
    assert main(["eval", run_dir, "--data", str(data), "--split", "all"]) == 0
    return json.loads(capsys.readouterr().out)


def assistant_logps(model, fmt, messages) -> tuple[float, int]:
    """(summed log-probabilities of the assistant tokens, how many) under `model`, by hand."""
    r = render(messages, fmt)
    logits_TV = model(jnp.asarray(r.tokens[None, :-1]))[0][0]
    logp_TV = jax.nn.log_softmax(logits_TV.astype(jnp.float32), axis=-1)
    picked = np.asarray(logp_TV)[np.arange(len(r.tokens) - 1), r.tokens[1:]]
    return float(np.sum(picked * r.mask[1:])), int(r.mask[1:].sum())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_records")


@pytest.mark.parametrize("lora_cfg", [LoraConfig(), ADAPTERS], ids=["full", "lora"])
def test_eval_of_an_sft_run_is_the_mean_loss_of_the_assistant_tokens_by_hand(root, lora_cfg, capsys):
    records, _ = arithmetic(12, 0, seed=3)
    run_dir = save(root / f"sft-{lora_cfg.rank}", "sft", records, lora_cfg, seed=1)
    got = evaluated(run_dir, root / "sft.jsonl", capsys)
    run = load_run(run_dir)  # LoRA merged: the function the adapted model computes
    fmt = chat_format(run.tokenizer, TEMPLATE)
    sums = [assistant_logps(run.model(), fmt, r["messages"]) for r in records]
    by_hand = -sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert (got["objective"], got["tokens"]) == ("sft", sum(n for _, n in sums))
    assert got["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(by_hand), rel=1e-5)


def test_eval_of_a_lora_dpo_run_is_the_dpo_loss_against_the_base_by_hand(root, capsys):
    records, _ = arithmetic(10, 0, seed=4, kind="preference")
    run_dir = save(root / "dpo", "dpo", records, ADAPTERS, seed=2)
    got = evaluated(run_dir, root / "dpo.jsonl", capsys)
    policy, base = load_run(run_dir), load_run(run_dir)  # merged; then the base: adapters dropped
    base.params = lora.split_adapters(load_run(run_dir, merge=False).params)[0]
    fmt = chat_format(policy.tokenizer, TEMPLATE)
    beta, losses = Config().dpo.beta, []
    for r in records:
        user = {"role": "user", "content": r["prompt"]}
        logp = {(who, side): assistant_logps(run.model(), fmt, [user, {"role": "assistant", "content": r[side]}])[0]
                for who, run in (("policy", policy), ("ref", base)) for side in ("chosen", "rejected")}
        margin = (logp["policy", "chosen"] - logp["ref", "chosen"]) - (logp["policy", "rejected"] - logp["ref", "rejected"])
        losses.append(-math.log(1 / (1 + math.exp(-beta * margin))))
    assert (got["objective"], got["pairs"]) == ("dpo", len(records))
    assert got["loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert abs(got["loss"] - math.log(2)) > 1e-3  # the adapters move the policy off its reference
