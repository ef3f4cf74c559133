"""What rank 0 shows: its log lines, and while an epoch runs a tqdm bar on a terminal, else a line every few seconds.

Under ``mpirun`` a rank's stderr is not a terminal, so a bar would never be
drawn; the lines (epoch, step, loss, images/s, time left) go to stdout
instead, where the launcher forwards them.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta

MODES = ("auto", "bar", "lines", "off", "on")  # on: the bar (an older spelling)


class Progress:
    """One epoch's progress on rank 0.  ``mode``: auto (bar on a terminal, else lines), bar, lines, off.
    ``end``: the step of the epoch where this run stops (``--max-steps``), when before its last; the time
    left covers the steps that will run."""

    def __init__(self, mode: str, epoch: int, epochs: int, steps: int, start_step: int, world_size: int,
                 every_s: float = 5.0, end: int | None = None):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        mode = "bar" if mode == "on" else mode
        self.mode, self.epoch, self.epochs, self.steps = mode, epoch, epochs, steps
        self.end = steps if end is None else min(end, steps)
        self.step, self.first_step, self.world_size, self.every_s = start_step, start_step, world_size, every_s
        self.t0 = self.last_line = time.perf_counter()
        self.images = 0
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=self.end, initial=start_step, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                            leave=True, dynamic_ncols=True)

    def update(self, loss, batch: int) -> None:
        """After a step of ``batch`` images per rank with (device) ``loss``."""
        self.step += 1
        self.images += batch * self.world_size
        now = time.perf_counter()
        rate = self.images / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            if self.step % 20 == 0:
                self.bar.set_postfix(loss=f"{float(loss):.4f}", img_s=f"{rate:.0f}")
        elif self.mode == "lines" and now - self.last_line >= self.every_s and self.step < self.end:
            self.last_line = now
            left = (self.end - self.step) * (now - self.t0) / max(self.step - self.first_step, 1)
            until = "in the epoch" if self.end == self.steps else f"until --max-steps (step {self.end} of the epoch)"
            print(f"epoch {self.epoch + 1}/{self.epochs} step {self.step}/{self.steps}: loss {float(loss):.4f}, "
                  f"{rate:.0f} img/s, {timedelta(seconds=round(left))} left {until}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RootLog:
    """Rank 0 prints; everyone else stays quiet."""

    def __init__(self, comm):
        self.root = comm.is_root

    def __call__(self, *parts):
        if self.root:
            print(*parts, flush=True)
