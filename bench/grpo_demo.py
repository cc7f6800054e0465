"""GRPO on the built-in arithmetic task, on 2 CPU cores, offline: a small byte-level model is taught
the task's format and some of its answers by SFT, then GRPO (`jaxlm rl`, rewarded by the exact
answer) raises its held-out accuracy.

    python bench/grpo_demo.py [--work DIR] [--stages sft,grpo,scaling] [--sft-steps N] [--grpo-steps N (1200)]

`scaling` (test-time scaling, run after the other two): held-out accuracy of the majority answer of
k sampled replies, k = 1, 4, 16, for the SFT and the GRPO model.

Accuracy: held-out questions (never trained on, by SFT or GRPO) rendered by the chat template with
the generation prompt, greedy decoding to end-of-text, the reply compared with the answer as a
string. Prints the accuracy before and after, the reward curve (every 10 steps), wall times and the
load average (the machine is shared). Each stage reuses the run directory of the one before.

Measured (2 shared CPU cores, load average ~7): SFT 300 steps (48 s), held-out greedy accuracy
0.180; GRPO 1200 steps (lr 5e-4, 16 prompts x 8, beta 0) in 213 s, 0.510 (+33 points, 2.8x). The
rollout batch's mean reward, averaged per 100 steps: 0.18, 0.17, 0.26, 0.21, 0.24, 0.28, 0.27, 0.36,
0.42, 0.44, 0.41, 0.47. After 300 steps it was 0.215 (earlier: 0.225 in 333 s, before GRPO's steps
got ~5x faster); the reward only starts to climb after ~700 steps. Earlier trials at 300 steps:
lr 2e-4 gave 0.220; mu=2, 0.145; lr 1e-3 (8 prompts x 16) collapsed the policy (0.045).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=172",
         "model.max_seq_len=64", "data.seq_len=64", "train.progress=false", "checkpoint.async_save=false",
         "train.log_every=10", "train.eval_every=0"]
# a compact chat template (first letter of the role): "u:What is 23 + 45?<|endoftext|>a:68<|endoftext|>"
TEMPLATE = ("{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'a:' }}{% endif %}")
N_TRAIN, N_TEST, MAX_OPERAND = 2000, 200, 49


def stage_config(name: str, work: Path, data: Path, steps: int, lr: float = 5e-4, mu: int = 1):
    from jaxlm.config import load_config

    template = work / "template.jinja"
    template.write_text(TEMPLATE)
    common = MODEL + [f"data.path={data}", f"data.chat_template={template}", f"train.run_dir={work / name}",
                      f"train.steps={steps}", f"checkpoint.every={steps}"]
    if name == "sft":
        extra = ["train.objective=sft", "train.global_batch=32", "data.packing=true", "optim.lr=3e-3",
                 "optim.min_lr=3e-4", "optim.warmup_steps=20", "optim.weight_decay=0.0"]
    else:
        extra = ["train.objective=grpo", f"train.init_from={work / 'sft'}", "grpo.group_size=8",
                 "grpo.prompts_per_step=16", "train.global_batch=128", "grpo.max_new_tokens=4", "grpo.beta=0.0",
                 "grpo.temperature=1.0", f"optim.lr={lr}", f"optim.min_lr={lr}", "optim.schedule=constant", "optim.warmup_steps=0",
                 "optim.weight_decay=0.0", "grpo.rewards=[{fn: answer}]", f"grpo.mu={mu}"]
    return load_config(str(REPO / "configs" / "tiny.yaml"), common + extra)


def accuracy(run_dir: Path, test: list[dict]) -> float:
    """Share of held-out questions whose greedy reply equals the answer."""
    from jaxlm.checkpoint.runs import load_run
    from jaxlm.data.chat import chat_format, prompt_tokens
    from jaxlm.inference.decode import Decoder, generate
    from jaxlm.inference.sampling import Sampling

    run = load_run(str(run_dir))
    fmt = chat_format(run.tokenizer, run.cfg.data.chat_template)
    dec = Decoder(run.cfg, run.params, run.mesh)
    prompts = [prompt_tokens([{"role": "user", "content": r["prompt"]}], fmt).tolist() for r in test]
    outs = generate(dec, prompts, 4, Sampling(temperature=0.0), stop_id=run.tokenizer.eot_id)
    return sum(run.tokenizer.decode(o).strip() == r["answer"] for o, r in zip(outs, test)) / len(test)


def majority_accuracy(run_dir: Path, test: list[dict], ks: list[int], seed: int = 0) -> dict[int, float]:
    """Test-time scaling: accuracy of the majority answer of k samples (temperature 1), per k."""
    from collections import Counter

    from jaxlm.checkpoint.runs import load_run
    from jaxlm.data.chat import chat_format, prompt_tokens
    from jaxlm.inference.decode import Decoder, generate
    from jaxlm.inference.sampling import Sampling

    run = load_run(str(run_dir))
    fmt = chat_format(run.tokenizer, run.cfg.data.chat_template)
    dec = Decoder(run.cfg, run.params, run.mesh)
    prompts = [prompt_tokens([{"role": "user", "content": r["prompt"]}], fmt).tolist() for r in test]
    n = max(ks)
    outs = generate(dec, [p for p in prompts for _ in range(n)], 4, Sampling(temperature=1.0), seed=seed,
                    stop_id=run.tokenizer.eot_id)
    replies = [[run.tokenizer.decode(o).strip() for o in outs[i * n: (i + 1) * n]] for i in range(len(test))]
    return {k: sum(Counter(rs[:k]).most_common(1)[0][0] == r["answer"] for rs, r in zip(replies, test)) / len(test)
            for k in ks}


def load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/grpo_demo")
    ap.add_argument("--stages", default="sft,grpo")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--grpo-steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=5e-4, help="GRPO's learning rate")
    ap.add_argument("--mu", type=int, default=1, help="optimizer steps per rollout batch")
    args = ap.parse_args()
    from jaxlm.eval.tasks.arithmetic import arithmetic, write_jsonl
    from jaxlm.rl.loop import train_grpo
    from jaxlm.train.loop import train

    work = Path(args.work)
    chats, _ = arithmetic(N_TRAIN, N_TEST, max_operand=MAX_OPERAND, ops="+")
    prompts, test = arithmetic(N_TRAIN, N_TEST, max_operand=MAX_OPERAND, ops="+", kind="prompt")
    sft_data, grpo_data = write_jsonl(chats, work / "sft.jsonl"), write_jsonl(prompts, work / "prompts.jsonl")
    if "sft" not in args.stages:
        print(f"[sft] held-out accuracy {accuracy(work / 'sft', test):.3f}", flush=True)
    if "scaling" in args.stages:
        for stage in ("sft", "grpo"):
            by_k = majority_accuracy(work / stage, test, [1, 4, 16])
            print(f"[scaling] {stage}: majority-vote accuracy by samples {by_k}", flush=True)
    for stage in [s for s in args.stages.split(",") if s in ("sft", "grpo")]:
        t0 = time.time()
        if stage == "sft":
            train(stage_config("sft", work, sft_data, args.sft_steps))
        elif stage == "grpo":
            history = train_grpo(stage_config("grpo", work, grpo_data, args.grpo_steps, args.lr, args.mu))
            curve = [(h["step"], round(h["reward_mean"], 3)) for h in history if h["step"] % 10 == 0]
            print(f"[grpo] reward (mean over the rollout batch) by step: {curve}", flush=True)
        print(f"[{stage}] {time.time() - t0:.0f} s ({load()}); held-out accuracy "
              f"{accuracy(work / stage, test):.3f}", flush=True)


if __name__ == "__main__":
    main()
