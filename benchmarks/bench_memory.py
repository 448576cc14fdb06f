"""Memory prediction against measurement on the CPU device, and the CPU batching speedup.

For each zoo model at its CPU size: the peak predicted on fake tensors next to the peak measured
from the tensors actually allocated, at several batch sizes (target: within 15%), how long each
prediction took, and the throughput at each batch relative to batch 1. Then the issue's timing
target: a ResNet-50 at 224x224 and batch 512 predicted in about a second, allocating nothing.

    .venv/bin/python benchmarks/bench_memory.py [MODEL ...]
"""

from __future__ import annotations

import os
import resource
import sys
import time

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pytest_autobatch.devices.torch_devices import CpuDevice  # noqa: E402
from pytest_autobatch.devices.torch_timing import TimingBudget  # noqa: E402
from pytest_autobatch.stats import median  # noqa: E402
from pytest_autobatch.units import format_bytes  # noqa: E402
from pytest_autobatch.zoo import ZOO  # noqa: E402

BATCHES = (1, 4, 16, 32)
TARGET_ERROR = 0.15
TIMING = TimingBudget(warmup_s=0.2, block_s=0.2, min_blocks=3, max_blocks=10, max_time_s=3.0, spread=0.05)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_model(name: str) -> list[float]:
    spec = ZOO[name]
    model, example, options = spec.build("cpu")
    workload = CpuDevice().workload(model, example, mode=spec.mode, timing=TIMING, **options)
    print(f"\n{name} ({spec.mode}, {spec.size_label('cpu')})")
    print(f"  {'batch':>5} {'predicted':>12} {'measured':>12} {'error':>7} {'predict s':>9} "
          f"{'samples/s':>10} {'speedup':>7}")
    errors = []
    batch1 = None
    for batch in BATCHES:
        started = time.perf_counter()
        predicted = workload.predict_peak_bytes(batch)
        predict_seconds = time.perf_counter() - started
        measured = workload.probe(batch)
        throughput = median(workload.measure(batch))
        batch1 = batch1 or throughput
        error = None if predicted is None else (predicted - measured) / measured
        if error is not None:
            errors.append(abs(error))
        shown = "n/a" if error is None else f"{error:+.1%}"
        print(f"  {batch:>5} {format_bytes(predicted):>12} {format_bytes(measured):>12} {shown:>7} "
              f"{predict_seconds:>9.2f} {throughput:>10.1f} {throughput / batch1:>6.2f}x")
    workload.close()
    return errors


def bench_resnet50_at_512() -> None:
    import torchvision
    model = torchvision.models.resnet50(weights=None).eval()
    workload = CpuDevice().workload(model, torch.randn(1, 3, 224, 224))
    workload.predict_peak_bytes(1)  # first use imports and warms up the fake-tensor machinery
    rss_before = max_rss_bytes()
    started = time.perf_counter()
    predicted = workload.predict_peak_bytes(512)
    seconds = time.perf_counter() - started
    grown = max_rss_bytes() - rss_before
    print(f"\nresnet50 inference, 224x224, batch 512: predicted peak {format_bytes(predicted)} in "
          f"{seconds:.2f} s; peak RSS grew by {format_bytes(grown)} (nothing allocated)")


def main(names: list[str]) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU device measures live tensor "
          f"storages, predictions run on fake tensors")
    worst = []
    for name in names or list(ZOO):
        worst += bench_model(name)
    bench_resnet50_at_512()
    if worst:
        print(f"\nlargest prediction error: {max(worst):.1%} (target {TARGET_ERROR:.0%})")
    return 0 if not worst or max(worst) <= TARGET_ERROR else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
