"""The regression gate: every finding a re-measurement can give against its stored entry.

A pure function of the stored entry, the new figures and the settings: no device, no pytest.
Findings that ``failed`` fail the test (throughput regression, OOM at a stored batch, memory
regression); the others are notes shown under the summary (improvement, model changed, settings
changed, hardware changed, noisy, recorded unsteady) or, for ``inconclusive`` (the machine was too
busy to judge throughput), whatever --autobatch-inconclusive says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .devices.agreement import describe_ranks
from .devices.base import stable_hash
from .errors import ConfigError
from .record import Remeasurement
from .stats import ThroughputComparison, compare_throughput, median, summarize
from .units import format_bytes

DEFAULT_THROUGHPUT_TOLERANCE = 0.10
DEFAULT_MEMORY_TOLERANCE = 0.10
#: Relative change of the device's available memory worth a note next to the gate's findings.
CAPACITY_CHANGE = 0.05
_MEMORY_NEXT_STEP = ("If the model is meant to need more memory, re-record with pytest --autobatch "
                     "--autobatch-update; otherwise find what grew, or what else holds device memory")
#: Spread (IQR/median) of the reference's rates above which the machine's speed moved too much
#: during a measurement to judge the model by it (quiet VMs: up to 0.2; contended: 0.3 to 3).
MAX_REFERENCE_SPREAD = 0.25
_QUIET = "Run the gate on a quiet machine"
_CHOOSE_POLICY = "choose --autobatch-inconclusive=retry or fail"


@dataclass(frozen=True)
class Finding:
    """One outcome of the gate. ``failed`` findings fail the test; the others are reported."""

    kind: str  # throughput_regression, oom, memory_regression, inconclusive, improvement, noisy, model_changed,
    #            settings_changed, hardware_changed, recorded_unsteady
    message: str
    failed: bool
    next_step: str = ""  # what to do about it: the last words of the text

    @property
    def text(self) -> str:
        return f"{self.message}. {self.next_step}" if self.next_step else self.message

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.text, "failed": self.failed}


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
    """The gate's findings for one re-measurement.

    ``change``: the throughput change the verdict went by (relative to the reference workload
    when both sides timed it, else raw); ``raw_change``: samples/s against samples/s;
    ``machine_speed``: this machine's reference rate over the recording's. None: not measured.
    ``who``: the model and hardware its messages name.
    """

    findings: list[Finding]
    change: float | None = None
    raw_change: float | None = None
    machine_speed: float | None = None
    who: str = ""

    @property
    def failed(self) -> bool:
        return any(finding.failed for finding in self.findings)

    @property
    def inconclusive(self) -> bool:
        return any(finding.kind == "inconclusive" for finding in self.findings)

    @property
    def regressed(self) -> bool:
        """A throughput regression: the finding a second measurement must confirm."""
        return any(finding.kind == "throughput_regression" for finding in self.findings)


def check_entry(entry: dict[str, Any], now: Remeasurement, *, hardware: str,
                tolerance: float = DEFAULT_THROUGHPUT_TOLERANCE,
                memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE) -> Verdict:
    """The regression gate: findings for a re-measurement against its stored entry."""
    if not 0 <= memory_tolerance < 10:
        raise ConfigError(f"memory tolerance must be a fraction such as 0.1, got {memory_tolerance!r}")
    who = f"{entry.get('model', '?')} on {hardware}"
    findings = _oom_findings(entry, now.oom_batches, who, now.oom_ranks)
    throughput = Verdict([])
    if now.throughput_samples:
        throughput = _throughput_verdict(entry, now, who, tolerance)
        findings += throughput.findings
    findings += _memory_findings(entry, now.peak_memory_bytes, who, memory_tolerance)
    note = _fingerprint_note(entry, now.fingerprint)
    if note:
        findings = [Finding(f.kind, f"{f.message}. Note: {note}", f.failed, f.next_step) if f.failed else f
                    for f in findings]
        findings.append(Finding("model_changed", f"{who}: {note}; if intended, re-record with "
                                "pytest --autobatch --autobatch-update", False))
    return Verdict(findings, throughput.change, throughput.raw_change, throughput.machine_speed, who)


def _oom_findings(entry: dict[str, Any], oom_batches: list[int], who: str,
                  oom_ranks: dict[int, list[int]]) -> list[Finding]:
    """A failed finding per stored batch that ran out of memory, naming the ranks of a distributed
    job where it did."""
    recorded_peaks = {entry["max_batch"]: ("maximum", entry.get("max_batch_peak_memory_bytes")),
                      entry["optimal_batch"]: ("optimal", entry.get("peak_memory_bytes"))}
    findings = []
    for batch in oom_batches:
        which, recorded = recorded_peaks.get(batch, (None, None))
        where = f"the stored {which} batch {batch} (recorded peak {format_bytes(recorded)})" if which \
            else f"batch {batch}"
        ranks = oom_ranks.get(batch)
        on = f" on {describe_ranks(ranks)}" if ranks else ""
        findings.append(Finding("oom", f"{who}: out of memory{on} at {where}; the model now needs more "
                                f"memory or the device{'s' if ranks else ''} {'have' if ranks else 'has'} "
                                "less free", True, _MEMORY_NEXT_STEP))
    return findings


def frontier_oom_findings(ooms: list[tuple[tuple[int, int], int]], who: str) -> list[Finding]:
    """A failed ``oom`` finding per stored frontier point whose batch now runs out of memory
    (``lengths.frontier_ooms``): the frontier is gated at every length, not just the longest."""
    return [Finding("oom", f"{who}: out of memory at the stored batch {batch} for {prompt} prompt tokens and "
                    f"{new} new tokens; the model now needs more memory or the device has less free",
                    True, _MEMORY_NEXT_STEP) for (prompt, new), batch in ooms]


def _stored_reference(entry: dict[str, Any], now: Remeasurement) -> tuple[list[float] | None, str]:
    """The entry's reference samples when they can be compared with this run's, else why not."""
    stored = entry.get("reference_samples")
    if stored is None:
        return None, ("the baseline has no reference samples (recorded by an older pytest-autobatch); "
                      "re-record it with pytest --autobatch --autobatch-update to judge relative to the machine")
    if not _rates_for(stored, entry["throughput_samples"]):
        return None, ("the baseline's reference_samples are corrupt (they must be one positive number per "
                      "throughput sample); re-record it with pytest --autobatch --autobatch-update")
    if not now.reference_samples:
        return None, "no reference was timed in this run"
    if entry.get("reference") != now.reference_kind:
        return None, (f"the baseline timed another reference ({entry.get('reference')}, now "
                      f"{now.reference_kind}); re-record it with pytest --autobatch --autobatch-update")
    return [float(value) for value in stored], ""


def _rates_for(rates: object, samples: list[float]) -> bool:
    """Whether stored reference ``rates`` are one positive number per throughput sample."""
    return isinstance(rates, list) and len(rates) == len(samples) and all(map(_positive_number, rates))


def _positive_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _machine_speed(speed: float) -> str:
    if abs(speed - 1) < 0.03:
        return f"this machine runs the reference as fast as the recording machine ({speed:.2f}x)"
    if speed < 1:
        return f"this machine runs the reference {1 / speed:.2f}x slower than the recording machine"
    return f"this machine runs the reference {speed:.2f}x faster than the recording machine"


def _throughput_verdict(entry: dict[str, Any], now: Remeasurement, who: str, tolerance: float) -> Verdict:
    """The throughput verdict, relative to the reference workload timed beside the model.

    Pair by pair, the model's throughput over the reference's rate cancels what slows both (a
    slower host, lower clocks); the rank test runs on those ratios. Without usable reference
    samples the raw samples are compared, and the message says why. When the OS or the
    reference's own spread says the timings cannot be trusted, the verdict is inconclusive; when
    the machine's speed moved since the recording, see ``_machine_moved_verdict``.
    """
    batch = entry["optimal_batch"]
    raw = compare_throughput(entry["throughput_samples"], now.throughput_samples, tolerance)
    raw_figures = (f"{raw.baseline.median:,.1f} -> {raw.current.median:,.1f} samples/s at batch {batch} "
                   f"({raw.change:+.1%} raw")
    stored_reference, why_raw = _stored_reference(entry, now)
    speed = None
    advice = _QUIET
    if stored_reference is None:
        comparison, figures = raw, (f"{raw_figures}, tolerance {tolerance:.0%}, Mann-Whitney p={raw.p_value:.2g}, "
                                    f"{raw.baseline.count} vs {raw.current.count} samples; judged on raw "
                                    f"throughput: {why_raw})")
        unsteady = list(now.unsteady)
    else:
        relative = compare_throughput(_ratios(entry["throughput_samples"], stored_reference),
                                      _ratios(now.throughput_samples, now.reference_samples), tolerance)
        speed = median(now.reference_samples) / median(stored_reference)
        comparison = relative
        parts = _part_comparisons(entry, now, tolerance)
        figures = (f"{raw_figures}; {relative.change:+.1%} relative to the reference, tolerance {tolerance:.0%}, "
                   f"Mann-Whitney p={relative.p_value:.2g}, {relative.baseline.count} vs "
                   f"{relative.current.count} pairs; {_machine_speed(speed)}{_parts_figures(parts)})")
        unsteady = list(now.unsteady) + _reference_unsteady(stored_reference, now.reference_samples)
        if parts and not unsteady:
            comparison, moved = _machine_moved_verdict(parts, relative, raw, tolerance)
            if moved:
                unsteady, advice = moved, ("If this machine keeps running like this, record its own baselines "
                                           "with pytest --autobatch --autobatch-update")
    if unsteady:
        finding = Finding(
            "inconclusive", f"{who}: throughput inconclusive: {'; '.join(unsteady)}. Measured {figures}. "
            f"{advice}, or {_CHOOSE_POLICY}", False)
    elif comparison.verdict == "regression":
        finding = Finding(
            "throughput_regression", f"{who}: throughput regression: {figures}", True,
            "If the slowdown is intended, re-record with pytest --autobatch --autobatch-update; if this "
            "machine differs from the recording one, record its own baselines there or point "
            "--autobatch-baselines at them")
    elif comparison.verdict == "improvement":
        finding = Finding("improvement", f"{who}: throughput improved: {figures}; record it with pytest "
                          "--autobatch --autobatch-update", False)
    elif comparison.noisy:
        spread = max(comparison.baseline.spread, comparison.current.spread)
        finding = Finding("noisy", f"{who}: noisy measurements (IQR/median {spread:.0%}): {figures}", False)
    else:
        return Verdict([], comparison.change, raw.change, speed)
    return Verdict([finding], comparison.change, raw.change, speed)


@dataclass(frozen=True)
class _PartComparison:
    """The model against one part of the reference: the part's speed over the recording's, and
    the model's throughput relative to that part."""

    speed: float
    relative: ThroughputComparison


