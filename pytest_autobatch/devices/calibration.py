"""The simulated profiles against published measurements (``calibration.json``), without torch.

Each published figure (samples/s at a batch) is compared with the noise-free simulated throughput
of the model's simulated counterpart (``sim_zoo``) on the card's profile, and each batching
speedup (the largest batch's figure over batch 1's, or the stated speedup of an optimal batch)
with the simulated one. ``python benchmarks/bench_simulated.py`` prints the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .sim_zoo import simulated_counterpart
from .simulated import SimulatedDevice

DATA_PATH = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class Comparison:
    model: str
    card: str
    what: str  # "batch 64" or "speedup 1 -> 64"
    published: float
    simulated: float
    source: str

    @property
    def error(self) -> float:
        """Signed relative error of the simulated figure (0.1 = 10% above the published one)."""
        return self.simulated / self.published - 1


@lru_cache(maxsize=1)
def published() -> dict[str, Any]:
    return dict(json.loads(DATA_PATH.read_text()))


def _throughput(model: str, card: str, batch: int) -> float:
    device = SimulatedDevice(card, timing_noise=0.0)
    return device.workload(simulated_counterpart(model)).expected_throughput(batch)


def comparisons() -> list[Comparison]:
    """Every published figure and speedup beside its simulated value."""
    rows: list[Comparison] = []
    figures = published()["figures"]
    for figure in figures:
        model, card, batch = figure["model"], figure["card"], figure["batch"]
        rows.append(Comparison(model, card, f"batch {batch}" + (" (optimal)" if figure.get("optimal") else ""),
                               figure["samples_per_s"], _throughput(model, card, batch), figure["source"]))
        if "speedup_over_batch_1" in figure:
            speedup = figure["speedup_over_batch_1"]
        else:
            ones = [f for f in figures if (f["model"], f["card"], f["batch"]) == (model, card, 1)]
            if batch == 1 or not ones:
                continue
            speedup = figure["samples_per_s"] / ones[0]["samples_per_s"]
        simulated = _throughput(model, card, batch) / _throughput(model, card, 1)
        rows.append(Comparison(model, card, f"speedup 1 -> {batch}", speedup, simulated, figure["source"]))
    return rows


def calibration_errors() -> dict[str, float]:
    """The largest absolute relative error per card."""
    errors: dict[str, float] = {}
    for row in comparisons():
        errors[row.card] = max(errors.get(row.card, 0.0), abs(row.error))
    return errors


def markdown_table() -> str:
    lines = ["| model | card | figure | published | simulated | error |", "|---|---|---|---|---|---|"]
    for row in comparisons():
        fmt = "{:.2f}x" if row.what.startswith("speedup") else "{:,.0f} samples/s"
        lines.append(f"| {row.model} | {row.card} | {row.what} | {fmt.format(row.published)} | "
                     f"{fmt.format(row.simulated)} | {row.error:+.0%} |")
    return "\n".join(lines)
