"""The batch-size search: the exact maximum batch that fits, and the batch with the best throughput.

Neither search knows what it runs: ``probe(b)`` returns peak bytes or raises an out-of-memory
error, ``measure(b)`` returns throughput samples. No torch here.

Maximum batch. The answer is certified, never estimated: ``max_batch`` has been probed and fit,
and ``max_batch + 1`` (when <= cap) has been seen to run out of memory. The memory model only
decides *where* to probe: memory measured on successful probes is fitted against the batch
(a line, a parabola once three peaks lie far enough apart) and, when the usable capacity is
known, the search jumps close to the predicted limit, then verifies it from both sides. Without
a capacity it grows geometrically (from ``start`` if given) until the first OOM; an
``errors.OutOfMemory`` that names the memory available supplies the capacity from then on,
otherwise the search bisects.
"""

from __future__ import annotations

import math
import numbers
import statistics
from dataclasses import dataclass, field
from typing import Callable

from .errors import ConfigError, NoBatchFits, OutOfMemory, is_oom_error

GiB = 1 << 30
# Peaks are reported in allocator blocks; two measurements closer than this say nothing about slope.
_MEMORY_GRANULARITY_BYTES = 2 << 20
# Fraction of a ``start`` prediction probed first: predicted memory ~30% low puts it ~43% high.
_START_SAFETY = 0.7
# Share of the memory at the limit assumed to grow with batch squared when only a line can be fitted.
_CURVATURE_PRIOR = 0.5
# Weight of the shift-one-peak view of the fit's error (see _MaxBatchSearch.extrapolate).
_LEVERAGE_WEIGHT = 0.25
# Peaks this many batches apart at least tell curvature from jitter (up to one sample each).
_CURVATURE_SPREAD = 2
# After an OOM, the next guess backs off at least this share of the bracket: an aim that overshot
# by a few batches would otherwise walk down one OOM at a time.
_OOM_BACKOFF_SHARE = 1 / 32
# Geometric growth (no trustworthy fit yet) goes to this share of a rough fit's limit, by a factor
# up to _GROWTH_LIMIT: two peaks a batch apart give the slope only to within its jitter.
_GROWTH_SHARE = 1 / 3
_GROWTH_LIMIT = 256.0
# A safe jump must cover this share of the distance to the predicted limit; shorter ones creep.
_MIN_JUMP_SHARE = 0.75


@dataclass(frozen=True)
class Probe:
    """One run of ``probe``: the batch and its peak bytes, None when it ran out of memory."""

    batch: int
    peak_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.peak_bytes is not None


@dataclass
class MaxBatchResult:
    """``max_batch`` fit and ``max_batch + 1`` ran out of memory (or ``max_batch`` is the cap).

    ``skipped`` would list batches proven too big without running them; the search only takes an
    observed OOM as proof (memory models guide it but never decide), so it stays empty.
    ``capacity_bytes``: the capacity the search went by, given or reported by an OOM (None: neither).
    """

    max_batch: int
    probes: list[Probe]
    ooms: int
    skipped: list[int] = field(default_factory=list)
    capacity_bytes: int | None = None

    @property
    def peak_bytes(self) -> int:
        """Peak memory measured at ``max_batch``."""
        return next(p.peak_bytes for p in self.probes if p.batch == self.max_batch and p.fits)


@dataclass
class OptimalBatchResult:
    optimal_batch: int
    throughput: float
    best_batch: int
    best_throughput: float
    measurements: dict[int, list[float]]
    tolerance: float = 0.03
    max_latency_s: float | None = None
    #: Batches that ran out of memory while being timed; the search then stayed below them.
    oom_batches: list[int] = field(default_factory=list)
    #: The largest batch the search could use: max_batch as asked, or lower after timing OOMs.
    max_batch: int | None = None

    def latency_s(self, batch: int) -> float:
        """Seconds per batch at ``batch``: the batch over its median throughput."""
        return batch / statistics.median(self.measurements[batch])


