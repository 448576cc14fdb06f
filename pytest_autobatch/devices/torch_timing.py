"""Throughput timing shared by the CPU and CUDA devices.

Like torch.utils.benchmark's ``adaptive_autorange``: warm up (cuDNN autotuning, allocator growth,
lazy initialisation), size blocks of iterations so one block takes ``block_s``, then time blocks by
wall clock until the spread (IQR / median) is below ``spread`` or ``max_time_s`` is spent. On CUDA
the device is synchronised at block ends only: a sync per iteration would time launch gaps, none at
all would time kernel launches. Every block's throughput is kept, raw, for the statistical gate.
Nothing global is changed: the CPU runs with whatever ``torch.get_num_threads()`` the user set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Protocol

from ..errors import ConfigError
from ..stats import summarize
from .base import whole_rate


@dataclass(frozen=True)
class TimingBudget:
    """How long to warm up and measure. The defaults suit a CI gate; tests pass ``FAST``."""

    warmup_s: float = 0.5
    warmup_iterations: int = 2
    block_s: float = 0.2
    min_blocks: int = 5
    max_blocks: int = 50
    max_time_s: float = 10.0
    spread: float = 0.05

    def __post_init__(self) -> None:
        if self.warmup_iterations < 1 or self.min_blocks < 1 or self.max_blocks < self.min_blocks:
            raise ConfigError(f"timing budget {self}: need warmup_iterations >= 1 and "
                              f"1 <= min_blocks <= max_blocks")
        if min(self.warmup_s, self.block_s, self.max_time_s, self.spread) < 0:
            raise ConfigError(f"timing budget {self}: times and spread must not be negative")

    @classmethod
    def coerce(cls, value: "TimingBudget | dict[str, Any] | None") -> "TimingBudget":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            try:
                return replace(cls(), **value)
            except TypeError as exc:
                raise ConfigError(f"timing option {value!r}: {exc}; fields are "
                                  f"{', '.join(cls.__dataclass_fields__)}") from None
        raise ConfigError(f"timing option {value!r}: give a TimingBudget or a dict of its fields")


#: A budget for tests: one warm-up iteration, three short blocks.
FAST = TimingBudget(warmup_s=0.0, warmup_iterations=1, block_s=0.01, min_blocks=3, max_blocks=3,
                    max_time_s=0.5, spread=1.0)


class Meter(Protocol):
    """Something read over the timed window only (an energy counter)."""

    def start(self) -> None: ...

    def stop(self) -> float | None: ...

    def method(self) -> str:
        """How the reading was taken, or why there is none."""


@dataclass(frozen=True)
class Timing:
    samples: list[float]
    """Items per second, one per timed block."""
    items: int
    """Items processed in the timed blocks (batches x batch size)."""
    seconds: float
    """Wall-clock seconds of the timed blocks."""
    metered: float | None = None
    """What the meter read over the timed blocks (joules), if a meter was given."""
    reference: list[float] = field(default_factory=list)
    """Units per second of the whole reference workload (one unit of each part), timed right after
    each block (when given)."""
    reference_parts: dict[str, list[float]] = field(default_factory=dict)
    """Units per second of each part of the reference, beside each block."""


def _timed(run: Callable[[], None], sync: Callable[[], None], iterations: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    sync()
    return time.perf_counter() - start


def _no_sync() -> None:
    pass


#: Each part's reference block runs at least this many units and this long: long enough to time,
#: short enough to sit right beside its model block (drift over a second hits both alike).
REFERENCE_UNITS = 3
REFERENCE_BLOCK_S = 0.015


def reference_rates(parts: Mapping[str, Callable[[], None]], sync: Callable[[], None]) -> dict[str, float]:
    """Units per second of one short block of each part of the reference workload."""
    rates = {}
    for name, unit in parts.items():
        units, elapsed = 0, 0.0
        while units < REFERENCE_UNITS or elapsed < REFERENCE_BLOCK_S:
            elapsed += _timed(unit, sync, 1)
            units += 1
        rates[name] = units / max(elapsed, 1e-9)
    return rates


def measure_throughput(run: Callable[[], None], items_per_run: int, *, budget: TimingBudget,
                       sync: Callable[[], None] | None = None, meter: Meter | None = None,
                       reference: Mapping[str, Callable[[], None]] | None = None) -> Timing:
    """Time ``run`` (one batch of ``items_per_run`` items) into per-block throughput samples.

    With a ``reference`` (its parts by name), a short block of each part follows each timed block,
    so each throughput sample has reference rates measured beside it (a meter's window then
    includes those blocks too).
    """
    sync = sync or _no_sync
    warm_runs, warm_seconds = 0, 0.0
    while warm_runs < budget.warmup_iterations or warm_seconds < budget.warmup_s:
        warm_seconds += _timed(run, sync, 1)
        warm_runs += 1
    per_run = warm_seconds / warm_runs
    block = max(1, math.ceil(budget.block_s / per_run)) if per_run > 0 else 1

    samples: list[float] = []
    references: list[float] = []
    parts: dict[str, list[float]] = {}
    seconds = 0.0
    if meter is not None:
        sync()
        meter.start()
    while len(samples) < budget.max_blocks:
        elapsed = _timed(run, sync, block)
        seconds += elapsed
        samples.append(block * items_per_run / max(elapsed, 1e-9))
        if reference is not None:
            rates = reference_rates(reference, sync)
            references.append(whole_rate(rates))
            for name, rate in rates.items():
                parts.setdefault(name, []).append(rate)
        if len(samples) >= budget.min_blocks and (summarize(samples).spread < budget.spread
                                                  or seconds >= budget.max_time_s):
            break
    metered = meter.stop() if meter is not None else None
    return Timing(samples=samples, items=len(samples) * block * items_per_run, seconds=seconds,
                  metered=metered, reference=references, reference_parts=parts)
