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

    def __init__(self, bracket: Bracket, tuning: Tuning, predict: Callable[[int], int | None] | None = None):
        self.bracket = bracket
        self.tuning = tuning
        self.jumped = False  # the last guided guess was a safe jump, not an aim at the limit
        self.past_limit: int | None = None  # the last aim, when it lies past the fitted limit
        self.predicted_limit: float | None = None  # from the last fit, however rough
        self.prediction = (Prediction(predict, bracket.min_batch)
                           if predict is not None and tuning.trust_prediction else None)

    def next_batch(self) -> int:
        """The model's guess, moved by the surprises since the bracket closed.

        Once bracketed, each surprise (an OOM where the model expected a fit, or the reverse) doubles
        how far the next guess must move from the side that surprised, up to bisection: a misled
        model costs O(log) probes, never a walk one batch at a time. An aim past the fitted limit
        that ran out of memory is no surprise.
        """
        bracket = self.bracket
        if not bracket.probes:
            return self.first_batch()
        if bracket.low == 0:  # only OOMs so far: the start ran out of memory
            return self.below_failed_start()
        jump_failed = bracket.oom_streak and self.jumped
        surprises = bracket.oom_streak - (bracket.oom_streak > 0 and bracket.probes[-1].batch == self.past_limit)
        guess = self.predicted_guess()
        trusted = guess is not None
        if guess is None:
            guess = self.guided_guess()
        if guess is None or jump_failed:
            # Nothing to go on, or a jump the model thought safe ran out of memory: the model is
            # wrong at this range, so split the bracket instead.
            guess = self.fallback_guess()
        if bracket.high is not None:
            middle = (bracket.low + bracket.high) // 2
            if surprises and not (trusted and surprises == 1):
                # A trusted prediction that overshot by a hair aims again from below at once.
                guess = min(guess, max(bracket.high - 2 ** (surprises - 1), middle))
            elif bracket.fit_streak:
                guess = max(guess, min(bracket.low + 2 ** (bracket.fit_streak - 1), middle))
        return guess

    def first_batch(self) -> int:
        """The start itself when memory can guide what follows (certified by its neighbour next),
        else ``min_batch`` (1 unless the model takes no smaller batch)."""
        bracket = self.bracket
        if bracket.start is not None and bracket.capacity is not None and self.tuning.start_first:
            return bracket.start
        return bracket.min_batch

    def below_failed_start(self) -> int:
        """After the start ran out of memory: ``start_backoff`` below it once, then ``min_batch``."""
        bracket = self.bracket
        assert bracket.high is not None
        if len(bracket.probes) == 1 and self.tuning.start_backoff:
            return max(bracket.min_batch, math.floor(bracket.high * (1 - self.tuning.start_backoff)))
        return bracket.min_batch

    def predicted_guess(self) -> int | None:
        """Where the prediction, corrected by the measured peaks, reaches capacity; None once it has
        disagreed with a measurement (then the fitted search takes over) or there is none."""
        bracket, prediction = self.bracket, self.prediction
        if prediction is None or bracket.capacity is None:
            return None
        last = bracket.probes[-1]
        expected = prediction.expected.get(last.batch)
        if expected is not None:
            tolerance = self.tuning.memory_granularity_bytes + prediction.sample_bytes
            if last.peak_bytes is None:
                # It said this batch fits: by more than one block and sample blur, or for the second
                # time (an aim at the predicted maximum is always within that blur of capacity).
                disagrees = expected < bracket.capacity - tolerance or prediction.missed
                prediction.missed = True
            else:
                disagrees = abs(last.peak_bytes - expected) > tolerance
            if disagrees:
                self.prediction = None
                return None
        ceiling = bracket.cap if bracket.high is None else bracket.high - 1
        # Peaks come in whole allocator blocks: one fits when the capacity's whole blocks hold it.
        usable = bracket.capacity - bracket.capacity % self.tuning.memory_granularity_bytes
        aim = prediction.aim(bracket.low, bracket.peaks[bracket.low], usable, ceiling)
        if aim is None:
            self.prediction = None
            return None
        return aim

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
        memory can give, aim at the limit itself (``aim_offset`` past it, then down to a batch);
        otherwise jump as far as is safe; when nothing is safe, leave it to geometric growth or bisection.
        """
        self.jumped = False
        self.past_limit = None
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
            aim = math.floor(limit + self.tuning.aim_offset)
            self.past_limit = aim if aim > limit else None
            return aim
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
        """After one fitting probe b0 (batch 1, the smallest batch the model takes, or the start): a
        safe fraction of the start prediction or of capacity * b0 / peak(b0).

        Memory at b >= b0 is at most b / b0 * peak(b0) for a line, and with up to ``curvature_prior``
        of it curved the limit is still at least (1 - curvature_prior) * capacity * b0 / peak(b0).
        """
        bracket = self.bracket
        assert bracket.capacity is not None
        self.jumped = True
        [(first, peak)] = bracket.peaks.items()
        safe = int((1 - self.tuning.curvature_prior) * bracket.capacity * first / max(peak, 1))
        if bracket.start is not None and first < bracket.start < (bracket.high or bracket.cap + 1):
            safe = max(safe, int(bracket.start * self.tuning.start_safety))
        return max(safe, first + 1)


class Prediction:
    """The workload's predicted peaks, corrected by a measured one and aimed at the capacity.

    Corrected at the largest batch that fit, ``low``: the predicted batch-dependent memory is
    scaled so that the prediction meets the peak measured there (a predictor that misjudges the
    activations misjudges them by a factor), M(b) = peak(low) + r * (P(b) - P(low)) with
    r = (peak(low) - P(m)) / (P(low) - P(m)), m the smallest batch the model takes (1 unless it
    needs more; a model that takes no batch of 1 has no prediction there either). When the
    prediction is exact, r is 1 and the aim is the predicted maximum itself. ``expected`` keeps M
    at each batch aimed at, to check it.
    """

    def __init__(self, predict: Callable[[int], int | None], min_batch: int = 1):
        self.predict = predict
        self.min_batch = min_batch
        self.cache: dict[int, int | None] = {}
        self.expected: dict[int, float] = {}
        self.sample_bytes = 0.0  # the corrected prediction's memory per sample at the last aim
        self.missed = False  # an aim it said fits ran out of memory

    def at(self, batch: int) -> int | None:
        if batch not in self.cache:
            self.cache[batch] = self.predict(batch)
        return self.cache[batch]

    def aim(self, low: int, peak: int, capacity: int, ceiling: int, steps: int = 4) -> int | None:
        """The largest batch in (low, ceiling] the corrected prediction says fits, or low + 1 when
        none does (the neighbour that certifies ``low``); None when the prediction cannot be used."""
        if ceiling <= low:
            return None
        first, at_low, after = self.at(self.min_batch), self.at(low), self.at(low + 1)
        if first is None or at_low is None or after is None or after <= at_low:
            return None
        ratio = (peak - first) / (at_low - first) if low > self.min_batch and at_low > first else 1.0
        if ratio <= 0:
            return None
        target = at_low + (capacity - peak) / ratio   # predicted bytes where memory meets capacity
        self.sample_bytes = ratio * (after - at_low)
        # Largest b with P(b) <= target: ``fit`` predicted under it, ``over`` above, secants between.
        known = {low: at_low, low + 1: after}
        fit, over = (low, low + 1) if after > target else (low + 1, None)
        for _ in range(steps):
            if fit >= ceiling or (over is not None and over - fit <= 1):
                break
            if over is None:
                slope = (known[fit] - at_low) / (fit - low)
                estimate = fit + max(1, int((target - known[fit]) / slope))
            else:
                slope = (known[over] - known[fit]) / (over - fit)
                estimate = min(max(fit + int((target - known[fit]) / slope), fit + 1), over - 1)
            estimate = min(estimate, ceiling)
            predicted = self.at(estimate)
            if predicted is None:
                return None
            known[estimate] = predicted
            if predicted <= target:
                fit = estimate
            else:
                over = estimate
        best = fit
        guess = best if best > low else low + 1
        predicted_guess = self.at(guess)
        if predicted_guess is None:
            return None
        self.expected[guess] = peak + ratio * (predicted_guess - at_low)
        return guess


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
