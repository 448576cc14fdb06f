"""Invariants of the batch-size searches, checked with Hypothesis against the simulated GPU."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_autobatch.devices.simulated import SimulatedDevice, SimulatedModel, model_for_max_batch
from pytest_autobatch.errors import ConfigError, NoBatchFits, OutOfMemory
from pytest_autobatch.search import DEFAULT, Probe, find_max_batch, find_optimal_batch, predicted_max_batch
from pytest_autobatch.search.optimal_batch import _decide_best, _ThroughputSweep
from pytest_autobatch.strategies import simulated_models, simulated_workloads

SEARCH = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SWEEP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
caps = st.sampled_from([1, 7, 64, 1000, 8192])


def run(workload, cap=8192, *, capacity=True, start=False):
    """The search as the plugin runs it: the device's capacity, and a start from predicted memory."""
    device = workload.device
    capacity_bytes = device.capacity_bytes() if capacity else None
    predicted = predicted_max_batch(workload.predict_peak_bytes, device.capacity_bytes(), cap) if start else None
    return find_max_batch(workload.probe, cap=cap, capacity_bytes=capacity_bytes, start=predicted or None,
                          predict=workload.predict_peak_bytes if start else None)


@SEARCH
@given(simulated_workloads(modes=("inference", "train")), caps, st.booleans(), st.booleans())
def test_the_maximum_is_exact_and_certified(workload, cap, capacity, start):
    if workload.true_max_batch(cap) == 0:  # training needs more memory than the range was drawn for
        with pytest.raises(NoBatchFits):
            run(workload, cap, capacity=capacity, start=start)
        return
    result = run(workload, cap, capacity=capacity, start=start)
    assert result.max_batch == workload.true_max_batch(cap)
    outcomes = {probe.batch: probe.fits for probe in result.probes}
    assert outcomes[result.max_batch] is True  # never an untested (or OOM-ing) answer
    if result.max_batch < cap:
        assert outcomes[result.max_batch + 1] is False
    assert all(probe.batch <= cap for probe in result.probes)
    assert result.ooms == sum(not fits for fits in outcomes.values())
    assert result.ooms == sum(p.peak_bytes is None for p in result.probes)
    assert result.peak_bytes == workload.needed_bytes(result.max_batch)
    # Without a given capacity, the first OOM's (the simulator names the memory available) supplies it.
    learned = capacity or result.ooms
    assert result.capacity_bytes == (workload.device.capacity_bytes() if learned else None)


@SEARCH
@given(simulated_workloads(), st.booleans())
def test_probes_stay_within_twice_log2_of_the_maximum(workload, capacity):
    result = run(workload, capacity=capacity)
    assert len(result.probes) <= 2 * math.log2(result.max_batch) + 3


@SEARCH
@given(simulated_workloads(), st.booleans())
def test_with_known_capacity_at_most_four_ooms(workload, start):
    """The benchmark's scenarios stay at 3 at most (bench_search.py); Hypothesis found 4 where peaks
    jitter by half a sample's memory and the fit aims just past the limit twice in a row."""
    assert run(workload, start=start).ooms <= 4


