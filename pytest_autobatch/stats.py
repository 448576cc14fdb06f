"""Statistics for the regression gate: robust summaries and a rank test on raw samples.

Throughput samples are noisy and not normal (thermal steps, background work, outliers), so the
gate compares medians against a tolerance and asks a non-parametric test whether the difference
is real, as asv does: a change counts only when it is both large and significant.
Pure Python: no numpy, no scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError

#: Two-sided significance level of the Mann-Whitney U test (asv uses 0.002 with many samples).
DEFAULT_ALPHA = 0.01

#: Relative spread (IQR / median) above which measurements are called noisy.
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of raw samples; ``spread`` is IQR / median."""

    count: int
    median: float
    q25: float
    q75: float
    minimum: float
    maximum: float

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    @property
    def spread(self) -> float:
        return self.iqr / self.median if self.median else math.inf

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "median": self.median, "q25": self.q25, "q75": self.q75,
                "min": self.minimum, "max": self.maximum}


def _checked(samples: Sequence[float], what: str) -> list[float]:
    values = [float(value) for value in samples]
    if not values:
        raise ConfigError(f"{what}: no samples to summarise; measure at least one")
    if any(math.isnan(value) or math.isinf(value) for value in values):
        raise ConfigError(f"{what}: samples must be finite numbers, got {values!r}")
    return values


def quantile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(samples: Sequence[float], what: str = "samples") -> Summary:
    values = sorted(_checked(samples, what))
    return Summary(count=len(values), median=quantile(values, 0.5), q25=quantile(values, 0.25),
                   q75=quantile(values, 0.75), minimum=values[0], maximum=values[-1])


def median(samples: Sequence[float]) -> float:
    return summarize(samples).median


def _ranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Mid-ranks (ties share the mean of their ranks) and the sizes of the tie groups."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    tie_sizes = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        mid_rank = (start + end) / 2 + 1
        for index in order[start:end + 1]:
            ranks[index] = mid_rank
        tie_sizes.append(end - start + 1)
        start = end + 1
    return ranks, tie_sizes


@dataclass(frozen=True)
class RankTest:
    """Mann-Whitney U of ``x`` against ``y``; ``p_value`` is two-sided.

    ``min_p_value`` is the smallest p-value these sample sizes can produce (complete separation):
    with few samples no difference can reach a strict alpha, which the gate must know.
    """

    u: float
    p_value: float
    min_p_value: float


def _two_sided_p(u: float, n1: int, n2: int, tie_sizes: Sequence[int]) -> float:
    """Normal approximation with tie correction and continuity correction."""
    total = n1 + n2
    mean_u = n1 * n2 / 2
    tie_term = sum(t ** 3 - t for t in tie_sizes) / (total * (total - 1)) if total > 1 else 0.0
    variance = n1 * n2 / 12 * ((total + 1) - tie_term)
    if variance <= 0:
        return 1.0
    z = max(abs(u - mean_u) - 0.5, 0.0) / math.sqrt(variance)
    return min(1.0, math.erfc(z / math.sqrt(2)))


def mann_whitney_u(x: Sequence[float], y: Sequence[float]) -> RankTest:
    """Two-sided Mann-Whitney U test of whether ``x`` and ``y`` come from one distribution."""
    xs = _checked(x, "first sample")
    ys = _checked(y, "second sample")
    ranks, tie_sizes = _ranks(xs + ys)
    n1, n2 = len(xs), len(ys)
    u = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    no_ties = [1] * (n1 + n2)
    return RankTest(u=u, p_value=_two_sided_p(u, n1, n2, tie_sizes),
                    min_p_value=_two_sided_p(0.0, n1, n2, no_ties))


@dataclass(frozen=True)
class ThroughputComparison:
    """How current throughput samples compare with the baseline's.

    ``verdict`` is "regression" or "improvement" only when the relative change of the medians is
    beyond ``tolerance`` AND the rank test finds the samples different; otherwise "unchanged".
    """

    baseline: Summary
    current: Summary
    change: float
    p_value: float
    significant: bool
    tolerance: float
    verdict: str

    @property
    def noisy(self) -> bool:
        return max(self.baseline.spread, self.current.spread) > NOISY_SPREAD


def compare_throughput(baseline_samples: Sequence[float], current_samples: Sequence[float],
                       tolerance: float, *, alpha: float = DEFAULT_ALPHA) -> ThroughputComparison:
    """Compare throughput (higher is better) of current samples with the baseline's.

    When the sample sizes cannot reach ``alpha`` at all, complete separation of the two samples
    (the strongest evidence they can give) counts as significant, so a clear drop measured with
    few samples is still caught.
    """
    if not 0 <= tolerance < 1:
        raise ConfigError(f"throughput tolerance must be a fraction in [0, 1), got {tolerance!r}")
    baseline = summarize(baseline_samples, "baseline throughput samples")
    current = summarize(current_samples, "current throughput samples")
    if baseline.median <= 0:
        raise ConfigError(f"baseline throughput median must be positive, got {baseline.median!r}")
    change = current.median / baseline.median - 1
    test = mann_whitney_u(current_samples, baseline_samples)
    significant = test.p_value <= max(alpha, test.min_p_value)
    verdict = "unchanged"
    if significant and change < -tolerance:
        verdict = "regression"
    elif significant and change > tolerance:
        verdict = "improvement"
    return ThroughputComparison(baseline=baseline, current=current, change=change,
                                p_value=test.p_value, significant=significant,
                                tolerance=tolerance, verdict=verdict)


def speedup_below(optimal_samples: Sequence[float], batch1_samples: Sequence[float], min_speedup: float,
                  *, alpha: float = DEFAULT_ALPHA) -> RankTest | None:
    """The rank test showing that the speedup is below ``min_speedup``, or None when it is not shown.

    The optimal batch's samples divided by ``min_speedup`` are compared with batch 1's: the speedup
    falls short only when those scaled samples are significantly lower, so the noise of two
    measurements never fails a target on its own.
    """
    scaled = [sample / min_speedup for sample in _checked(optimal_samples, "optimal-batch samples")]
    batch1 = _checked(batch1_samples, "batch-1 samples")
    test = mann_whitney_u(scaled, batch1)
    lower = median(scaled) < median(batch1)
    return test if lower and test.p_value <= max(alpha, test.min_p_value) else None
