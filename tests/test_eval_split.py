"""`jaxlm eval RUN --data PATH`: the run's own text is scored on what training held out unless
--split says otherwise, and the JSON says which text was scored."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from jaxlm import cli


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A random byte model whose data.path is a 2,000-byte text (one document: validation is its last 5%)."""
    from jaxlm.checkpoint import runs
    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    root = tmp_path_factory.mktemp("split")
    text = root / "corpus.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps.\n" for i in range(57)))
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
                             "model.n_layers=1", "data.seq_len=32", "train.global_batch=8", "train.eval_every=0",
                             f"data.path={text}", f"train.run_dir={root / 'run'}", "checkpoint.async_save=false"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    runs.write_step0(root / "run", cfg, trainer.init_state()["params"], trainer)
    return root / "run", text


def test_eval_on_the_runs_own_text_scores_its_validation_split_and_says_so(text_run, tmp_path, capsys):
    run_dir, text = text_run
    n = len(text.read_bytes()) + 1  # bytes and <|endoftext|>
    held_out = int(n * 0.05)  # one document: the last data.val_fraction of its tokens
    copy = tmp_path / "same.txt"
    copy.write_bytes(text.read_bytes())  # the same content by another path is still the run's data
    expected = {None: ("val", held_out - 1), "val": ("val", held_out - 1), "train": ("train", n - held_out - 1),
                "all": ("all", n - 1)}
    for split, (name, tokens) in expected.items():
        assert cli.main(["eval", str(run_dir), "--data", str(copy), *(["--split", split] if split else [])]) == 0
        got = json.loads(capsys.readouterr().out)
        assert (got["split"], got["tokens"]) == (name, tokens), split
        assert str(copy) in got["scored"] and math.isfinite(got["loss"])
        if name == "val":
            assert got["scored"] == f"the part of {copy} held out for validation by the run's data.val_fraction=0.05"
    other = tmp_path / "other.txt"
    other.write_text(text.read_text().replace("fox", "cat"))
    assert cli.main(["eval", str(run_dir), "--data", str(other)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["split"], got["tokens"], got["scored"]) == ("all", n - 1, f"all of {other}")
    assert np.isfinite(got["bits_per_byte"])
