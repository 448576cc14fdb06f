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

    def __init__(self, measure: Callable[[int, int], list[float]], max_latency_s: float | None):
        self.measure = measure
        self.max_latency_s = max_latency_s
        self.samples: dict[int, list[float]] = {}
        self.calls: dict[int, list[int]] = {}   # samples per measure() call, per batch
        self.medians: dict[int, float] = {}

    def run(self, batch: int) -> float:
        """Measure ``batch`` (again: its samples are pooled) and return its median throughput."""
        samples = list(self.measure(batch, len(self.calls.get(batch, []))))
        self.calls.setdefault(batch, []).append(len(samples))
        if not samples:
            raise ConfigError(f"measure({batch}) returned no samples: it must return a non-empty list of "
                              f"throughputs in samples per second")
        for value in samples:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"measure({batch}) returned {value!r} among its samples: throughputs must be "
                                  f"finite numbers > 0 (samples per second)")
        self.samples[batch] = self.samples.get(batch, []) + samples
        self.medians[batch] = statistics.median(self.samples[batch])
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

    Without a latency limit: max_batch and min_batch (1 unless the model needs more) first, then
    only where a model of the step time puts the peak and the band crossing (``_modelled``). With
    one (or with ``tuning.throughput_model`` off): a geometric sweep min_batch, 2 min_batch,
    4 min_batch, ... max_batch (stopping at the first batch over the latency limit), then a
    geometric golden-section-like refinement around the best batch (throughput can rise,
    saturate and fall), then bisection of the crossing into the band.

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
    measured: dict[int, list[list[float]]] = {}   # every call's samples, per batch
    oom_batches: list[int] = []

    def measure_once(batch: int, call: int = 0) -> list[float]:
        """The ``call``-th measurement of ``batch``: one already made (before an OOM restarted the
        search) is not made again."""
        while len(measured.get(batch, [])) <= call:
            with catch_oom() as caught:
                samples = measure(batch)
            if caught.error is not None:
                oom_batches.append(batch)
                raise _OomWhileTiming(caught.error)
            measured.setdefault(batch, []).append(samples)
        return measured[batch][call]

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


def _optimal_batch(measure: Callable[[int, int], list[float]], max_batch: int, band: float,
                   max_latency_s: float | None, tuning: Tuning, min_batch: int = 1) -> OptimalBatchResult:
    sweep = _ThroughputSweep(measure, max_latency_s)
    if tuning.throughput_model and max_latency_s is None:
        optimal = _modelled(sweep, min_batch, max_batch, band, tuning)
        best = sweep.best()
        return OptimalBatchResult(optimal, sweep.medians[optimal], best, sweep.medians[best], sweep.samples,
                                  band, max_latency_s, max_batch=max_batch)
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


def _modelled(sweep: _ThroughputSweep, min_batch: int, max_batch: int, band: float, tuning: Tuning) -> int:
    """The largest batch and the smallest (``min_batch``, 1 unless the model needs more) first, then
    only where a model of the step time says the peak and the band crossing are; the smallest
    measured batch within ``band`` of the best measured.

    Seconds per step s(b) = b / throughput(b) is close to a line in b (a fixed overhead plus a
    cost per sample, the overhead dominating until the device saturates) and bends upwards past a
    knee where memory contends. Throughput therefore rises to the largest batch unless a measured
    batch beats it: then the peak lies between that batch's neighbours and is narrowed there. The
    crossing into the band is where the line through the step times of its two measured neighbours
    meets the band's throughput; it is measured there until the neighbours are close.
    """
    sweep.run(max_batch)
    if max_batch > min_batch:
        sweep.run(min_batch)
    aimed: list[int] = []   # batches measured where the model put the crossing
    while True:
        batch = _peak_step(sweep, tuning.peak_resolution, tuning.peak_margin)
        if batch is None and len(aimed) < tuning.crossing_steps:
            batch = _crossing_step(sweep, band, tuning.crossing_resolution, aimed)
            if batch is not None:
                aimed.append(batch)
        if batch is None or batch in sweep.medians:
            break
        sweep.run(batch)
    _decide_best(sweep, tuning.peak_margin, tuning.decide_rounds)
    threshold = (1 - band) * sweep.medians[sweep.best()]
    return min(b for b in sweep.medians if sweep.medians[b] >= threshold)


def _decide_best(sweep: _ThroughputSweep, margin: float, rounds: int) -> None:
    """Measure the best and its closest rival again, up to ``rounds`` times, while the rival is within
    ``margin`` of it: a close call between medians of a few samples is decided by noise."""
    for _ in range(rounds):
        best = sweep.best()
        close = [b for b in sweep.medians if b != best and sweep.medians[b] >= sweep.medians[best] / (1 + margin)]
        if not close:
            return
        for batch in (best, max(close, key=lambda b: sweep.medians[b])):   # the best and its closest rival
            sweep.run(batch)


