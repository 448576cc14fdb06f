"""Whether the machine let a measurement run undisturbed, from what the OS counts for it.

Read over a timed window, on Linux, from /proc and the process's cgroup (no torch, no psutil):

- run-queue wait: time this process's threads were ready but waited for a CPU
  (``/proc/self/task/*/schedstat``), against the window's wall time. About 0.04 on a quiet 2-core
  VM, 1.0 and more with a busy neighbour or under a CPU quota;
- CPU-quota throttling: periods in which the cgroup's quota ran out (``cpu.stat``'s nr_throttled);
- fewer CPUs allowed than torch runs threads on (``sched_getaffinity``).

Steal time is not used: on the VMs this was measured on it stayed at 0.1-0.2% under every kind of
contention. Where a file is missing (another OS, no cgroup) that signal is simply not read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: Run-queue wait over wall time above which the process was fighting for CPUs.
MAX_RUN_QUEUE_WAIT = 0.25


def _run_queue_wait_s() -> float | None:
    total = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue   # a thread that ended meanwhile
    except OSError:
        return None
    return total / 1e9


def _cgroup_cpu_stat() -> Path | None:
    """cpu.stat of this process's own cgroup (v2 unified, or v1 cpu controller)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.stat"
        elif "cpu" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/cpu") / path.lstrip("/") / "cpu.stat"
        else:
            continue
        if candidate.is_file():
            return candidate
    return None


def _throttled_periods(stat: Path | None) -> int | None:
    if stat is None:
        return None
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "nr_throttled":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


class Watch:
    """Start before a measurement, ``reasons()`` after: why its timings cannot be trusted, if any."""

    def __init__(self, threads: int):
        self.threads = threads
        self._stat = _cgroup_cpu_stat()
        self._start = time.perf_counter()
        self._waited = _run_queue_wait_s()
        self._throttled = _throttled_periods(self._stat)

    def reasons(self) -> list[str]:
        wall = time.perf_counter() - self._start
        found = []
        waited = _run_queue_wait_s()
        if waited is not None and self._waited is not None and wall > 0:
            share = (waited - self._waited) / wall
            if share > MAX_RUN_QUEUE_WAIT:
                found.append(f"its threads waited for a CPU {share:.0%} of the time (another process "
                             f"competes for the CPUs)")
        throttled = _throttled_periods(self._stat)
        if throttled is not None and self._throttled is not None and throttled > self._throttled:
            found.append(f"the CPU quota throttled it {throttled - self._throttled} times "
                         f"(cgroup {self._stat})")
        try:
            allowed = len(os.sched_getaffinity(0))
        except AttributeError:
            allowed = self.threads
        if allowed < self.threads:
            found.append(f"torch runs {self.threads} threads on {allowed} allowed CPU(s)")
        return found
