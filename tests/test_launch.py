"""The cluster launchers' own logic, run here with fake `gcloud` / `srun` on PATH that record
their arguments: what they start, and the one-line refusals that keep a run off unshared disks."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO

BASH = shutil.which("bash")


def write_stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(body)
    path.chmod(0o755)


def recording_stub(log: Path, answers: dict[str, str] | None = None) -> str:
    """A Python program that appends its argv (as JSON) to `log` and prints answers[key] when
    key occurs in its arguments."""
    return textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        for key, answer in {answers or {}!r}.items():
            if key in " ".join(sys.argv):
                print(answer)
        """)


def run_script(args: list[str], tmp_path: Path, env_extra: dict, stub: str, answers: dict | None = None):
    """Runs a launcher from the repo root with a recording `stub` command first on PATH; returns
    (process, [argv of each call to the stub])."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    write_stub(bin_dir, stub, recording_stub(log, answers))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, **env_extra}
    proc = subprocess.run([BASH, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


POD = ["launch/tpu_pod.sh", "my-tpu", "us-east5-a", "configs/pod-1b-v5p64.yaml"]


@pytest.mark.parametrize("run_dir, shared, expected", [
    ("gs://bucket/run", "/mnt/shared", "jaxlm writes the run directory with plain file I/O, so URLs do not work"),
    ("runs/pod", "", "set SHARED_DIR to the absolute path of a directory mounted on all workers"),
    ("/mnt/shared/pod", "mnt/shared", "set SHARED_DIR to the absolute path"),
    ("/home/me/runs/pod", "/mnt/shared", "is not under SHARED_DIR=/mnt/shared, so each worker would write its own"),
    ("/mnt/shared-other/pod", "/mnt/shared", "is not under SHARED_DIR=/mnt/shared"),
    ("/mnt/shared/../elsewhere", "/mnt/shared", "train.run_dir=/mnt/elsewhere is not under SHARED_DIR"),
])
def test_tpu_pod_refuses_a_run_dir_that_is_not_shared_in_one_line_before_touching_the_pod(
        tmp_path, run_dir, shared, expected):
    proc, calls = run_script([*POD, "data.path=/data/c", f"train.run_dir={run_dir}"], tmp_path,
                             {"SHARED_DIR": shared}, "gcloud")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tpu_pod.sh: train.run_dir=")
    assert expected in proc.stderr
    assert calls == []  # nothing copied, nothing started


def test_tpu_pod_copies_the_tree_and_starts_training_detached_on_every_worker(tmp_path):
    proc, calls = run_script([*POD, "train.run_dir=/mnt/shared/runs/pod", "data.path=/data/my corpus"], tmp_path,
                             {"SHARED_DIR": "/mnt/shared/", "PROJECT": "proj", "SETUP": "0"}, "gcloud")
    assert proc.returncode == 0, proc.stderr
    (scp, ssh) = calls
    where = ["--zone=us-east5-a", "--project=proj"]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[-4:] == ["my-tpu:", "--worker=all", *where]
    assert ssh[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--worker=all", *where, "--command"]
    remote = shlex.split(ssh[-1].strip().splitlines()[-1])  # as the worker's shell will split it
    log_name = remote[7]
    assert log_name.startswith("train-")
    assert remote == ["cd", "jaxlm", "&&", "SETUP=0", "SHARED_DIR=/mnt/shared", "bash", "launch/tpu_worker.sh",
                      log_name, "train.run_dir=/mnt/shared/runs/pod", "data.path=/data/my corpus"]
    follow = (f"gcloud compute tpus tpu-vm ssh my-tpu --zone=us-east5-a --project=proj --worker=0 "
              f"--command 'tail -f jaxlm/logs/{log_name}.log'")
    assert "metrics and checkpoints in /mnt/shared/runs/pod" in proc.stdout and follow in proc.stdout
    assert f"--worker=all --command 'kill -TERM $(cat jaxlm/logs/{log_name}.pid)'" in proc.stdout


def fake_repo(tmp_path: Path, python_body: str | None) -> Path:
    """A worker's unpacked repository: the worker script, and .venv/bin/python as a stub."""
    work = tmp_path / "jaxlm"
    (work / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "tpu_worker.sh", work / "launch")
    if python_body is not None:
        (work / ".venv" / "bin").mkdir(parents=True)
        # a bash stand-in for the venv's python: prints its arguments (shell-quoted), then body
        write_stub(work / ".venv" / "bin", "python", f'#!{BASH}\nprintf python; printf " %q" "$@"; echo\n{python_body}')
    return work