def _peak_step(sweep: _ThroughputSweep, resolution: float, margin: float) -> int | None:
    """Where the peak may be, when a measured batch beats the largest by more than ``margin``;
    None when the largest wins, or when the best's neighbours come within ``margin`` of it (the
    curve is flat there: noise, not a peak, decides which of them measured highest)."""
    best = sweep.best()
    below, above = sweep.neighbours(best)
    top = sweep.medians[best]
    if above is None or top <= (1 + margin) * sweep.medians[max(sweep.medians)]:
        return None
    knee = _knee(sweep, best)
    if knee is not None and knee[0] > (1 + margin) * top:   # the lines say the peak is well above
        return knee[1]
    gaps = [(high / low, low, high) for low, high in ((below, best), (best, above))
            if low is not None and _between(low, high) is not None and high / low > resolution
            and sweep.medians[low if high == best else high] < (1 - margin) * top]
    if not gaps:
        return None
    if knee is not None and any(low < knee[1] < high for _, low, high in gaps):
        return knee[1]
    _, low, high = max(gaps)
    return _between(low, high)


def _knee(sweep: _ThroughputSweep, best: int) -> tuple[float, int] | None:
    """(throughput, batch) where the step-time lines on either side of the peak meet: the knee, if
    the measured batches around ``best`` place it, unmeasured, between best's neighbours (best on
    its left or on its right)."""
    batches = sorted(sweep.medians)
    at = batches.index(best)
    step = {b: b / sweep.medians[b] for b in batches}

    def meet(left: tuple[int, int], right: tuple[int, int], within: tuple[int, int]) -> tuple[float, float] | None:
        """(throughput, batch) where the line through ``left`` meets the one through ``right``."""
        (a, b), (c, d) = left, right
        slope_left = (step[b] - step[a]) / (b - a)
        slope_right = (step[d] - step[c]) / (d - c)
        if slope_right <= slope_left:
            return None
        x = (step[c] - slope_right * c - step[a] + slope_left * a) / (slope_left - slope_right)
        if not within[0] < x < within[1]:
            return None
        return x / (step[a] + slope_left * (x - a)), x

    candidates = []
    if 1 <= at and at + 2 < len(batches):   # best left of the knee
        candidates.append(meet((batches[at - 1], best), (batches[at + 1], batches[at + 2]),
                               (best, batches[at + 1])))
    if 2 <= at and at + 1 < len(batches):   # best right of the knee
        candidates.append(meet((batches[at - 2], batches[at - 1]), (best, batches[at + 1]),
                               (batches[at - 1], best)))
    found = [(throughput, round(x)) for throughput, x in (c for c in candidates if c is not None)
             if round(x) not in sweep.medians]
    return max(found) if found else None


def _crossing_step(sweep: _ThroughputSweep, band: float, resolution: float, aimed: list[int]) -> int | None:
    """Where the step-time line through the crossing's neighbours meets the band; None when they are
    close, or when the batch aimed at last landed inside the band and nothing below it can be.

    Step time bends upwards (a launch-bound flat stretch, then a cost per sample; a knee), and a
    line through a bend lies above it: its aim can overshoot the crossing. Step time never falls
    as the batch grows, though, so no batch below threshold * s(below) reaches the band; when the
    line's aim landed inside, that floor is measured before the aim is believed: inside the band, it
    is the crossing; below it, the line through it and the aim either agrees with the aim (a
    straight stretch: done) or aims lower.
    """
    threshold = (1 - band) * sweep.medians[sweep.best()]
    inside = min(b for b in sweep.medians if sweep.medians[b] >= threshold)
    below = sweep.neighbours(inside)[0]
    if below is None or inside / below <= resolution or _between(below, inside) is None:
        return None
    step_below, step_inside = below / sweep.medians[below], inside / sweep.medians[inside]
    if aimed and aimed[-1] == inside:
        floor = math.ceil(threshold * step_below)
        return floor if below < floor < inside else None
    slope = (step_inside - step_below) / (inside - below)
    # b / (step_below + slope * (b - below)) = threshold, solved for b.
    denominator = 1 - threshold * slope
    if denominator <= 0:
        return _between(below, inside)
    crossing = threshold * (step_below - slope * below) / denominator
    if inside in aimed and inside <= resolution * crossing:
        return None   # the line through the floor below still puts the crossing at its earlier aim
    return min(max(math.ceil(crossing), below + 1), inside - 1)
