"""The tasks jaxlm makes itself: arithmetic answers that are right, next-line questions whose
labelled choice is the line that follows in the text, and task files that read back."""

from __future__ import annotations

import json

import yaml

from jaxlm import cli
from jaxlm.eval.tasks import arithmetic, next_line


def test_arithmetic_records_are_distinct_correct_and_apart_from_excluded_ones():
    test = arithmetic.records(300, seed=3, max_operand=20, ops="+-*")
    train = arithmetic.records(50, seed=4, max_operand=20, ops="+-*", exclude={r["question"] for r in test})
    for r in test + train:
        a, b = (int(x) for x in r["question"][:-1].replace("+", " ").replace("-", " ").replace("*", " ").split())
        assert r["question"] == f"{a}{r['op']}{b}="
        assert int(r["answer"]) == {"+": a + b, "-": a - b, "*": a * b}[r["op"]]
        assert int(r["answer"]) >= 0
    questions = [r["question"] for r in test + train]
    assert len(set(questions)) == len(questions)
    assert arithmetic.records(300, seed=3, max_operand=20, ops="+-*") == test  # seeded


def test_next_line_labels_the_line_that_follows_its_context(shakespeare_path):
    text = shakespeare_path.read_text()
    records = next_line.records(text, 60, seed=1, region=(0.9, 1.0))
    for r in records:
        answer = r["choices"][r["label"]]
        assert r["context"].endswith("\n") and text.rfind(r["context"] + answer + "\n") >= 0.9 * len(text) - 200
        assert len(set(r["choices"])) == 4 and all(len(c) >= 20 for c in r["choices"])
    assert next_line.records(text, 60, seed=1, region=(0.9, 1.0)) == records


def test_jaxlm_tasks_writes_task_files_that_read_back(shakespeare_path, tmp_path, capsys):
    assert cli.main(["tasks", str(tmp_path), "--text", str(shakespeare_path), "--n", "30", "--seed", "2"]) == 0
    for name, split in (("next_line", "validation"), ("integer_arithmetic", "test")):
        config = yaml.safe_load((tmp_path / name / f"{name}.yaml").read_text())
        assert config["task"] == name and config["dataset_path"] == "json"
        rows = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"][split])]
        assert len(rows) == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    for argv, words in [(["tasks", str(tmp_path), "--text", str(tmp_path / "none.txt")], "--text"),
                        (["tasks", str(tmp_path), "--n", "0"], "--n 0 must be >= 1")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]
