"""The batch-by-length frontier: the exact maximum batch at each length of a sequence workload.

A length is a point ``(prompt_tokens, new_tokens)`` (``new_tokens`` 0 for a forward pass over a
sequence). The searches at the points share what they learnt, in three ways:

- **Bounds.** The maximum batch does not grow with length: a point at least as long in both
  coordinates as one already searched takes no larger a batch, a shorter one no smaller.
- **A memory model in tokens.** Where the workload predicts its peak (``predict_at``), each
  length's predictions give a parabola in the batch (static memory, memory per sample, and what
  curves with the batch), and the measured peaks scale its batch-dependent part: at a point, by
  the ratio measured at its largest fit (and along the chord to an OOM that named its need);
  before any probe there, by the ratio interpolated between the lengths measured (the larger of
  the two where they disagree beyond one sample's memory; beyond the lengths measured, never
  below 1). Without predictions, every peak at every point is fitted as ``static + b *
  (per_sample + per_token * T + per_token_squared * T**2) + squared * b**2`` (as many terms as
  the lengths and peaks measured tell apart). The model's limit at the next point is probed
  first, then the batch above it: two probes and one OOM when the model is right. A guess no
  measurement backs (the first point's) is checked below first, and the first peak at a point
  anchors the next guess there.
- **The order.** The longest point first (the worst case; from ``start`` or the predictions alone,
  or as the caller ``searched`` it), then the shortest, then each time the point farthest in
  tokens from those done, so that the model interpolates rather than extrapolates.

When a few guesses at a point have not closed its bracket, ``find_max_batch`` finishes from there
(started at the largest fit there, else a longer point's maximum or ``start``; capped below the
smallest OOM seen at that point), with the probes already made at the point answered again
without running. Certification is that of ``find_max_batch``, at every point: the answer was
probed there and fit, and the next batch was probed there and ran out of memory (or the answer is
the cap). The model and the bounds choose where to probe, never the answer. No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import ConfigError, NoBatchFits, OutOfMemory, catch_oom
from .bracket import Bracket, Probe
from .guide import predicted_max_batch
from .max_batch import find_max_batch
from .memory_fit import MemoryFit, fit_columns
from .tuning import DEFAULT, Tuning

#: (prompt_tokens, new_tokens)
Point = tuple[int, int]
ProbeAt = Callable[[Point], Callable[[int], int]]
PredictAt = Callable[[Point], Callable[[int], "int | None"]]

#: Probes one point may spend on the model's guesses before find_max_batch takes over.
GUESSES_PER_POINT = 6


@dataclass
class FrontierPoint:
    """The maximum batch at one point, the probes run there (in order), and the model's first guess."""

    prompt_tokens: int
    new_tokens: int
    max_batch: int
    probes: list[Probe]
    predicted: int | None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def ooms(self) -> int:
        return sum(not probe.fits for probe in self.probes)


@dataclass
class FrontierResult:
    """One ``FrontierPoint`` per point, in the order the points were given."""

    points: list[FrontierPoint]
    capacity_bytes: int | None = None

    @property
    def probes(self) -> int:
        return sum(len(point.probes) for point in self.points)

    @property
    def ooms(self) -> int:
        return sum(point.ooms for point in self.points)


def frontier_points(prompt_tokens: Sequence[int], new_tokens: Sequence[int] = (0,)) -> list[Point]:
    """Every (prompt, new tokens) pair of the two lists, checked: positive integers (new tokens may
    be 0 for a forward pass), each list non-empty and without repeats."""
    for name, values, smallest in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 0)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"{name} must be a non-empty list of token counts, got {values!r}")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                kind = "a positive integer" if smallest else "an integer >= 0"
                raise ConfigError(f"{name} must hold token counts, each {kind}; got {value!r} in {list(values)!r}")
        if len(set(values)) != len(values):
            raise ConfigError(f"{name} lists a length twice: {list(values)!r}; list each length once")
    return [(prompt, new) for prompt in prompt_tokens for new in new_tokens]


