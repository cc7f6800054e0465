"""Chaos run: a 2-process x 4-CPU-device training job SIGKILLed at random moments, restarted each
time, must end exactly where an uninterrupted run ends.

Both runs: the tiny model, `--steps` steps (200), a checkpoint every `--every` (10), processes on
127.0.0.1 joined by jax.distributed (as launch/multihost_cpu.sh starts them). The driver kills
`--kills` times (seeded): at a random step, or as soon as a save is in flight (an orbax temporary
directory exists); it kills process 0, process 1 or both, and a surviving peer a moment later (as
a job scheduler tears down the rest of a job), then restarts the job, which resumes from its newest
valid checkpoint. At the end it checks:
  - the final state (params and optimizer state) equals the uninterrupted run's, bit for bit
  - metrics.jsonl reads as one run: each step once, in order, with the reference's losses
  - every checkpoint left verifies in full (sizes, checksums, every array read and digested),
    and no temporary directory is left
and prints kills survived, steps lost per kill (last logged step - resumed step) and wall times.

    python bench/chaos.py [--kills 20] [--steps 200] [--every 10] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TMP = ".orbax-checkpoint-tmp"
LAUNCH_TIMEOUT = 600  # seconds without the job finishing or being killed: a hang


class Crashed(Exception):
    """A launch failed on its own (under heavy load, gloo's 30 s rendezvous can time out when one
    process compiles much later than the other): restarted like a kill, and counted."""


def overrides(steps: int, every: int) -> list[str]:
    return ["model.n_layers=2", "model.d_model=32", "model.d_ff=64", "data.seq_len=32", "train.global_batch=8",
            "train.eval_every=0", "train.log_every=1", "train.progress=false", "train.peak_flops_per_device=1e12",
            "mesh.data=2", "mesh.fsdp=4", f"train.steps={steps}", f"checkpoint.every={every}", "checkpoint.keep=3"] \
        + ([f"data.path={SHAKESPEARE}"] if SHAKESPEARE.is_file() else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """The two processes of one launch, their output in run_dir/../logs/<launch>.p<i>."""

    def __init__(self, run_dir: Path, args: list[str], cache: Path, name: str):
        port, self.logs = free_port(), []
        self.procs = []
        for i in range(2):
            env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLM_")}
            env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                       PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAXLM_COORDINATOR=f"127.0.0.1:{port}",
                       JAXLM_NUM_PROCESSES="2", JAXLM_PROCESS_ID=str(i), PYTHONPATH=str(REPO))
            log = run_dir.parent / "logs" / f"{name}.p{i}"
            log.parent.mkdir(parents=True, exist_ok=True)
            self.logs.append(log)
            cmd = [sys.executable, "-m", "jaxlm.cli", "train", str(REPO / "configs" / "tiny.yaml"), *args,
                   f"train.run_dir={run_dir}"]
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"),
                                               stderr=subprocess.STDOUT))

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.poll() is None]

    def kill(self, i: int) -> None:
        if self.procs[i].poll() is None:
            self.procs[i].send_signal(signal.SIGKILL)

    def wait(self) -> list[int]:
        return [p.wait() for p in self.procs]

    def resumed_from(self) -> int:
        text = self.logs[0].read_text()
        return int(text.split("resumed from step ")[1].split()[0]) if "resumed from step " in text else 0

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n" + log.read_text()[-2500:] for log in self.logs)


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):  # a killed writer may leave half a line
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue
    return 0


def saving(run_dir: Path) -> bool:
    try:
        return any(TMP in name for name in os.listdir(run_dir / "checkpoints"))
    except FileNotFoundError:
        return False


def committed(run_dir: Path) -> bool:
    try:
        return any(name.isdigit() for name in os.listdir(run_dir / "checkpoints"))
    except FileNotFoundError:
        return False


def run_to_end(run_dir: Path, args: list[str], cache: Path, name: str) -> Job:
    job = Job(run_dir, args, cache, name)
    codes = job.wait()
    if codes != [0, 0]:
        raise Crashed(f"{name}: exit codes {codes}\n{job.tail()}")
    return job


def reference_run(run_dir: Path, args: list[str], cache: Path, tries: int = 3) -> None:
    """The uninterrupted run; started again from scratch if it crashes on its own."""
    for attempt in range(tries):
        try:
            run_to_end(run_dir, args, cache, f"reference{attempt}")
            return
        except Crashed as e:
            print(f"the reference run crashed on its own (try {attempt + 1}): {str(e).splitlines()[0]}", flush=True)
            shutil.rmtree(run_dir)
    raise SystemExit(f"the reference run crashed {tries} times; see {run_dir.parent / 'logs'}")


def kill_once(job: Job, run_dir: Path, rng: random.Random, start: int, steps: int) -> dict:
    """Waits for this kill's moment, kills; returns what happened."""
    during_save = rng.random() < 0.4
    target = min(start + rng.randint(1, 25), steps - 1)
    victims = rng.choice([[0], [1], [0, 1]])
    deadline = time.time() + LAUNCH_TIMEOUT
    while True:
        if len(job.alive()) < 2:
            for i in job.alive():
                job.kill(i)
            job.wait()
            raise Crashed(f"exit codes {[p.poll() for p in job.procs]}")
        if time.time() > deadline:
            raise SystemExit(f"no progress in {LAUNCH_TIMEOUT}s\n{job.tail()}")
        step = last_step(run_dir)
        if not committed(run_dir):  # killed in its first save, a run is refused, not restarted (resume.py)
            pass
        elif (saving(run_dir) and step > start) if during_save else step >= target:
            break
        if during_save and step >= steps - 2:  # no save left to catch: kill now
            break
        time.sleep(0.002)
    in_save = saving(run_dir)
    for i in victims:
        job.kill(i)
    if len(victims) == 1:  # the peer goes on alone a moment (until a collective), then is torn down
        time.sleep(rng.uniform(0, 1.5))
        job.kill(1 - victims[0])
    job.wait()
    return {"killed": "both" if len(victims) == 2 else f"p{victims[0]}", "at_step": last_step(run_dir),
            "in_save": in_save}


