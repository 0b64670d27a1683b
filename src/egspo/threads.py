"""Torch's intra-op threads fitted to the cores that other processes leave free.

torch starts one intra-op thread per core, and its OpenMP threads wait for the next parallel
region by spinning (GNU libgomp: about 3 ms). On a quiet machine that is the fastest choice. Beside
a busy process it is the slowest: a spinning thread holds a core the other process wants, and the
thread it waits for waits for that core (the demo ran 2.4-3.1x slower beside one busy process on
2 cores). Sleeping at once instead (`OMP_WAIT_POLICY=PASSIVE`) cost 1.45x when quiet; one thread
costs 1.3x when quiet and busy alike. So the count follows the machine: every interval the
governor measures how many cores the other processes used (all CPUs' busy time from /proc/stat,
less this process's and its children's) and sets `torch.set_num_threads` to the free cores,
rounded, between 1 and the count torch started with (README "On a busy machine").

Linux only (/proc); elsewhere the governor leaves the count alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

PROC = Path("/proc")


def system_jiffies() -> tuple[int, int, int] | None:
    """(busy, total, cpus) of all CPUs since boot, in clock ticks, from /proc/stat; None off Linux."""
    try:
        lines = (PROC / "stat").read_text().splitlines()
    except OSError:
        return None
    values = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    total = sum(values)
    return total - values[3] - values[4], total, max(cpus, 1)


def tree_jiffies(pid: int) -> int:
    """CPU time (user + system, clock ticks) of process `pid` and its live descendants, e.g. the
    reward's verifier workers, which are this run's work, not another process's."""
    used, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            fields = (PROC / str(current) / "stat").read_text().rsplit(")", 1)[1].split()
            used += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
            for task in (PROC / str(current) / "task").iterdir():
                stack.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or a kernel without the children file
    return used


def fitted_threads(current: int, free_cores: float, max_threads: int, margin: float = 0.6) -> int:
    """The thread count for `free_cores` (cores no other process used): the free cores rounded,
    between 1 and `max_threads`, changed only when they are more than `margin` away from `current`
    (so a background process that comes and goes at half a core does not flip the count)."""
    if abs(free_cores - current) <= margin:
        return current
    return max(1, min(max_threads, round(free_cores)))


class Sample(NamedTuple):
    """Clock ticks of all CPUs and of this run's processes, at one moment."""

    seconds: float  # time.monotonic()
    busy: int
    total: int
    cpus: int
    ours: int


class ThreadGovernor:
    """Sets torch's intra-op thread count to the cores other processes leave free.

    Call `update()` from the thread that runs torch (OpenMP's thread count is a per-thread
    setting), e.g. before every training step; it measures at most every `interval_seconds`.
    """

    def __init__(self, max_threads: int | None = None, interval_seconds: float = 1.0) -> None:
        self.max_threads = max_threads or torch.get_num_threads()
        self.interval_seconds = interval_seconds
        self.pid = os.getpid()
        self.threads = torch.get_num_threads()
        self.other_cores = 0.0  # cores the other processes used over the last interval
        self._last = self._sample()

    def _sample(self) -> Sample | None:
        system = system_jiffies()
        return None if system is None else Sample(time.monotonic(), *system, tree_jiffies(self.pid))

    def update(self) -> int:
        """Measure (when an interval has passed) and set the thread count; returns it."""
        if self._last is None or self.max_threads < 2:
            return self.threads
        if time.monotonic() - self._last.seconds < self.interval_seconds:
            return self.threads
        now = self._sample()
        if now is None:
            return self.threads
        busy, total, ours = (
            now.busy - self._last.busy,
            now.total - self._last.total,
            now.ours - self._last.ours,
        )
        self._last = now
        if total <= 0:
            return self.threads
        self.other_cores = max(0.0, (busy - ours) / total * now.cpus)
        cpus = min(now.cpus, len(os.sched_getaffinity(0)))
        threads = fitted_threads(self.threads, cpus - self.other_cores, self.max_threads)
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads

    def restore(self) -> None:
        """Back to the count torch started with."""
        if self.threads != self.max_threads:
            torch.set_num_threads(self.max_threads)
            self.threads = self.max_threads
