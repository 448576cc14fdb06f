"""Recording a search into an entry, and the regression gate, on simulated GPUs (no pytest machinery)."""

import re

import pytest

from pytest_autobatch.devices.simulated import SimulatedModel, simulated_device
from pytest_autobatch.errors import OutOfMemory
from pytest_autobatch.gate import check_entry
from pytest_autobatch.record import GATE_SAMPLES, Remeasurement, gate_samples, record_entry, remeasure

# FLOPs / 16: the simulated profiles use FP32 peaks since issue 15, about 1/16 of the FP16 ones.
MODEL = SimulatedModel("toy", weights_bytes=2_000_000_000, activation_bytes_per_sample=50_000_000,
                       flops_per_sample=4e10 / 16)
DESIGN_KEYS = {"model", "device", "mode", "model_fingerprint", "model_fingerprint_hash", "optimal_batch",
               "max_batch", "cap", "max_latency_s", "optimal_band", "throughput", "throughput_samples",
               "batch1_throughput", "batch1_throughput_samples", "speedup", "peak_memory_bytes",
               "max_batch_peak_memory_bytes", "capacity_bytes", "extras", "search", "probes", "targets",
               "recorded_at"}


def recorded(model=MODEL, profile="sim:h100", **options):
    device = simulated_device(profile)
    return record_entry(device, device.workload(model), model=model.name, **options)


def gate(entry, model=MODEL, memory_tolerance=0.1, **device_options):
    device = simulated_device("sim:h100", **device_options)
    now = remeasure(device, device.workload(model), entry)
    return now, check_entry(entry, now, hardware=device.hardware()["name"], memory_tolerance=memory_tolerance)


def kinds(findings):
    return sorted((finding.kind, finding.failed) for finding in findings)


def test_search_entry_has_the_documented_fields_and_exact_maximum():
    device = simulated_device("sim:h100")
    workload = device.workload(MODEL)
    entry = record_entry(device, workload, model="toy")
    assert DESIGN_KEYS <= set(entry)
    assert entry["max_batch"] == workload.true_max_batch(8192)
    assert 1 <= entry["optimal_batch"] <= entry["max_batch"]
    assert entry["speedup"] == pytest.approx(entry["throughput"] / entry["batch1_throughput"])
    assert entry["targets"]["min_speedup"] == pytest.approx(max(1.0, round(0.8 * entry["speedup"], 2)))
    batches = [row["batch"] for row in entry["probes"]]
    assert batches == sorted(set(batches))
    memory_rows = [row for row in entry["probes"] if row["peak_bytes"] is not None]
    assert memory_rows and all(row["predicted_bytes"] for row in memory_rows)
    assert {"oom"} <= {row["outcome"] for row in entry["probes"]}
    assert entry["search"]["ooms"] == sum(row["outcome"] == "oom" for row in entry["probes"])


def test_latency_limit_and_cap_are_kept_in_the_entry():
    entry = recorded(cap=100, max_latency_s=0.004)
    assert entry["max_batch"] <= 100 and entry["cap"] == 100
    assert entry["optimal_batch"] / entry["throughput"] <= 0.004 * 1.1
    assert entry["targets"]["max_latency_s"] == 0.004


def test_unchanged_rerun_passes_the_gate():
    now, check = gate(recorded())
    assert not check.failed and now.oom_batches == []
    assert abs(check.change) < 0.10 and len(now.throughput_samples) >= 15


@pytest.mark.parametrize("noise, calls, samples", [(0.01, 1, 15), (0.3, 2, 30)])
def test_gate_samples_are_taken_in_one_go_and_doubled_only_when_noisy(noise, calls, samples):
    workload = simulated_device("sim:h100", timing_noise=noise).workload(MODEL)
    asked = []

    def measure_paired(batch, blocks):
        asked.append(blocks)
        return workload.measure_paired(batch, blocks)
    gate = gate_samples(measure_paired, 64)
    assert asked == [GATE_SAMPLES] * calls
    assert len(gate.model) == len(gate.reference) == len(gate.reference_parts["memory"]) == samples


def test_slower_model_is_a_throughput_regression_naming_model_hardware_numbers_and_next_step():
    _, check = gate(recorded(), slowdown=1.25)
    assert kinds(check.findings) == [("throughput_regression", True)]
    message = check.findings[0].message
    assert message.startswith("toy on NVIDIA H100 80GB HBM3 (simulated): throughput regression:")
    raw = float(re.search(r"\((-\d+\.\d)% raw", message).group(1))
    relative = float(re.search(r"; (-\d+\.\d)% relative to the reference, tolerance 10%, Mann-Whitney p=",
                               message).group(1))
    assert raw == pytest.approx(-20, abs=2) and relative == pytest.approx(-20, abs=3)  # 1/1.25 - 1
    assert "as fast as the recording machine" in message
    assert check.findings[0].text.endswith("point --autobatch-baselines at them")


