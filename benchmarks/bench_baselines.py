"""Time to record 200 entries into one baseline file (a script, not collected by pytest).

    python benchmarks/bench_baselines.py [--existing N]

"per entry": one locked read-merge-write per entry, as every recording did before issue 13
(``put(..., now=True)``, which the plugin no longer uses). "batched": what the plugin does now,
entries staged and written by one ``flush()`` per file at the end of the session. Both run with
the schema check of every read and write; ``--existing N`` starts from a file that already holds
N entries (the issue's 76 MB file held about 10,000 with long probe tables).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_autobatch.baselines import BaselineStore

HARDWARE = {"device": "sim:h100", "name": "NVIDIA H100 80GB HBM3 (simulated)"}


def entry(index: int) -> dict[str, Any]:
    """An entry of the size record_entry writes: 15 samples per batch, a dozen probe rows."""
    samples = [1000.0 + index + i for i in range(15)]
    return {"model": f"model{index}", "device": "sim:h100", "mode": "inference", "optimal_batch": 64,
            "max_batch": 256, "cap": 8192, "throughput": 1000.0, "throughput_samples": samples,
            "batch1_throughput": 100.0, "batch1_throughput_samples": samples, "speedup": 10.0,
            "peak_memory_bytes": 2**30, "max_batch_peak_memory_bytes": 2**32, "capacity_bytes": 2**36,
            "search": {"probes": 12, "ooms": 1, "measurements": 40, "seconds": 3.2},
            "probes": [{"batch": 2**i, "latency_s": 0.01, "outcome": "ok", "peak_bytes": 2**20 * i,
                        "predicted_bytes": 2**20 * i, "throughput": 100.0 * i} for i in range(1, 13)],
            "targets": {"min_speedup": 9.0}, "recorded_at": "2026-12-01T10:00:00+00:00"}


def record(root: Path, count: int, *, batched: bool) -> float:
    store = BaselineStore(root, "sim-h100", HARDWARE)
    start = time.perf_counter()
    for index in range(count):
        store.put(f"tests/test_models.py::test_{index}::model", entry(index), now=not batched)
    store.flush()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=200)
    parser.add_argument("--existing", type=int, default=0)
    args = parser.parse_args()
    for existing in sorted({0, args.existing}):
        for batched in (False, True):
            root = Path(tempfile.mkdtemp())
            try:
                seed = BaselineStore(root, "sim-h100", HARDWARE)
                for index in range(existing):
                    seed.put(f"tests/test_models.py::test_old{index}::model", entry(index), now=False)
                seed.flush()
                seconds = record(root, args.entries, batched=batched)
                size = (root / "sim-h100" / "tests__test_models.json").stat().st_size
            finally:
                shutil.rmtree(root)
            how = "batched (one write) " if batched else "per entry (before)  "
            print(f"{args.entries} entries into a file of {existing:>5} entries, {how}: "
                  f"{seconds * 1000:8.1f} ms  (file {size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
