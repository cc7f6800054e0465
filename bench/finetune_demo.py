"""Fine-tuning demonstrations on 2 CPU cores, offline: a byte-level model pretrained here on
TinyShakespeare, then taught the built-in arithmetic task (jaxlm/eval/tasks/arithmetic.py).

    JAXLM_BENCH_DATA=~/data python bench/finetune_demo.py [--work DIR] [--stages pretrain,sft,lora,dpo]

  pretrain  next-token on TinyShakespeare; held-out exact match on arithmetic (~0: it never saw any)
  sft       full fine-tuning on chat records (train.objective=sft): held-out exact match (goal >= 90%)
  lora      LoRA rank 4 from the same start, on every projection, with the digits' and end-of-text's
            rows of the embedding and head trained too (lora.trainable_tokens, peft's
            trainable_token_indices): exact match (goal >= 80%) and the share of parameters trained
            (goal <= 5%: the optimizer's parameters, adapters and token rows, over all of them)
  dpo       DPO from the SFT model on preference records (right answer vs a one-digit near miss):
            held-out preference accuracy, the share of pairs whose implicit reward margin
            beta * (log pi/ref (chosen) - log pi/ref (rejected)) is positive (goal >= 90%). LoRA
            rank 8 on every projection, 200 steps: 84.5% at lr 3e-4, 84% at 1e-4, 81% at 1e-3;
            with the digits' and end-of-text's rows trained too, 92.5% at 3e-4 (full-parameter
            DPO at 1e-4: 91.5%; load 3-7). The near misses differ in one digit: the head's digit
            rows are where the preference lives.

What LoRA needed (800 steps, lr 3e-3 unless said, 2 cores at load 5.7-9; exact match, share):
  rank 8 on k, v, up, down                                   14.0%  5.1%   loss 1.23
  the same + trainable tokens                                10.0%  5.4%   loss 0.71
  rank 8 on v, up, down + tokens, lr 1e-2                    13.0%  4.7%   loss 0.70
  rank 8 on q, v, o, down + tokens, 1200 steps               32.5%  4.9%   loss 0.42
  rank 4 on every projection + tokens (alpha 8), 1200 steps  68.5%  4.8%   loss 0.23, still falling
  rank 8 on every projection + tokens                        80.5%  8.9%   loss 0.16
  rank 4 on every projection + tokens (alpha 8), 3000 steps  99.5%  4.8%   loss 0.0005 (load 2.3)
The replies of the failing runs are well-formed numbers off by a few units (approximate sums), so
the digits' rows were not what held LoRA back (full SFT moves the digits' input rows by 2% and
their head rows by 18%; it rewrites the other tokens' head rows, 89%, to push them down): the
adapters need every projection (q, o and gate matter) and, at d_model 128, rank 8 on all of them
is 8.9% of the model, so the demo trains rank 4 on all of them, longer (3000 steps, ~11 min).

Exact match: the held-out question rendered by the chat template with the generation prompt,
greedy decoding to the end-of-text token, the reply compared as a string. Every figure is printed
with the load average (the machine is shared). Each stage reuses the run directories of the ones
before it in --work, so stages can be rerun alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from data import bench_data  # noqa: E402

MODEL = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=344",
         "model.max_seq_len=128", "train.progress=false", "checkpoint.every=100000",
         "checkpoint.async_save=false", "train.log_every=50"]
# a compact chat template (first letter of the role): "u:What is 23 + 45?<|endoftext|>a:68<|endoftext|>"
TEMPLATE = ("{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'a:' }}{% endif %}")

# byte-level ids: the digits' bytes and <|endoftext|> (256), the answers' only tokens
TOKENS = f"lora.trainable_tokens=[{','.join(str(ord(c)) for c in '0123456789')},256]"
STAGES = {
    "pretrain": ["train.steps=600", "train.global_batch=16", "data.seq_len=128", "optim.lr=3e-3",
                 "optim.min_lr=3e-4", "optim.warmup_steps=50", "train.eval_every=0"],
    "sft": ["train.objective=sft", "train.steps=800", "train.global_batch=64", "optim.lr=1e-3",
            "optim.min_lr=1e-4", "optim.warmup_steps=50", "optim.weight_decay=0.0", "train.eval_every=400",
            "train.eval_batches=2", "data.val_fraction=0.02"],
    "lora": ["train.objective=sft", "train.steps=3000", "train.global_batch=64", "optim.lr=3e-3",
             "optim.min_lr=3e-4", "optim.warmup_steps=50", "optim.weight_decay=0.0", "lora.rank=4",
             "lora.alpha=8", "lora.targets=[q,k,v,o,gate,up,down]", "train.eval_every=400",
             "train.eval_batches=2", "data.val_fraction=0.02",
             TOKENS],
    "dpo": ["train.objective=dpo", "train.steps=200", "train.global_batch=32", "optim.lr=3e-4",
            "optim.min_lr=3e-5", "optim.warmup_steps=20", "optim.weight_decay=0.0", "dpo.beta=0.1",
            "train.eval_every=0", "lora.rank=8", "lora.alpha=16", TOKENS],
}
N_TRAIN, N_TEST = 6000, 200


def load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def run_stage(name: str, work: Path, data: str, extra: list[str], tag: str = "") -> float:
    from jaxlm.config import load_config
    from jaxlm.train.loop import train

    t0 = time.time()
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"),
                      MODEL + STAGES[name] + [f"data.path={data}", f"train.run_dir={work / (name + tag)}"] + extra)
    history = train(cfg)
    last = history[-1] if history else {}
    print(f"[{name}] {last.get('step', 'already done')} steps in {time.time() - t0:.0f} s, loss "
          f"{last.get('loss', float('nan')):.4f} ({load()})", flush=True)
    return time.time() - t0


def exact_match(run_dir: Path, test: list[dict]) -> float:
    """Share of held-out questions whose greedy reply equals the answer."""
    from jaxlm.checkpoint.runs import load_run
    from jaxlm.data.chat import chat_format, prompt_tokens
    from jaxlm.inference.decode import Decoder, generate
    from jaxlm.inference.sampling import Sampling

    run = load_run(str(run_dir))
    fmt = chat_format(run.tokenizer, run.cfg.data.chat_template)
    dec = Decoder(run.cfg, run.params, run.mesh)
    prompts = [prompt_tokens(r["messages"][:1], fmt).tolist() for r in test]
    right = 0
    for i in range(0, len(prompts), 50):
        outs = generate(dec, prompts[i: i + 50], 8, Sampling(temperature=0.0), stop_id=run.tokenizer.eot_id)
        for out, r in zip(outs, test[i: i + 50]):
            right += run.tokenizer.decode(out) == r["messages"][1]["content"]
    return right / len(test)


def trained_share(run_dir: Path) -> tuple[int, int]:
    """(trained parameters, all parameters, adapters included) of a run: what its optimizer updates
    (the train state's parameters: adapters and any trainable token rows) against the whole model."""
    import jax

    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    cfg = load_config(str(run_dir / "config.yaml"))
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    n = lambda t: sum(x.size for x in jax.tree.leaves(t))
    return n(trainer.abstract_state()["params"]), n(jax.eval_shape(trainer.jit_init_params))


def preference_accuracy(policy_dir: Path, reference_dir: Path, test: list[dict], beta: float) -> float:
    """Share of held-out pairs with a positive implicit reward margin (policy vs its reference)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxlm.checkpoint.runs import load_run
    from jaxlm.data.chat import chat_format
    from jaxlm.data.records import encoded, preference
    from jaxlm.objectives.dpo import sequence_logps
    from jaxlm.data.batch import Batch

    policy, reference = load_run(str(policy_dir)), load_run(str(reference_dir))
    fmt = chat_format(policy.tokenizer, policy.cfg.data.chat_template)
    T = policy.cfg.data.seq_len
    rows = {k: np.zeros((len(test), T), np.int32) for k in ("inputs", "targets", "loss_mask", "rejected_inputs",
                                                            "rejected_targets", "rejected_mask")}
    for i, r in enumerate(test):
        for keys, (messages, train_on) in zip((("inputs", "targets", "loss_mask"),
                                               ("rejected_inputs", "rejected_targets", "rejected_mask")),
                                              preference(r, f"test {i}")):
            tokens, mask, _ = encoded(messages, train_on, fmt, T, f"test {i}")
            for k, v in zip(keys, (tokens[:-1], tokens[1:], mask[1:])):
                rows[k][i, : len(v)] = v
    batch = Batch.from_arrays({k: jnp.asarray(v) for k, v in rows.items()})
    pw, pl, _ = sequence_logps(policy.model(), batch)
    rw, rl, _ = sequence_logps(reference.model(), batch)
    margin = beta * ((pw - rw) - (pl - rl))
    return float(np.mean(np.asarray(margin) > 0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/finetune_demo")
    p.add_argument("--stages", default="pretrain,sft,lora,dpo")
    p.add_argument("--tag", default="", help="suffix of the lora and dpo run directories (variants side by side)")
    p.add_argument("overrides", nargs="*", help="config overrides for the lora and dpo stages (e.g. optim.lr=1e-3)")
    args = p.parse_args()
    from jaxlm.eval.tasks.arithmetic import arithmetic, write_jsonl

    work = Path(args.work)
    sft_train, sft_test = arithmetic(N_TRAIN, N_TEST, seed=0, ops="+")
    pref_train, pref_test = arithmetic(N_TRAIN, N_TEST, seed=0, ops="+", kind="preference")
    sft_path = write_jsonl(sft_train, work / "data" / "sft.jsonl")
    pref_path = write_jsonl(pref_train, work / "data" / "dpo.jsonl")
    template = work / "data" / "template.jinja"
    template.write_text(TEMPLATE)
    chat = [f"data.chat_template={template}", "data.seq_len=32"]
    start = [f"train.init_from={work / 'pretrain'}", *chat]
    figures = {}
    for stage in args.stages.split(","):
        if stage == "pretrain":
            run_stage("pretrain", work, str(bench_data("tinyshakespeare/input.txt")), [])
            figures["pretrained exact match"] = exact_match(work / "pretrain", sft_test)
        elif stage == "sft":
            run_stage(stage, work, str(sft_path), start)
            figures["sft exact match"] = exact_match(work / stage, sft_test)
        elif stage == "lora":
            run_stage(stage, work, str(sft_path), start + args.overrides, args.tag)
            figures["lora exact match"] = exact_match(work / f"lora{args.tag}", sft_test)
            trained, total = trained_share(work / f"lora{args.tag}")
            figures["lora trained share"] = trained / total
        elif stage == "dpo":
            run_stage("dpo", work, str(pref_path), [f"train.init_from={work / 'sft'}", *chat] + args.overrides, args.tag)
            figures["dpo preference accuracy"] = preference_accuracy(work / f"dpo{args.tag}", work / "sft", pref_test,
                                                                     0.1)
        print(json.dumps(figures), f"({load()})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