def test_slower_machine_is_not_a_regression_but_a_slower_model_on_it_is():
    entry = recorded()
    _, slower_machine = gate(entry, machine_speed=0.4)
    assert not slower_machine.failed and abs(slower_machine.change) < 0.05   # relative: unchanged
    _, both = gate(entry, machine_speed=0.4, slowdown=1.25)
    assert kinds(both.findings) == [("throughput_regression", True)]
    assert "(-68." in both.findings[0].message or "(-67." in both.findings[0].message   # raw: 0.4 / 1.25
    slower = float(re.search(r"this machine runs the reference (\d\.\d\d)x slower than the recording machine",
                             both.findings[0].message).group(1))
    assert slower == pytest.approx(2.5, abs=0.1)


def test_a_drop_a_faster_machine_can_explain_is_inconclusive_not_a_failure():
    """1.6x faster since the recording, the model 1.25x slower: -20% relative to the reference but
    +28% raw. A model that follows the machine only partly reads the same, so it is not judged."""
    _, faster = gate(recorded(), machine_speed=1.6, slowdown=1.25)
    assert kinds(faster.findings) == [("inconclusive", False)]
    assert re.search(r"the machine's speed changed by more than the tolerance since the recording \(compute 1\.6\dx, "
                     r"memory 1\.6\dx\).*from none of it \(raw \+2\d\.\d%\) to all of it", faster.findings[0].message)
    _, slower_raw_too = gate(recorded(), machine_speed=1.6, slowdown=2.0)   # -20% raw as well: the model's
    assert kinds(slower_raw_too.findings) == [("throughput_regression", True)]


def test_a_busy_machine_makes_throughput_inconclusive_but_still_fails_on_memory():
    entry = recorded()
    _, busy = gate(entry, slowdown=1.5, unsteady=("its threads waited for a CPU 120% of the time",))
    assert kinds(busy.findings) == [("inconclusive", False)]
    assert "throughput inconclusive: its threads waited for a CPU 120% of the time" in busy.findings[0].message
    assert "--autobatch-inconclusive" in busy.findings[0].message
    _, busy_oom = gate(entry, memory_overhead_bytes=4 * 2**30, unsteady=("busy",))
    assert ("oom", True) in kinds(busy_oom.findings)


def test_a_reference_whose_speed_varies_makes_the_verdict_inconclusive():
    entry = recorded()
    now = remeasure(simulated_device("sim:h100"), simulated_device("sim:h100").workload(MODEL), entry)
    now.reference_samples = [1000.0 * (1 + 0.5 * (i % 2)) for i in range(len(now.throughput_samples))]
    verdict = check_entry(entry, now, hardware="gpu")
    assert kinds(verdict.findings) == [("inconclusive", False)]
    assert "the reference's speed varied by" in verdict.findings[0].message


@pytest.mark.parametrize("damage, reason", [
    (lambda entry: entry.pop("reference_samples"), "has no reference samples"),
    (lambda entry: entry.__setitem__("reference_samples", ["fast"] * len(entry["throughput_samples"])),
     "reference_samples are corrupt"),
    (lambda entry: entry.__setitem__("reference_samples", [1.0]), "reference_samples are corrupt"),
])
def test_an_old_or_corrupt_reference_falls_back_to_the_raw_comparison_and_says_so(damage, reason):
    entry = recorded()
    damage(entry)
    _, check = gate(entry, slowdown=1.25)
    assert kinds(check.findings) == [("throughput_regression", True)]
    assert "judged on raw throughput" in check.findings[0].message and reason in check.findings[0].message
    _, unchanged = gate(entry)
    assert not unchanged.failed


def test_faster_device_is_an_improvement_with_an_update_hint():
    _, check = gate(recorded(), slowdown=0.7)
    assert kinds(check.findings) == [("improvement", False)]
    assert "--autobatch-update" in check.findings[0].message


def test_less_memory_gives_oom_at_the_stored_maximum_not_a_crash():
    entry = recorded()
    now, check = gate(entry, memory_overhead_bytes=4 * 2**30)
    assert now.oom_batches == [entry["max_batch"]]
    assert ("oom", True) in kinds(check.findings)
    oom = next(f for f in check.findings if f.kind == "oom")
    assert f"stored maximum batch {entry['max_batch']}" in oom.message


