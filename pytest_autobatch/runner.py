"""Search a workload into a baseline entry, and re-measure an entry through the regression gate.

Plain functions over a Device and its Workload (see DESIGN.md): no pytest, no torch. The plugin
calls ``search_workload`` when a baseline is missing or being updated, and ``remeasure`` when
one exists; ``check_entry`` is the gate itself, a pure function of the entry and new figures.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from .errors import ConfigError, is_oom_error
from .stats import NOISY_SPREAD, compare_throughput, median, summarize
from .units import format_bytes

DEFAULT_CAP = 8192
DEFAULT_SEARCH_TOLERANCE = 0.03
DEFAULT_THROUGHPUT_TOLERANCE = 0.10
DEFAULT_MEMORY_TOLERANCE = 0.10

#: Raw samples the gate wants on each side: with 15 against 15 the rank test stays significant for
#: a real drop even when a few baseline samples are slow outliers.
GATE_SAMPLES = 15
#: At most this many measure() calls to gather GATE_SAMPLES (a device may give few per call);
#: twice as many for twice the samples when they are noisy.
GATE_MEASURE_CALLS = 4

#: Recorded speedup target: this share of the measured speedup, never below 1.
TARGET_SPEEDUP_SHARE = 0.8

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    pass


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _Recorder:
    """Wraps a workload's probe and measure: reports progress, remembers every memory probe."""

    workload: Any
    label: str
    progress: Progress
    peaks: dict[int, int | None] = field(default_factory=dict)   # None: out of memory
    predicted: dict[int, int | None] = field(default_factory=dict)
    probe_calls: int = 0

    def probe(self, batch: int) -> int:
        self.predicted[batch] = self.workload.predict_peak_bytes(batch)
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

    def _noting_oom(self, action: Callable[[int], Any], batch: int, when: str) -> Any:
        """Run ``action(batch)``; an OOM is recorded against the batch (and re-raised for the search)."""
        try:
            return action(batch)
        except Exception as exc:
            if is_oom_error(exc):
                self.peaks[batch] = None
                self.progress(f"{self.label}: batch {batch} out of memory{when}")
            raise


def gate_samples(measure: Callable[[int], list[float]], batch: int) -> list[float]:
    """Raw throughput samples at ``batch``: GATE_SAMPLES, or twice that when they are noisy.

    With a spread (IQR/median) above NOISY_SPREAD a few slow outliers can take a quarter of 15
    samples and hide a real drop from the rank test; 30 samples keep it significant.
    """
    collected: list[float] = []
    for _ in range(2 * GATE_MEASURE_CALLS):
        noisy = len(collected) >= GATE_SAMPLES and summarize(collected).spread > NOISY_SPREAD
        if len(collected) >= (2 * GATE_SAMPLES if noisy else GATE_SAMPLES):
            break
        collected.extend(measure(batch))
    return collected


def _probe_rows(recorder: _Recorder, optimal: Any) -> list[dict[str, Any]]:
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


