"""The simulated GPU: memory, OOMs, throughput and noise behave like the real CUDA path."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_autobatch.devices import get_device
from pytest_autobatch.devices.simulated import (
    ALLOCATOR_BLOCK_BYTES,
    PROFILES,
    SimulatedDevice,
    SimulatedModel,
    model_for_max_batch,
    simulated_device,
)
from pytest_autobatch.errors import ConfigError, OutOfMemory, is_oom_error
from pytest_autobatch.strategies import simulated_models, simulated_workloads

FAST = settings(max_examples=60, deadline=None)
TOY = SimulatedModel("toy", weights_bytes=2 * 10 ** 9, activation_bytes_per_sample=5 * 10 ** 7,
                     flops_per_sample=2e10)


def test_profiles_come_from_public_specs():
    assert set(PROFILES) == {"h100", "a5000", "rtx5070ti"}
    h100, a5000, rtx = PROFILES["h100"], PROFILES["a5000"], PROFILES["rtx5070ti"]
    assert h100.total_bytes > a5000.total_bytes > rtx.total_bytes
    assert h100.peak_flops > rtx.peak_flops > a5000.peak_flops
    assert h100.memory_bandwidth > rtx.memory_bandwidth > a5000.memory_bandwidth


@pytest.mark.parametrize("name", ["sim:h100", "sim:a5000", "sim:RTX5070Ti", "h100"])
def test_devices_by_name(name):
    device = simulated_device(name)
    key = name.lower().removeprefix("sim:")
    assert device.name == f"sim:{key}" and device.hardware_key() == f"sim-{key}"
    assert device.capacity_bytes() == PROFILES[key].total_bytes - PROFILES[key].context_bytes
    assert json.loads(json.dumps(device.hardware()))["device"] == f"sim:{key}"


def test_get_device_builds_simulated_devices_and_names_known_profiles():
    assert get_device("sim:a5000").hardware_key() == "sim-a5000"
    with pytest.raises(ConfigError, match="known profiles are sim:h100, sim:a5000, sim:rtx5070ti"):
        get_device("sim:tpu")


def test_an_oom_is_raised_like_the_cuda_path_raises_it():
    workload = SimulatedDevice("rtx5070ti").workload(TOY)
    too_big = workload.true_max_batch(8192) + 1
    with pytest.raises(OutOfMemory) as raised:
        workload.probe(too_big)
    error = raised.value
    assert is_oom_error(error) and error.limit == "simulated" and error.batch == too_big
    assert error.needed_bytes > error.available_bytes == workload.device.capacity_bytes()
    assert "out of memory" in str(error)
    with pytest.raises(OutOfMemory):
        workload.measure(too_big)


@FAST
@given(simulated_workloads(modes=("inference", "train", "generate")), st.integers(1, 20000))
def test_memory_is_block_rounded_monotone_and_decides_fit(workload, batch):
    needed = workload.needed_bytes(batch)
    assert needed % ALLOCATOR_BLOCK_BYTES == 0
    assert workload.needed_bytes(batch + 1) >= needed
    if workload.fits(batch):
        assert workload.probe(batch) == needed
    else:
        with pytest.raises(OutOfMemory):
            workload.probe(batch)


@FAST
@given(st.sampled_from(sorted(PROFILES)), st.floats(1, 8000), st.floats(0, 0.8), st.floats(0, 0.5))
def test_model_for_max_batch_hits_the_requested_maximum(profile, target, weights, curvature):
    model = model_for_max_batch(profile, target, weights_fraction=weights, curvature_share=curvature)
    true_max = SimulatedDevice(profile).workload(model).true_max_batch(10 ** 6)
    assert int(target) * 0.98 - 1 <= true_max <= target * 1.02 + 1


def test_training_needs_more_memory_and_time_than_inference():
    device = SimulatedDevice("h100")
    inference, train = device.workload(TOY), device.workload(TOY, mode="train", loss_fn=None, optimizer=None)
    assert train.needed_bytes(8) > inference.needed_bytes(8)
    assert train.step_time_s(8) > inference.step_time_s(8)
    assert train.true_max_batch(8192) < inference.true_max_batch(8192)


def test_throughput_rises_saturates_and_falls_past_a_knee():
    device = SimulatedDevice("h100", timing_noise=0.0)
    # A tenth of TOY's FLOPs: on the calibrated (FP32) H100, TOY itself is compute-bound from batch 1.
    plain = device.workload(dataclasses.replace(TOY, flops_per_sample=2e9))
    rates = [plain.expected_throughput(2 ** k) for k in range(12)]
    assert rates == sorted(rates) and rates[-1] < 1.05 * rates[-2]  # rises, then saturates
    assert rates[-1] > 5 * rates[0]  # batching pays
    knee = device.workload(dataclasses.replace(TOY, knee_batch=256, falloff=1.0))
    assert knee.expected_throughput(1024) < 0.7 * knee.expected_throughput(256)


def test_timing_noise_is_seeded():
    def samples(seed):
        workload = SimulatedDevice("a5000", seed=seed).workload(TOY)
        return [workload.measure(b) for b in (1, 8, 8, 64)]

    first = samples(3)
    assert first == samples(3) and first != samples(4)
    assert first[1] != first[2]  # repeated measurements differ, as on a real GPU
    assert all(len(batch) == 5 for batch in first)
    exact = SimulatedDevice("a5000", timing_noise=0.0).workload(TOY)
    assert exact.measure(8) == [exact.expected_throughput(8)] * 5
    assert statistics.median(first[1]) == pytest.approx(exact.expected_throughput(8), rel=0.05)


def test_slowdown_and_memory_overhead_simulate_regressions_without_changing_identity():
    base = SimulatedDevice("h100").workload(TOY)
    slower = SimulatedDevice("h100", slowdown=1.5).workload(TOY)
    heavier = SimulatedDevice("h100", memory_overhead_bytes=10 ** 10).workload(TOY)
    assert slower.expected_throughput(32) == pytest.approx(base.expected_throughput(32) / 1.5)
    assert heavier.needed_bytes(32) > base.needed_bytes(32)
    assert heavier.true_max_batch(8192) < base.true_max_batch(8192)
    assert slower.fingerprint() == base.fingerprint() == heavier.fingerprint()
    assert SimulatedDevice("h100", slowdown=1.5).hardware() == SimulatedDevice("h100").hardware()


@FAST
@given(simulated_models(), st.integers(1, 4000))
def test_predictions_are_off_by_the_configured_error(model, batch):
    workload = SimulatedDevice("h100").workload(model)
    exact = dataclasses.replace(model, prediction_error=0.0)
    unbiased = SimulatedDevice("h100").workload(exact).predict_peak_bytes(batch)
    static = model.weights_bytes
    assert workload.predict_peak_bytes(batch) - static == pytest.approx(
        (unbiased - static) * (1 + model.prediction_error), rel=1e-6, abs=2)
    assert abs(unbiased - workload.needed_bytes(batch)) <= ALLOCATOR_BLOCK_BYTES + model.activation_bytes_per_sample


def test_extras_and_fingerprint():
    workload = SimulatedDevice("h100").workload(TOY, mode="generate")
    extras = workload.extras(16)
    assert extras["flops_per_sample"] == TOY.flops_per_sample and extras["energy_per_sample_j"] > 0
    assert workload.fingerprint()["mode"] == "generate" and workload.fingerprint()["name"] == "toy"
    workload.close()


@pytest.mark.parametrize("call, message", [
    (lambda d: d.workload(object()), "runs SimulatedModel instances"),
    (lambda d: d.workload(TOY, mode="serve"), "unknown mode 'serve'"),
    (lambda d: d.workload(TOY, batch_size=3), "unknown workload option"),
    (lambda d: d.workload(TOY).probe(0), "batch size must be an integer >= 1"),
])
def test_bad_workload_requests_are_config_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call(SimulatedDevice("h100"))


@pytest.mark.parametrize("fields, message", [
    ({"weights_bytes": -1}, "weights_bytes must be a number >= 0"),
    ({"flops_per_sample": 0}, "flops_per_sample must be > 0"),
    ({"memory_jitter": 1.5}, "memory_jitter must be in"),
    ({"activation_bytes_per_sample": 0}, "memory must grow with the batch"),
    ({"knee_batch": 0}, "knee_batch must be >= 1"),
])
def test_bad_models_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TOY, **fields)


@pytest.mark.parametrize("options, message", [({"slowdown": 0}, "slowdown must be > 0"),
                                              ({"repeats": 0}, "repeats must be >= 1")])
def test_bad_device_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        SimulatedDevice("h100", **options)
