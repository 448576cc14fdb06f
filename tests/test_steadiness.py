"""The OS's word on whether a timing window was undisturbed: real processes competing for the CPUs."""

import os
import subprocess
import sys
import time

import pytest

from pytest_autobatch.devices.steadiness import Watch

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads Linux's /proc")


def matmuls(seconds: float) -> None:
    """torch's own threads, one per CPU, busy for ``seconds``."""
    torch = pytest.importorskip("torch")
    a = torch.randn(512, 512)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


def test_a_busy_neighbour_is_named():
    cpus = len(os.sched_getaffinity(0))
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus + 1)]
    try:
        time.sleep(0.2)
        watch = Watch(threads=cpus)
        matmuls(1.0)
        reasons = watch.reasons()
    finally:
        for neighbour in neighbours:
            neighbour.kill()
    assert any("waited for a CPU" in reason for reason in reasons), reasons


def test_fewer_cpus_than_torch_threads_is_named():
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        reasons = Watch(threads=2).reasons()
    finally:
        os.sched_setaffinity(0, allowed)
    assert "torch runs 2 threads on 1 allowed CPU(s)" in reasons