def search_order(points: Sequence[Point]) -> list[Point]:
    """Longest first, then shortest, then each time the point farthest in tokens from those done."""
    remaining = sorted(set(points), key=lambda point: (-sum(point), point))
    order = [remaining.pop(0)]
    if remaining:
        order.append(remaining.pop())
    while remaining:
        farthest = max(remaining, key=lambda point: min(abs(sum(point) - sum(done)) for done in order))
        remaining.remove(farthest)
        order.append(farthest)
    return order


#: (static bytes, bytes per sample, bytes per sample squared) at one length
Line = tuple[float, float, float]


@dataclass(frozen=True)
class Shape:
    """The workload's predicted peak at one length: ``static + linear * b + squared * b**2``."""

    static: float
    linear: float
    squared: float

    def dynamic(self, batch: int) -> float:
        return self.linear * batch + self.squared * batch * batch

    def largest_within(self, room: float) -> int:
        """The largest batch whose batch-dependent memory is at most ``room`` bytes."""
        if room <= 0:
            return 0
        root = math.sqrt(self.linear * self.linear + 4 * self.squared * room)
        return math.floor(2 * room / (self.linear + root))


def predicted_shape(predict: Callable[[int], int | None], capacity: int, cap: int, min_batch: int) -> Shape | None:
    """The parabola through the workload's predictions at ``min_batch``, its predicted maximum and
    half-way (a line when the three bend the wrong way); None without predictions that grow."""
    far = max(predicted_max_batch(predict, capacity, cap, smallest=min_batch) or 0, min_batch + 2)
    middle = (min_batch + far) // 2
    first, half, last = predict(min_batch), predict(middle), predict(far)
    if first is None or half is None or last is None or last <= first:
        return None
    rising, later = (half - first) / (middle - min_batch), (last - half) / (far - middle)
    squared = max(0.0, (later - rising) / (far - min_batch))
    linear = rising - squared * (min_batch + middle) if squared else (last - first) / (far - min_batch)
    if linear + squared * min_batch <= 0:   # memory must grow from the smallest batch on
        return None
    return Shape(first - linear * min_batch - squared * min_batch * min_batch, linear, squared)


def local_limit(points: dict[int, int], capacity: int) -> int | None:
    """The limit that the peaks measured at one point give on their own, a parabola through three
    or more; None with fewer or without a usable fit."""
    if len(points) < 3:
        return None
    limit = MemoryFit(points, curved=True).limit(capacity)
    return None if limit is None or not math.isfinite(limit) else max(0, math.floor(limit))