def _predictors(workload):
    """The workload's own prediction, an exact one, one that lies by a factor, a flat one, none."""
    exact = workload.device.workload(dataclasses.replace(workload.model, prediction_error=0.0))
    return st.sampled_from([workload.predict_peak_bytes, exact.predict_peak_bytes,
                            lambda b: workload.predict_peak_bytes(b) // 3, lambda b: 10 ** 9, lambda b: None])


@SEARCH
@given(simulated_workloads(modes=("inference", "train")), caps, st.data())
def test_any_start_and_any_prediction_give_the_exact_certified_maximum(workload, cap, data):
    """The start is probed first and the prediction followed only while it agrees: a wrong one of
    either costs probes, never the answer."""
    true_max = workload.true_max_batch(cap)
    start = data.draw(st.integers(1, 2 * max(true_max, 1) + 2))
    predict = data.draw(_predictors(workload))
    capacity = workload.device.capacity_bytes()
    if true_max == 0:
        with pytest.raises(NoBatchFits):
            find_max_batch(workload.probe, cap=cap, capacity_bytes=capacity, start=start, predict=predict)
        return
    result = find_max_batch(workload.probe, cap=cap, capacity_bytes=capacity, start=start, predict=predict)
    outcomes = {probe.batch: probe.fits for probe in result.probes}
    assert result.max_batch == true_max and outcomes[true_max] is True
    assert true_max == cap or outcomes[true_max + 1] is False
    assert len(result.probes) == len(outcomes)  # no batch probed twice
    assert len(result.probes) <= 2 * math.log2(max(true_max, start)) + 6


@SEARCH
@given(simulated_workloads(min_max_batch=2), st.sampled_from([1, 2]))
def test_the_exact_start_with_an_exact_prediction_takes_two_probes(workload, smallest):
    """Also above a ``min_batch``, with nothing predicted below it (fake tensors of BatchNorm in training)."""
    true_max = workload.true_max_batch(8192)
    exact = workload.device.workload(dataclasses.replace(workload.model, prediction_error=0.0))
    result = find_max_batch(workload.probe, capacity_bytes=workload.device.capacity_bytes(), start=true_max,
                            min_batch=smallest, predict=lambda b: None if b < smallest else exact.predict_peak_bytes(b))
    expected = [Probe(true_max, workload.needed_bytes(true_max))]
    if true_max < 8192:
        expected.append(Probe(true_max + 1, None))
    assert result.probes == expected


@SEARCH
@given(simulated_workloads(min_max_batch=4), st.floats(-0.02, 0.02))
def test_a_prediction_within_two_percent_takes_few_probes(workload, error):
    """The start, then the corrected prediction's aim and its neighbour; a start that ran out of memory
    costs the probe below it (the benchmark's mean is about 2.9, its worst 8 probes and 3 OOMs)."""
    near = workload.device.workload(dataclasses.replace(workload.model, prediction_error=error))
    capacity = workload.device.capacity_bytes()
    start = predicted_max_batch(near.predict_peak_bytes, capacity, 8192)
    result = find_max_batch(workload.probe, capacity_bytes=capacity, start=start, predict=near.predict_peak_bytes)
    assert result.max_batch == workload.true_max_batch(8192)
    assert len(result.probes) <= 8 and result.ooms <= 3


@SEARCH
@given(simulated_models(), st.floats(0.05, 0.95), st.booleans())
def test_more_memory_never_lowers_the_maximum(model, fraction, start):
    large = SimulatedDevice("h100")
    small = SimulatedDevice("h100", capacity_bytes=int(large.capacity_bytes() * fraction))
    try:
        on_small = run(small.workload(model), start=start).max_batch
    except NoBatchFits:
        on_small = 0
    assert on_small <= run(large.workload(model), start=start).max_batch


@SEARCH
@given(simulated_models(), st.integers(0, 100))
def test_a_seeded_device_gives_the_same_search_and_samples(model, seed):
    def search():
        workload = SimulatedDevice("a5000", seed=seed).workload(model)
        try:
            result = run(workload, start=True)
        except NoBatchFits:
            return None
        optimal = find_optimal_batch(workload.measure, max_batch=result.max_batch)
        return result.probes, optimal.measurements

    assert search() == search()


@SEARCH
@given(simulated_workloads(batch_one_fits=False), st.booleans())
def test_no_batch_fits_names_memory_needed_and_available(workload, capacity):
    with pytest.raises(NoBatchFits, match=r"batch 1 does not fit in memory: it needs [\d.,]+ (GiB|bytes), "
                                          r"[\d.,]+ (GiB|bytes) available"):
        run(workload, capacity=capacity)
    assert workload.probes == [1]


def test_no_batch_fits_with_a_bare_oom_names_the_error_and_the_capacity():
    def probe(batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(NoBatchFits, match=r"batch 1 does not fit in memory: 3\.00 GiB available\."):
        find_max_batch(probe, capacity_bytes=3 << 30)
    with pytest.raises(NoBatchFits, match="Tried to allocate 2.00 GiB"):
        find_max_batch(probe)


@pytest.mark.parametrize("error", [ValueError("shape mismatch"), RuntimeError("CUDA error: illegal memory access"),
                                   KeyError("input")])
def test_errors_that_are_not_oom_propagate_unchanged(error):
    def probe(batch):
        if batch > 3:
            raise error
        return batch * 1000

    with pytest.raises(type(error)) as raised:
        find_max_batch(probe, capacity_bytes=10 ** 6)
    assert raised.value is error


def test_without_capacity_an_oom_naming_the_memory_available_guides_the_rest():
    capacity = 10 ** 9 + 1001 * 10 ** 6 + 5 * 10 ** 5  # 1 GB of weights, 1 MB per sample: 1001 fit

    def probe(batch, error_type):
        needed = 10 ** 9 + batch * 10 ** 6
        if needed > capacity:
            if error_type is OutOfMemory:
                raise OutOfMemory("simulated OOM", needed_bytes=needed, available_bytes=capacity)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return needed

    told = find_max_batch(lambda b: probe(b, OutOfMemory))
    bare = find_max_batch(lambda b: probe(b, RuntimeError))
    assert told.max_batch == bare.max_batch == 1001
    assert told.capacity_bytes == capacity and bare.capacity_bytes is None
    # Doubling to 1024 (11 probes) finds the bracket either way; then memory closes it in a few
    # probes where bisection needs about log2(512) = 9.
    assert len(told.probes) <= 11 + 3 < len(bare.probes)
    assert told.ooms <= 2


def test_the_cap_is_probed_when_everything_fits():
    seen = []

    def probe(batch):
        seen.append(batch)
        return 100 + batch

    assert find_max_batch(probe, cap=300).max_batch == 300
    assert seen[-1] == 300 and max(seen) == 300
    assert find_max_batch(lambda b: 7, cap=1).probes == [Probe(1, 7)]


@pytest.mark.parametrize("cap", [0, -5, 2.5, "8", True])
def test_a_bad_cap_is_a_config_error(cap):
    with pytest.raises(ConfigError, match="cap must be an integer >= 1"):
        find_max_batch(lambda b: 1, cap=cap)


@pytest.mark.parametrize("peak", [-1, "1 GiB", None, float("nan"), float("inf"), True])
def test_a_bad_peak_is_a_config_error(peak):
    with pytest.raises(ConfigError, match=r"probe\(1\) returned .*peak memory in bytes"):
        find_max_batch(lambda b: peak)


@pytest.mark.parametrize("options, message", [({"capacity_bytes": 0}, "capacity_bytes must be > 0"),
                                              ({"start": 0}, "start must be an integer >= 1")])
def test_bad_capacity_or_start_is_a_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        find_max_batch(lambda b: 1, **options)


def test_predicted_max_batch_lands_near_the_limit_of_a_simulated_model():
    device = SimulatedDevice("sim:h100")
    workload = device.workload(SimulatedModel("curved", weights_bytes=2_000_000_000,
                                              activation_bytes_per_sample=40_000_000,
                                              curvature_bytes=20_000, flops_per_sample=1e9))
    true_max = workload.true_max_batch(8192)
    start = predicted_max_batch(workload.predict_peak_bytes, device.capacity_bytes(), 8192)
    assert abs(start - true_max) / true_max < 0.15
    assert predicted_max_batch(workload.predict_peak_bytes, device.capacity_bytes(), 1) == 1


def test_predicted_max_batch_inverts_a_prediction():
    assert predicted_max_batch(lambda b: 100 + 10 * b, 1100, cap=8192) == 100
    assert predicted_max_batch(lambda b: 100 + 10 * b, 1100, cap=50) == 50
    assert predicted_max_batch(lambda b: 2000, 1100) == 0
    assert predicted_max_batch(lambda b: None, 1100) is None


def _expected_best(workload, max_batch):
    return max(workload.expected_throughput(b) for b in range(1, max_batch + 1))


@pytest.mark.parametrize("modelled", [True, False], ids=["modelled", "sweep"])
@SWEEP
@given(workload=simulated_workloads(max_max_batch=4096, timing_noise=0.0))
def test_optimal_is_measured_within_the_band_of_the_best_measured(modelled, workload):
    """Both searches answer with a measured batch within the band of the best measured; the sweep
    (every power of two, then refined) also comes within 2% of the exhaustive best every time. The
    modelled search does so in about 98.6% of scenarios (benchmarks/bench_search.py), not always:
    a plateau hidden behind a knee between the few batches it times can escape it."""
    max_batch = workload.true_max_batch(8192)
    tuning = DEFAULT if modelled else dataclasses.replace(DEFAULT, throughput_model=False)
    result = find_optimal_batch(workload.measure, max_batch=max_batch, tuning=tuning)
    assert 1 <= result.optimal_batch <= result.best_batch <= max_batch
    assert result.optimal_batch in result.measurements
    assert result.throughput >= (1 - result.band) * result.best_throughput
    if not modelled:
        assert result.throughput >= (1 - result.band - 0.02) * _expected_best(workload, max_batch)
    smaller = [batch for batch in result.measurements if batch < result.optimal_batch]
    assert all(statistics.median(result.measurements[batch]) < (1 - result.band) * result.best_throughput
               for batch in smaller)


@SWEEP
@given(simulated_workloads(max_max_batch=4096))
def test_optimal_with_noise_stays_close_and_uses_few_measurements(workload):
    max_batch = workload.true_max_batch(8192)
    result = find_optimal_batch(workload.measure, max_batch=max_batch)
    best = _expected_best(workload, max_batch)
    assert workload.expected_throughput(result.best_batch) >= 0.9 * best
    assert all(samples and batch <= max_batch for batch, samples in result.measurements.items())
    if max_batch >= 64:
        assert len(result.measurements) <= max_batch / 3


@SWEEP
@given(simulated_workloads(min_max_batch=2, max_max_batch=4096), st.floats(0.0, 1.0))
def test_the_latency_limit_is_respected(workload, where):
    max_batch = workload.true_max_batch(8192)
    limit = workload.step_time_s(max(1, int(max_batch * where))) * 1.1
    try:
        result = find_optimal_batch(workload.measure, max_batch=max_batch, max_latency_s=limit)
    except ConfigError as error:
        assert "batch 1 takes" in str(error)
        return
    assert result.latency_s(result.optimal_batch) <= limit
    assert result.latency_s(result.best_batch) <= limit
    assert result.max_latency_s == limit


def test_a_latency_limit_no_batch_meets_is_a_config_error():
    with pytest.raises(ConfigError, match=r"no batch meets max_latency_s=0\.001: batch 1 takes 0\.01 s"):
        find_optimal_batch(lambda b: [100.0], max_batch=8, max_latency_s=0.001)


@pytest.mark.parametrize("samples, message", [([], "returned no samples"),
                                              ([1.0, float("nan")], "returned nan"),
                                              ([float("inf")], "returned inf"),
                                              ([-3.0], "returned -3.0"),
                                              (["fast"], "returned 'fast'")])
def test_bad_samples_are_a_config_error(samples, message):
    with pytest.raises(ConfigError, match=message):
        find_optimal_batch(lambda b: samples, max_batch=4)


@pytest.mark.parametrize("options, message", [({"max_batch": 0}, "max_batch must be an integer >= 1"),
                                              ({"max_batch": 4, "band": 1.0}, "band must be"),
                                              ({"max_batch": 4, "max_latency_s": 0}, "max_latency_s must be")])
def test_bad_optimal_options_are_a_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        find_optimal_batch(lambda b: [1.0], **options)


@pytest.mark.parametrize("flops, sharp", [(4e10, False), (4e7, True)])
def test_optimal_finds_a_peak_between_powers_of_two(flops, sharp):
    """Throughput flat from about 60 to the knee at 300 (compute-bound), or rising to it (bound by
    launch overhead): the best batch is within 2% of the peak's throughput, at the knee when sharp."""
    workload = SimulatedDevice("h100", timing_noise=0.0).workload(
        SimulatedModel("knee", 10 ** 9, 10 ** 7, flops, knee_batch=300, falloff=2.0))
    result = find_optimal_batch(workload.measure, max_batch=4000)
    assert workload.expected_throughput(result.best_batch) >= 0.98 * _expected_best(workload, 4000)
    assert not sharp or abs(result.best_batch - 300) <= 15
    assert len(result.measurements) <= 20


def test_optimal_keeps_the_raw_samples():
    def measure(batch):
        return [batch * 10.0, batch * 11.0, batch * 12.0]

    result = find_optimal_batch(measure, max_batch=16)
    assert result.measurements[16] == [160.0, 176.0, 192.0]
    assert result.throughput == 176.0 and result.optimal_batch == 16
    assert result.latency_s(16) == pytest.approx(16 / 176.0)


def test_a_simulated_oom_is_what_the_search_catches():
    device = SimulatedDevice("rtx5070ti")
    workload = device.workload(model_for_max_batch("rtx5070ti", 40, weights_fraction=0.5))
    with pytest.raises(OutOfMemory):
        workload.probe(10_000)
    assert find_max_batch(workload.probe, capacity_bytes=device.capacity_bytes()).max_batch == \
        workload.true_max_batch(8192)


def test_optimal_search_stays_below_a_batch_that_runs_out_of_memory_while_timed():
    calls = []

    def measure(batch):
        calls.append(batch)
        if batch > 40:
            raise OutOfMemory(f"batch {batch} ran out while timing", batch=batch)
        return [batch * 10.0] * 3   # throughput grows with the batch: the best is the largest that runs

    result = find_optimal_batch(measure, max_batch=64)
    assert 64 in result.oom_batches and len(result.oom_batches) <= 3   # bisects, no walk down
    assert result.max_batch == max(result.measurements) <= 40 < min(result.oom_batches)
    assert result.best_batch == result.max_batch >= 32 and result.optimal_batch <= result.max_batch
    assert len(calls) == len(set(calls)), "batches measured before the OOM are not measured again"
    assert find_optimal_batch(lambda b: [b * 10.0], max_batch=64).max_batch == 64


def test_optimal_search_gives_up_cleanly_when_batch_1_cannot_be_timed():
    def measure(batch):
        raise OutOfMemory("no memory at all", batch=batch)

    with pytest.raises(NoBatchFits, match="batch 1 ran out of memory while being timed"):
        find_optimal_batch(measure, max_batch=8)


def test_non_oom_errors_while_timing_propagate_unchanged():
    error = ValueError("bug in the model")

    def measure(batch):
        raise error

    with pytest.raises(ValueError) as caught:
        find_optimal_batch(measure, max_batch=8)
    assert caught.value is error


@SEARCH
@given(simulated_workloads(modes=("inference", "train")), st.sampled_from([64, 1000, 8192]),
       st.integers(2, 5), st.booleans())
def test_a_minimum_batch_is_probed_first_and_the_maximum_stays_certified(workload, cap, smallest, capacity):
    """BatchNorm in training takes no batch of 1: the search starts at ``min_batch``, never below it."""
    true_max = workload.true_max_batch(cap)
    capacity_bytes = workload.device.capacity_bytes() if capacity else None
    if true_max < smallest:
        with pytest.raises(NoBatchFits, match=f"batch {smallest} \\(the smallest batch the model takes\\)"):
            find_max_batch(workload.probe, cap=cap, capacity_bytes=capacity_bytes, min_batch=smallest)
        return
    result = find_max_batch(workload.probe, cap=cap, capacity_bytes=capacity_bytes, min_batch=smallest)
    assert result.probes[0].batch == smallest and min(probe.batch for probe in result.probes) == smallest
    assert result.max_batch == true_max
    outcomes = {probe.batch: probe.fits for probe in result.probes}
    assert outcomes[result.max_batch] is True
    if result.max_batch < cap:
        assert outcomes[result.max_batch + 1] is False


@SEARCH
@given(simulated_workloads(modes=("inference", "train")), caps, st.integers(2, 5), st.data())
def test_a_minimum_batch_with_any_start_and_prediction_probes_nothing_below_it(workload, cap, smallest, data):
    """A start below ``min_batch`` is raised to it, and a prediction with nothing below it (fake
    tensors of BatchNorm in training) is corrected from ``min_batch``: the answer stays exact."""
    cap = max(cap, smallest)
    true_max = workload.true_max_batch(cap)
    start = data.draw(st.integers(1, 2 * max(true_max, 1) + 2))
    predictor = data.draw(_predictors(workload))

    def predict(batch):
        return None if batch < smallest else predictor(batch)

    capacity = workload.device.capacity_bytes()
    options = dict(cap=cap, capacity_bytes=capacity, start=start, min_batch=smallest, predict=predict)
    if true_max < smallest:
        with pytest.raises(NoBatchFits, match=f"batch {smallest} \\(the smallest batch the model takes\\)"):
            find_max_batch(workload.probe, **options)
        return
    result = find_max_batch(workload.probe, **options)
    outcomes = {probe.batch: probe.fits for probe in result.probes}
    assert min(outcomes) >= smallest and len(result.probes) == len(outcomes)
    assert result.max_batch == true_max and outcomes[true_max] is True
    assert true_max == cap or outcomes[true_max + 1] is False


@pytest.mark.parametrize("smallest", [1, 2])
def test_a_start_that_does_not_fit_falls_back_to_the_minimum_batch(smallest):
    """40% below the start, then ``min_batch`` (batch 1 unless the model needs more)."""
    seen = []

    def probe(batch):
        seen.append(batch)
        if batch > smallest:
            raise OutOfMemory("too big", available_bytes=1000)
        return 900

    assert find_max_batch(probe, capacity_bytes=1000, start=50, min_batch=smallest).max_batch == smallest
    assert seen == [50, 30, smallest, smallest + 1]
    seen.clear()
    with pytest.raises(NoBatchFits, match=f"batch {smallest + 1} \\(the smallest batch the model takes\\)"):
        find_max_batch(probe, capacity_bytes=1000, start=50, min_batch=smallest + 1)
    assert seen == [50, 30, smallest + 1]
    with pytest.raises(NoBatchFits, match="batch 1 does not fit"):
        find_max_batch(lambda b: (_ for _ in ()).throw(OutOfMemory("none", available_bytes=10)),
                       capacity_bytes=10, start=50)


@pytest.mark.parametrize("modelled", [True, False])
def test_the_optimal_search_measures_nothing_below_the_minimum_batch(modelled):
    """The modelled search measures the largest batch, then ``min_batch``; the sweep starts at it."""
    measured = []

    def measure(batch):
        measured.append(batch)
        return [min(batch, 40) * 10.0] * 3

    tuning = DEFAULT if modelled else dataclasses.replace(DEFAULT, throughput_model=False)
    result = find_optimal_batch(measure, max_batch=100, min_batch=3, tuning=tuning)
    assert measured[:2] == ([100, 3] if modelled else [3, 6]) and min(measured) == 3
    assert 36 <= result.optimal_batch <= 40
    with pytest.raises(ConfigError, match="max_batch must be an integer >= 3"):
        find_optimal_batch(measure, max_batch=2, min_batch=3)
    with pytest.raises(ConfigError, match="cap must be an integer >= 3"):
        find_max_batch(lambda batch: batch, cap=2, min_batch=3)


@pytest.mark.parametrize("again, measured, best", [
    ({64: [[101]], 32: [[95]]}, [64, 32], 64),                         # the rival falls out of the margin
    ({64: [[99], [99]], 32: [[103], [103]]}, [64, 32, 32, 64], 32),    # it overtakes, and stays ahead
    ({64: [[101], [101]], 32: [[100], [100]]}, [64, 32, 64, 32], 64),  # still close after the last round
])
def test_a_close_call_measures_the_best_and_its_rival_again_for_a_few_rounds(again, measured, best):
    first = {32: [100.0], 64: [101.0], 8: [60.0]}
    calls = []

    def measure(batch, call):
        calls.append(batch)
        return first[batch] if call == 0 else again[batch][call - 1]

    sweep = _ThroughputSweep(measure, None)
    for batch in first:
        sweep.run(batch)
    calls.clear()
    _decide_best(sweep, margin=0.02, rounds=2)
    assert calls == measured and sweep.best() == best
