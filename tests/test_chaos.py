"""The chaos run (bench/chaos.py), shortened: a 2-process x 4-device job SIGKILLed at random
moments (some during a save) and restarted each time ends bit-identical to an uninterrupted run,
with one run's metrics and no damaged checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

KILLS, STEPS, EVERY = 4, 60, 10


@pytest.mark.demo  # about 4 minutes: python -m pytest -m demo tests/test_chaos.py
def test_a_job_killed_and_restarted_four_times_ends_as_an_uninterrupted_run(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"), "--kills", str(KILLS), "--steps",
                           str(STEPS), "--every", str(EVERY), "--seed", "1", "--dir", str(tmp_path / "work"),
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["problems"] == [] and len(r["lost"]) == KILLS
    # a kill loses the steps since the newest committed checkpoint: at most an interval, plus the
    # steps run while the save in flight would have committed
    assert all(0 <= lost <= 2 * EVERY for lost in r["lost"]), r["history"]
