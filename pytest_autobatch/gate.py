"""The regression gate: every finding a re-measurement can give against its stored entry.

A pure function of the stored entry, the new figures and the settings: no device, no pytest.
Findings that ``failed`` fail the test (throughput regression, OOM at a stored batch, memory
regression); the others are notes shown under the summary (improvement, model changed, settings
changed, noisy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .devices.base import stable_hash
from .errors import ConfigError
from .record import Remeasurement
from .stats import compare_throughput
from .units import format_bytes

DEFAULT_THROUGHPUT_TOLERANCE = 0.10
DEFAULT_MEMORY_TOLERANCE = 0.10
#: Relative change of the device's available memory worth a note next to the gate's findings.
CAPACITY_CHANGE = 0.05


@dataclass(frozen=True)
class Finding:
    """One outcome of the gate. ``failed`` findings fail the test; the others are reported."""

    kind: str  # throughput_regression, oom, memory_regression, improvement, model_changed, noisy, settings_changed
    message: str
    failed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fingerprint_note(entry: dict[str, Any], fingerprint: dict[str, Any]) -> str | None:
    stored = entry.get("model_fingerprint") or {}
    if entry.get("model_fingerprint_hash") == stable_hash(fingerprint):
        return None
    changed = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
    return (f"the model's fingerprint changed since the baseline was recorded "
            f"({entry.get('model_fingerprint_hash')} -> {stable_hash(fingerprint)}; changed: "
            f"{', '.join(changed) or 'details'})")


@dataclass
class Verdict:
    """The gate's findings for one re-measurement, and the relative throughput change (None: not timed)."""

    findings: list[Finding]
    change: float | None

    @property
    def failed(self) -> bool:
        return any(finding.failed for finding in self.findings)


def check_entry(entry: dict[str, Any], now: Remeasurement, *, hardware: str,
                tolerance: float = DEFAULT_THROUGHPUT_TOLERANCE,
                memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE) -> Verdict:
    """The regression gate: findings for a re-measurement against its stored entry."""
    if not 0 <= memory_tolerance < 10:
        raise ConfigError(f"memory tolerance must be a fraction such as 0.1, got {memory_tolerance!r}")
    who = f"{entry.get('model', '?')} on {hardware}"
    findings = _oom_findings(entry, now.oom_batches, who)
    change = None
    if now.throughput_samples:
        change, finding = _throughput_finding(entry, now.throughput_samples, who, tolerance)
        findings += [finding] if finding is not None else []
    findings += _memory_findings(entry, now.peak_memory_bytes, who, memory_tolerance)
    note = _fingerprint_note(entry, now.fingerprint)
    if note:
        findings = [Finding(f.kind, f"{f.message}. Note: {note}", f.failed) if f.failed else f
                    for f in findings]
        findings.append(Finding("model_changed", f"{who}: {note}; if intended, re-record with "
                                "pytest --autobatch --autobatch-update", False))
    return Verdict(findings, change)


def _oom_findings(entry: dict[str, Any], oom_batches: list[int], who: str) -> list[Finding]:
    recorded_peaks = {entry["max_batch"]: ("maximum", entry.get("max_batch_peak_memory_bytes")),
                      entry["optimal_batch"]: ("optimal", entry.get("peak_memory_bytes"))}
    findings = []
    for batch in oom_batches:
        which, recorded = recorded_peaks.get(batch, (None, None))
        where = f"the stored {which} batch {batch} (recorded peak {format_bytes(recorded)})" if which \
            else f"batch {batch}"
        findings.append(Finding("oom", f"{who}: out of memory at {where}; the model now needs more "
                                "memory or the device has less free", True))
    return findings


def _throughput_finding(entry: dict[str, Any], samples: list[float], who: str,
                        tolerance: float) -> tuple[float, Finding | None]:
    comparison = compare_throughput(entry["throughput_samples"], samples, tolerance)
    change = comparison.change
    figures = (f"{comparison.baseline.median:,.1f} -> {comparison.current.median:,.1f} samples/s "
               f"at batch {entry['optimal_batch']} ({change:+.1%}, tolerance {tolerance:.0%}, Mann-Whitney "
               f"p={comparison.p_value:.2g}, {comparison.baseline.count} vs "
               f"{comparison.current.count} samples)")
    if comparison.verdict == "regression":
        return change, Finding("throughput_regression", f"{who}: throughput regression: {figures}", True)
    if comparison.verdict == "improvement":
        return change, Finding("improvement", f"{who}: throughput improved: {figures}; record it "
                               "with pytest --autobatch --autobatch-update", False)
    if comparison.noisy:
        spread = max(comparison.baseline.spread, comparison.current.spread)
        return change, Finding("noisy", f"{who}: noisy measurements (IQR/median {spread:.0%}): {figures}",
                               False)
    return change, None


def _memory_findings(entry: dict[str, Any], peak: int | None, who: str,
                     memory_tolerance: float) -> list[Finding]:
    stored_peak = entry.get("peak_memory_bytes")
    if peak is None or not stored_peak:
        return []
    growth = peak / stored_peak - 1
    figures = (f"{format_bytes(stored_peak)} -> {format_bytes(peak)} at batch {entry['optimal_batch']} "
               f"({growth:+.1%}, tolerance {memory_tolerance:.0%})")
    if growth > memory_tolerance:
        return [Finding("memory_regression", f"{who}: peak memory regression: {figures}", True)]
    if growth < -memory_tolerance:
        return [Finding("improvement", f"{who}: peak memory dropped: {figures}; a larger batch may "
                        "fit, search again with pytest --autobatch --autobatch-update", False)]
    return []


def settings_note(key: str, entry: dict[str, Any], *, asked: dict[str, Any],
                  capacity_bytes: int | None) -> Finding | None:
    """A note when the search settings or the memory available differ from the recording's.

    A different --autobatch-memory-budget, or other processes on the GPU, can explain an OOM at a
    stored batch better than the model can.
    """
    changed = [f"{name} {entry.get(name)!r} -> {value!r}" for name, value in asked.items()
               if entry.get(name) != value]
    recorded = entry.get("capacity_bytes")
    if recorded and capacity_bytes and abs(capacity_bytes / recorded - 1) > CAPACITY_CHANGE:
        changed.append(f"memory available {format_bytes(recorded)} -> {format_bytes(capacity_bytes)}")
    if not changed:
        return None
    return Finding("settings_changed", f"{key}: the search settings changed since the baseline was "
                   f"recorded ({', '.join(changed)}); re-search with pytest --autobatch --autobatch-update",
                   False)
