"""The optimal batch: the smallest batch within a band of the best throughput.

``measure(b)`` returns raw throughput samples (samples/s); the sweep keeps every one. No torch here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError, NoBatchFits, catch_oom
from .tuning import DEFAULT, Tuning


@dataclass
class OptimalBatchResult:
    optimal_batch: int
    throughput: float
    best_batch: int
    best_throughput: float
    measurements: dict[int, list[float]]
    band: float = 0.03
    max_latency_s: float | None = None
    #: Batches that ran out of memory while being timed; the search then stayed below them.
    oom_batches: list[int] = field(default_factory=list)
    #: The largest batch the search could use: max_batch as asked, or lower after timing OOMs.
    max_batch: int | None = None

    def latency_s(self, batch: int) -> float:
        """Seconds per batch at ``batch``: the batch over its median throughput."""
        return batch / statistics.median(self.measurements[batch])


class _ThroughputSweep:
    """Measured batches and their medians; a batch over the latency limit counts as infeasible."""

    def __init__(self, measure: Callable[[int], list[float]], max_latency_s: float | None):
        self.measure = measure
        self.max_latency_s = max_latency_s
        self.samples: dict[int, list[float]] = {}
        self.medians: dict[int, float] = {}

    def run(self, batch: int) -> float:
        samples = list(self.measure(batch))
        if not samples:
            raise ConfigError(f"measure({batch}) returned no samples: it must return a non-empty list of "
                              f"throughputs in samples per second")
        for value in samples:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"measure({batch}) returned {value!r} among its samples: throughputs must be "
                                  f"finite numbers > 0 (samples per second)")
        self.samples[batch] = samples
        self.medians[batch] = statistics.median(samples)
        return self.medians[batch]

    def feasible(self, batch: int) -> bool:
        return self.max_latency_s is None or batch / self.medians[batch] <= self.max_latency_s

    def best(self) -> int:
        return max((b for b in self.medians if self.feasible(b)), key=lambda b: (self.medians[b], -b))

    def neighbours(self, batch: int) -> tuple[int | None, int | None]:
        below = max((b for b in self.medians if b < batch), default=None)
        above = min((b for b in self.medians if b > batch), default=None)
        return below, above


def _between(low: int, high: int) -> int | None:
    """The integer strictly between ``low`` and ``high`` nearest their geometric mean, if any."""
    if high - low < 2:
        return None
    return min(max(round(math.sqrt(low * high)), low + 1), high - 1)


class _OomWhileTiming(Exception):
    """A batch ran out of memory while being timed: the sweep starts again below it."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def find_optimal_batch(measure: Callable[[int], list[float]], *, max_batch: int, band: float = 0.03,
                       max_latency_s: float | None = None, min_batch: int = 1,
                       tuning: Tuning = DEFAULT) -> OptimalBatchResult:
    """The smallest batch within ``band`` of the best throughput, among batches meeting the latency limit.

    A geometric sweep min_batch (1 unless the model needs more), 2 min_batch, 4 min_batch, ...
    max_batch (stopping at the first batch over the latency limit), then a geometric
    golden-section-like refinement around the best batch (throughput can rise, saturate and
    fall), then bisection of the crossing into the band.

    Timing runs more steps than a probe: fragmentation or autotuning can tip a batch at the memory
    edge over. The sweep then starts again below it, reusing what was measured, with the new
    ceiling halfway between the largest batch timed and the one that failed: a few OOMs at most.
    """
    if isinstance(min_batch, bool) or not isinstance(min_batch, int) or min_batch < 1:
        raise ConfigError(f"min_batch must be an integer >= 1, got {min_batch!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < min_batch:
        raise ConfigError(f"max_batch must be an integer >= {min_batch} (min_batch), got {max_batch!r}")
    if not 0 <= band < 1:
        raise ConfigError(f"band must be a fraction in [0, 1) (0.03 = within 3% of the best), "
                          f"got {band!r}")
    if max_latency_s is not None and not max_latency_s > 0:
        raise ConfigError(f"max_latency_s must be > 0 seconds or None, got {max_latency_s!r}")
    measured: dict[int, list[float]] = {}
    oom_batches: list[int] = []

    def measure_once(batch: int) -> list[float]:
        if batch not in measured:
            with catch_oom() as caught:
                measured[batch] = measure(batch)
            if caught.error is not None:
                oom_batches.append(batch)
                raise _OomWhileTiming(caught.error)
        return measured[batch]

    while True:
        try:
            result = _optimal_batch(measure_once, max_batch, band, max_latency_s, tuning, min_batch)
        except _OomWhileTiming as oom:
            failed = min(oom_batches)
            max_batch = (max((b for b in measured if b < failed), default=min_batch - 1) + failed) // 2
            if max_batch < min_batch:
                raise NoBatchFits(f"batch {min_batch} ran out of memory while being timed ({oom.error})") \
                    from oom.error
            continue
        result.oom_batches = sorted(oom_batches)
        return result


def _optimal_batch(measure: Callable[[int], list[float]], max_batch: int, band: float,
                   max_latency_s: float | None, tuning: Tuning, min_batch: int = 1) -> OptimalBatchResult:
    sweep = _ThroughputSweep(measure, max_latency_s)
    batch = min_batch
    while True:
        sweep.run(batch)
        if not sweep.feasible(batch) or batch == max_batch:
            break
        batch = min(2 * batch, max_batch)
    if not sweep.feasible(min_batch):
        raise ConfigError(f"no batch meets max_latency_s={max_latency_s}: batch {min_batch} takes "
                          f"{min_batch / sweep.medians[min_batch]:.4g} s; raise the limit")
    _refine_peak(sweep, tuning.peak_resolution)
    optimal = _refine_crossing(sweep, band, tuning.crossing_resolution)
    best = sweep.best()
    return OptimalBatchResult(optimal, sweep.medians[optimal], best, sweep.medians[best], sweep.samples,
                              band, max_latency_s, max_batch=max_batch)


def _refine_peak(sweep: _ThroughputSweep, resolution: float) -> None:
    """Narrow the gaps on both sides of the best batch, the wider gap first."""
    while True:
        best = sweep.best()
        gaps = [(high / low, low, high) for low, high in zip((sweep.neighbours(best)[0], best),
                                                              (best, sweep.neighbours(best)[1]))
                if low is not None and high is not None and _between(low, high) is not None]
        gaps = [gap for gap in gaps if gap[0] > resolution]
        if not gaps:
            return
        _, low, high = max(gaps)
        middle = _between(low, high)
        assert middle is not None  # gaps holds only pairs with a batch between them
        sweep.run(middle)


def _refine_crossing(sweep: _ThroughputSweep, band: float, resolution: float) -> int:
    """The smallest measured batch within ``band`` of the best, after bisecting the crossing below it."""
    while True:
        threshold = (1 - band) * sweep.medians[sweep.best()]
        optimal = min(b for b in sweep.medians if sweep.feasible(b) and sweep.medians[b] >= threshold)
        below = sweep.neighbours(optimal)[0]
        middle = None if below is None or optimal / below <= resolution else _between(below, optimal)
        if middle is None:
            return optimal
        sweep.run(middle)
