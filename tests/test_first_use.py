"""First use, as a new user meets it: a pipe closed early is not an error, the README's outputs are
git-ignored, a YAML typo names its line, training starts by saying what it runs."""

import subprocess
import sys

from conftest import REPO


def test_reader_closing_the_pipe_early_is_quiet_and_exit_0():
    """`jaxlm checkpoint ls RUN | head -3`: head exits, the next write gets EPIPE. The pipe is closed
    here before the child writes at all, so its first write fails (the worst case, made certain); the
    handling is in jaxlm/cli.py, around every verb."""
    child = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "config"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    err = child.stderr.read()
    assert child.wait(timeout=120) == 0 and err == "", err


def test_the_readmes_outputs_are_git_ignored():
    made = ["tok/shakespeare/tokenizer.json", "data/shakespeare/shard_0.bin", "exports/shakespeare-hf/config.json",
            "curves.png", "runs/tiny/config.yaml"]
    readme = (REPO / "README.md").read_text()
    for path in made:
        assert path.split("/")[0].removesuffix(".png") in readme  # the README does make them
    ignored = subprocess.run(["git", "check-ignore", *made], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == made
    kept = subprocess.run(["git", "check-ignore", "jaxlm/data/batch.py"], cwd=REPO, capture_output=True, text=True)
    assert kept.returncode == 1  # the package's own data/ is not caught by the pattern
