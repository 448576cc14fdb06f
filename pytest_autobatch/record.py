"""A search of a workload into a baseline entry, and a re-measurement of a stored entry.

Plain functions over a Device and its Workload (``devices.base``): no pytest, no torch. The
session calls ``record_entry`` when a baseline is missing or being updated, and ``remeasure``
when one exists; what the re-measurement means is the gate's business (``gate.py``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

from .devices.base import Device, PairedSamples, Workload, stable_hash
from .errors import catch_oom
from .search import MaxBatchResult, OptimalBatchResult, find_max_batch, find_optimal_batch, predicted_max_batch
from .stats import NOISY_SPREAD, median, summarize
from .units import format_bytes

DEFAULT_CAP = 8192
#: The optimal batch is the smallest within this band of the best throughput.
DEFAULT_OPTIMAL_BAND = 0.03

#: Raw samples the gate wants on each side: with 15 against 15 the rank test stays significant for
#: a real drop even when a few baseline samples are slow outliers.
GATE_SAMPLES = 15

#: Gate samples are measured this many times at most while the OS says the machine is busy, with
#: this pause between tries: a neighbour's burst often passes within seconds.
STEADY_ATTEMPTS = 3
STEADY_PAUSE_S = 5.0

#: Recorded speedup target: this share of the measured speedup, never below 1.
TARGET_SPEEDUP_SHARE = 0.8

Progress = Callable[[str], None]
_Result = TypeVar("_Result")


def silent(_: str) -> None:
    pass


@dataclass
class _Recorder:
    """Wraps a workload's probe and measure: reports progress, remembers every memory probe."""

    workload: Workload
    label: str
    progress: Progress
    peaks: dict[int, int | None] = field(default_factory=dict)   # None: out of memory
    predicted: dict[int, int | None] = field(default_factory=dict)
    probe_calls: int = 0

    def predict(self, batch: int) -> int | None:
        """The workload's predicted peak at ``batch``, predicted once (fake tensors take a while)."""
        if batch not in self.predicted:
            self.predicted[batch] = self.workload.predict_peak_bytes(batch)
        return self.predicted[batch]

    def probe(self, batch: int) -> int:
        self.predict(batch)
        self.progress(f"{self.label}: probing batch {batch}")
        self.probe_calls += 1
        peak = self._noting_oom(self.workload.probe, batch, "")
        self.peaks[batch] = peak
        self.progress(f"{self.label}: batch {batch} fits ({format_bytes(peak)})")
        return peak

    def peak_at(self, batch: int) -> int:
        """Peak bytes at ``batch``, probing once more only when the search never ran it."""
        peak = self.peaks.get(batch)
        return self.probe(batch) if peak is None else peak

    def measure(self, batch: int) -> list[float]:
        self.progress(f"{self.label}: timing batch {batch}")
        samples = self._noting_oom(self.workload.measure, batch, " while timing")
        self.progress(f"{self.label}: batch {batch} runs {median(samples):,.1f} samples/s")
        return samples

    def _noting_oom(self, action: Callable[[int], _Result], batch: int, when: str) -> _Result:
        """Run ``action(batch)``; an OOM is recorded against the batch (and re-raised for the search)."""
        with catch_oom() as caught:
            return action(batch)
        self.peaks[batch] = None
        self.progress(f"{self.label}: batch {batch} out of memory{when}")
        assert caught.error is not None
        raise caught.error


@dataclass
class GateSamples:
    """Paired samples at one batch for the gate: the model's throughput and, beside each, the
    reference workload's rate; why the OS says they cannot be trusted (empty: steady)."""

    model: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    unsteady: list[str] = field(default_factory=list)
    reference_kind: dict[str, Any] = field(default_factory=dict)
    reference_parts: dict[str, list[float]] = field(default_factory=dict)


