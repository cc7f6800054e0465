"""`jaxlm plot`: curves of real runs overlaid in one PNG; clear one-line errors otherwise."""

import struct
import sys

import numpy as np
import pytest
from conftest import run_cli

from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.tools.plot import load_run, series, tokens_per_step
from jaxlm.train.loop import train

SHORT = ["model.n_layers=2", "data.seq_len=64", "train.global_batch=8", "train.steps=6", "train.log_every=1",
         "train.eval_every=3", "train.eval_batches=1", "train.progress=false", "checkpoint.every=0",
         "train.peak_flops_per_device=1e11"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real 6-step runs of the tiny config, pre-norm and post-norm."""
    root = tmp_path_factory.mktemp("runs")
    for norm in ("pre", "post"):
        train(load_config("configs/tiny.yaml", SHORT + [f"model.norm={norm}", f"train.run_dir={root / norm}"]))
    return root / "pre", root / "post"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_of_two_real_runs_writes_a_png_of_the_figure_size_with_both_runs_drawn(two_runs, tmp_path):
    out = tmp_path / "figs" / "curves.png"
    result = run_cli("plot", *map(str, two_runs), "-o", str(out), "--x", "tokens")
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (1500, 800)  # 15 x 8 inches at 100 dpi
    assert 20_000 < out.stat().st_size < 1_000_000
    import matplotlib.image

    rgb = matplotlib.image.imread(out)[..., :3]
    for color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib's first two line colors: one per run
        assert (np.abs(rgb - np.array(color) / 255).max(axis=-1) < 0.02).sum() > 200
    assert not list(out.parent.glob(".*tmp"))


def test_tokens_axis_is_step_times_batch_times_seq_len_and_series_follow_the_jsonl(two_runs):
    records = load_run(two_runs[0])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    xs, losses = series(records, "loss", tokens_per_step(two_runs[0]))
    assert xs == [s * 8 * 64 for s in range(1, 7)] and losses == [r["loss"] for r in records]
    assert series(records, "eval_loss")[0] == [3, 6]
    assert series(records, "tokens_per_s")[0] == [2, 3, 4, 5, 6]  # the first step (compilation) is untimed


def test_a_run_dir_without_metrics_exits_2_with_one_line_and_writes_nothing(two_runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "curves.png"
    result = run_cli("plot", str(two_runs[0]), str(empty), "-o", str(out))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"{empty}: no metrics" in result.stderr
    assert not out.exists()


def test_without_matplotlib_plot_says_how_to_install_it(two_runs, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert cli.main(["plot", str(two_runs[0]), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err == "jaxlm plot: error: matplotlib is not installed; pip install 'jaxlm[plot]'\n"
    assert not (tmp_path / "c.png").exists()


def test_label_count_must_match_the_run_dirs(two_runs, capsys):
    assert cli.main(["plot", *map(str, two_runs), "--label", "only-one"]) == 2
    assert "1 --label for 2 run directories" in capsys.readouterr().err
