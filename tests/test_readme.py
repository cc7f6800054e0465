"""The README's shell blocks, run in order in a fresh copy of the repository, each exit 0.

Conventions the README follows (the runner relies on them):
- Only ```bash blocks run, in order, one bash process per block (`set -euo pipefail`), all in the
  same copy, so files made by one block (a tokenizer, prepared data) serve the next.
- A block right after a line `<!-- readme-test: skip (<reason>) -->` is skipped (installs,
  downloads, GPUs, pods, the test suite itself); the marker is an HTML comment, so a reader of the
  rendered README never sees it. An unmarked block that runs `pip install` fails the test instead
  of touching this environment.
- Training runs briefly: every `jaxlm train`, `python -m jaxlm.cli train`, `launch/local.sh` and
  `launch/multihost_cpu.sh` command gets `train.steps=2 train.eval_batches=1 train.progress=false`
  appended; a command that sets `train.steps=S` itself gets 2 + 2 i steps instead, i (from 1) the
  rank of S among the README's train.steps values, so a run that the README extends is extended
  here too. Such a command is the last one on its (continued) line.
- The user's own files, linked into the copy's root from ../shared/data (which also exists beside
  the copy): `input.txt` (TinyShakespeare, as the README's download step would fetch it), and
  GPT-2's `vocab.json` and `merges.txt`. Nothing else is there unless a block makes it.
Run it on another README with:  python tests/test_readme.py README.md
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# What a user makes by hand before the README's commands (name in the copy -> file under ../shared).
PROVIDED = {"input.txt": "data/tinyshakespeare/input.txt",  # TinyShakespeare
            "vocab.json": "data/cs336_fixtures/gpt2_vocab.json",  # GPT-2's tokenizer files
            "merges.txt": "data/cs336_fixtures/gpt2_merges.txt"}
SKIP_MARK = re.compile(r"^<!-- readme-test: skip \((.+?)\) -->[ \t]*$")
TRAIN_COMMAND = re.compile(r"\bjaxlm(?:\.cli)? train\b|\blaunch/(?:local|multihost_cpu)\.sh\b")
TRAIN_STEPS = re.compile(r"\btrain\.steps=(\d+)")
BASE_STEPS = 2
FAST = "train.eval_batches=1 train.progress=false"
TIME_LIMIT_S = 900  # the whole README; a guard against hangs (the README of issue 16, marked, took 205 s of CPU)


def bash_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash fenced blocks, in order."""
    return [body for _, body in marked_blocks(markdown)]


def marked_blocks(markdown: str) -> list[tuple[str | None, str]]:
    """(skip reason or None, body) of each ```bash block: the reason from a marker on the line before."""
    found = re.findall(r"^(?:(<!--.*?-->)[ \t]*\n)?```bash[ \t]*\n(.*?)^```[ \t]*$", markdown, flags=re.M | re.S)
    return [((m := SKIP_MARK.match(marker)) and m.group(1), body) for marker, body in found]


def logical_lines(block: str) -> list[str]:
    """Lines with backslash continuations joined, as the shell reads them."""
    return re.sub(r"[ \t]*\\\n\s*", " ", block).splitlines()


def strip_comment(line: str) -> str:
    """The line without a trailing ` # comment` (a # after whitespace, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def steps_for(blocks: list[str]) -> dict[int, int]:
    """Explicit train.steps values in the README -> the steps they run here, order kept."""
    values = sorted({int(v) for b in blocks for v in TRAIN_STEPS.findall(b)})
    return {v: BASE_STEPS + 2 * (i + 1) for i, v in enumerate(values)}


def rewrite(block: str, steps: dict[int, int]) -> str:
    """The block as CI runs it: training commands shortened (see the module docstring)."""
    out = []
    for line in logical_lines(block):
        code = strip_comment(line)
        if TRAIN_COMMAND.search(code):
            explicit = TRAIN_STEPS.search(code)
            if explicit:
                code = TRAIN_STEPS.sub(lambda m: f"train.steps={steps[int(m.group(1))]}", code)
            else:
                code += f" train.steps={BASE_STEPS}"
            line = f"{code} {FAST}"
        out.append(line)
    return "\n".join(out) + "\n"


def plan(markdown: str) -> list[tuple[int, str | None, str]]:
    """[(block number from 1, skip reason or None, script)] for every bash block."""
    marked = marked_blocks(markdown)
    steps = steps_for([block for _, block in marked])
    result = []
    for n, (reason, block) in enumerate(marked, 1):
        if reason:
            result.append((n, reason, block))
        elif re.search(r"\bpip install\b", block):
            raise AssertionError(f"README bash block {n} runs `pip install`; mark it `<!-- readme-test: skip (reason) -->`")
        elif re.search(r"^# not run in CI", block, re.M):  # the old convention: the test ran such blocks anyway
            raise AssertionError(f"README bash block {n} says `# not run in CI`; mark it "
                                 "`<!-- readme-test: skip (reason) -->` instead")
        else:
            result.append((n, None, rewrite(block, steps)))
    return result


def fresh_copy(dest: Path) -> Path:
    """The repository's files (tracked and untracked-but-not-ignored, as a clone plus your edits)
    under dest/repo, with ../shared beside it and the PROVIDED user files inside it."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    repo = dest / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    (dest / "shared").symlink_to(SHARED)
    for name, source in PROVIDED.items():
        (repo / name).unlink(missing_ok=True)  # an untracked copy in the worktree gives way
        (repo / name).symlink_to(SHARED / source)
    return repo