def gate_samples(measure_paired: Callable[[int, int], PairedSamples], batch: int) -> GateSamples:
    """Paired samples at ``batch``: GATE_SAMPLES in one go (one warm-up), as many again when they are noisy.

    With a spread (IQR/median) above NOISY_SPREAD a few slow outliers can take a quarter of 15
    samples and hide a real drop from the rank test; 30 samples keep it significant.
    """
    collected = GateSamples()
    for _ in range(2):
        if collected.model and summarize(collected.model).spread <= NOISY_SPREAD:
            break
        paired = measure_paired(batch, GATE_SAMPLES)
        collected.model.extend(paired.model)
        collected.reference.extend(paired.reference)
        for part, rates in paired.reference_parts.items():
            collected.reference_parts.setdefault(part, []).extend(rates)
        kinds = {_kind(reason) for reason in collected.unsteady}
        collected.unsteady.extend(reason for reason in paired.unsteady if _kind(reason) not in kinds)
        collected.reference_kind = paired.reference_kind
    return collected


def _kind(reason: str) -> str:
    """A reason without its figures: one of each kind is enough in a message."""
    return re.sub(r"[\d.,]+", "#", reason)


def measure_until_steady(measure: Callable[[], _Result], busy: Callable[[_Result], str], *, attempts: int,
                         pause_s: float, progress: Progress) -> _Result:
    """``measure()``, again after a pause (up to ``attempts`` times in all) while ``busy`` names a
    reason its result cannot be trusted; the last result when the machine stays busy."""
    result = measure()
    for _ in range(attempts - 1):
        reason = busy(result)
        if not reason:
            break
        progress(f"{reason}: measuring again in {pause_s:.0f} s")
        time.sleep(pause_s)
        result = measure()
    return result


def steady_gate_samples(measure_paired: Callable[[int, int], PairedSamples], batch: int, *, attempts: int,
                        pause_s: float, progress: Progress) -> GateSamples:
    """Gate samples, measured again after a pause while the OS says the machine was busy; the last
    attempt's samples, reasons included, when it stays busy."""
    return measure_until_steady(
        lambda: gate_samples(measure_paired, batch),
        lambda samples: f"unsteady timing ({'; '.join(samples.unsteady)})" if samples.unsteady else "",
        attempts=attempts, pause_s=pause_s, progress=progress)


def _probe_rows(recorder: _Recorder, optimal: OptimalBatchResult) -> list[dict[str, Any]]:
    """Memory probes and throughput measurements merged by batch, in batch order."""
    rows: dict[int, dict[str, Any]] = {}
    for batch, peak in recorder.peaks.items():
        rows[batch] = {"batch": batch, "outcome": "ok" if peak is not None else "oom", "peak_bytes": peak,
                       "predicted_bytes": recorder.predicted.get(batch), "throughput": None, "latency_s": None}
    for batch, samples in optimal.measurements.items():
        row = rows.setdefault(batch, {"batch": batch, "outcome": "ok", "peak_bytes": None,
                                      "predicted_bytes": None})
        row["throughput"] = median(samples)
        row["latency_s"] = optimal.latency_s(batch)
    return [rows[batch] for batch in sorted(rows)]


def smallest_batch(workload: Workload) -> int:
    """The smallest batch the workload takes (``min_batch``: 2 for BatchNorm in training), else 1.
    The search starts there, and the speedup is over it."""
    smallest = getattr(workload, "min_batch", 1)
    return smallest if isinstance(smallest, int) and smallest >= 1 else 1


def search_batches(workload: Workload, capacity: int | None, *, cap: int, max_latency_s: float | None = None,
                   band: float = DEFAULT_OPTIMAL_BAND, probe: Callable[[int], int] | None = None,
                   measure: Callable[[int], list[float]] | None = None,
                   predict: Callable[[int], int | None] | None = None) -> tuple[MaxBatchResult, OptimalBatchResult]:
    """The maximum batch (starting where the workload's prediction for ``capacity`` points, and
    following the prediction while it agrees with the peaks), then the optimal batch below it;
    ``probe``/``measure``/``predict`` default to the workload's own."""
    smallest = smallest_batch(workload)
    predict = predict or workload.predict_peak_bytes
    predicted = predicted_max_batch(predict, capacity, cap, smallest=smallest) if capacity else None
    start = None if predicted is None else max(smallest, predicted)
    max_result = find_max_batch(probe or workload.probe, cap=cap, capacity_bytes=capacity, start=start,
                                min_batch=smallest, predict=predict)
    synchronised_probe = getattr(workload, "synchronised_probe", None)
    if synchronised_probe is not None:
        max_result = _synchronised_max(synchronised_probe, max_result, capacity, smallest)
    optimal = find_optimal_batch(measure or workload.measure, max_batch=max_result.max_batch,
                                 band=band, max_latency_s=max_latency_s, min_batch=smallest)
    return max_result, optimal