class TokenMemory:
    """Peak bytes against batch and tokens from every peak measured at every point: the workload's
    own predictions at each length (``shape_at``) scaled to the measured peaks where it predicts,
    else a least-squares fit in tokens. An estimate is "measured" when it rests on a peak measured
    here or at another length, not on a bare prediction."""

    def __init__(self, shape_at: Callable[[int, int], Shape | None] | None = None, granularity: int = 0) -> None:
        self.peaks: dict[tuple[int, int], int] = {}   # (batch, tokens) -> peak bytes
        self.shape_at = shape_at
        self.granularity = granularity   # bytes an allocator block blurs a peak by

    def add(self, batch: int, tokens: int, peak: int) -> None:
        self.peaks[(batch, tokens)] = peak

    @property
    def lengths(self) -> list[int]:
        return sorted({tokens for _, tokens in self.peaks})

    def ratio(self, tokens: int, capacity: int) -> float | None:
        """Measured over predicted batch-dependent memory at ``tokens``, from the largest batch measured
        at each length: interpolated between the nearest lengths measured when they agree within
        what one sample's memory and an allocator block blur, else the larger; beyond the lengths
        measured, the nearest's, but not below 1 (a correction that lowers memory is not carried
        past what was measured). None before any length with a prediction is measured."""
        assert self.shape_at is not None
        ratios: dict[int, tuple[float, float]] = {}   # tokens -> (ratio, blur)
        for length in self.lengths:
            shape = self.shape_at(length, capacity)
            batch = max(b for b, t in self.peaks if t == length)
            dynamic = shape.dynamic(batch) if shape is not None else 0.0
            if shape is not None and dynamic > 0:
                ratio = (self.peaks[(batch, length)] - shape.static) / dynamic
                ratios[length] = ratio, ratio / batch + self.granularity / dynamic
        below = [length for length in ratios if length <= tokens]
        above = [length for length in ratios if length >= tokens]
        if not below or not above:
            nearest = [max(below)] if below else [min(above)] if above else []
            return max(1.0, ratios[nearest[0]][0]) if nearest else None
        shorter, longer = max(below), min(above)
        (low, low_blur), (high, high_blur) = ratios[shorter], ratios[longer]
        if shorter == longer or abs(high - low) > low_blur + high_blur:
            return max(low, high)
        return low + (high - low) * (tokens - shorter) / (longer - shorter)

    def scaled_limit(self, tokens: int, capacity: int, local: dict[int, int],
                     over: tuple[int, int] | None) -> tuple[int, bool] | None:
        """The largest batch the workload's prediction at ``tokens``, scaled by the measured peaks,
        puts within ``capacity``, and whether a measurement backs it; None without a prediction.

        Anchored at the largest batch that fit here (``local``: batch -> peak; else at the predicted
        static memory), scaled by the largest of the ratios measured: at the anchor, along the
        chord to the OOM here that named its need (``over``: batch, bytes; a lower bound where the
        need is the allocation that crossed), or, with nothing measured here, at the other lengths."""
        shape = self.shape_at(tokens, capacity) if self.shape_at is not None else None
        if shape is None:
            return None
        anchor = max(local, default=0)
        base = local[anchor] if local else shape.static
        ratios = [(base - shape.static) / shape.dynamic(anchor)] if local else []
        if over is not None:
            batch, needed = over
            ratios.append((needed - base) / (shape.dynamic(batch) - shape.dynamic(anchor)))
        measured = self.ratio(tokens, capacity) if not local else None
        ratios += [] if measured is None else [measured]
        ratio = max(ratios, default=1.0)
        if not ratio > 0:
            return None
        return shape.largest_within(shape.dynamic(anchor) + (capacity - base) / ratio), bool(ratios)

    def fitted(self, tokens: int) -> Line | None:
        """(static, per sample, per sample squared) at ``tokens`` from the measured peaks: static +
        b * (per_sample + per_token * T + per_token_squared * T**2) + b**2 * squared, with as many
        per-token terms as the distinct lengths measured tell apart (one length: all of it per
        token), and the batch-squared term once there are peaks to spare and it is not negative.
        None without a fit."""
        powers = {1: (1,), 2: (0, 1)}.get(len(self.lengths), (0, 1, 2))
        keys = list(self.peaks)
        columns = [[1.0] * len(keys)] + [[float(b * t ** power) for b, t in keys] for power in powers]
        values = [float(self.peaks[key]) for key in keys]
        if len(keys) >= len(columns) + 3:
            curved = fit_columns(columns + [[float(b * b) for b, _ in keys]], values)
            if curved is not None and curved[-1] >= 0:
                return self._at(curved[:-1], powers, tokens, curved[-1])
        if len(keys) < len(columns):
            return None
        solution = fit_columns(columns, values)
        return None if solution is None else self._at(solution, powers, tokens, 0.0)

    @staticmethod
    def _at(solution: list[float], powers: tuple[int, ...], tokens: int, squared: float) -> Line:
        return solution[0], sum(term * tokens ** power for term, power in zip(solution[1:], powers)), squared

    def fitted_limit(self, tokens: int, capacity: int, local: dict[int, int]) -> tuple[int, bool] | None:
        """The largest batch the fit in tokens puts within ``capacity`` at ``tokens`` (a parabola
        through the peaks here once there are three; the per-sample memory pinned by the largest
        peak here once there is one), and whether it is measured (here, or at two lengths)."""
        local_only = local_limit(local, capacity)
        if local_only is not None:
            return local_only, True
        fitted = self.fitted(tokens)
        if fitted is None:
            return None
        static, per_sample, squared = fitted
        if local:
            batch = max(local)
            per_sample = (local[batch] - static) / batch - squared * batch
        if not per_sample > 0 or not math.isfinite(per_sample):
            return None
        measured = bool(local) or len(self.lengths) >= 2
        return Shape(static, per_sample, max(squared, 0.0)).largest_within(capacity - static), measured