class _MemoryFit:
    """Peak memory against batch, fitted to successful probes: w + a*b (+ q*b**2, q >= 0).

    ``curved``: the curvature is measured from the points (three at least; a concave fit means
    none, since memory per sample does not shrink); otherwise it is a line and curvature unknown.
    """

    def __init__(self, points: dict[int, int], *, curved: bool):
        self.curved = curved
        coefficients = _least_squares(points, quadratic=True) if curved else None
        if coefficients is None or coefficients[2] < 0:
            coefficients = _least_squares(points, quadratic=False)
        self.coefficients = coefficients
        if coefficients is not None and self.slope(max(points)) <= 0:
            self.coefficients = None

    def slope(self, batch: float) -> float:
        _, linear, quadratic = self.coefficients
        return linear + 2 * quadratic * batch

    def limit(self, capacity: int) -> float | None:
        """The real batch at which fitted memory reaches ``capacity`` (None without a usable fit)."""
        if self.coefficients is None:
            return None
        constant, linear, quadratic = self.coefficients
        if quadratic > 0:
            discriminant = linear * linear + 4 * quadratic * (capacity - constant)
            if discriminant < 0:
                return None
            root = math.sqrt(discriminant)
            if linear > 0:  # the same root, in the form that does not cancel when curvature is tiny
                return 2 * (capacity - constant) / (linear + root)
            return (-linear + root) / (2 * quadratic)
        return (capacity - constant) / linear


def _least_squares(points: dict[int, int], *, quadratic: bool) -> tuple[float, float, float] | None:
    """Least-squares polynomial (degree 1 or 2) through ``points``, in scaled units for conditioning."""
    scale_x = max(points)
    scale_y = max(points.values()) or 1
    degree = 3 if quadratic else 2
    xs = [b / scale_x for b in points]
    ys = [p / scale_y for p in points.values()]
    # Normal equations: sum x^(i+j) c_j = sum x^i y.
    matrix = [[sum(x ** (i + j) for x in xs) for j in range(degree)] for i in range(degree)]
    vector = [sum(x ** i * y for x, y in zip(xs, ys)) for i in range(degree)]
    solution = _solve(matrix, vector)
    if solution is None:
        return None
    if not quadratic:
        solution.append(0.0)
    constant, linear, square = solution
    return constant * scale_y, linear * scale_y / scale_x, square * scale_y / scale_x ** 2


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    size = len(vector)
    rows = [row[:] + [value] for row, value in zip(matrix, vector)]
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(rows[r][column]))
        if abs(rows[pivot][column]) < 1e-12:
            return None
        rows[column], rows[pivot] = rows[pivot], rows[column]
        for r in range(column + 1, size):
            factor = rows[r][column] / rows[column][column]
            for c in range(column, size + 1):
                rows[r][c] -= factor * rows[column][c]
    solution = [0.0] * size
    for r in reversed(range(size)):
        solution[r] = (rows[r][size] - sum(rows[r][c] * solution[c] for c in range(r + 1, size))) / rows[r][r]
    return solution


