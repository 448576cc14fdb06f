"""One pytest session's worth of searches and gate checks, without pytest.

The plugin builds an ``AutobatchSession`` from its options and asks it for a ``BatchResult`` per
(test id, model name): searched and recorded when the baseline is missing or being updated,
re-measured and gated when it exists. Results are cached for the session. ``RunRecord`` is what
the controller of a run gathers (from every xdist worker): results for the summary, and what was
collected and finished, for syrupy-style detection of unused baseline entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .arguments import check_call, check_marker
from .baselines import BaselineStore, entry_key, module_key, split_entry_key
from .devices.agreement import DEFAULT_RANK_TIMEOUT_S
from .devices.base import Device, Workload
from .errors import BaselineError, ConfigError
from .gate import (
    DEFAULT_MEMORY_TOLERANCE,
    DEFAULT_THROUGHPUT_TOLERANCE,
    Finding,
    Verdict,
    check_entry,
    confirmed,
    frontier_oom_findings,
    hardware_note,
    inconclusive_as_failure,
    recorded_unsteady_note,
    settings_note,
)
from .lengths import SWEEP_OPTIONS, LengthSweep
from .record import (
    DEFAULT_CAP,
    STEADY_ATTEMPTS,
    STEADY_PAUSE_S,
    Progress,
    Remeasurement,
    measure_until_steady,
    record_entry,
    remeasure,
    silent,
)
from .stats import speedup_below


@dataclass(frozen=True)
class Settings:
    """What the options say; plain values so they travel to pytest-xdist workers."""

    baselines: Path
    device: str = "auto"
    update: bool = False
    strict: bool = False
    tolerance: float = DEFAULT_THROUGHPUT_TOLERANCE
    memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE
    memory_budget: int | None = None
    inconclusive: str = "warn"
    steady_pause_s: float = STEADY_PAUSE_S
    #: under torchrun: every rank searches together (devices/agreement.py); rank 0 writes baselines
    distributed: bool = False
    rank: int = 0
    rank_timeout_s: float = DEFAULT_RANK_TIMEOUT_S


@dataclass
class BatchResult:
    """What ``optimal_batch(...)`` returns: the figures of this run and the entry behind them.

    ``probes``/``ooms``/``search_seconds`` count searching done in this session (0 when served from
    a baseline); ``status`` is "new", "updated" or "cached"; ``change`` is the throughput change
    the gate went by (relative to the reference workload when both sides timed it), ``raw_change``
    samples/s against samples/s, ``machine_speed`` this machine's reference rate over the
    recording machine's (each None without a baseline to compare with).
    """

    key: str
    name: str
    device: str
    hardware_key: str
    optimal_batch: int
    max_batch: int
    throughput: float
    speedup: float
    peak_memory_bytes: int | None
    probes: int
    ooms: int
    search_seconds: float
    status: str
    entry: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    change: float | None = None
    raw_change: float | None = None
    machine_speed: float | None = None
    baseline_path: str = ""
    throughput_samples: list[float] = field(default_factory=list)
    batch1_throughput_samples: list[float] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        return self.status == "cached"

    @property
    def latency_s(self) -> float:
        """Seconds per batch at the optimal batch; infinite when it could not be timed (an OOM)."""
        return self.optimal_batch / self.throughput if self.throughput > 0 else math.inf

    @property
    def failed(self) -> bool:
        return any(finding.failed for finding in self.findings)

    @property
    def verdict(self) -> str:
        """failed, inconclusive, passed (re-measured), or new / updated (recorded)."""
        if self.failed:
            return "failed"
        if any(finding.kind == "inconclusive" for finding in self.findings):
            return "inconclusive"
        return "passed" if self.cached else self.status

    def failure_message(self) -> str:
        return "\n".join(finding.text for finding in self.findings if finding.failed)

    def missed_targets(self, *, min_speedup: float | None = None, max_latency_s: float | None = None,
                       min_throughput: float | None = None, max_memory_bytes: int | None = None) -> str | None:
        """A sentence naming every target this result misses, with the numbers; None when all are met.

        On a machine too busy to judge throughput (an inconclusive verdict) the timing targets
        (speedup, latency, throughput) are not judged either: only the memory target is.
        """
        check_marker({"min_speedup": min_speedup, "max_latency_s": max_latency_s,
                      "min_throughput": min_throughput, "max_memory_bytes": max_memory_bytes}, "expect()")
        if self.verdict == "inconclusive":
            min_speedup = max_latency_s = min_throughput = None
        missed = []
        if min_speedup is not None and self.speedup < min_speedup:
            evidence = self._speedup_evidence(min_speedup)
            if evidence is not None:
                smallest = self.entry.get("min_batch", 1)
                missed.append(f"speedup {self.speedup:.2f}x over batch {smallest} is below {min_speedup:.2f}x"
                              f"{evidence}")
        if max_latency_s is not None and self.latency_s > max_latency_s:
            missed.append(f"latency {self.latency_s * 1e3:.2f} ms per batch of {self.optimal_batch} "
                          f"is above {max_latency_s * 1e3:.2f} ms")
        if min_throughput is not None and self.throughput < min_throughput:
            missed.append(f"throughput {self.throughput:,.1f} samples/s is below {min_throughput:,.1f}")
        if (max_memory_bytes is not None and self.peak_memory_bytes is not None
                and self.peak_memory_bytes > max_memory_bytes):
            missed.append(f"peak memory {self.peak_memory_bytes:,} B is above {max_memory_bytes:,} B")
        return f"{self.name} on {self.device}: " + "; ".join(missed) if missed else None

    def _speedup_evidence(self, min_speedup: float) -> str | None:
        """Why the speedup counts as short of ``min_speedup``: the rank test's figures, "" without raw
        samples (the medians decide), None when the samples do not show it (noise)."""
        if not (self.throughput_samples and self.batch1_throughput_samples):
            return ""   # no raw samples: the medians are all there is
        test = speedup_below(self.throughput_samples, self.batch1_throughput_samples, min_speedup)
        if test is None:
            return None
        return (f" (Mann-Whitney p={test.p_value:.2g}, {len(self.throughput_samples)} vs "
                f"{len(self.batch1_throughput_samples)} samples)")

    def expect(self, **targets: Any) -> "BatchResult":
        """Assert the usual targets (see ``missed_targets``); AssertionError lists every one missed."""
        missed = self.missed_targets(**targets)
        if missed:
            raise AssertionError(missed)
        return self

    def expect_targets(self) -> "BatchResult":
        """Assert the targets stored in the baseline entry (``targets.min_speedup``, ...)."""
        targets = self.entry.get("targets") or {}
        return self.expect(min_speedup=targets.get("min_speedup"),
                           max_latency_s=targets.get("max_latency_s"))

    def as_summary(self) -> dict[str, Any]:
        """Plain figures for the terminal summary and pytest-xdist reports."""
        return {"key": self.key, "name": self.name, "device": self.device,
                "hardware_key": self.hardware_key, "optimal_batch": self.optimal_batch,
                "max_batch": self.max_batch, "throughput": self.throughput, "speedup": self.speedup,
                "peak_memory_bytes": self.peak_memory_bytes, "probes": self.probes, "ooms": self.ooms,
                "search_seconds": self.search_seconds, "status": self.status, "change": self.change,
                "raw_change": self.raw_change, "machine_speed": self.machine_speed,
                "stored_throughput": self.entry.get("throughput"), "verdict": self.verdict,
                "failed": self.failed, "findings": [finding.as_dict() for finding in self.findings],
                "baseline_path": self.baseline_path}


def model_name(model: Any, mode: str = "inference") -> str:
    """The default entry name: the model's ``name`` or class, with the mode unless it is inference."""
    name = getattr(model, "name", None)
    name = name if isinstance(name, str) and name else type(model).__name__
    return name if mode == "inference" else f"{name}-{mode}"