def search_workload(device: Any, workload: Any, *, model: str, cap: int | None = None,
                    max_latency_s: float | None = None, tolerance: float = DEFAULT_SEARCH_TOLERANCE,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Run the full search on ``workload`` and return its baseline entry (DESIGN.md format)."""
    from .search import find_max_batch, find_optimal_batch, predicted_max_batch

    cap = DEFAULT_CAP if cap is None else cap
    began = time.perf_counter()
    recorder = _Recorder(workload, f"{model} on {device.name}", progress or _silent)
    capacity = device.capacity_bytes()
    predicted = predicted_max_batch(workload.predict_peak_bytes, capacity, cap) if capacity else None
    start = None if predicted is None else max(1, predicted)
    max_result = find_max_batch(recorder.probe, cap=cap, capacity_bytes=capacity, start=start)
    optimal = find_optimal_batch(recorder.measure, max_batch=max_result.max_batch,
                                 tolerance=tolerance, max_latency_s=max_latency_s)
    max_batch = optimal.max_batch   # below max_result's when a batch ran out of memory while timed
    batch1_samples = optimal.measurements.get(1) or recorder.measure(1)
    peak_at_optimal = recorder.peak_at(optimal.optimal_batch)
    peak_at_max = recorder.peak_at(max_batch)
    # Fresh samples for the baseline: the sweep's samples at the optimal batch are the ones that
    # won the comparison, biased high, and a re-measurement would read them as a regression.
    samples = gate_samples(recorder.measure, optimal.optimal_batch)
    throughput = median(samples)
    speedup = throughput / median(batch1_samples)
    fingerprint = workload.fingerprint()
    entry = {
        "model": model,
        "device": device.name,
        "mode": fingerprint.get("mode", "inference"),
        "model_fingerprint": fingerprint,
        "model_fingerprint_hash": fingerprint_hash(fingerprint),
        "optimal_batch": optimal.optimal_batch,
        "max_batch": max_batch,
        "cap": cap,
        "max_latency_s": max_latency_s,
        "tolerance": tolerance,
        "throughput": throughput,
        "throughput_samples": samples,
        "batch1_throughput": median(batch1_samples),
        "batch1_throughput_samples": list(batch1_samples),
        "speedup": speedup,
        "peak_memory_bytes": peak_at_optimal,
        "max_batch_peak_memory_bytes": peak_at_max,
        "capacity_bytes": capacity,
        "extras": workload.extras(optimal.optimal_batch),
        "search": {"probes": recorder.probe_calls, "ooms": max_result.ooms + len(optimal.oom_batches),
                   "skipped": list(max_result.skipped), "measurements": len(optimal.measurements),
                   "seconds": round(time.perf_counter() - began, 3)},
        "probes": _probe_rows(recorder, optimal),
        "targets": {"min_speedup": round(max(1.0, TARGET_SPEEDUP_SHARE * speedup), 2)},
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if max_latency_s is not None:
        entry["targets"]["max_latency_s"] = max_latency_s
    return entry


@dataclass(frozen=True)
class Finding:
    """One outcome of the gate. ``failed`` findings fail the test; the others are reported."""

    kind: str  # throughput_regression, oom, memory_regression, improvement, model_changed, noisy, settings_changed
    message: str
    failed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Remeasurement:
    """What a cached run measured at the stored batches, and the gate's findings."""

    throughput_samples: list[float]
    batch1_throughput_samples: list[float]
    peak_memory_bytes: int | None
    oom_batches: list[int]
    findings: list[Finding]
    change: float | None

    @property
    def throughput(self) -> float | None:
        return median(self.throughput_samples) if self.throughput_samples else None

    @property
    def speedup(self) -> float:
        """Throughput at the optimal batch over batch 1, both measured in this run."""
        if not (self.throughput_samples and self.batch1_throughput_samples):
            return 0.0
        return median(self.throughput_samples) / median(self.batch1_throughput_samples)

    @property
    def failed(self) -> bool:
        return any(finding.failed for finding in self.findings)


def _fingerprint_note(entry: dict[str, Any], fingerprint: dict[str, Any]) -> str | None:
    stored = entry.get("model_fingerprint") or {}
    if entry.get("model_fingerprint_hash") == fingerprint_hash(fingerprint):
        return None
    changed = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
    return (f"the model's fingerprint changed since the baseline was recorded "
            f"({entry.get('model_fingerprint_hash')} -> {fingerprint_hash(fingerprint)}; changed: "
            f"{', '.join(changed) or 'details'})")


def check_entry(entry: dict[str, Any], *, throughput_samples: list[float],
                peak_memory_bytes: int | None, oom_batches: list[int], hardware: str,
                fingerprint: dict[str, Any], tolerance: float = DEFAULT_THROUGHPUT_TOLERANCE,
                memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE) -> tuple[list[Finding], float | None]:
    """The regression gate: findings for new figures against a stored entry, and the throughput change."""
    if not 0 <= memory_tolerance < 10:
        raise ConfigError(f"memory tolerance must be a fraction such as 0.1, got {memory_tolerance!r}")
    who = f"{entry.get('model', '?')} on {hardware}"
    optimal = entry["optimal_batch"]
    recorded_peaks = {entry["max_batch"]: ("maximum", entry.get("max_batch_peak_memory_bytes")),
                      optimal: ("optimal", entry.get("peak_memory_bytes"))}
    findings: list[Finding] = []
    for batch in oom_batches:
        which, recorded = recorded_peaks.get(batch, (None, None))
        where = f"the stored {which} batch {batch} (recorded peak {format_bytes(recorded)})" if which \
            else f"batch {batch}"
        findings.append(Finding("oom", f"{who}: out of memory at {where}; the model now needs more "
                                "memory or the device has less free", True))
    change = None
    if throughput_samples:
        comparison = compare_throughput(entry["throughput_samples"], throughput_samples, tolerance)
        change = comparison.change
        figures = (f"{comparison.baseline.median:,.1f} -> {comparison.current.median:,.1f} samples/s "
                   f"at batch {optimal} ({change:+.1%}, tolerance {tolerance:.0%}, Mann-Whitney "
                   f"p={comparison.p_value:.2g}, {comparison.baseline.count} vs "
                   f"{comparison.current.count} samples)")
        if comparison.verdict == "regression":
            findings.append(Finding("throughput_regression", f"{who}: throughput regression: {figures}", True))
        elif comparison.verdict == "improvement":
            findings.append(Finding("improvement", f"{who}: throughput improved: {figures}; record it "
                                    "with pytest --autobatch --autobatch-update", False))
        elif comparison.noisy:
            findings.append(Finding("noisy", f"{who}: noisy measurements (IQR/median "
                                    f"{max(comparison.baseline.spread, comparison.current.spread):.0%}): "
                                    f"{figures}", False))
    stored_peak = entry.get("peak_memory_bytes")
    if peak_memory_bytes is not None and stored_peak:
        growth = peak_memory_bytes / stored_peak - 1
        figures = (f"{format_bytes(stored_peak)} -> {format_bytes(peak_memory_bytes)} at batch {optimal} "
                   f"({growth:+.1%}, tolerance {memory_tolerance:.0%})")
        if growth > memory_tolerance:
            findings.append(Finding("memory_regression", f"{who}: peak memory regression: {figures}", True))
        elif growth < -memory_tolerance:
            findings.append(Finding("improvement", f"{who}: peak memory dropped: {figures}; a larger "
                                    "batch may fit, search again with pytest --autobatch "
                                    "--autobatch-update", False))
    note = _fingerprint_note(entry, fingerprint)
    if note:
        findings = [Finding(f.kind, f"{f.message}. Note: {note}", f.failed) if f.failed else f
                    for f in findings]
        findings.append(Finding("model_changed", f"{who}: {note}; if intended, re-record with "
                                "pytest --autobatch --autobatch-update", False))
    return findings, change


def _run_or_oom(action: Callable[[], Any], batch: int, oom_batches: list[int]) -> Any:
    try:
        return action()
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        if batch not in oom_batches:
            oom_batches.append(batch)
        return None


def remeasure(device: Any, workload: Any, entry: dict[str, Any], *,
              tolerance: float = DEFAULT_THROUGHPUT_TOLERANCE,
              memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE,
              progress: Progress | None = None) -> Remeasurement:
    """Re-measure a stored entry: one probe at the maximum and at the optimal batch, then throughput
    at the optimal batch and at batch 1.

    The probes come first, as in the search: a process's first large allocations grow its heap, and
    timing before them reads up to a quarter slower on the CPU than the recorded search did.
    """
    report = progress or _silent
    label = f"{entry.get('model', '?')} on {device.name}"
    optimal, maximum = entry["optimal_batch"], entry["max_batch"]
    oom_batches: list[int] = []
    report(f"{label}: checking the stored maximum batch {maximum}")
    _run_or_oom(lambda: workload.probe(maximum), maximum, oom_batches)   # only whether it fits
    peak = _run_or_oom(lambda: workload.probe(optimal), optimal, oom_batches)
    report(f"{label}: re-measuring batch {optimal}")
    samples = _run_or_oom(lambda: gate_samples(workload.measure, optimal), optimal, oom_batches) or []
    batch1_samples = _run_or_oom(lambda: workload.measure(1), 1, oom_batches) or []
    fingerprint = workload.fingerprint()
    hardware = device.hardware().get("name") or device.name
    findings, change = check_entry(entry, throughput_samples=samples, peak_memory_bytes=peak,
                                   oom_batches=oom_batches, hardware=hardware, fingerprint=fingerprint,
                                   tolerance=tolerance, memory_tolerance=memory_tolerance)
    return Remeasurement(throughput_samples=samples, batch1_throughput_samples=batch1_samples,
                         peak_memory_bytes=peak, oom_batches=oom_batches, findings=findings,
                         change=change)