def run_readme(readme: Path, workdir: Path) -> None:
    """Runs the plan of `readme` in a fresh copy under workdir, printing a line per block (wall
    and CPU seconds); raises AssertionError naming the first block that fails."""
    repo = fresh_copy(workdir)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(repo), JAX_PLATFORMS="cpu",  # this copy's jaxlm; no accelerator in CI
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")  # this python's `jaxlm`
    deadline = time.monotonic() + TIME_LIMIT_S
    for n, skip, script in plan(readme.read_text()):
        if skip:
            print(f"README block {n}: skipped ({skip})", flush=True)
            continue
        t0, cpu0 = time.monotonic(), _children_cpu()
        # a session of its own, so that a timeout stops every process the block started
        proc = subprocess.Popen(["bash", "-c", "set -euxo pipefail\n" + script], cwd=repo, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=max(1, deadline - t0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"README block {n} passed the {TIME_LIMIT_S} s limit of the whole README:\n"
                                 f"{script}") from None
        if proc.returncode != 0:
            tail = "\n".join(output.splitlines()[-30:])
            raise AssertionError(f"README block {n} exited {proc.returncode}:\n{script}--- output (tail):\n{tail}")
        print(f"README block {n}: ok, {time.monotonic() - t0:.1f} s wall, {_children_cpu() - cpu0:.1f} s CPU",
              flush=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------- tests

EXAMPLE = """\
Intro.

<!-- readme-test: skip (installs) -->
```bash
pip install -e .
```

<!-- readme-test: skip (needs a GPU) -->
```bash
jaxlm train configs/gpu-124m.yaml
```

<!-- a comment that is not a marker -->

```bash
jaxlm train configs/tiny.yaml data.path=input.txt   # trains 300 steps
jaxlm train configs/tiny.yaml train.run_dir=runs/x \\
    train.steps=600 'mesh.rules={embed: null}'
echo '# not a comment' && launch/multihost_cpu.sh 2 configs/tiny.yaml train.steps=900
jaxlm accounting configs/gpt2-xl.yaml  # untouched
```

```python
print("not bash")
```
"""


def test_plan_skips_marked_blocks_and_shortens_training_keeping_the_order_of_explicit_steps():
    (n1, skip1, _), (n2, skip2, _), (n3, skip3, script) = plan(EXAMPLE)
    assert "<!--" not in script
    assert (n1, skip1) == (1, "installs") and (n2, skip2) == (2, "needs a GPU") and (n3, skip3) == (3, None)
    assert script.splitlines() == [
        f"jaxlm train configs/tiny.yaml data.path=input.txt train.steps=2 {FAST}",
        f"jaxlm train configs/tiny.yaml train.run_dir=runs/x train.steps=4 'mesh.rules={{embed: null}}' {FAST}",
        f"echo '# not a comment' && launch/multihost_cpu.sh 2 configs/tiny.yaml train.steps=6 {FAST}",
        "jaxlm accounting configs/gpt2-xl.yaml  # untouched",
    ]


def test_plan_refuses_an_unmarked_pip_install_and_the_old_skip_comment():
    with pytest.raises(AssertionError, match=r"block 1 runs `pip install`; mark it"):
        plan("```bash\npip install -e '.[dev]'\n```\n")
    with pytest.raises(AssertionError, match=r"block 1 says `# not run in CI`; mark it"):
        plan("```bash\n# not run in CI: downloads\njaxlm import x -o y\n```\n")


@pytest.mark.slow
def test_readme_commands_run_in_order_in_a_fresh_copy(tmp_path):
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    run_readme(REPO / "README.md", tmp_path)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_readme(Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "README.md").resolve(), Path(tmp))