def _synchronised_max(probe: Callable[[int], int], found: MaxBatchResult, capacity: int | None,
                      smallest: int) -> MaxBatchResult:
    """The largest batch up to ``found``'s whose synchronised step (a DDP step with its gradient
    all-reduce, on every rank) fits: ``found``'s when it does, else searched down from it."""
    verified = find_max_batch(probe, cap=found.max_batch, capacity_bytes=capacity, start=found.max_batch,
                              min_batch=smallest)
    return MaxBatchResult(verified.max_batch, found.probes + verified.probes, found.ooms + verified.ooms,
                          found.capacity_bytes)


def record_entry(device: Device, workload: Workload, *, model: str, cap: int | None = None,
                 max_latency_s: float | None = None, band: float = DEFAULT_OPTIMAL_BAND,
                 progress: Progress | None = None, steady_pause_s: float = STEADY_PAUSE_S) -> dict[str, Any]:
    """Run the full search on ``workload`` and return its baseline entry (DESIGN.md format).

    The samples stored for the gate are measured while the machine is steady, waiting and trying
    again while it is not; an entry that could only be measured on a busy machine says so in
    ``unsteady`` (the session reports it), rather than passing for a normal baseline.
    """
    cap = DEFAULT_CAP if cap is None else cap
    smallest = smallest_batch(workload)
    began = time.perf_counter()
    recorder = _Recorder(workload, f"{model} on {device.name}", progress or silent)
    capacity = device.capacity_bytes()
    max_result, optimal = search_batches(workload, capacity, cap=cap, max_latency_s=max_latency_s, band=band,
                                         probe=recorder.probe, measure=recorder.measure, predict=recorder.predict)
    max_batch = optimal.max_batch or max_result.max_batch  # lower when a batch ran out of memory while timed
    batch1_samples = optimal.measurements.get(smallest) or recorder.measure(smallest)
    peak_at_optimal = recorder.peak_at(optimal.optimal_batch)
    peak_at_max = recorder.peak_at(max_batch)
    # Fresh samples for the baseline: the sweep's samples at the optimal batch are the ones that
    # won the comparison, biased high, and a re-measurement would read them as a regression.
    recorder.progress(f"{recorder.label}: timing batch {optimal.optimal_batch} beside the reference")
    gate = steady_gate_samples(workload.measure_paired, optimal.optimal_batch, attempts=STEADY_ATTEMPTS,
                               pause_s=steady_pause_s, progress=recorder.progress)
    samples = gate.model
    throughput = median(samples)
    speedup = throughput / median(batch1_samples)
    fingerprint = workload.fingerprint()
    entry: dict[str, Any] = {
        "model": model,
        "device": device.name,
        "mode": fingerprint.get("mode", "inference"),
        "model_fingerprint": fingerprint,
        "model_fingerprint_hash": stable_hash(fingerprint),
        "optimal_batch": optimal.optimal_batch,
        "max_batch": max_batch,
        "cap": cap,
        "max_latency_s": max_latency_s,
        "optimal_band": band,
        "throughput": throughput,
        "throughput_samples": samples,
        "reference_samples": gate.reference,
        "reference_parts": gate.reference_parts,
        "reference": gate.reference_kind,
        "batch1_throughput": median(batch1_samples),
        "batch1_throughput_samples": list(batch1_samples),
        "speedup": speedup,
        "peak_memory_bytes": peak_at_optimal,
        "max_batch_peak_memory_bytes": peak_at_max,
        "capacity_bytes": capacity,
        "extras": workload.extras(optimal.optimal_batch),
        "search": {"probes": recorder.probe_calls, "ooms": max_result.ooms + len(optimal.oom_batches),
                   "measurements": len(optimal.measurements),
                   "seconds": round(time.perf_counter() - began, 3)},
        "probes": _probe_rows(recorder, optimal),
        "targets": {"min_speedup": round(max(1.0, TARGET_SPEEDUP_SHARE * speedup), 2)},
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if max_latency_s is not None:
        entry["targets"]["max_latency_s"] = max_latency_s
    if smallest > 1:
        entry["min_batch"] = smallest   # batch1_* and speedup are at this batch
    if gate.unsteady:
        entry["unsteady"] = gate.unsteady
    return entry


@dataclass
class Remeasurement:
    """What a cached run measured at the stored batches; empty samples where a batch ran out of memory."""

    throughput_samples: list[float]
    batch1_throughput_samples: list[float]
    peak_memory_bytes: int | None
    oom_batches: list[int]
    fingerprint: dict[str, Any]
    reference_samples: list[float] = field(default_factory=list)
    reference_kind: dict[str, Any] = field(default_factory=dict)
    unsteady: list[str] = field(default_factory=list)
    reference_parts: dict[str, list[float]] = field(default_factory=dict)
    #: the ranks of a distributed job that ran out of memory, by batch
    oom_ranks: dict[int, list[int]] = field(default_factory=dict)

    @property
    def throughput(self) -> float | None:
        return median(self.throughput_samples) if self.throughput_samples else None

    @property
    def speedup(self) -> float:
        """Throughput at the optimal batch over batch 1, both measured in this run."""
        if not (self.throughput_samples and self.batch1_throughput_samples):
            return 0.0
        return median(self.throughput_samples) / median(self.batch1_throughput_samples)


def remeasure(device: Device, workload: Workload, entry: dict[str, Any], *,
              progress: Progress | None = None, attempts: int = 1,
              steady_pause_s: float = STEADY_PAUSE_S) -> Remeasurement:
    """Re-measure a stored entry: one probe at the maximum and at the optimal batch, then throughput
    at the optimal batch and at batch 1.

    The probes come first, as in the search: a process's first large allocations grow its heap, and
    timing before them reads up to a quarter slower on the CPU than the recorded search did.
    """
    report = progress or silent
    label = f"{entry.get('model', '?')} on {device.name}"
    optimal, maximum = entry["optimal_batch"], entry["max_batch"]
    oom_batches: list[int] = []
    oom_ranks: dict[int, list[int]] = {}

    def unless_oom(action: Callable[[], _Result], batch: int) -> _Result | None:
        with catch_oom() as caught:
            return action()
        if batch not in oom_batches:
            oom_batches.append(batch)
        ranks = getattr(caught.error, "ranks", None)
        if ranks is not None:
            oom_ranks[batch] = ranks
        del caught
        return None

    report(f"{label}: checking the stored maximum batch {maximum}")
    unless_oom(lambda: workload.probe(maximum), maximum)   # only whether it fits
    peak = unless_oom(lambda: workload.probe(optimal), optimal)
    report(f"{label}: re-measuring batch {optimal}")
    gate = unless_oom(lambda: steady_gate_samples(workload.measure_paired, optimal, attempts=attempts,
                                                  pause_s=steady_pause_s, progress=report), optimal)
    gate = gate or GateSamples()
    smallest = smallest_batch(workload)
    batch1_samples = unless_oom(lambda: workload.measure(smallest), smallest) or []
    return Remeasurement(throughput_samples=gate.model, batch1_throughput_samples=batch1_samples,
                         peak_memory_bytes=peak, oom_batches=oom_batches, fingerprint=workload.fingerprint(),
                         reference_samples=gate.reference, reference_kind=gate.reference_kind,
                         unsteady=gate.unsteady, reference_parts=gate.reference_parts, oom_ranks=oom_ranks)