def _part_comparisons(entry: dict[str, Any], now: Remeasurement, tolerance: float) -> dict[str, _PartComparison]:
    """The model relative to each part of the reference, when both runs timed the same parts
    (older baselines, and corrupt parts, leave the whole reference to judge by)."""
    stored = entry.get("reference_parts")
    if (not isinstance(stored, dict) or not stored or set(stored) != set(now.reference_parts)
            or not all(_rates_for(rates, entry["throughput_samples"]) for rates in stored.values())):
        return {}
    comparisons = {}
    for part, rates in sorted(stored.items()):
        rates_now = now.reference_parts[part]
        if len(rates_now) != len(now.throughput_samples):
            return {}
        comparisons[part] = _PartComparison(
            median(rates_now) / median(rates),
            compare_throughput(_ratios(entry["throughput_samples"], rates),
                               _ratios(now.throughput_samples, rates_now), tolerance))
    return comparisons


def _parts_figures(parts: dict[str, _PartComparison]) -> str:
    if not parts:
        return ""
    return "; by part: " + ", ".join(f"{part} {comparison.speed:.2f}x, relative to it {comparison.relative.change:+.1%}"
                                     for part, comparison in parts.items())


def _machine_moved_verdict(parts: dict[str, _PartComparison], whole: ThroughputComparison, raw: ThroughputComparison,
                           tolerance: float) -> tuple[ThroughputComparison, list[str]]:
    """The comparison to judge by, and why it cannot be judged (empty: it can).

    A model's time is spent partly computing, partly moving memory and partly in what neither part
    of the reference does (dispatch, the interpreter), so a change of the machine alone moves its
    throughput somewhere between not at all (its raw change) and what it did to each part. When the
    parts moved, apart or together, by more than the tolerance since the recording, only a change
    beyond all of these is the model's: a regression (or improvement) relative to every part and
    in raw terms is judged as such, by the one that explains the most; one beyond some of them only
    is inconclusive, named. (On this project's 2-core VM models followed the reference from half to
    one and a half times as much, and the reference alone failed an unchanged model on a machine
    read 1.57x.)
    """
    speeds = [comparison.speed for comparison in parts.values()]

    def apart(values: list[float]) -> bool:
        return max(values) / min(values) - 1 > tolerance

    if not apart(speeds + [1.0]):   # 1.0: the recording machine's own speed
        return whole, []
    relatives = [comparison.relative for comparison in parts.values()] + [raw]
    verdicts = {relative.verdict for relative in relatives}
    charitable = min(relatives, key=lambda relative: abs(relative.change))
    if verdicts in ({"regression"}, {"improvement"}) or "regression" not in verdicts:
        return charitable, []
    how = "unevenly" if apart(speeds) else "by more than the tolerance"
    moved = ", ".join(f"{part} {comparison.speed:.2f}x" for part, comparison in parts.items())
    return charitable, [f"the machine's speed changed {how} since the recording ({moved}), and the "
                        f"throughput's change lies within what that alone can explain, from none of it (raw "
                        f"{raw.change:+.1%}) to all of it (relative to each part)"]