@dataclass
class _PointSearch:
    """The probes at one point: real ones recorded in order, and replayed to find_max_batch."""

    point: Point
    probe: Callable[[int], int]
    bracket: Bracket
    seen: dict[int, int | BaseException] = field(default_factory=dict)

    def attempt(self, batch: int) -> None:
        with catch_oom() as caught:
            peak = self.probe(batch)
        if caught.error is not None:
            self.seen[batch] = caught.error
            self.bracket.record_oom(batch, caught.error)
        else:
            self.seen[batch] = peak
            self.bracket.record_fit(batch, peak)

    def finish(self, start: int | None, min_batch: int, tuning: Tuning) -> int:
        """The maximum batch here: the bracket the guesses closed, or find_max_batch from it (capped
        one below the smallest OOM seen here, which then certifies an answer at the cap)."""
        bracket = self.bracket
        if bracket.settled and bracket.low >= min_batch:
            return bracket.low
        cap = bracket.cap if bracket.high is None or bracket.high <= min_batch else min(bracket.cap, bracket.high - 1)
        return find_max_batch(self.replaying, cap=cap, capacity_bytes=bracket.capacity, start=start,
                              min_batch=min_batch, tuning=tuning).max_batch

    def replaying(self, batch: int) -> int:
        """``probe`` for find_max_batch: a batch already probed here answers as it did."""
        if batch not in self.seen:
            self.attempt(batch)
        answer = self.seen[batch]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def find_frontier(probe_at: ProbeAt, points: Sequence[Point], *, cap: int = 8192,
                  capacity_bytes: int | None = None, start: int | None = None, min_batch: int = 1,
                  predict_at: PredictAt | None = None, searched: dict[Point, tuple[int, list[Probe]]] | None = None,
                  tuning: Tuning = DEFAULT) -> FrontierResult:
    """The exact maximum batch at every point; see the module docstring.

    ``probe_at(point)`` returns that point's ``probe(b)`` (peak bytes, or an OOM raised); ``start``
    is a predicted maximum batch at the longest point. ``predict_at(point)``, where the workload
    predicts its peak (``Workload.predict_peak_bytes``, None when it cannot), gives each length's
    shape, which the measured peaks scale. ``searched`` holds points the caller has already
    searched (their maximum batch and probes), taken as they are. Raises NoBatchFits naming the
    point when ``min_batch`` does not fit there.
    """
    if not points:
        raise ConfigError("a frontier needs at least one (prompt_tokens, new_tokens) point")
    by_tokens = {sum(point): point for point in points}
    shapes: dict[int, Shape | None] = {}

    def shape_at(tokens: int, capacity: int) -> Shape | None:
        if tokens not in shapes:
            shapes[tokens] = None if predict_at is None else predicted_shape(predict_at(by_tokens[tokens]), capacity,
                                                                              cap, min_batch)
        return shapes[tokens]

    memory = TokenMemory(shape_at, tuning.memory_granularity_bytes)
    capacity = capacity_bytes
    found: dict[Point, FrontierPoint] = {}
    for point in search_order(points):
        if searched and point in searched:
            max_batch, probes = searched[point]
            found[point] = FrontierPoint(point[0], point[1], max_batch, probes, None)
        else:
            lower = max((done.max_batch for other, done in found.items() if _at_least(other, point)), default=None)
            upper = min((done.max_batch for other, done in found.items() if _at_least(point, other)), default=cap)
            search = _PointSearch(point, probe_at(point), Bracket(cap, capacity, None))
            predicted = _guess(search, memory, lower, upper, min_batch, tuning.start_safety)
            try:
                max_batch = search.finish(search.bracket.low or lower or start, min_batch, tuning)
            except NoBatchFits as error:
                raise NoBatchFits(f"at {point[0]} prompt tokens and {point[1]} new tokens: {error}") from None
            capacity = search.bracket.capacity
            found[point] = FrontierPoint(point[0], point[1], max_batch, search.bracket.probes, predicted)
        for probe in found[point].probes:
            if probe.peak_bytes is not None:
                memory.add(probe.batch, sum(point), probe.peak_bytes)
    return FrontierResult([found[point] for point in dict.fromkeys(points)], capacity)