def test_peak_memory_growth_beyond_tolerance_is_a_memory_regression():
    entry = recorded()
    bigger = SimulatedModel("toy", weights_bytes=2_000_000_000, activation_bytes_per_sample=60_000_000,
                            flops_per_sample=4e10 / 16)
    _, check = gate(entry, bigger, memory_tolerance=0.05)
    assert ("memory_regression", True) in kinds(check.findings)
    memory = next(f for f in check.findings if f.kind == "memory_regression")
    assert "tolerance 5%" in memory.message and "GiB ->" in memory.message
    assert "fingerprint changed" in memory.message and "activation_bytes_per_sample" in memory.message
    assert ("model_changed", False) in kinds(check.findings)


def test_check_entry_flags_memory_drop_as_improvement():
    entry = recorded()
    now = Remeasurement(throughput_samples=entry["throughput_samples"], batch1_throughput_samples=[],
                        peak_memory_bytes=entry["peak_memory_bytes"] // 2, oom_batches=[],
                        fingerprint=entry["model_fingerprint"])
    verdict = check_entry(entry, now, hardware="gpu")
    assert kinds(verdict.findings) == [("improvement", False)] and verdict.change == 0.0
    assert "a larger batch may fit" in verdict.findings[0].message


def test_a_batch_that_runs_out_of_memory_while_timed_lowers_the_recorded_maximum():
    device = simulated_device("sim:h100")
    workload = device.workload(MODEL)
    true_max = workload.true_max_batch(8192)
    timing_limit = true_max - 3
    measure = workload.measure

    def measure_with_fragmentation(batch):
        if batch > timing_limit:
            raise OutOfMemory(f"batch {batch}: fragmented while timing", batch=batch)
        return measure(batch)

    workload.measure = measure_with_fragmentation
    entry = record_entry(device, workload, model=MODEL.name)
    assert entry["optimal_batch"] <= entry["max_batch"] <= timing_limit < true_max
    ooms = [row["batch"] for row in entry["probes"] if row["outcome"] == "oom"]
    assert min(ooms) > entry["max_batch"] and entry["search"]["ooms"] == len(ooms)


MEMORY_BOUND = SimulatedModel("weights-streaming", weights_bytes=20_000_000_000, activation_bytes_per_sample=1_000_000,
                              flops_per_sample=1e6)
COMPUTE_BOUND = SimulatedModel("gemm-heavy", weights_bytes=100_000_000, activation_bytes_per_sample=1_000_000,
                               flops_per_sample=1e12)


def test_a_host_whose_memory_alone_slowed_is_named_not_judged_for_a_memory_bound_model():
    entry = recorded(MEMORY_BOUND)
    now, check = gate(entry, MEMORY_BOUND, memory_speed=0.7)
    assert now.throughput < 0.75 * entry["throughput"]    # raw: the model really ran 30% slower
    assert kinds(check.findings) == [("inconclusive", False)]
    message = check.findings[0].message
    assert re.search(r"the machine's speed changed unevenly since the recording \(compute (0\.9\d|1\.0\d)x, "
                     r"memory 0\.[67]\dx\)", message)
    assert re.search(r"by part: compute .*, relative to it -[23]\d\.\d%, memory .*, relative to it [+-]\d\.\d%",
                     message)
    assert "record its own baselines with pytest --autobatch --autobatch-update" in message


def test_a_host_whose_memory_alone_slowed_passes_a_compute_bound_model():
    _, check = gate(recorded(COMPUTE_BOUND), COMPUTE_BOUND, memory_speed=0.7)
    assert not check.failed and not check.inconclusive and abs(check.change) < 0.05


def test_a_slowdown_beyond_every_part_of_the_reference_is_a_regression_on_an_uneven_host():
    _, check = gate(recorded(MEMORY_BOUND), MEMORY_BOUND, memory_speed=0.7, slowdown=1.6)
    assert kinds(check.findings) == [("throughput_regression", True)]
    assert check.change == pytest.approx(1 / 1.6 - 1, abs=0.05)   # judged by the part that explains the most


def test_corrupt_reference_parts_leave_the_whole_reference_to_judge_by():
    entry = recorded(MEMORY_BOUND)
    entry["reference_parts"]["memory"] = ["slow"] * len(entry["throughput_samples"])
    _, check = gate(entry, MEMORY_BOUND, memory_speed=0.7)
    assert kinds(check.findings) == [("throughput_regression", True)]   # what the whole reference alone says
    assert "by part" not in check.findings[0].message