def worker_gpu_mask(worker_id: str, outer_mask: str | None, gpu_count: Callable[[], int]) -> str | None:
    """CUDA_VISIBLE_DEVICES for pytest-xdist worker ``gwN`` so worker i uses GPU i; None: keep as is.

    An outer mask is honoured (worker i gets its i-th entry); ``gpu_count`` is only asked when
    there is none. With one GPU or fewer there is nothing to spread.
    """
    if not worker_id.startswith("gw") or not worker_id[2:].isdigit():
        return None
    if outer_mask is not None:
        visible = [part.strip() for part in outer_mask.split(",") if part.strip()]
    else:
        visible = [str(index) for index in range(gpu_count())]
    if len(visible) <= 1:
        return None
    return visible[int(worker_id[2:]) % len(visible)]


class AutobatchSession:
    """Searches, records and gates results for one pytest session (one xdist worker)."""

    def __init__(self, settings: Settings, *, progress: Progress | None = None,
                 device_factory: Callable[..., Device] | None = None, batch_writes: bool = False):
        self.settings = settings
        self.batch_writes = batch_writes   # stage new entries; flush() writes each file once
        self.progress = progress
        self._device_factory = device_factory
        self._device: Device | None = None
        self._store: BaselineStore | None = None
        self.results: dict[str, BatchResult] = {}
        self._callers: dict[str, tuple[int, str]] = {}   # key -> (id of the model, mode) that owns it
        self.messages: list[str] = []   # notes for the user (e.g. baseline files migrated)

    @property
    def device(self) -> Device:
        if self._device is None:
            factory = self._device_factory
            if factory is None:
                from .devices import get_device
                factory = get_device
            if self.settings.distributed:
                from .devices.distributed import agreed_device
                self._device = agreed_device(self.settings.device, memory_budget=self.settings.memory_budget,
                                             make_device=factory, timeout_s=self.settings.rank_timeout_s)
            else:
                self._device = factory(self.settings.device, memory_budget=self.settings.memory_budget)
        return self._device

    @property
    def store(self) -> BaselineStore:
        if self._store is None:
            device = self.device
            # a distributed job's device gives a store that only rank 0 reads and writes
            make_store = getattr(device, "baseline_store", BaselineStore)
            store = make_store(self.settings.baselines, device.hardware_key(), device.hardware())
            self.messages.extend(store.migrate())
            self._store = store
        return self._store

    def flush(self) -> list[Path]:
        """Write the entries recorded in this session: one write per baseline file."""
        return self._store.flush() if self._store is not None else []

    def run(self, nodeid: str, model: Any, example_input: Any = None, *, mode: str = "inference",
            name: str | None = None, max_latency_s: float | None = None, cap: int | None = None,
            **options: Any) -> BatchResult:
        """The result for ``model`` in test ``nodeid``: searched once per session, else from the baseline."""
        check_call(name=name, cap=cap, max_latency_s=max_latency_s, mode=mode)
        sweep = None
        if "prompt_tokens" in options:   # a frontier: a row per length (lengths.py)
            if max_latency_s is not None:
                raise ConfigError("max_latency_s does not apply to a frontier (prompt_tokens=[...]) yet: "
                                  "leave it out, or search one length without prompt_tokens")
            lengths = {option: options.pop(option) for option in SWEEP_OPTIONS if option in options}
            sweep = LengthSweep(model, mode, lengths, dict(options))
        key = entry_key(nodeid, name or model_name(model, mode))
        if key in self.results:
            if self._callers[key] != (id(model), mode):
                raise ConfigError(f"{key} is already the name of another model or mode in this test: "
                                  f"give each optimal_batch call its own name='...'")
            return self.results[key]
        workload = (self.device.workload(model, example_input, mode=mode, **options) if sweep is None
                    else sweep.workload(self.device))
        limit = getattr(workload, "batch_limit", None)   # a dataset's size
        if isinstance(limit, int) and limit < (DEFAULT_CAP if cap is None else cap):
            self.messages.append(f"{key}: the dataset has {limit} samples, fewer than the largest batch "
                                 f"the search could try ({DEFAULT_CAP if cap is None else cap}): the search "
                                 f"is capped at {limit}; give a larger dataset to search further")
            cap = limit
        try:
            result = self._result(key, workload, max_latency_s=max_latency_s, cap=cap, sweep=sweep)
        finally:
            workload.close()
        self.results[key] = result
        self._callers[key] = (id(model), mode)
        return result

    def _result(self, key: str, workload: Workload, *, max_latency_s: float | None,
                cap: int | None, sweep: LengthSweep | None = None) -> BatchResult:
        store = self.store
        entry = None if self.settings.update else store.get(key)
        if entry is not None:
            return self._check(key, workload, entry, cap=cap, max_latency_s=max_latency_s, sweep=sweep)
        if self.settings.strict and not self.settings.update:
            raise BaselineError(
                f"no baseline for {key} on {store.hardware_key} in {store.path_for_key(key)} and "
                "--autobatch-strict is set: record it with pytest --autobatch (without "
                "--autobatch-strict) on this hardware and commit the file")
        with store.search_lock(key) as lock:
            previous = store.get(key)
            if previous is not None and not self.settings.update:
                # another worker recorded it meanwhile
                return self._check(key, workload, previous, cap=cap, max_latency_s=max_latency_s, sweep=sweep)
            if sweep is not None:
                entry = sweep.record(self.device, name=split_entry_key(key)[1], cap=cap, progress=self.progress)
            else:
                entry = record_entry(self.device, workload, model=split_entry_key(key)[1], cap=cap,
                                     max_latency_s=max_latency_s, progress=self.progress,
                                     steady_pause_s=self.settings.steady_pause_s)
            # staged for flush() at the end of the session, unless another process waits for it
            store.put(key, entry, now=not self.batch_writes or lock.contended)
        search = entry["search"]
        unsteady = recorded_unsteady_note(key, entry)
        return self._batch_result(
            key, entry, status="updated" if previous is not None else "new",
            throughput=entry["throughput"], speedup=entry["speedup"],
            peak_memory_bytes=entry["peak_memory_bytes"], probes=search["probes"], ooms=search["ooms"],
            search_seconds=search["seconds"], change=_throughput_change(previous, entry),
            findings=[unsteady] if unsteady is not None else [],
            throughput_samples=entry["throughput_samples"],
            batch1_throughput_samples=entry["batch1_throughput_samples"])

    def _check(self, key: str, workload: Workload, entry: dict[str, Any], *, cap: int | None,
               max_latency_s: float | None, sweep: LengthSweep | None = None) -> BatchResult:
        device = self.device
        now, verdict = self._judge(workload, entry)
        findings = verdict.findings
        if sweep is not None:   # the longest point was judged above; every stored point must still fit
            findings.extend(frontier_oom_findings(sweep.ooms(device, entry), f"{key} on {device.name}"))
        notes = [settings_note(key, entry, asked={"cap": DEFAULT_CAP if cap is None else cap,
                                                  "max_latency_s": max_latency_s},
                               capacity_bytes=device.capacity_bytes()),
                 hardware_note(key, self.store.recorded_hardware(key), device.hardware()),
                 recorded_unsteady_note(key, entry)]
        findings.extend(note for note in notes if note is not None)
        return self._batch_result(
            key, entry, status="cached", throughput=now.throughput or 0.0, speedup=now.speedup,
            probes=0, ooms=0, search_seconds=0.0,
            peak_memory_bytes=now.peak_memory_bytes, findings=findings, change=verdict.change,
            raw_change=verdict.raw_change, machine_speed=verdict.machine_speed,
            throughput_samples=now.throughput_samples,
            batch1_throughput_samples=now.batch1_throughput_samples)

    def _judge(self, workload: Workload, entry: dict[str, Any]) -> tuple[Remeasurement, Verdict]:
        """Re-measure and gate; with --autobatch-inconclusive=retry, again after a pause while the
        machine is too busy to judge throughput; a throughput regression is measured once more to
        confirm it (``gate.confirmed``); with =fail, an inconclusive verdict fails."""
        policy = self.settings.inconclusive

        def judged() -> tuple[Remeasurement, Verdict]:
            now = remeasure(self.device, workload, entry, progress=self.progress)
            return now, check_entry(entry, now, hardware=self.device.hardware().get("name") or self.device.name,
                                    tolerance=self.settings.tolerance,
                                    memory_tolerance=self.settings.memory_tolerance)

        progress = self.progress or silent
        now, verdict = measure_until_steady(
            judged, lambda result: "the machine is busy" if result[1].inconclusive else "",
            attempts=STEADY_ATTEMPTS if policy == "retry" else 1, pause_s=self.settings.steady_pause_s,
            progress=progress)
        if verdict.regressed:
            progress(f"throughput regression ({verdict.change:+.1%}): measuring again to confirm it")
            first = verdict
            now, verdict = judged()
            verdict = confirmed(first, verdict)
        return now, inconclusive_as_failure(verdict) if policy == "fail" else verdict

    def _batch_result(self, key: str, entry: dict[str, Any], **figures: Any) -> BatchResult:
        """A BatchResult of ``entry``'s batches with this run's ``figures``."""
        return BatchResult(key=key, name=split_entry_key(key)[1], device=self.device.name,
                           hardware_key=self.store.hardware_key, optimal_batch=entry["optimal_batch"],
                           max_batch=entry["max_batch"], entry=entry,
                           baseline_path=str(self.store.path_for_key(key)), **figures)