def _at_least(longer: Point, shorter: Point) -> bool:
    return longer[0] >= shorter[0] and longer[1] >= shorter[1]


def _guess(search: _PointSearch, memory: TokenMemory, lower: int | None, upper: int,
           min_batch: int, safety: float) -> int | None:
    """Probe the model's limit at this point, then around it, until the bracket closes or
    GUESSES_PER_POINT probes are spent; returns the first prediction (None: the model had none).

    A guess no measurement backs is checked below first: at the maximum of a longer point (which
    fits here) or, without one, at ``safety`` of it. After an OOM here, the scaled prediction
    aims with the need the OOM named; the fit in tokens cannot, and tries the longer point's
    maximum once before find_max_batch takes over.
    """
    bracket, tokens = search.bracket, sum(search.point)
    first = None
    for _ in range(GUESSES_PER_POINT):
        if bracket.settled or bracket.capacity is None or (bracket.high or min_batch + 1) <= min_batch:
            break
        scaled = memory.scaled_limit(tokens, bracket.capacity, bracket.peaks, _over(search))
        predicted = scaled or _chord(search) or memory.fitted_limit(tokens, bracket.capacity, bracket.peaks)
        if predicted is None:
            break
        guess, measured = predicted
        first = guess if first is None else first
        if not bracket.low and bracket.high is not None and scaled is None:   # the first check ran out of memory
            if lower is None or bracket.high <= lower or not measured:
                break   # find_max_batch takes over
            guess = lower
        elif not bracket.low and not measured:
            guess = lower or int(guess * safety)
        search.attempt(bracket.inside(min(max(guess, lower or min_batch, min_batch), upper)))
    return first


def _over(search: _PointSearch) -> tuple[int, int] | None:
    """The smallest batch that ran out of memory here and the bytes it named as needed, if it did."""
    bracket = search.bracket
    error = search.seen.get(bracket.high) if bracket.high is not None else None
    needed = error.needed_bytes if isinstance(error, OutOfMemory) else None
    return None if bracket.high is None or needed is None else (bracket.high, needed)


def _chord(search: _PointSearch) -> tuple[int, bool] | None:
    """Once a batch here ran out of memory naming what it needed: where the chord from the largest
    fit to it meets the capacity. Memory that curves up lies under its chords, so this fits when
    the OOM names the whole need (a simulated GPU does; a CPU budget names the allocation that
    crossed it, less than the peak, and the chord may then overshoot by a little)."""
    bracket, over = search.bracket, _over(search)
    if not bracket.low or bracket.capacity is None or over is None:
        return None
    batch, needed = over
    fit = bracket.peaks[bracket.low]
    if needed <= max(fit, bracket.capacity):
        return None
    return bracket.low + math.floor((bracket.capacity - fit) * (batch - bracket.low) / (needed - fit)), True
