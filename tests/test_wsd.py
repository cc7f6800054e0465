"""A finished WSD run extended by raising train.steps equals a run that had the longer schedule from
the start: it branches from the checkpoint kept where the old decay began."""

import json

import pytest

from jaxlm.config import ConfigError, load_config
from jaxlm.train.loop import train

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
         "data.seq_len=32", "train.global_batch=8", "train.progress=false"]
WSD = ["optim.schedule=wsd", "optim.warmup_steps=2", "optim.decay_fraction=0.25", "train.log_every=1",
       "train.eval_every=0", "checkpoint.every=4", "checkpoint.keep=1"]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(run_dir, steps: int, data):
    cfg = load_config("configs/tiny.yaml", SMALL + WSD + [f"train.steps={steps}", f"train.run_dir={run_dir}",
                                                          f"data.path={data}"])
    return train(cfg)


def test_an_extended_wsd_run_equals_the_longer_schedule_from_the_start(tmp_path, shakespeare_path, capsys):
    extended, full = tmp_path / "extended", tmp_path / "full"
    run(extended, 12, shakespeare_path)  # decay over steps 10..12: the checkpoint at 9 is kept (keep=1)
    assert (extended / "checkpoints" / "9").is_dir()
    short_lr = [r["lr"] for r in records(extended)]
    run(extended, 24, shakespeare_path)
    assert "resuming from step 9, where the old schedule's decay began" in capsys.readouterr().err
    run(full, 24, shakespeare_path)

    ext, ref = records(extended), records(full)
    assert [r["step"] for r in ext] == list(range(1, 25))  # one run: each step once, in order
    assert [(r["step"], r["loss"], r["lr"]) for r in ext] == [(r["step"], r["loss"], r["lr"]) for r in ref]
    assert ext[11]["lr"] > short_lr[11]  # step 12 is in the new stable phase, not the old decay
    assert (extended / "checkpoints.set_aside" / "12").is_dir()  # the decayed end is kept aside, not lost


def test_warmup_and_decay_longer_than_the_run_are_refused():
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=90 plus the WSD decay \(20 steps"):
        load_config("configs/tiny.yaml", ["optim.schedule=wsd", "optim.warmup_steps=90", "train.steps=100",
                                          "optim.decay_fraction=0.2"])
