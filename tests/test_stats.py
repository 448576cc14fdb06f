"""The gate's statistics: summaries, the Mann-Whitney U test (checked against scipy), the verdicts."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_autobatch.errors import ConfigError
from pytest_autobatch.stats import compare_throughput, mann_whitney_u, speedup_below, summarize


def test_summary_uses_interpolated_quartiles():
    summary = summarize([4.0, 1.0, 3.0, 2.0])
    assert (summary.median, summary.q25, summary.q75) == (2.5, 1.75, 3.25)
    assert summary.iqr == pytest.approx(1.5)
    assert summary.spread == pytest.approx(0.6)
    assert (summary.minimum, summary.maximum, summary.count) == (1.0, 4.0, 4)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_summary_rejects_empty_and_non_finite_samples(bad):
    with pytest.raises(ConfigError, match="samples"):
        summarize(bad)


samples = st.lists(st.integers(min_value=0, max_value=20).map(float), min_size=2, max_size=25)


@settings(max_examples=200, deadline=None)
@given(samples, samples)
def test_mann_whitney_matches_scipy_with_ties(x, y):
    scipy_stats = pytest.importorskip("scipy.stats")   # in the test extra; only this check needs it
    expected = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic",
                                        use_continuity=True)
    ours = mann_whitney_u(x, y)
    assert ours.u == pytest.approx(expected.statistic)
    if len(set(x + y)) == 1:   # scipy returns nan where no ordering exists at all
        assert ours.p_value == 1.0
    else:
        assert ours.p_value == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-12)


def test_min_p_value_is_complete_separation():
    test = mann_whitney_u([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert test.p_value == pytest.approx(test.min_p_value)
    assert test.min_p_value > 0.01  # three against three can never reach 1%


def noisy(center, count, spread, seed):
    rng = random.Random(seed)
    return [center * (1 + rng.gauss(0, spread)) for _ in range(count)]


def test_drop_beyond_tolerance_and_significant_is_a_regression():
    comparison = compare_throughput(noisy(1000, 15, 0.02, 1), noisy(850, 15, 0.02, 2), 0.10)
    assert comparison.verdict == "regression"
    assert comparison.change == pytest.approx(-0.15, abs=0.03)
    assert comparison.significant


def test_significant_drop_within_tolerance_is_unchanged():
    comparison = compare_throughput(noisy(1000, 15, 0.005, 1), noisy(950, 15, 0.005, 2), 0.10)
    assert comparison.significant
    assert comparison.verdict == "unchanged"


def test_large_drop_that_is_only_noise_is_unchanged():
    baseline = [1000, 400, 1600, 900, 1100]
    current = [850, 500, 1500, 700, 1200]
    comparison = compare_throughput(baseline, current, 0.10)
    assert comparison.change < -0.10
    assert not comparison.significant
    assert comparison.verdict == "unchanged"
    assert comparison.noisy


def test_clear_drop_with_few_samples_counts_as_significant():
    comparison = compare_throughput([100.0, 101.0, 102.0], [80.0, 81.0, 82.0], 0.10)
    assert comparison.verdict == "regression"


def test_rise_beyond_tolerance_is_an_improvement():
    comparison = compare_throughput(noisy(1000, 15, 0.02, 3), noisy(1300, 15, 0.02, 4), 0.10)
    assert comparison.verdict == "improvement"


@pytest.mark.parametrize("tolerance", [-0.1, 1.0, 5])
def test_tolerance_must_be_a_fraction(tolerance):
    with pytest.raises(ConfigError, match="tolerance"):
        compare_throughput([1.0], [1.0], tolerance)


def test_speedup_below_a_target_needs_the_samples_to_show_it():
    rng = random.Random(3)
    batch1 = [100 * rng.gauss(1, 0.1) for _ in range(8)]
    optimal = [470 * rng.gauss(1, 0.1) for _ in range(15)]
    assert speedup_below(optimal, batch1, 4.0) is None            # met
    assert speedup_below(optimal, batch1, 4.9) is None            # medians short, within the noise
    clearly_short = speedup_below(optimal, batch1, 7.0)
    assert clearly_short is not None and clearly_short.p_value < 0.01


def test_speedup_below_rejects_missing_samples():
    with pytest.raises(ConfigError):
        speedup_below([], [1.0], 2.0)
