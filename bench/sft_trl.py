"""SFT step time: jaxlm (train.objective=sft) against TRL's SFTTrainer (torch, CPU) on the same model
(a jaxlm model exported to Hugging Face), the same chat records and the same batch.

    pip install trl                      # and torch (CPU), transformers
    python bench/sft_trl.py [--config configs/bench.yaml] [--batch 8] [--steps 12] [--records 512]

Both train on the built-in arithmetic chat records (jaxlm/eval/tasks/arithmetic.py), prompt + completion, with
the loss on the completion only, one conversation per row (no packing), AdamW with clipping at 1.0.
jaxlm pads every row to data.seq_len, set to the longest record, so it never does less work than
TRL, which pads each batch to its longest row. The first steps (compilation, warm-up) are left
out of both medians. Goal (issue #27): jaxlm >= 2x faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, trl_chat_tokenizer, trl_step_clock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SKIP = 3  # steps left out of each median


def make_model(config: str, work: Path) -> Path:
    """A random model of `config`, exported to Hugging Face (the start of both trainers)."""
    import jax

    from jaxlm.checkpoint import runs
    from jaxlm.config import load_config
    from jaxlm.export.cli import export
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    cfg = load_config(config, [f"train.run_dir={work / 'run'}"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    runs.write_step0(work / "run", cfg, trainer.jit_init_params(), trainer)
    return export(work / "run", "hf", work / "hf")


def jaxlm_times(config: str, hf: Path, data: Path, batch: int, seq_len: int, steps: int) -> list[float]:
    import jax

    from jaxlm.config import load_config
    from jaxlm.data.pipeline import to_global
    from jaxlm.data.sources import build_data
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    cfg = load_config(config, ["train.objective=sft", f"data.path={data}", "data.packing=false",
                               f"data.seq_len={seq_len}", f"train.global_batch={batch}", f"train.init_from={hf}",
                               "train.eval_every=0", "optim.lr=2e-5", "optim.min_lr=0", "optim.warmup_steps=0",
                               "optim.schedule=constant"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    state = trainer.state_from_params(trainer.initial_params())
    batches, _ = build_data(cfg)
    times = []
    for _ in range(steps):
        b = to_global(next(batches), trainer.batch_sharding)
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, b)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return times


def trl_times(hf: Path, records: list[dict], batch: int, seq_len: int, steps: int) -> list[float]:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer


    tokenizer = trl_chat_tokenizer(hf)
    rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in records]
    times: list[float] = []

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_length=seq_len, packing=False,
                           completion_only_loss=True, max_steps=steps, learning_rate=2e-5, lr_scheduler_type="constant",
                           max_grad_norm=1.0, report_to="none", save_strategy="no", logging_strategy="no",
                           use_cpu=True, dataloader_num_workers=0, seed=0)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(hf), args=config,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[trl_step_clock(times)])
        trainer.train()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "bench.yaml"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--records", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2, help="TRL then jaxlm, this many times (load drifts alike)")
    args = p.parse_args()
    from jaxlm.data.chat import chat_format, render
    from jaxlm.data.records import conversation
    from jaxlm.eval.tasks.arithmetic import arithmetic, write_jsonl
    from jaxlm.tokenizer.tokenizer import load_tokenizer

    print(machine_line(), flush=True)
    records, _ = arithmetic(args.records, 0, seed=0, ops="+")
    fmt = chat_format(load_tokenizer("bytes"))
    seq_len = max(len(render(*conversation(r, "r")[:1], fmt).tokens) for r in records) - 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf = make_model(args.config, work)
        data = write_jsonl(records, work / "sft.jsonl")
        trl, jax_t = [], []
        for r in range(args.rounds):
            trl += trl_times(hf, records, args.batch, seq_len + 1, args.steps)[SKIP:]
            jax_t += jaxlm_times(args.config, hf, data, args.batch, seq_len, args.steps)[SKIP:]
            print(f"round {r + 1}: TRL {statistics.median(trl) * 1e3:.1f} ms, jaxlm {statistics.median(jax_t) * 1e3:.1f} "
                  f"ms so far ({machine_line()})", flush=True)
    med = statistics.median
    result = {"batch": args.batch, "seq_len": seq_len, "steps": args.steps, "jaxlm_step_s": med(jax_t),
              "trl_step_s": med(trl), "speedup": med(trl) / med(jax_t)}
    print(f"SFT step (median of steps {SKIP + 1}..{args.steps} of {args.rounds} rounds, batch {args.batch} x "
          f"{seq_len} tokens): "
          f"jaxlm {result['jaxlm_step_s'] * 1e3:.1f} ms, TRL SFTTrainer {result['trl_step_s'] * 1e3:.1f} ms "
          f"-> jaxlm {result['speedup']:.2f}x faster (goal >= 2x)")
    print(machine_line())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