class _MaxBatchSearch:
    """State of one maximum-batch search: ``low`` fits, ``high`` does not (None: none seen yet)."""

    def __init__(self, probe: Callable[[int], int], cap: int, capacity: int | None, start: int | None):
        self.probe = probe
        self.cap = cap
        self.capacity = capacity
        self.start = start
        self.probes: list[Probe] = []
        self.peaks: dict[int, int] = {}
        self.skipped: list[int] = []
        self.low = 0
        self.high: int | None = None
        self.last_oom: BaseException | None = None
        self.oom_streak = 0  # consecutive OOMs
        self.fit_streak = 0  # consecutive fits since the first OOM
        self.jumped = False  # the last guided guess was a safe jump, not an aim at the limit
        self.predicted_limit: float | None = None  # from the last fit, however rough

    def run(self) -> MaxBatchResult:
        if not self.attempt(1):
            raise NoBatchFits(_no_fit_message(self.last_oom, self.capacity))
        while self.low < self.cap and (self.high is None or self.high - self.low > 1):
            self.attempt(self.next_batch())
        return MaxBatchResult(self.low, self.probes, sum(not p.fits for p in self.probes), self.skipped,
                              self.capacity)

    def attempt(self, batch: int) -> bool:
        try:
            peak = self.probe(batch)
        except Exception as error:
            if not is_oom_error(error):
                raise
            self.last_oom = error
            if self.capacity is None and isinstance(error, OutOfMemory) and error.available_bytes:
                self.capacity = error.available_bytes  # the device told us: guide the rest by memory
            self.oom_streak += 1
            self.fit_streak = 0
            self.probes.append(Probe(batch, None))
            self.high = batch if self.high is None else min(self.high, batch)
            return False
        self.probes.append(Probe(batch, _checked_peak(peak, batch)))
        self.peaks[batch] = int(peak)
        self.low = max(self.low, batch)
        self.oom_streak = 0
        self.fit_streak += self.high is not None
        return True

    def next_batch(self) -> int:
        """Where to probe next: the model's guess, kept inside (low, high) and <= cap.

        Once bracketed, each surprise (an OOM where the model expected a fit, or the reverse) doubles
        how far the next guess must move from the side that surprised, up to bisection: a misled
        model costs O(log) probes, never a walk one batch at a time. After an OOM the guess also
        backs off _OOM_BACKOFF_SHARE of the bracket, so that the next probe likely fits and its
        peak, close to the limit, corrects the model.
        """
        jump_failed = self.oom_streak and self.jumped
        guess = self.guided_guess()
        if guess is None or jump_failed:
            # Nothing to go on, or a jump the model thought safe ran out of memory: the model is
            # wrong at this range, so split the bracket instead.
            guess = self.fallback_guess()
        if self.high is not None:
            middle = (self.low + self.high) // 2
            if self.oom_streak:
                backoff = max(2 ** (self.oom_streak - 1), int((self.high - self.low) * _OOM_BACKOFF_SHARE))
                guess = min(guess, max(self.high - backoff, middle))
            elif self.fit_streak:
                guess = max(guess, min(self.low + 2 ** (self.fit_streak - 1), middle))
        ceiling = self.cap if self.high is None else self.high - 1
        return min(max(guess, self.low + 1), ceiling)

    def fallback_guess(self) -> int:
        """Geometric growth until something fails (to _GROWTH_SHARE of a rough fit's limit, x2 to
        x_GROWTH_LIMIT, never past it), then bisection (geometric while the bracket is wide)."""
        if self.high is None:
            if self.start is not None and self.start > self.low and len(self.probes) == 1:
                return self.start
            if self.predicted_limit is None:
                return 2 * self.low
            factor = min(_GROWTH_LIMIT, max(2.0, _GROWTH_SHARE * self.predicted_limit / self.low))
            return min(int(factor * self.low), max(math.floor(self.predicted_limit), self.low + 1))
        if self.high > 4 * self.low:
            return int(math.sqrt(self.low * self.high))
        return (self.low + self.high) // 2

    def guided_guess(self) -> int | None:
        """Close to where the fitted memory reaches capacity, backed off by the fit's possible error.

        Each peak may be off by an allocator block plus one sample's memory, so the fitted slope is
        uncertain by that much over the fitted span; extrapolating past the last point multiplies
        it (and squares it for a parabola's curvature). A line cannot see curvature, so up to
        _CURVATURE_PRIOR of the memory at the limit may grow with batch squared. The more confident
        of the two fits wins. Within twice the resolution that memory can give, aim at the limit
        itself; otherwise jump as far as is safe; when nothing is safe, leave it to geometric
        growth or bisection.
        """
        self.jumped = False
        self.predicted_limit = None
        if self.capacity is None:
            return None
        if len(self.peaks) == 1:
            return self.first_jump()
        candidates = [self.extrapolate(_MemoryFit(self.peaks, curved=curved))
                      for curved in ((False, True) if self.curvature_measurable() else (False,))]
        candidates = [candidate for candidate in candidates if candidate is not None]
        if not candidates:
            return None
        error, limit, resolution = min(candidates)
        self.predicted_limit = limit
        if error <= 2 * resolution:
            return math.floor(limit)
        if error < (limit - self.low) * _MIN_JUMP_SHARE:
            self.jumped = True
            return math.floor(limit - error)
        return None

    def curvature_measurable(self) -> bool:
        """Three peaks at least _CURVATURE_SPREAD batches apart: closer ones differ by little more
        than their jitter, and a parabola through them (1, 2 and 512, say) bends at random."""
        spread = []
        for batch in sorted(self.peaks):
            if not spread or batch - spread[-1] >= _CURVATURE_SPREAD:
                spread.append(batch)
        return len(spread) >= 3

    def extrapolate(self, fit: _MemoryFit) -> tuple[float, float, float] | None:
        """(possible error, predicted limit, resolution) in batches; None without a usable fit.

        Each peak may be off by one sample's memory plus an allocator block. The error is the
        larger of two views of what that does to the limit: the slope's error over the fitted span
        carried over the distance still to go (squared for a parabola's curvature), and how far the
        limit moves when the peaks are shifted one at a time (root of the summed squares, weighted
        by _LEVERAGE_WEIGHT), which sees a fit resting on a few noisy points. A line also cannot
        see curvature: up to _CURVATURE_PRIOR of the memory at the limit may grow with batch squared.
        """
        limit = fit.limit(self.capacity)
        if limit is None:
            return None
        smallest = min(self.peaks)
        resolution = 1 + _MEMORY_GRANULARITY_BYTES / fit.slope(self.low)  # batches one block spans
        distance = max(limit - self.low, 0.0)
        reach = distance / (self.low - smallest)
        squares = 0.0
        for batch, peak in self.peaks.items():
            shifted = _MemoryFit({**self.peaks, batch: peak + fit.slope(batch) + _MEMORY_GRANULARITY_BYTES},
                                 curved=fit.curved).limit(self.capacity)
            if shifted is None:  # one peak's error could make memory look flat: no bound on the error
                squares = math.inf
                break
            squares += (shifted - limit) ** 2
        if fit.curved:
            error = max(resolution * (reach + reach * reach), _LEVERAGE_WEIGHT * math.sqrt(squares))
        else:
            error = max(resolution * reach, _LEVERAGE_WEIGHT * math.sqrt(squares))
            error += _CURVATURE_PRIOR * (limit - smallest) * distance / limit
        return error, limit, resolution

    def first_jump(self) -> int:
        """After batch 1 only: a safe fraction of the start prediction or of capacity / peak(1).

        Memory at b is at most b * peak(1) for a line, and with up to _CURVATURE_PRIOR of it
        curved the limit is still at least (1 - _CURVATURE_PRIOR) * capacity / peak(1).
        """
        self.jumped = True
        safe = int((1 - _CURVATURE_PRIOR) * self.capacity / max(self.peaks[1], 1))
        if self.start is not None:
            safe = max(safe, int(self.start * _START_SAFETY))
        return max(safe, 2)