def read_state(step_dir: Path) -> dict:
    """The saved state as host numpy arrays, by orbax name."""
    import jax
    import orbax.checkpoint as ocp

    from jaxlm.checkpoint.digest import read_host

    state = read_host((step_dir / "state").absolute())
    names = ocp.tree.get_param_names(state, include_empty_nodes=False)
    return dict(zip(jax.tree.leaves(names), jax.tree.leaves(state)))


def check(run_dir: Path, reference: Path, steps: int) -> list[str]:
    """What differs from the uninterrupted run, or is left damaged (empty: nothing)."""
    import numpy as np

    from jaxlm import checkpoint as ckpt

    problems = []
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    if [r["step"] for r in records] != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps are not 1..{steps} once each in order")
    keys = ("step", "loss", "grad_norm", "lr")
    bad = [r["step"] for r, w in zip(records, ref) if [r.get(k) for k in keys] != [w.get(k) for k in keys]]
    if bad:
        problems.append(f"{len(bad)} step(s) logged other losses than the reference's, first {bad[0]}")
    got, want = read_state(run_dir / "checkpoints" / str(steps)), read_state(reference / "checkpoints" / str(steps))
    differ = [n for n in want if n not in got or not np.array_equal(got[n], want[n])]
    if differ or set(got) != set(want):
        problems.append(f"final state differs from the reference in {len(differ)} array(s), e.g. {differ[:2]}")
    for where in (run_dir / "checkpoints", run_dir / ckpt.SET_ASIDE):
        for step, path in ckpt.step_dirs(where):
            if (reason := ckpt.verify(path, arrays=True)) is not None:
                problems.append(f"{path.relative_to(run_dir)} is damaged: {reason}")
    left = [p.name for p in (run_dir / "checkpoints").iterdir() if TMP in p.name]
    if left:
        problems.append(f"temporary directories left: {left}")
    return problems


