"""The batch-size searches on the real zoo models on this CPU: probes, OOMs and the prediction's error.

    python benchmarks/bench_search_cpu.py [--models resnet50,resnet50-train] [--optimal]

Each zoo model at its CPU size, under the main job's 1 GiB memory budget and caps
(benchmarks/conftest.py, benchmarks/test_models.py), searched for its maximum batch twice on the
same workload: as before issue 14 (batch 1 first, a safe share of the predicted start, the fitted
search; ``start_first``, ``start_backoff`` and ``trust_prediction`` off) and as now (the predicted
start probed first, the fake-tensor prediction followed while it agrees with the measured peaks).
Per model: probes, OOMs, the prediction's largest error against the measured peak over the
probed batches that fit, and the seconds of each search, its fake-tensor predictions included
(each search predicts afresh, as record.py does). With ``--optimal``, the optimal batch too: the
geometric sweep (``throughput_model`` off) against the model of step time: measurements,
measure() calls and seconds each (timing on a shared CPU is noisy: compare the counts, read the
seconds loosely).
A script, not a pytest module; it needs the vision, yolo and llm extras.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import CPU_BUDGET  # noqa: E402
from test_models import CPU_CAPS, CPU_DEFAULT_CAP, CPU_TIMING  # noqa: E402

from pytest_autobatch.errors import catch_oom  # noqa: E402
from pytest_autobatch.record import smallest_batch  # noqa: E402
from pytest_autobatch.search import DEFAULT, find_max_batch, find_optimal_batch, predicted_max_batch  # noqa: E402
from pytest_autobatch.units import parse_size  # noqa: E402
from pytest_autobatch.zoo import ZOO  # noqa: E402

BEFORE = replace(DEFAULT, start_first=False, start_backoff=0.0, trust_prediction=False)
SWEEP = replace(DEFAULT, throughput_model=False)


class Counting:
    """A workload's probe, counting runs, OOMs, and the prediction's error at each batch that fit."""

    def __init__(self, workload: Any, predict: Callable[[int], int | None]):
        self.workload = workload
        self.predict = predict
        self.runs = self.ooms = 0
        self.errors: list[float] = []

    def __call__(self, batch: int) -> int:
        self.runs += 1
        with catch_oom() as caught:
            peak = self.workload.probe(batch)
        if caught.error is not None:
            self.ooms += 1
            raise caught.error
        predicted = self.predict(batch)
        if predicted is not None and peak:
            self.errors.append(abs(predicted - peak) / peak)
        return peak


def search_max(workload: Any, capacity: int, cap: int, tuning: Any) -> tuple[int, int | None, Counting, float]:
    """The search as record.py runs it: the predicted start, then find_max_batch, from the smallest
    batch the model takes."""
    cache: dict[int, int | None] = {}
    smallest = smallest_batch(workload)

    def predict(batch: int) -> int | None:
        if batch not in cache:
            cache[batch] = workload.predict_peak_bytes(batch)
        return cache[batch]

    began = time.perf_counter()
    predicted = predicted_max_batch(predict, capacity, cap, smallest=smallest)
    start = None if predicted is None else max(smallest, predicted)
    probe = Counting(workload, predict)
    result = find_max_batch(probe, cap=cap, capacity_bytes=capacity, start=start, min_batch=smallest,
                            tuning=tuning, predict=predict if tuning.trust_prediction else None)
    return result.max_batch, start, probe, time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names")
    parser.add_argument("--optimal", action="store_true", help="also time the optimal-batch searches")
    args = parser.parse_args(argv)
    from pytest_autobatch.devices import get_device
    device = get_device("cpu", memory_budget=parse_size(CPU_BUDGET))
    capacity = device.capacity_bytes()
    assert capacity is not None
    print(f"CPU, {CPU_BUDGET} budget; before = batch 1 first and the fitted search, now = the predicted "
          f"start first, the prediction followed while it agrees")
    print(f"{'model':16} {'cap':>4} {'start':>5} {'max':>4} {'probes before':>13} {'OOMs':>4} "
          f"{'probes now':>10} {'OOMs':>4} {'pred. error':>11} {'s before':>8} {'s now':>6}")
    optimal_rows = []
    for name in args.models.split(","):
        spec = ZOO[name]
        model, example, options = spec.build("cpu")
        options["timing"] = CPU_TIMING
        workload = device.workload(model, example, mode=spec.mode, **options)
        cap = CPU_CAPS.get(name, CPU_DEFAULT_CAP)
        before, start, probe_before, s_before = search_max(workload, capacity, cap, BEFORE)
        now, _, probe_now, s_now = search_max(workload, capacity, cap, DEFAULT)
        assert before == now, (name, before, now)
        error = max(probe_before.errors + probe_now.errors, default=float("nan"))
        print(f"{name:16} {cap:4d} {start or 0:5d} {now:4d} {probe_before.runs:13d} {probe_before.ooms:4d} "
              f"{probe_now.runs:10d} {probe_now.ooms:4d} {100 * error:10.2f}% {s_before:8.1f} {s_now:6.1f}",
              flush=True)
        if args.optimal:
            for label, tuning in (("sweep", SWEEP), ("model", DEFAULT)):
                calls: list[int] = []

                def measure(batch: int, workload: Any = workload, calls: list[int] = calls) -> list[float]:
                    calls.append(batch)
                    return workload.measure(batch)

                began = time.perf_counter()
                result = find_optimal_batch(measure, max_batch=now, min_batch=smallest_batch(workload),
                                            tuning=tuning)
                row = (f"{name:16} {label:6} {len(result.measurements):12d} {len(calls):6d} "
                       f"{time.perf_counter() - began:7.1f} {result.best_batch:5d} "
                       f"{result.best_throughput:12,.1f} {result.optimal_batch:7d}")
                print(f"  optimal: {row}", flush=True)
                optimal_rows.append(row)
        workload.close()
    if optimal_rows:
        print(f"\n{'model':16} {'search':6} {'measurements':>12} {'calls':>6} {'seconds':>7} {'best':>5} "
              f"{'samples/s':>12} {'optimal':>7}")
        print("\n".join(optimal_rows))


if __name__ == "__main__":
    main()
