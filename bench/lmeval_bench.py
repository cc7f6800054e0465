"""lm-evaluation-harness on CPU: jaxlm's model (`jaxlm eval --tasks`) against lm-eval's own `hf`
backend on the same checkpoint's HF export, on the same tasks, in one process.

The model is configs/tiny.yaml (random init: speed does not depend on training; --config for
another), the tasks are `jaxlm tasks`' next_line (multiple choice, 4 loglikelihood requests per
document) and integer_arithmetic (generate_until, 3-shot, stop at a newline). Each backend runs
simple_evaluate on each task `--rounds` times, in alternation (a load change on a shared machine
hits both alike), after one warm-up round (jaxlm's compiles; its time is reported apart). The
figure is the time inside the model's request methods (loglikelihood, generate_until: tokenizing,
batching, running); "end to end" adds lm-eval's own work, the same for every backend (building
requests, metrics, and ~3 s of `pip list` for the JSON's environment info). The hf backend runs
at lm-eval's default batch size (1) and at jaxlm's (--batch-size); both in f32.

    python bench/lmeval_bench.py [--docs 40] [--rounds 1] [--config configs/tiny.yaml] [--tasks next_line,...]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from harness import load_average, machine_line  # noqa: E402


def make_run(root: Path, config: str) -> Path:
    import jax

    from jaxlm.checkpoint import runs
    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    cfg = load_config(config, [f"train.run_dir={root / 'run'}", "checkpoint.async_save=false", "train.eval_every=0"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    runs.write_step0(root / "run", cfg, trainer.init_state()["params"], trainer)
    return root / "run"


def clocked(lm):
    """The model with its request methods timed into lm.model_seconds."""
    lm.model_seconds = 0.0
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        def timed_method(requests, *a, _method=getattr(lm, name), **kw):
            start = time.perf_counter()
            try:
                return _method(requests, *a, **kw)
            finally:
                lm.model_seconds += time.perf_counter() - start
        setattr(lm, name, timed_method)
    return lm


def timed(lm, manager, task: str, limit: int) -> tuple[float, float, dict]:
    """(seconds in the model, seconds end to end, lm-eval's results of the task)."""
    from lm_eval.evaluator import simple_evaluate

    lm.model_seconds, start = 0.0, time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, bootstrap_iters=0)
    return lm.model_seconds, time.perf_counter() - start, results["results"][task]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--docs", type=int, default=40, help="documents per task")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds after the warm-up one")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tasks", default="next_line,integer_arithmetic")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from jaxlm import cli
    from jaxlm.checkpoint.runs import load_run
    from jaxlm.eval.harness import JaxlmLM
    from jaxlm.export.cli import export

    print(machine_line(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="lmeval-bench-"))
    atexit.register(shutil.rmtree, root, True)
    run_dir = make_run(root, args.config)
    export(run_dir, "hf", root / "hf")
    cli.main(["tasks", str(root / "tasks"), "--text", str(REPO.parent / "shared/data/tinyshakespeare/input.txt"),
              "--n", str(args.docs)])
    manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
    models = {"jaxlm": JaxlmLM(load_run(str(run_dir)), batch_size=args.batch_size),
              "hf bs=1": HFLM(pretrained=str(root / "hf"), device="cpu", dtype="float32", batch_size=1),
              f"hf bs={args.batch_size}": HFLM(pretrained=str(root / "hf"), device="cpu", dtype="float32",
                                              batch_size=args.batch_size)}
    models = {name: clocked(lm) for name, lm in models.items()}
    for task in args.tasks.split(","):
        model_s, total_s, scores = {name: [] for name in models}, {name: [] for name in models}, {}
        for _ in range(args.rounds + 1):  # the first round of each is its warm-up (jaxlm: compilation)
            for name, lm in models.items():
                inside, end_to_end, scores[name] = timed(lm, manager, task, args.docs)
                model_s[name].append(inside)
                total_s[name].append(end_to_end)
        inside = {name: statistics.median(t[1:]) for name, t in model_s.items()}
        outside = {name: statistics.median(t[1:]) for name, t in total_s.items()}
        peers = [name for name in models if name != "jaxlm"]
        report = {"docs": args.docs, "jaxlm warm-up round (compiles) s": round(model_s["jaxlm"][0], 2),
                  "model s": {name: round(s, 2) for name, s in inside.items()},
                  "end to end s": {name: round(s, 2) for name, s in outside.items()},
                  "peer / jaxlm (model)": {name: round(inside[name] / inside["jaxlm"], 2) for name in peers},
                  "peer / jaxlm (end to end)": {name: round(outside[name] / outside["jaxlm"], 2) for name in peers},
                  "same results": len({json.dumps(s, sort_keys=True, default=str) for s in scores.values()}) == 1}
        print(task, json.dumps(report), f"load avg {load_average():.1f}", flush=True)


if __name__ == "__main__":
    main()