def chaos(kills: int, steps: int, every: int, seed: int, work: Path, max_crashes: int = 5) -> dict:
    args, cache = overrides(steps, every), work / "jax_cache"
    t0 = time.time()
    reference_run(work / "reference", args, cache)
    reference_s = time.time() - t0
    rng, run_dir, history, crashes = random.Random(seed), work / "run", [], []
    t0 = time.time()
    launch = 0
    while True:
        last = kills == len(history)
        job = Job(run_dir, args, cache, f"launch{launch}")
        launch += 1
        try:
            start = job_start(job, run_dir) if committed(run_dir) else 0
            if history and "resumed" not in history[-1]:
                history[-1].update(resumed=start, lost=history[-1]["at_step"] - start)
            if last:
                if job.wait() != [0, 0]:
                    raise Crashed(f"exit codes {[p.returncode for p in job.procs]}")
                break
            history.append(kill_once(job, run_dir, rng, start, steps))
        except Crashed as e:
            crashes.append(f"launch {launch - 1}: {str(e).splitlines()[0]}")
            print(f"launch {launch - 1} crashed on its own ({str(e).splitlines()[0]}); restarting", flush=True)
            if len(crashes) > max_crashes:
                raise SystemExit(f"{len(crashes)} launches crashed on their own; see {work / 'logs'}") from None
            continue
        h = history[-1]
        print(f"kill {len(history)}: {h['killed']} at step {h['at_step']}{' during a save' if h['in_save'] else ''}",
              flush=True)
    chaos_s = time.time() - t0
    problems = check(run_dir, work / "reference", steps)
    lost = [h["lost"] for h in history]
    return {"kills": kills, "problems": problems, "crashes": crashes,
            "kills_in_save": sum(h["in_save"] for h in history), "lost": lost,
            "lost_mean": sum(lost) / len(lost) if lost else 0.0, "lost_max": max(lost, default=0),
            "reference_s": reference_s, "chaos_s": chaos_s, "history": history}


def job_start(job: Job, run_dir: Path) -> int:
    """The step the new launch resumed from, once its process 0 has said so."""
    deadline = time.time() + LAUNCH_TIMEOUT
    while time.time() < deadline:
        if "resumed from step " in job.logs[0].read_text():
            return job.resumed_from()
        if len(job.alive()) < 2:
            for i in job.alive():
                job.kill(i)
            job.wait()
            raise Crashed(f"exit codes {[p.poll() for p in job.procs]} before resuming")
        time.sleep(0.01)
    raise SystemExit(f"the restarted job did not resume in {LAUNCH_TIMEOUT}s\n{job.tail()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="scratch directory (default: a new temporary one)")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    work = Path(a.dir or tempfile.mkdtemp(prefix="chaos_"))
    print(f"chaos: {a.kills} kills of a 2-process x 4-device run, {a.steps} steps, checkpoint every {a.every}; "
          f"load average {os.getloadavg()[0]:.1f}; scratch {work}", flush=True)
    r = chaos(a.kills, a.steps, a.every, a.seed, work)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    print(f"kills survived        {r['kills'] if not r['problems'] else 'NOT ALL'} of {r['kills']} "
          f"({r['kills_in_save']} during a save; victims "
          f"{', '.join(h['killed'] for h in r['history'])})")
    print(f"steps lost per kill   {r['lost']} (mean {r['lost_mean']:.1f}, max {r['lost_max']}; "
          f"checkpoint.every={a.every})")
    if r["crashes"]:
        print(f"crashed on their own   {len(r['crashes'])} launch(es), restarted: {'; '.join(r['crashes'])}")
    print(f"wall time             {r['chaos_s']:.0f} s with the kills, {r['reference_s']:.0f} s uninterrupted; "
          f"load average {os.getloadavg()[0]:.1f}")
    for p in r["problems"]:
        print(f"PROBLEM: {p}")
    print("final state bit-identical, metrics.jsonl one run, no damaged checkpoint" if not r["problems"]
          else "FAILED")
    sys.exit(1 if r["problems"] else 0)


if __name__ == "__main__":
    main()