def _ratios(samples: list[float], reference: list[float]) -> list[float]:
    return [model / rate for model, rate in zip(samples, reference)]


def _reference_unsteady(stored: list[float], now: list[float]) -> list[str]:
    """The reference's own samples moving: the machine's speed changed during the measurement."""
    found = []
    for when, samples in (("this run", now), ("the recording", stored)):
        spread = summarize(samples).spread
        if spread > MAX_REFERENCE_SPREAD:
            found.append(f"the reference's speed varied by {spread:.0%} (IQR/median) during {when}")
    return found


def _memory_findings(entry: dict[str, Any], peak: int | None, who: str,
                     memory_tolerance: float) -> list[Finding]:
    stored_peak = entry.get("peak_memory_bytes")
    if peak is None or not stored_peak:
        return []
    growth = peak / stored_peak - 1
    figures = (f"{format_bytes(stored_peak)} -> {format_bytes(peak)} at batch {entry['optimal_batch']} "
               f"({growth:+.1%}, tolerance {memory_tolerance:.0%})")
    if growth > memory_tolerance:
        return [Finding("memory_regression", f"{who}: peak memory regression: {figures}", True, _MEMORY_NEXT_STEP)]
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


#: Hardware fields outside the hardware key that change speed: a difference is reported beside the
#: verdict (the key itself holds the CPU model and ISA level, or the GPU model and memory).
NOTED_HARDWARE = ("cpus", "torch_threads", "torch", "driver", "cuda", "power_limit_w", "max_clocks_mhz",
                  "mig", "ecc")


