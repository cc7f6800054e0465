"""`jaxlm plot RUN_DIR [RUN_DIR ...] -o curves.png`: training curves of several runs, overlaid.

Reads each run's metrics.jsonl (and, for `--x tokens`, its config.yaml: tokens = step x
global_batch x seq_len). matplotlib is optional: `pip install 'jaxlm[plot]'`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from jaxlm.errors import UserError

PANELS = {"loss": "train loss", "eval_loss": "eval loss", "lr": "learning rate", "grad_norm": "grad norm",
          "tokens_per_s": "tokens/s", "mfu": "MFU"}  # record key -> panel title
RL_PANELS = {"reward_mean": "reward (mean)", "accuracy": "accuracy", "kl": "KL to the reference",
             "clip_fraction": "clip fraction", "completion_len": "completion length", "rollout_time": "rollout time (s)"}


def panels_for(runs: list[tuple[str, list[dict], int]]) -> dict:
    """RL runs (`jaxlm rl`: records with rewards) get their own panels; loss curves otherwise."""
    return RL_PANELS if any("reward_mean" in r for _, records, _ in runs for r in records) else PANELS


def load_run(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl, in step order; lines cut short by a kill are skipped."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    if not records:
        raise UserError(f"{run_dir}: no metrics (expected {path} written by `jaxlm train`)")
    return sorted(records, key=lambda r: r["step"])


def tokens_per_step(run_dir: Path) -> int:
    """global_batch x seq_len from the config.yaml that training wrote into run_dir."""
    path = run_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
        return int(cfg["train"]["global_batch"]) * int(cfg["data"]["seq_len"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        raise UserError(f"{run_dir}: --x tokens needs train.global_batch and data.seq_len from {path}") from None


def series(records: list[dict], key: str, scale: int = 1) -> tuple[list[float], list[float]]:
    """(x, y) of one metric: x is the step times `scale`; records without the key are skipped."""
    points = [(r["step"] * scale, r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [x for x, _ in points], [y for _, y in points]


def _agg_figure():
    """A Figure on the Agg canvas: files only, no display, and no change to pyplot's global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("matplotlib is not installed; pip install 'jaxlm[plot]'") from None
    fig = Figure(figsize=(15, 8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot(runs: list[tuple[str, list[dict], int]], out: Path, x: str = "steps", dpi: int = 100) -> None:
    """Draws (label, records, x scale) runs into `out`, written whole or not at all."""
    fig = _agg_figure()
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"-o {out}: unsupported image type {fmt!r}; use .png, .svg or .pdf")
    for ax, (key, title) in zip(fig.subplots(2, 3).flat, panels_for(runs).items()):
        for label, records, scale in runs:
            xs, ys = series(records, key, scale)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if key == "eval_loss" else None, markersize=4)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.axes[0].legend()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format=fmt, dpi=dpi)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"-o {out}: cannot write ({e.strerror or e})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("-o", "--output", default="curves.png", help="image to write (default: curves.png)")
    parser.add_argument("--x", choices=("steps", "tokens"), default="steps", help="x axis (default: steps)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch of the 15 x 8 inch figure (default: 100)")
    parser.add_argument("--label", action="append", help="legend label of each run, in order (default: its "
                                                         "directory name); give it once per RUN_DIR")


def main(args: argparse.Namespace) -> int:
    if not 10 <= args.dpi <= 1000:
        raise UserError(f"--dpi {args.dpi}: expected 10 to 1000 pixels per inch")
    dirs = [Path(d) for d in args.run_dirs]
    labels = args.label or [d.resolve().name for d in dirs]
    if len(labels) != len(dirs):
        raise UserError(f"{len(labels)} --label for {len(dirs)} run directories; give one per RUN_DIR or none")
    runs = [(label, load_run(d), tokens_per_step(d) if args.x == "tokens" else 1) for label, d in zip(labels, dirs)]
    out = Path(args.output)
    plot(runs, out, args.x, args.dpi)
    print(f"wrote {out}")
    return 0