def _checked_peak(peak: object, batch: int) -> int:
    if isinstance(peak, bool) or not isinstance(peak, numbers.Real) or not math.isfinite(peak) or peak < 0:
        raise ConfigError(f"probe({batch}) returned {peak!r}: it must return the peak memory in bytes "
                          f"(a number >= 0) and raise an out-of-memory error when the batch does not fit")
    return int(peak)


def _no_fit_message(error: BaseException | None, capacity: int | None) -> str:
    needed = error.needed_bytes if isinstance(error, OutOfMemory) else None
    available = error.available_bytes if isinstance(error, OutOfMemory) else None
    available = available if available is not None else capacity
    unit = _gib
    if needed is not None and available is not None and _gib(needed) == _gib(available):
        unit = "{:,} bytes".format
    amounts = [f"it needs {unit(needed)}"] if needed is not None else []
    if available is not None:
        amounts.append(f"{unit(available)} available")
    detail = ", ".join(amounts) if amounts else str(error)
    return (f"batch 1 does not fit in memory: {detail}. Use a smaller model, a lower precision, "
            f"or a device with more memory")


def _gib(size: int) -> str:
    return f"{size / GiB:.2f} GiB"


def predicted_max_batch(predict_peak_bytes: Callable[[int], int | None], capacity_bytes: int,
                        cap: int = 8192, *, predictions: int = 4) -> int | None:
    """The largest batch <= cap predicted to fit ``capacity_bytes`` (a ``start`` for
    find_max_batch); 0 when even batch 1 is predicted not to fit, None when there is no prediction.

    Secant steps through (1, peak(1)) and the latest estimate, so a handful of predictions is
    enough (each can cost a second on fake tensors): exact for linear memory, converging to the
    batch whose predicted peak meets the capacity when memory curves.
    """
    first = predict_peak_bytes(1)
    if first is None:
        return None
    if first > capacity_bytes:
        return 0
    estimate = min(16, cap)
    for _ in range(predictions - 1):
        if estimate == 1:
            return 1
        predicted = predict_peak_bytes(estimate)
        if predicted is None:
            return None
        per_sample = (predicted - first) / (estimate - 1)
        if per_sample <= 0:
            return cap
        refined = max(1, min(cap, 1 + int((capacity_bytes - first) / per_sample)))
        if refined == estimate:
            break
        estimate = refined
    return estimate


