"""Where the maximum-batch search probes next: memory fitted against batch, aimed at the capacity.

Heuristics only: the core (``max_batch.Bracket``) keeps every guess inside the bracket, so a
wrong guess costs probes, never a wrong answer. The constants are ``tuning.Tuning``'s.

Memory measured on successful probes is fitted against the batch (a line, a parabola once three
peaks lie far enough apart) and, when the usable capacity is known, the guide jumps close to the
predicted limit, then closes in from both sides. Without a capacity it grows geometrically (from
``start`` if given) until the first OOM; an ``errors.OutOfMemory`` that names the memory available
supplies the capacity from then on, otherwise it bisects.
"""

from __future__ import annotations

import math
from typing import Callable

from .bracket import Bracket
from .memory_fit import MemoryFit
from .tuning import Tuning


class Guide:
    """Chooses the next batch for one search from its ``Bracket``."""

    def __init__(self, bracket: Bracket, tuning: Tuning):
        self.bracket = bracket
        self.tuning = tuning
        self.jumped = False  # the last guided guess was a safe jump, not an aim at the limit
        self.predicted_limit: float | None = None  # from the last fit, however rough

    def next_batch(self) -> int:
        """The model's guess, moved by the surprises since the bracket closed.

        Once bracketed, each surprise (an OOM where the model expected a fit, or the reverse) doubles
        how far the next guess must move from the side that surprised, up to bisection: a misled
        model costs O(log) probes, never a walk one batch at a time.
        """
        bracket = self.bracket
        jump_failed = bracket.oom_streak and self.jumped
        guess = self.guided_guess()
        if guess is None or jump_failed:
            # Nothing to go on, or a jump the model thought safe ran out of memory: the model is
            # wrong at this range, so split the bracket instead.
            guess = self.fallback_guess()
        if bracket.high is not None:
            middle = (bracket.low + bracket.high) // 2
            if bracket.oom_streak:
                guess = min(guess, max(bracket.high - 2 ** (bracket.oom_streak - 1), middle))
            elif bracket.fit_streak:
                guess = max(guess, min(bracket.low + 2 ** (bracket.fit_streak - 1), middle))
        return guess

    def fallback_guess(self) -> int:
        """Geometric growth until something fails (to ``growth_share`` of a rough fit's limit, x2 to
        x``growth_limit``, never past it), then bisection (geometric while the bracket is wide)."""
        bracket, tuning = self.bracket, self.tuning
        low = bracket.low
        if bracket.high is None:
            if bracket.start is not None and bracket.start > low and len(bracket.probes) == 1:
                return bracket.start
            if self.predicted_limit is None:
                return 2 * low
            factor = min(tuning.growth_limit, max(2.0, tuning.growth_share * self.predicted_limit / low))
            return min(int(factor * low), max(math.floor(self.predicted_limit), low + 1))
        if bracket.high > 4 * low:
            return int(math.sqrt(low * bracket.high))
        return (low + bracket.high) // 2

    def guided_guess(self) -> int | None:
        """Close to where the fitted memory reaches capacity, backed off by the fit's possible error.

        The more confident of the line and the parabola wins. Within twice the resolution that
        memory can give, aim at the limit itself; otherwise jump as far as is safe; when nothing is
        safe, leave it to geometric growth or bisection.
        """
        self.jumped = False
        self.predicted_limit = None
        if self.bracket.capacity is None:
            return None
        if len(self.bracket.peaks) == 1:
            return self.first_jump()
        fits = [MemoryFit(self.bracket.peaks, curved=curved)
                for curved in ((False, True) if self.curvature_measurable() else (False,))]
        candidates = [c for c in (self.extrapolate(fit) for fit in fits) if c is not None]
        if not candidates:
            return None
        error, limit, resolution = min(candidates)
        self.predicted_limit = limit
        if error <= 2 * resolution:
            return math.floor(limit)
        if error < (limit - self.bracket.low) * self.tuning.min_jump_share:
            self.jumped = True
            return math.floor(limit - error)
        return None

    def curvature_measurable(self) -> bool:
        """Three peaks at least ``curvature_spread`` batches apart: closer ones differ by little
        more than their jitter, and a parabola through them (1, 2 and 512, say) bends at random."""
        spread: list[int] = []
        for batch in sorted(self.bracket.peaks):
            if not spread or batch - spread[-1] >= self.tuning.curvature_spread:
                spread.append(batch)
        return len(spread) >= 3

    def extrapolate(self, fit: MemoryFit) -> tuple[float, float, float] | None:
        """(possible error, predicted limit, resolution) in batches; None without a usable fit.

        Each peak may be off by one sample's memory plus an allocator block. The error is the
        larger of two views of what that does to the limit: the slope's error over the fitted span
        carried over the distance still to go (squared for a parabola's curvature), and how far the
        limit moves when the peaks are shifted one at a time (root of the summed squares, weighted
        by ``leverage_weight``), which sees a fit resting on a few noisy points. A line also cannot
        see curvature: up to ``curvature_prior`` of the memory at the limit may grow with batch squared.
        """
        bracket, tuning = self.bracket, self.tuning
        assert bracket.capacity is not None
        limit = fit.limit(bracket.capacity)
        if limit is None:
            return None
        smallest = min(bracket.peaks)
        granularity = tuning.memory_granularity_bytes
        resolution = 1 + granularity / fit.slope(bracket.low)  # batches one block spans
        distance = max(limit - bracket.low, 0.0)
        reach = distance / (bracket.low - smallest)
        squares = 0.0
        for batch, peak in bracket.peaks.items():
            shifted = MemoryFit({**bracket.peaks, batch: int(peak + fit.slope(batch) + granularity)},
                                curved=fit.curved).limit(bracket.capacity)
            if shifted is None:  # one peak's error could make memory look flat: no bound on the error
                squares = math.inf
                break
            squares += (shifted - limit) ** 2
        leverage = tuning.leverage_weight * math.sqrt(squares) if tuning.leverage_weight else 0.0
        if fit.curved:
            error = max(resolution * (reach + reach * reach), leverage)
        else:
            error = max(resolution * reach, leverage)
            error += tuning.curvature_prior * (limit - smallest) * distance / limit
        return error, limit, resolution

    def first_jump(self) -> int:
        """After the first probe only (batch 1, or the smallest batch m the model takes): a safe
        fraction of the start prediction or of capacity / peak(m) * m.

        Memory at b is at most b / m * peak(m) for a line, and with up to ``curvature_prior`` of it
        curved the limit is still at least (1 - curvature_prior) * capacity / peak(m) * m.
        """
        bracket = self.bracket
        assert bracket.capacity is not None
        self.jumped = True
        [(first, peak)] = bracket.peaks.items()
        safe = int((1 - self.tuning.curvature_prior) * bracket.capacity / max(peak, 1) * first)
        if bracket.start is not None:
            safe = max(safe, int(bracket.start * self.tuning.start_safety))
        return max(safe, first + 1)


def predicted_max_batch(predict_peak_bytes: Callable[[int], int | None], capacity_bytes: int,
                        cap: int = 8192, *, predictions: int = 4, smallest: int = 1) -> int | None:
    """The largest batch <= cap predicted to fit ``capacity_bytes`` (a ``start`` for
    find_max_batch); 0 when even batch ``smallest`` (1, or the smallest the model takes) is predicted
    not to fit, None when there is no prediction.

    Secant steps through (smallest, peak(smallest)) and the latest estimate, so a handful of predictions is
    enough (each can cost a second on fake tensors): exact for linear memory, converging to the
    batch whose predicted peak meets the capacity when memory curves.
    """
    first = predict_peak_bytes(smallest)
    if first is None:
        return None
    if first > capacity_bytes:
        return 0
    estimate = min(max(16, smallest + 1), cap)
    for _ in range(predictions - 1):
        if estimate == smallest:
            return smallest
        predicted = predict_peak_bytes(estimate)
        if predicted is None:
            return None
        per_sample = (predicted - first) / (estimate - smallest)
        if per_sample <= 0:
            return cap
        refined = max(smallest, min(cap, smallest + int((capacity_bytes - first) / per_sample)))
        if refined == estimate:
            break
        estimate = refined
    return estimate
