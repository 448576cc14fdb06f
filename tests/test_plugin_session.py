"""AutobatchSession (the plugin's logic without pytest), the public API, and xdist GPU spreading."""

import json
import multiprocessing
import re
import subprocess
import sys
import time

import pytest

import pytest_autobatch
from pytest_autobatch import stored_optimal_batch
from pytest_autobatch.devices.simulated import SimulatedDevice, SimulatedModel
from pytest_autobatch.errors import BaselineError, ConfigError
from pytest_autobatch.session import AutobatchSession, Settings, worker_gpu_mask

MODEL = SimulatedModel("toy", weights_bytes=2_000_000_000, activation_bytes_per_sample=50_000_000,
                       flops_per_sample=4e10 / 16)   # FP32 peaks: memory-bound at small batches
KEY = "tests/test_models.py::test_toy::toy"


def session(tmp_path, **options):
    return AutobatchSession(Settings(baselines=tmp_path, device="sim:h100", **options))


def test_result_is_cached_for_the_session_and_served_from_the_baseline_next_time(tmp_path):
    first = session(tmp_path)
    result = first.run("tests/test_models.py::test_toy", MODEL)
    assert result.status == "new" and result.probes > 0 and not result.cached
    assert first.run("tests/test_models.py::test_toy", MODEL) is result
    again = session(tmp_path).run("tests/test_models.py::test_toy", MODEL)
    assert again.cached and again.probes == 0 and again.ooms == 0
    assert (again.optimal_batch, again.max_batch) == (result.optimal_batch, result.max_batch)


def test_expect_reports_every_missed_target_with_numbers(tmp_path):
    result = session(tmp_path).run("t.py::test_a", MODEL)
    assert result.expect(min_speedup=1.0, max_latency_s=1.0) is result
    with pytest.raises(AssertionError) as caught:
        result.expect(min_speedup=1e9, min_throughput=1e12, max_memory_bytes=1)
    message = str(caught.value)
    assert message.startswith("toy on sim:h100: speedup")
    assert "is below 1000000000.00x" in message and "samples/s is below" in message and "B is above 1 B" in message
    result.expect_targets()
    result.entry["targets"]["min_speedup"] = 1e9
    with pytest.raises(AssertionError, match="speedup .*Mann-Whitney p="):
        result.expect_targets()


def test_a_speedup_target_missed_by_noise_alone_does_not_fail(tmp_path):
    result = session(tmp_path).run("t.py::test_a", MODEL)
    just_above = result.speedup * 1.005   # the medians miss it by 0.5%, the samples cannot tell
    result.expect(min_speedup=just_above)
    result.throughput_samples, result.batch1_throughput_samples = [], []
    with pytest.raises(AssertionError, match="speedup"):
        result.expect(min_speedup=just_above)   # without raw samples the medians decide


def test_bad_call_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="max_latency_s"):
        session(tmp_path).run("t.py::test_a", MODEL, max_latency_s=0)
    with pytest.raises(ConfigError, match="must not contain"):
        session(tmp_path).run("t.py::test_a", MODEL, name="a::b")
    with pytest.raises(ConfigError, match="runs SimulatedModel"):
        session(tmp_path).run("t.py::test_a", object())


class SlowSimulatedDevice(SimulatedDevice):
    """Probes take 50 ms, so concurrent searches overlap unless the search lock serialises them."""

    def workload(self, model, example_input=None, **options):
        workload = super().workload(model, example_input, **options)
        fast_probe = workload.probe
        def probe(batch):
            time.sleep(0.05)
            return fast_probe(batch)
        workload.probe = probe
        return workload


def _run_together(root, barrier, queue):
    autobatch = AutobatchSession(Settings(baselines=root, device="sim:h100"),
                                 device_factory=lambda spec, memory_budget: SlowSimulatedDevice(spec))
    barrier.wait()
    queue.put(autobatch.run("tests/test_models.py::test_toy", MODEL).status)