def find_max_batch(probe: Callable[[int], int], *, cap: int = 8192, capacity_bytes: int | None = None,
                   start: int | None = None) -> MaxBatchResult:
    """The exact largest batch <= ``cap`` that fits; see the module docstring."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ConfigError(f"cap must be an integer >= 1 (the largest batch to try), got {cap!r}")
    if capacity_bytes is not None and not capacity_bytes > 0:
        raise ConfigError(f"capacity_bytes must be > 0 or None (unknown), got {capacity_bytes!r}")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 1):
        raise ConfigError(f"start must be an integer >= 1 or None, got {start!r}")
    return _MaxBatchSearch(probe, cap, capacity_bytes, start).run()


# Refinement stops once neighbouring measured batches are this close (ratio): throughput around a
# peak or a tolerance crossing changes little within a few percent of batch size.
_PEAK_RESOLUTION = 1.05
_CROSSING_RESOLUTION = 1.1


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


def find_optimal_batch(measure: Callable[[int], list[float]], *, max_batch: int, tolerance: float = 0.03,
                       max_latency_s: float | None = None) -> OptimalBatchResult:
    """The smallest batch within ``tolerance`` of the best throughput, among batches meeting the latency limit.

    A geometric sweep 1, 2, 4, ... max_batch (stopping at the first batch over the latency limit),
    then a geometric golden-section-like refinement around the best batch (throughput can rise,
    saturate and fall), then bisection of the crossing into the tolerance band.
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be a fraction in [0, 1) (0.03 = within 3% of the best), "
                          f"got {tolerance!r}")
    if max_latency_s is not None and not max_latency_s > 0:
        raise ConfigError(f"max_latency_s must be > 0 seconds or None, got {max_latency_s!r}")
    measured: dict[int, list[float]] = {}
    oom_batches: list[int] = []

    def measure_once(batch: int) -> list[float]:
        if batch not in measured:
            try:
                measured[batch] = measure(batch)
            except Exception as exc:
                if is_oom_error(exc):
                    oom_batches.append(batch)
                raise
        return measured[batch]

    while True:
        try:
            result = _optimal_batch(measure_once, max_batch, tolerance, max_latency_s)
        except Exception as exc:
            # Timing runs more steps than a probe: fragmentation or autotuning can tip a batch at
            # the memory edge over. Search again below it, reusing what was measured; bisect between the largest batch timed and the one that failed: a few OOMs at most.
            if not is_oom_error(exc) or not oom_batches:
                raise
            failed = min(oom_batches)
            max_batch = (max((b for b in measured if b < failed), default=0) + failed) // 2
            if max_batch < 1:
                raise NoBatchFits(f"batch 1 ran out of memory while being timed ({exc})") from exc
            continue
        result.oom_batches = sorted(oom_batches)
        return result


def _optimal_batch(measure: Callable[[int], list[float]], max_batch: int, tolerance: float,
                   max_latency_s: float | None) -> OptimalBatchResult:
    sweep = _ThroughputSweep(measure, max_latency_s)
    batch = 1
    while True:
        sweep.run(batch)
        if not sweep.feasible(batch) or batch == max_batch:
            break
        batch = min(2 * batch, max_batch)
    if not sweep.feasible(1):
        raise ConfigError(f"no batch meets max_latency_s={max_latency_s}: batch 1 takes "
                          f"{1 / sweep.medians[1]:.4g} s; raise the limit")
    _refine_peak(sweep)
    optimal = _refine_crossing(sweep, tolerance)
    best = sweep.best()
    return OptimalBatchResult(optimal, sweep.medians[optimal], best, sweep.medians[best], sweep.samples,
                              tolerance, max_latency_s, max_batch=max_batch)


def _refine_peak(sweep: _ThroughputSweep) -> None:
    """Narrow the gaps on both sides of the best batch, the wider gap first."""
    while True:
        best = sweep.best()
        gaps = [(high / low, low, high) for low, high in zip((sweep.neighbours(best)[0], best),
                                                              (best, sweep.neighbours(best)[1]))
                if low is not None and high is not None and _between(low, high) is not None]
        gaps = [gap for gap in gaps if gap[0] > _PEAK_RESOLUTION]
        if not gaps:
            return
        _, low, high = max(gaps)
        sweep.run(_between(low, high))


def _refine_crossing(sweep: _ThroughputSweep, tolerance: float) -> int:
    """The smallest measured batch within tolerance of the best, after bisecting the crossing below it."""
    while True:
        threshold = (1 - tolerance) * sweep.medians[sweep.best()]
        optimal = min(b for b in sweep.medians if sweep.feasible(b) and sweep.medians[b] >= threshold)
        below = sweep.neighbours(optimal)[0]
        middle = None if below is None or optimal / below <= _CROSSING_RESOLUTION else _between(below, optimal)
        if middle is None:
            return optimal
        sweep.run(middle)