def _throughput_change(previous: dict[str, Any] | None, entry: dict[str, Any]) -> float | None:
    """Relative change of the recorded throughput when an update replaced an entry."""
    if not previous or not previous.get("throughput"):
        return None
    return float(entry["throughput"] / previous["throughput"] - 1)


@dataclass
class RunRecord:
    """What the controller of a run (or a run without xdist) gathers for the summary and for
    detecting unused baseline entries, syrupy-style."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)   # entry key -> as_summary()
    collected: set[str] = field(default_factory=set)         # every collected node id, deselected too
    selected_modules: set[str] = field(default_factory=set)  # modules run whole (not file.py::test)
    finished: set[str] = field(default_factory=set)          # node ids whose call passed
    unused: dict[str, list[str]] = field(default_factory=dict)   # baseline path -> unused entry keys
    unused_removed: bool = False
    errors: list[str] = field(default_factory=list)     # baseline writes that failed (the run fails)
    messages: list[str] = field(default_factory=list)   # notes, e.g. baseline files migrated

    def worker_output(self, baselines: Path) -> dict[str, Any]:
        """What an xdist worker sends its controller: only node ids of modules with baseline files."""
        with_files = {path.stem for path in Path(baselines).glob("*/*.json")}
        return {"collected": sorted(nodeid for nodeid in self.collected if module_key(nodeid) in with_files),
                "selected_modules": sorted(self.selected_modules),
                "errors": list(self.errors), "messages": list(self.messages)}

    def merge(self, worker_output: dict[str, Any]) -> None:
        self.errors.extend(worker_output.get("errors", ()))
        self.messages.extend(worker_output.get("messages", ()))
        self.collected.update(worker_output.get("collected", ()))
        self.selected_modules.update(worker_output.get("selected_modules", ()))

    def find_unused(self, baselines: Path, *, update: bool, hardware_key: Callable[[], str]) -> None:
        """Entries of fully collected, selected modules whose test is gone or did not use them;
        removed with ``update``. ``hardware_key`` is asked only when no benchmark ran."""
        hardware_keys = {result["hardware_key"] for result in self.results.values()}
        if not hardware_keys and any(Path(baselines).glob(f"*/{module}.json") for module in self.selected_modules):
            hardware_keys = {hardware_key()}
        finished = self.finished if len(hardware_keys) == 1 else set()
        for key in sorted(hardware_keys):
            store = BaselineStore(baselines, key)
            for module in sorted(self.selected_modules & set(store.modules())):
                unused = store.unused(module, collected=self.collected, finished=finished,
                                      used=set(self.results))
                if not unused:
                    continue
                self.unused[str(store.path(module))] = unused
                if update:
                    store.remove(module, unused)
                    self.unused_removed = True
