"""`train.profile: {start_step, steps}`: a jax.profiler trace of a few training steps.

The trace lands in RUN_DIR/profile (`plugins/profile/<time>/<host>.xplane.pb` for TensorBoard's
profile tab, `perfetto_trace.json.gz` beside it for ui.perfetto.dev); each traced step is a
`train` step annotation, so TensorBoard's step view splits the timeline by step. The loop makes
one call per step, after it dispatched the step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import jax

from jaxlm.config import ProfileConfig


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Profiler:
    """Traces steps start_step+1 .. start_step+steps (steps counted from 1, as in the metrics)."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, start: int, say: Callable[[str], None] = _say):
        self.first, self.last = cfg.start_step + 1, cfg.start_step + cfg.steps
        self.dir, self.say = Path(run_dir) / "profile", say
        self.tracing, self.annotation, self.traced = False, None, []
        self.waiting = cfg.steps > 0  # for the window to begin
        if self.waiting and self.first <= start + 1 <= self.last:  # from the start (or a resume inside)
            self._start(start + 1)

    def step(self, done: int, state=None) -> None:
        """After step `done` was dispatched: after the window's last step, wait for `state` (so the
        trace holds the whole step on the device) and write the trace; before its first, start."""
        self._end_annotation()
        if self.tracing:
            self.traced.append(done)
            if done >= self.last:
                jax.block_until_ready(state)
                self.close()
                return
        elif self.waiting and done + 1 == self.first:
            self._start(done + 1)
            return
        if self.tracing:
            self._annotate(done + 1)

    def _start(self, step: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
        self.tracing, self.waiting = True, False
        self._annotate(step)

    def _annotate(self, step: int) -> None:
        self.annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
        self.annotation.__enter__()

    def _end_annotation(self) -> None:
        if self.annotation is not None:
            self.annotation.__exit__(None, None, None)
            self.annotation = None

    def close(self) -> None:
        """Writes the trace (also when the run stops inside the window) and says where it went."""
        self._end_annotation()
        if not self.tracing:
            return
        jax.profiler.stop_trace()
        self.tracing = False
        runs = sorted((self.dir / "plugins" / "profile").glob("*"))
        where = runs[-1] if runs else self.dir
        steps = f"steps {self.traced[0]}-{self.traced[-1]}" if self.traced else "no complete step"
        if jax.process_index() == 0:
            self.say(f"jaxlm: profiled {steps}: trace in {where}; open it with `tensorboard --logdir {self.dir}` "
                     "(profile tab, the `tensorboard` and `tensorboard-plugin-profile` packages) or its "
                     "perfetto_trace.json.gz at ui.perfetto.dev")
