"""Figures for the regression gate and the plugin's cost (a script, not collected by pytest).

    python benchmarks/bench_gate.py

1. Gate reliability on simulated GPUs with noisy timings (2% and 5% Gaussian noise plus 5% slow
   outliers): per model, 20 unchanged reruns (target: 0 false failures) and 20 reruns with a 15%
   throughput drop (target: 20 of 20 caught), plus an 8% drop (inside the 10% tolerance) and 25%.
2. The gate across machine speeds: baselines recorded on one simulated machine, re-measured on one
   running everything 0.4x and 1.6x as fast (target: 0 false failures, the 15% drop caught).
3. Plugin start-up overhead on plain ``pytest`` (target: at most 30 ms), and whether torch,
   pynvml or git were imported (target: none).
4. The ``optimal_batch`` fixture in a cached session (target: under 100 ms plus the re-measurement;
   on the simulated device the re-measurement itself costs microseconds).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from pytest_autobatch.devices.simulated import SimulatedModel, simulated_device
from pytest_autobatch.gate import Verdict, check_entry
from pytest_autobatch.record import record_entry, remeasure

RERUNS = 20
MODELS = (
    SimulatedModel("memory-bound", weights_bytes=2_000_000_000, activation_bytes_per_sample=50_000_000,
                   flops_per_sample=4e9),
    SimulatedModel("compute-bound", weights_bytes=500_000_000, activation_bytes_per_sample=20_000_000,
                   flops_per_sample=2e11),
    SimulatedModel("with-knee", weights_bytes=1_000_000_000, activation_bytes_per_sample=30_000_000,
                   flops_per_sample=3e10, knee_batch=256, falloff=0.4, curvature_bytes=2e4),
)


def record(model: SimulatedModel, seed: int, noise: float) -> dict:
    device = simulated_device("sim:h100", seed=seed, timing_noise=noise)
    return record_entry(device, device.workload(model), model=model.name)


def rerun(model: SimulatedModel, entry: dict, seed: int, drop: float, noise: float,
          machine_speed: float = 1.0) -> Verdict:
    device = simulated_device("sim:h100", seed=seed, slowdown=1 / (1 - drop), timing_noise=noise,
                              machine_speed=machine_speed)
    return check_entry(entry, remeasure(device, device.workload(model), entry), hardware=device.name)


def machine_speed_figures() -> None:
    """Baselines recorded on one machine, re-measured on a slower and a faster one of the same kind."""
    print(f"2. The same gate across machine speeds (sim:h100, 2% noise, {RERUNS} reruns per cell): a machine")
    print("   running everything (the reference workload too) at the given speed, with and without a 15% drop.")
    print(f"   {'model':<14} {'speed':>5} {'drop':>5}  {'failed':>9}  {'median relative':>15}  {'median raw':>10}")
    for model in MODELS:
        entry = record(model, 0, 0.02)
        for speed in (0.4, 1.6):
            for drop in (0.0, 0.15):
                checks = [rerun(model, entry, seed, drop, 0.02, speed) for seed in range(1, RERUNS + 1)]
                failed = sum(check.failed for check in checks)
                relative = statistics.median(check.change for check in checks)
                raw = statistics.median(check.raw_change for check in checks)
                print(f"   {model.name:<14} {speed:>4.1f}x {drop:>5.0%}  {failed:>6}/{RERUNS}  {relative:>+15.1%}"
                      f"  {raw:>+10.1%}")
    print()


def gate_figures() -> None:
    """Two ways to rerun: against one recorded baseline (as CI does), and each rerun against its
    own freshly recorded baseline (so the baseline's own noise is sampled too)."""
    print(f"1. Regression gate on sim:h100, {RERUNS} reruns per cell, tolerance 10%, Mann-Whitney alpha 1%,")
    print("   15 raw samples a side (30 when noisy); 'drop' is the true throughput drop (the device's slowdown).")
    print(f"   {'model':<14} {'noise':>5} {'drop':>5}  {'failed, one baseline':>21}  {'failed, fresh baselines':>23}"
          f"  {'median change':>13}")
    for noise in (0.02, 0.05):
        for model in MODELS:
            entry = record(model, 0, noise)
            for drop in (0.0, 0.08, 0.15, 0.25):
                checks = [rerun(model, entry, seed, drop, noise) for seed in range(1, RERUNS + 1)]
                fresh = [rerun(model, record(model, 1000 + seed, noise), seed, drop, noise)
                         for seed in range(1, RERUNS + 1)]
                failed = sum(check.failed for check in checks)
                failed_fresh = sum(check.failed for check in fresh)
                change = statistics.median(check.change for check in checks)
                print(f"   {model.name:<14} {noise:>5.0%} {drop:>5.0%}  {failed:>18}/{RERUNS}  "
                      f"{failed_fresh:>20}/{RERUNS}  {change:>+13.1%}")
    print()


PROJECT_TEST = '''
import json, os, time
import pytest
from pytest_autobatch.devices.simulated import SimulatedModel

@pytest.mark.parametrize("index", range(10))
def test_model(optimal_batch, index):
    model = SimulatedModel(f"model{index}", weights_bytes=10**9, activation_bytes_per_sample=10**7,
                           flops_per_sample=1e10 * (index + 1))
    began = time.perf_counter()
    result = optimal_batch(model)
    with open(os.environ["TIMES"], "a") as stream:
        stream.write(json.dumps({"seconds": time.perf_counter() - began, "cached": result.cached,
                                 "probes": result.probes}) + "\\n")
'''


def run_pytest(folder: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run pytest in a subprocess; returns its CPU seconds (user + system: steadier than wall time
    on a shared machine) and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                               cwd=folder, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode not in (0, 5):
        raise SystemExit(f"pytest {' '.join(args)} failed:\n{completed.stdout}\n{completed.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, completed.stdout


def added_ms(folder: Path, with_args: tuple[str, ...], without_args: tuple[str, ...],
             env: dict[str, str], rounds: int) -> str:
    """Added CPU time (median and minimum), runs interleaved so drifts hit both sides alike."""
    with_plugin, without_plugin = [], []
    for _ in range(rounds):
        with_plugin.append(run_pytest(folder, *with_args, "test_plain.py", env=env)[0])
        without_plugin.append(run_pytest(folder, *without_args, "test_plain.py", env=env)[0])
    median_with, median_without = statistics.median(with_plugin) * 1e3, statistics.median(without_plugin) * 1e3
    return (f"{median_with:.0f} ms CPU with the plugin, {median_without:.0f} ms without: added "
            f"{median_with - median_without:+.1f} ms (medians), "
            f"{(min(with_plugin) - min(without_plugin)) * 1e3:+.1f} ms (minimums)")


def startup_figures(folder: Path, rounds: int = 30) -> None:
    """Bytecode caching on, as in a real install (this machine sets PYTHONDONTWRITEBYTECODE)."""
    (folder / "test_plain.py").write_text("def test_nothing():\n    pass\n")
    (folder / "conftest.py").write_text(textwrap.dedent('''
        import sys
        def pytest_unconfigure(config):
            heavy = [name for name in ("torch", "pynvml", "git") if name in sys.modules]
            print("HEAVY=" + ",".join(heavy))
    '''))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    bare = dict(env, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    _, output = run_pytest(folder, "-q", "-s", "test_plain.py", env=env)   # also warms the caches
    heavy = output.split("HEAVY=")[1].splitlines()[0] or "none"
    everything = added_ms(folder, ("-q",), ("-q", "-p", "no:autobatch"), env, rounds)
    alone = added_ms(folder, ("-q", "-p", "pytest_autobatch.plugin"), ("-q",), bare, rounds)
    print(f"3. Plain pytest start-up (one trivial test), {rounds} interleaved runs each (target: <= 30 ms added):")
    print(f"   with every installed plugin: {everything}")
    print(f"   with no other plugin (PYTEST_DISABLE_PLUGIN_AUTOLOAD=1): {alone}")
    print(f"   heavy modules imported by a plain run: {heavy} (target: none of torch, pynvml, git)")
    print()


def cached_fixture_figures(folder: Path) -> None:
    (folder / "test_models.py").write_text(PROJECT_TEST)
    times = folder / "times.jsonl"
    env = dict(os.environ, TIMES=str(times))
    args = ("-q", "-p", "no:xdist", "--autobatch", "--autobatch-device=sim:h100", "test_models.py")
    record_s, _ = run_pytest(folder, *args, env=env)
    times.unlink()
    cached_s, _ = run_pytest(folder, *args, env=env)
    calls = [json.loads(line) for line in times.read_text().splitlines()]
    assert all(call["cached"] and call["probes"] == 0 for call in calls), calls
    seconds = sorted(call["seconds"] for call in calls)
    print("4. optimal_batch fixture in a cached session (10 simulated models, baselines on disk):")
    print(f"   per call: median {statistics.median(seconds) * 1e3:.1f} ms, max {seconds[-1] * 1e3:.1f} ms, "
          f"probes spent searching: {sum(call['probes'] for call in calls)} (target: 0 and < 100 ms "
          "plus the re-measurement)")
    print(f"   whole session, CPU time: recording run {record_s:.2f} s, cached run {cached_s:.2f} s (includes "
          "interpreter and pytest start-up)")


def main() -> None:
    gate_figures()
    machine_speed_figures()
    with tempfile.TemporaryDirectory() as folder:
        startup_figures(Path(folder))
    with tempfile.TemporaryDirectory() as folder:
        cached_fixture_figures(Path(folder))


if __name__ == "__main__":
    main()