def test_tpu_worker_returns_at_once_and_training_goes_on_detached_into_its_log(tmp_path):
    # the "training" outlives the worker script by a second, in its own session, writing to the log
    work = fake_repo(tmp_path, 'sleep 1; echo "trained, session $(ps -o sid= -p $$)"\n')
    env = {**os.environ, "SETUP": "0"}
    proc = subprocess.run([BASH, "launch/tpu_worker.sh", "run1", "train.steps=5", "data.path=/d x"],
                          capture_output=True, text=True, env=env, cwd=work, timeout=30)
    assert proc.returncode == 0, proc.stderr
    log = work / "logs" / "run1.log"
    assert "trained" not in log.read_text()  # returned at once: the training is still running
    assert "training started, pid" in proc.stderr and str(log) in proc.stderr
    pid = int((work / "logs" / "run1.pid").read_text())
    deadline = time.monotonic() + 20
    while "trained" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    command, trained = log.read_text().splitlines()
    assert command == "python -m jaxlm.cli train run-config.yaml train.steps=5 data.path=/d\\ x"
    session = int(trained.split("session")[1])
    assert session == pid != os.getsid(0)  # setsid: training leads its own session, away from ssh's


def test_tpu_worker_without_python_311_fails_in_one_line(tmp_path):
    work = fake_repo(tmp_path, None)  # no venv yet: the worker must find a python
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("hostname", "basename"):
        (tools / tool).symlink_to(shutil.which(tool))
    write_stub(tools, "python3", f'#!{BASH}\ncase "$*" in *--version*) echo "Python 3.10.12";; *) exit 1;; esac\n')
    proc = subprocess.run([BASH, "launch/tpu_worker.sh", "run1"], capture_output=True, text=True,
                          env={"PATH": str(tools), "SETUP": "0"}, cwd=work, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no python >= 3.11 (python3 is Python 3.10.12)" in proc.stderr
    assert not (work / ".venv").exists() and not (work / "logs").exists()


def test_slurm_refuses_a_run_dir_that_some_node_does_not_see(tmp_path):
    run_dir = tmp_path / "run"
    # the probe's answer: the first node sees the marker file, the second does not
    proc, calls = run_script(["launch/slurm.sbatch", "configs/tiny.yaml", f"train.run_dir={run_dir}"], tmp_path,
                             {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77"}, "srun", {"test -e": "yes\nno"})
    assert proc.returncode == 2
    assert proc.stderr == (f"slurm.sbatch: train.run_dir={run_dir} is not shared: 1 of 2 nodes do not see it; "
                           "put it on a filesystem every node mounts (e.g. under your home or a parallel filesystem)\n")
    (probe,) = calls  # the probe ran, training did not
    assert probe[:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "bash"]
    assert probe[-1] == f"{run_dir}/.shared-check-77"
    assert list(run_dir.iterdir()) == []  # the marker is gone


def test_slurm_starts_training_once_every_node_sees_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc, calls = run_script(["launch/slurm.sbatch", "configs/gpu-124m.yaml", f"--run-dir={run_dir}",
                              "train.steps=7"], tmp_path, {"SLURM_JOB_NUM_NODES": "2"}, "srun", {"test -e": "yes\nyes"})
    assert proc.returncode == 0, proc.stderr
    probe, train = calls
    assert train == ["--kill-on-bad-exit=1", "--label", sys.executable, "-m", "jaxlm.cli", "train",
                     "configs/gpu-124m.yaml", f"--run-dir={run_dir}", "train.steps=7"]


def test_slurm_on_one_node_skips_the_probe(tmp_path):
    proc, calls = run_script(["launch/slurm.sbatch", "configs/tiny.yaml"], tmp_path, {"SLURM_JOB_NUM_NODES": "1"},
                             "srun")
    assert proc.returncode == 0 and [c[:2] for c in calls] == [["--kill-on-bad-exit=1", "--label"]]


@pytest.mark.parametrize("key, args, expected", [
    ("train.run_dir", ["configs/tiny.yaml"], "runs/tiny"),
    ("train.run_dir", ["configs/gpt2-xl.yaml"], "runs/gpt2-xl"),  # no train section: runs/<file name>
    ("train.run_dir", ["configs/tiny.yaml", "train.run_dir=/a//b/../c", "x.y=1"], "/a/c"),
    ("train.run_dir", ["configs/tiny.yaml", "train.run_dir=/a", "--run-dir", "/b"], "/b"),
    ("train.run_dir", ["configs/tiny.yaml", "train.run_dir='gs://b/r'"], "gs://b/r"),
    ("data.path", ["configs/pod-1b-v5p64.yaml"], ""),
    ("data.path", ["configs/pod-1b-v5p64.yaml", "data.path=/d/c", "data.path=/d/e"], "/d/e"),
    ("data.mixture", ["configs/tiny.yaml", "data.mixture=[{path: a}]"], "[{'path': 'a'}]"),
])
def test_config_value_agrees_with_jaxlm_config(key, args, expected):
    out = subprocess.run([sys.executable, "launch/config_value.py", key, *args], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.strip()
    assert out == expected
    if key == "train.run_dir" and "://" not in expected and "--run-dir" not in args:
        from jaxlm.config import load_config

        assert os.path.normpath(load_config(args[0], args[1:2]).train.run_dir) == expected


def test_tpu_pod_refuses_a_config_without_data(tmp_path):
    proc, calls = run_script([*POD, "train.run_dir=/mnt/shared/pod"], tmp_path, {"SHARED_DIR": "/mnt/shared"},
                             "gcloud")
    assert proc.returncode == 2 and calls == []
    assert proc.stderr == ("tpu_pod.sh: configs/pod-1b-v5p64.yaml has no data.path (nor data.mixture), so the pod "
                           "would train on the built-in default corpus (the Python standard library); add "
                           "data.path=DIR, a `jaxlm prepare` directory that every worker can read\n")


def test_gpu_config_is_124m_and_runs_offline_from_the_files_its_header_names(tmp_path, shakespeare_path, monkeypatch):
    """The two commands in configs/gpu-124m.yaml's header make everything it needs, without the
    internet: GPT-2 files -> tokenizer directory -> prepared corpus at the config's own paths."""
    from jaxlm import cli
    from jaxlm.tools.accounting import count_params
    from jaxlm.config import load_config
    from jaxlm.data.shards import check_tokenizer, open_prepared
    from jaxlm.tokenizer.tokenizer import load_tokenizer

    fixtures = shakespeare_path.parents[1] / "cs336_fixtures"
    monkeypatch.chdir(tmp_path)
    assert cli.main(["tokenizer", "convert", "--gpt2-vocab", str(fixtures / "gpt2_vocab.json"),
                     "--gpt2-merges", str(fixtures / "gpt2_merges.txt"), "-o", "tok/gpt2"]) == 0
    assert cli.main(["prepare", str(shakespeare_path), "--tokenizer", "tok/gpt2", "-o", "data/corpus-gpt2",
                     "--workers", "1"]) == 0
    cfg = load_config(REPO / "configs" / "gpu-124m.yaml")  # data.path must exist: it does now
    assert count_params(cfg.model, cfg.moe).total == 123_587_328
    tok = load_tokenizer(cfg.data.tokenizer)
    assert tok.n_vocab == 50257 <= cfg.model.vocab_size and cfg.model.vocab_size % 128 == 0
    check_tokenizer(open_prepared(cfg.data.path), tok)
    assert cfg.model.param_dtype == "float32" and cfg.model.compute_dtype == "bfloat16"