def test_two_processes_never_search_the_same_entry_twice(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue, barrier = context.Queue(), context.Barrier(3)
    processes = [context.Process(target=_run_together, args=(tmp_path, barrier, queue)) for _ in range(3)]
    for process in processes:
        process.start()
    statuses = sorted(queue.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(60)
    assert statuses == ["cached", "cached", "new"]


@pytest.mark.parametrize("worker, outer, count, expected", [
    ("gw0", None, 4, "0"), ("gw3", None, 4, "3"), ("gw5", None, 4, "1"),
    ("gw1", "3,5", 8, "5"), ("gw2", " 3, 5 ", 8, "3"),
    ("gw1", None, 1, None), ("gw1", "7", 8, None), ("gw1", None, 0, None), ("master", None, 4, None),
])
def test_worker_gpu_mask(worker, outer, count, expected):
    assert worker_gpu_mask(worker, outer, lambda: count) == expected


def test_stored_optimal_batch_for_production_code(tmp_path):
    recorded = session(tmp_path).run("tests/test_models.py::test_toy", MODEL)
    for name in ("toy", "tests/test_models.py::test_toy", KEY):
        assert stored_optimal_batch(name, tmp_path, device="sim:h100") == recorded.optimal_batch
    assert stored_optimal_batch("toy", tmp_path, device="sim:a5000", default=16) == 16
    assert stored_optimal_batch("toy", tmp_path, hardware_key="nvidia-b200-179gib", default=None) is None
    with pytest.raises(ConfigError, match="no baseline for 'resnet50'.*default="):
        stored_optimal_batch("resnet50", tmp_path, device="sim:h100")
    other = SimulatedModel("toy", weights_bytes=10**9, activation_bytes_per_sample=10**9, flops_per_sample=1e9)
    session(tmp_path).run("tests/test_models.py::test_other", other)
    with pytest.raises(ConfigError, match="matches several baselines"):
        stored_optimal_batch("toy", tmp_path, device="sim:h100")


def test_changed_search_settings_are_noted_not_failed(tmp_path):
    session(tmp_path).run("t.py::test_a", MODEL)
    result = session(tmp_path).run("t.py::test_a", MODEL, cap=64, max_latency_s=0.5)
    assert result.cached and not result.failed
    note = next(finding for finding in result.findings if finding.kind == "settings_changed")
    assert "cap 8192 -> 64" in note.message and "max_latency_s None -> 0.5" in note.message


def test_incomplete_entry_is_a_baseline_error_and_is_kept(tmp_path):
    first = session(tmp_path)
    first.run("t.py::test_a", MODEL)
    path = first.store.path("t")
    document = json.loads(path.read_text())
    del document["entries"]["t.py::test_a::toy"]["throughput_samples"]
    path.write_text(json.dumps(document))
    with pytest.raises(BaselineError, match=r"field .throughput_samples. = .\(missing\). is required.*--autobatch-up"):
        session(tmp_path).run("t.py::test_a", MODEL)
    assert json.loads(path.read_text()) == document


def test_public_api_resolves_every_name_without_importing_torch():
    code = ("import sys, pytest_autobatch as p\n"
            "assert 'pytest_autobatch.search' not in sys.modules\n"
            "missing = [name for name in p.__all__ if getattr(p, name, None) is None]\n"
            "assert not missing, missing\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pytest_autobatch.nothing  # noqa: B018


def test_each_model_and_mode_in_a_test_gets_its_own_entry(tmp_path):
    runs = session(tmp_path)
    inference = runs.run("t.py::test_a", MODEL)
    train = runs.run("t.py::test_a", MODEL, mode="train")
    assert (inference.key, train.key) == ("t.py::test_a::toy", "t.py::test_a::toy-train")
    assert train is not inference and train.entry["mode"] == "train"
    other = SimulatedModel("toy", weights_bytes=10**9, activation_bytes_per_sample=10**7, flops_per_sample=1e9)
    with pytest.raises(ConfigError, match="already the name of another model or mode.*name='...'"):
        runs.run("t.py::test_a", other)


def test_an_oom_at_batch_1_is_not_called_a_stored_batch():
    from pytest_autobatch.gate import check_entry
    from pytest_autobatch.record import Remeasurement
    entry = {"model": "toy", "optimal_batch": 8, "max_batch": 16, "throughput_samples": [1.0] * 15,
             "peak_memory_bytes": 100, "model_fingerprint_hash": "x"}
    now = Remeasurement(throughput_samples=[], batch1_throughput_samples=[], peak_memory_bytes=None,
                        oom_batches=[1, 16], fingerprint={})
    messages = [finding.message for finding in check_entry(entry, now, hardware="gpu").findings
                if finding.kind == "oom"]
    assert "out of memory at batch 1;" in messages[0]
    assert "out of memory at the stored maximum batch 16 (recorded peak" in messages[1]


def test_less_memory_than_recorded_is_noted_beside_the_oom_it_causes(tmp_path):
    recorded = session(tmp_path).run("t.py::test_a", MODEL)
    smaller = recorded.entry["capacity_bytes"] // 2
    runs = AutobatchSession(Settings(baselines=tmp_path, device="sim:h100"),
                            device_factory=lambda spec, memory_budget: SimulatedDevice(
                                "h100", capacity_bytes=smaller))
    again = runs.run("t.py::test_a", MODEL)
    assert again.cached and again.failed
    assert [finding.kind for finding in again.findings if finding.failed][0] == "oom"
    note = next(finding.message for finding in again.findings if finding.kind == "settings_changed")
    assert "memory available" in note and "->" in note


def busy_session(tmp_path, device, **settings):
    return AutobatchSession(Settings(baselines=tmp_path, device="sim:h100", steady_pause_s=0.0, **settings),
                            device_factory=lambda spec, memory_budget: device)


class CountingDevice(SimulatedDevice):
    """A simulated H100 that counts paired measurements (the gate's and the recording's)."""

    def workload(self, model, example_input=None, *, mode="inference", **options):
        workload = super().workload(model, example_input, mode=mode, **options)
        measure_paired = workload.measure_paired

        def counted(batch, blocks):
            self.paired += 1
            return measure_paired(batch, blocks)
        workload.measure_paired = counted
        return workload


def counting(**options):
    device = CountingDevice("h100", **options)
    device.paired = 0
    return device


@pytest.mark.parametrize("policy, failed, rounds", [("warn", False, 1), ("retry", False, 3), ("fail", True, 1)])
def test_the_inconclusive_option_warns_retries_or_fails(tmp_path, policy, failed, rounds):
    session(tmp_path).run("t.py::test_a", MODEL)
    quiet = counting()
    busy_session(tmp_path, quiet).run("t.py::test_a", MODEL)
    device = counting(slowdown=1.5, unsteady=("its threads waited for a CPU 150% of the time",))
    result = busy_session(tmp_path, device, inconclusive=policy).run("t.py::test_a", MODEL)
    assert result.failed is failed
    assert [f.kind for f in result.findings] == ["inconclusive"]
    assert device.paired == rounds * quiet.paired   # each round gathers the same number of samples


def test_a_baseline_recorded_on_a_busy_machine_is_retried_then_says_so(tmp_path):
    device = counting(unsteady=("the CPU quota throttled it 12 times",))
    result = busy_session(tmp_path, device).run("t.py::test_a", MODEL)
    assert result.entry["unsteady"] == ["the CPU quota throttled it 12 times"]
    note = next(f for f in result.findings if f.kind == "recorded_unsteady")
    assert "recorded while the machine was busy" in note.message and "--autobatch-update" in note.message
    quiet = counting()
    busy_session(tmp_path / "quiet", quiet).run("t.py::test_a", MODEL)
    assert device.paired == 3 * quiet.paired   # measured again twice before giving up
    again = session(tmp_path).run("t.py::test_a", MODEL)
    assert "recorded_unsteady" in [f.kind for f in again.findings] and not again.failed


def test_timing_targets_are_not_judged_on_a_busy_machine_but_memory_is(tmp_path):
    session(tmp_path).run("t.py::test_a", MODEL)
    busy = counting(slowdown=3.0, unsteady=("its threads waited for a CPU 150% of the time",))
    result = busy_session(tmp_path, busy).run("t.py::test_a", MODEL)
    assert result.verdict == "inconclusive"
    result.expect(min_speedup=1e9, min_throughput=1e12, max_latency_s=1e-9)   # not judged: too busy
    with pytest.raises(AssertionError, match="peak memory"):
        result.expect(min_speedup=1e9, max_memory_bytes=1)


def test_a_throughput_regression_fails_only_when_a_second_measurement_confirms_it(tmp_path):
    session(tmp_path).run("t.py::test_a", MODEL)
    quiet = counting()
    busy_session(tmp_path, quiet).run("t.py::test_a", MODEL)
    slower = counting(slowdown=1.5)
    result = busy_session(tmp_path, slower).run("t.py::test_a", MODEL)
    assert result.failed and [f.kind for f in result.findings] == ["throughput_regression"]
    assert "a second measurement confirmed it (the first: -3" in result.findings[0].message
    assert slower.paired == 2 * quiet.paired


def test_a_regression_a_second_measurement_does_not_show_is_inconclusive(tmp_path):
    session(tmp_path).run("t.py::test_a", MODEL)
    quiet = counting()
    busy_session(tmp_path, quiet).run("t.py::test_a", MODEL)
    passing = counting(slowdown=1.5)
    workload = passing.workload

    def slow_for_one_measurement(model, example_input=None, *, mode="inference", **options):
        made = workload(model, example_input, mode=mode, **options)
        measure_paired = made.measure_paired

        def measured(batch, blocks):
            samples = measure_paired(batch, blocks)
            if passing.paired == quiet.paired:
                passing.slowdown = 1.0    # what slowed the first measurement has passed
            return samples
        made.measure_paired = measured
        return made
    passing.workload = slow_for_one_measurement
    result = busy_session(tmp_path, passing).run("t.py::test_a", MODEL)
    assert not result.failed and [f.kind for f in result.findings] == ["inconclusive"]
    assert re.search(r"a first measurement read a regression \(-3\d\.\d%\), a second taken right after it did not "
                     r"\([+-]\d\.\d%\)", result.findings[0].message)