def hardware_note(key: str, recorded: dict[str, Any], current: dict[str, Any]) -> Finding | None:
    """A note naming the speed-relevant hardware fields that differ from the recording's."""
    changed = [f"{name} {recorded.get(name)!r} -> {current.get(name)!r}" for name in NOTED_HARDWARE
               if name in recorded and recorded.get(name) != current.get(name)]
    if not changed:
        return None
    return Finding("hardware_changed", f"{key}: this machine differs from the one that recorded the baseline "
                   f"({', '.join(changed)}); its timings are judged relative to the reference workload", False)


def recorded_unsteady_note(key: str, entry: dict[str, Any]) -> Finding | None:
    """A note when the baseline itself was measured on a busy machine."""
    reasons = entry.get("unsteady")
    if not reasons:
        return None
    return Finding("recorded_unsteady", f"{key}: the baseline was recorded while the machine was busy "
                   f"({'; '.join(map(str, reasons))}); its throughput may be off: re-record it on a quiet "
                   "machine with pytest --autobatch --autobatch-update", False)


def confirmed(first: Verdict, second: Verdict) -> Verdict:
    """The verdict of a second measurement taken because the first found a throughput regression.

    A shared machine's speed can move for minutes in a way no reference follows; a real regression
    is in the model and shows again. Confirmed, it fails with both figures; not confirmed, the
    throughput verdict is inconclusive (the two measurements disagree), and the second's OOM and
    memory findings stand.
    """
    if second.regressed:
        findings = [Finding(f.kind, f"{f.message}; a second measurement confirmed it (the first: {first.change:+.1%})",
                            f.failed, f.next_step) if f.kind == "throughput_regression" else f
                    for f in second.findings]
        return replace(second, findings=findings)
    kept = [finding for finding in second.findings if finding.kind not in ("inconclusive", "improvement", "noisy")]
    disagree = Finding(
        "inconclusive", f"{second.who}: throughput inconclusive: a first measurement read a regression "
        f"({first.change:+.1%}), a second taken right after it did not ({_signed(second.change)}), so the "
        "machine's speed moved between them", False, f"{_QUIET}, or {_CHOOSE_POLICY}")
    return replace(second, findings=kept + [disagree])


def _signed(change: float | None) -> str:
    return "not measured" if change is None else f"{change:+.1%}"


def inconclusive_as_failure(verdict: Verdict) -> Verdict:
    """--autobatch-inconclusive=fail: an inconclusive throughput verdict fails the test."""
    findings = [Finding(f.kind, f.message, True, f.next_step) if f.kind == "inconclusive" else f
                for f in verdict.findings]
    return replace(verdict, findings=findings)
