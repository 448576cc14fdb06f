"""pytest hooks and fixtures of pytest-autobatch.

Thin by design, in the shape of syrupy's plugin: options (``options.py``) become a
``session.Settings``; each hook
is a few lines over ``AutobatchState`` (this process's state), which asks an ``AutobatchSession``
(plain Python) for results and keeps a ``RunRecord`` (plain Python) of what ran for the summary
and for unused-baseline detection. Without ``--autobatch`` nothing beyond the standard library
and pytest is imported, and tests that use the fixtures or the ``autobatch`` marker are skipped.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from .session import AutobatchSession, BatchResult, RunRecord, Settings

FIXTURES = ("optimal_batch", "autobatch_device")
MARKER = "autobatch"
MARKER_TARGETS = ("min_speedup", "max_latency_s", "min_throughput", "max_memory_bytes")
SKIP_REASON = "benchmark test: run it with pytest --autobatch"
USER_PROPERTY = "autobatch"


def pytest_addoption(parser: pytest.Parser) -> None:
    from .options import add_options
    add_options(parser)


class AutobatchState:
    """The plugin's state for one pytest process, kept on ``config.stash``."""

    def __init__(self, config: pytest.Config, settings: Settings | None):
        from .report.terminal import ProgressLine
        self.config = config
        self.settings = settings
        self._session: AutobatchSession | None = None
        self._record: RunRecord | None = None
        self.progress = ProgressLine(self._terminal, self._uncaptured, config.get_verbosity())

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    @property
    def session(self) -> AutobatchSession:
        if self._session is None:
            from .session import AutobatchSession
            assert self.settings is not None
            self._session = AutobatchSession(self.settings, progress=self.progress.show, batch_writes=True)
        return self._session

    @property
    def record(self) -> RunRecord:
        if self._record is None:
            from .session import RunRecord
            self._record = RunRecord()
        return self._record

    def _terminal(self) -> Any:
        """The terminal to show progress on: none on an xdist worker (its output is not a terminal)."""
        if self.is_worker:
            return None
        return self.config.pluginmanager.get_plugin("terminalreporter")

    def _uncaptured(self) -> Any:
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        return capture.global_and_fixture_disabled() if capture is not None else nullcontext()

    def run(self, item: pytest.Item, model: Any, example_input: Any, **options: Any) -> BatchResult:
        """``optimal_batch(...)`` for ``item``: the result, or a test failure that says why."""
        from .errors import AutobatchError
        if not self.enabled:
            pytest.skip(SKIP_REASON)
        marker_latency = _marker_targets(item).get("max_latency_s")
        if options.get("max_latency_s") is None and marker_latency is not None:
            options["max_latency_s"] = marker_latency   # the marker's limit limits the search too
        result, error = None, None
        try:
            result = self.session.run(item.nodeid, model, example_input, **options)
        except AutobatchError as exc:
            error = f"autobatch: {exc}"
        finally:
            self.progress.end(_outcome(result))
        if result is None:
            pytest.fail(error or "autobatch: stopped", pytrace=False)  # outside the except: no chained traceback
        summary = result.as_summary()
        item.user_properties.append((USER_PROPERTY, summary))
        benchmark = getattr(item, "funcargs", {}).get("benchmark")
        if benchmark is not None and hasattr(benchmark, "extra_info"):
            benchmark.extra_info.setdefault("autobatch", []).append(summary)
        if result.failed:
            pytest.fail(result.failure_message(), pytrace=False)
        # max_latency_s limited the search; checked again on fresh samples it would fail by noise
        # whenever the chosen batch sits at the limit
        targets = {key: value for key, value in _marker_targets(item).items() if key != "max_latency_s"}
        missed = result.missed_targets(**targets)
        if missed:
            pytest.fail(missed, pytrace=False)
        return result

    def flush(self) -> None:
        """Write what this process recorded (one write per baseline file); a failure is kept for
        the summary and fails the run, never a crash of the session."""
        from .errors import AutobatchError
        if self._session is None:
            return
        self.record.messages.extend(self._session.messages)
        self._session.messages.clear()
        try:
            self._session.flush()
        except AutobatchError as exc:
            self.record.errors.append(f"baselines not saved: {exc}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect results from reports: the same path with and without pytest-xdist."""
        if not self.enabled or self.is_worker:
            return
        for name, value in report.user_properties:
            if name == USER_PROPERTY and isinstance(value, dict):
                self.record.results[value["key"]] = value
        if report.when == "call" and report.passed:
            self.record.finished.add(report.nodeid)


_STATE = pytest.StashKey[AutobatchState]()


def _outcome(result: BatchResult | None) -> str:
    """The last progress line of a search or re-measurement."""
    if result is None:
        return "stopped"
    if result.cached:
        how = "re-measured against the baseline"
    else:
        how = f"{result.probes} probes, {result.ooms} OOM{'s' * (result.ooms != 1)}, {result.search_seconds:.1f} s"
    return f"{result.name}: optimal batch {result.optimal_batch}, max {result.max_batch} ({how})"


def _state(config: pytest.Config) -> AutobatchState:
    return config.stash[_STATE]


def _marker_targets(item: pytest.Item) -> dict[str, Any]:
    marker = item.get_closest_marker(MARKER)
    return dict(marker.kwargs) if marker is not None else {}


def _is_benchmark(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return item.get_closest_marker(MARKER) is not None or any(name in names for name in FIXTURES)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(min_speedup=None, max_latency_s=None, min_throughput=None, "
                   "max_memory_bytes=None): a benchmark test, skipped without --autobatch; the "
                   "given targets are asserted on every optimal_batch result of the test, but "
                   "max_latency_s, which limits the search as the optimal_batch keyword does")
    from .options import settings
    state = AutobatchState(config, settings(config))
    config.stash[_STATE] = state
    config.pluginmanager.register(state, "autobatch-state")
    if state.settings is not None and state.is_worker:
        _assign_worker_gpu(config, state.settings.device)
    elif state.settings is not None:
        _warn_if_workers_share_a_device(config, state.settings.device)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(state), "autobatch-xdist")
    if config.pluginmanager.hasplugin("benchmark"):
        config.pluginmanager.register(_BenchmarkHooks(state), "autobatch-benchmark")


def _gpu_count() -> int:
    from .devices.nvml import gpu_count
    return gpu_count()


def _warn_if_workers_share_a_device(config: pytest.Config, device: str) -> None:
    """Timings of xdist workers that share one CPU or GPU slow each other down: say so up front."""
    workers = getattr(config.option, "numprocesses", None)
    if not isinstance(workers, int) or workers < 2 or device.startswith("sim:"):
        return
    gpus = _gpu_count() if device in ("auto", "cuda") else 0
    if device != "cpu" and not device.startswith("cuda:") and gpus >= workers:
        return
    shared = f"{gpus} GPU{'s' * (gpus != 1)}" if gpus else f"one device ({device})"
    config.issue_config_time_warning(pytest.PytestConfigWarning(
        f"pytest-autobatch: {workers} xdist workers share {shared}: their throughput figures slow "
        "each other down and the gate compares them with baselines measured alone; run benchmarks "
        "with at most one worker per GPU (-n 0 on the CPU)"), stacklevel=2)


def _assign_worker_gpu(config: pytest.Config, device: str) -> None:
    """Worker i uses GPU i: set CUDA_VISIBLE_DEVICES before anything initialises CUDA."""
    from .session import worker_gpu_mask
    if device not in ("auto", "cuda"):
        return
    worker = config.workerinput["workerid"]  # type: ignore[attr-defined]
    mask = worker_gpu_mask(worker, os.environ.get("CUDA_VISIBLE_DEVICES"), _gpu_count)
    if mask is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        warnings.warn(f"pytest-autobatch: CUDA was initialised before worker {worker} could select "
                      f"GPU {mask}; all workers share one GPU", stacklevel=1)
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = mask


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = _state(config).settings
    if settings is None:
        return []
    modes = [name for name, on in (("update", settings.update), ("strict", settings.strict)) if on]
    return [f"autobatch: device {settings.device}, baselines {settings.baselines}, throughput "
            f"tolerance {settings.tolerance:.0%}, memory tolerance {settings.memory_tolerance:.0%}, "
            f"inconclusive: {settings.inconclusive}" + (f", {' '.join(modes)}" if modes else "")]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip benchmark tests without --autobatch; remember every collected test for unused detection.

    tryfirst: this sees the items before -k / -m deselect any, so deselected tests still exist.
    """
    state = _state(config)
    if not state.enabled:
        skip = pytest.mark.skip(reason=SKIP_REASON)
        for item in items:
            if _is_benchmark(item):
                item.add_marker(skip)
        return
    for item in items:
        unknown = set(_marker_targets(item)) - set(MARKER_TARGETS)
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown @pytest.mark.{MARKER} argument(s) "
                                    f"{', '.join(sorted(unknown))}; known: {', '.join(MARKER_TARGETS)}")
        from .arguments import check_marker
        from .errors import ConfigError
        try:
            check_marker(_marker_targets(item))
        except ConfigError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc}") from None
    state.record.collected.update(item.nodeid for item in items)


def pytest_collection_finish(session: pytest.Session) -> None:
    state = _state(session.config)
    if state.enabled:
        from .baselines import module_key
        selected = {module_key(item.nodeid) for item in session.items}
        state.record.selected_modules.update(selected - _narrowed_modules(session.config))


def _narrowed_modules(config: pytest.Config) -> set[str]:
    """Modules given as ``file.py::test`` on the command line: only part of them was collected."""
    from .baselines import module_key
    narrowed = set()
    for arg in config.args:
        if "::" not in arg:
            continue
        path = (config.invocation_params.dir / arg.split("::", 1)[0]).resolve()
        try:
            narrowed.add(module_key(path.relative_to(config.rootpath).as_posix()))
        except ValueError:
            continue
    return narrowed


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = _state(session.config)
    if state.settings is None:
        return
    state.flush()
    if state.is_worker:
        session.config.workeroutput[USER_PROPERTY] = state.record.worker_output(state.settings.baselines)  # type: ignore[attr-defined]
        return
    if state.record.errors and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if state.settings.rank != 0:
        return   # rank 0 of a distributed job reports and removes unused entries for all ranks
    from .errors import AutobatchError
    try:
        state.record.find_unused(state.settings.baselines, update=state.settings.update,
                                 hardware_key=lambda: state.session.store.hardware_key)
    except AutobatchError as exc:
        warnings.warn(f"pytest-autobatch: unused-baseline check skipped: {exc}", stacklevel=1)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = _state(config)
    record = state.record if state.enabled else None
    if record is None or state.is_worker or not (record.results or record.unused or record.errors
                                                 or record.messages):
        return
    from .errors import printable
    from .report.terminal import summary_lines, unused_lines
    terminalreporter.write_sep("=", "autobatch")
    for message in record.messages:
        terminalreporter.write_line(printable(message), yellow=True)
    for message in record.errors:
        terminalreporter.write_line(printable(message), red=True)
    for line in summary_lines(list(state.record.results.values())):
        terminalreporter.write_line(line)
    for line in unused_lines(state.record.unused, removed=state.record.unused_removed):
        terminalreporter.write_line(line, yellow=True)
    _write_step_summary(terminalreporter, state)
    _write_report(terminalreporter, config, state)


def _write_step_summary(terminalreporter: Any, state: AutobatchState) -> None:
    """On GitHub Actions ($GITHUB_STEP_SUMMARY), this run's verdicts as Markdown on the run's page."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path or not state.record.results:
        return
    from .report.markdown import run_lines
    try:
        with open(path, "a", encoding="utf-8") as summary:
            summary.write("\n".join(run_lines(list(state.record.results.values()))) + "\n")
    except OSError as exc:
        terminalreporter.write_line(f"autobatch: could not write $GITHUB_STEP_SUMMARY ({path}): {exc}", red=True)


def _write_report(terminalreporter: Any, config: pytest.Config, state: AutobatchState) -> None:
    """--autobatch-report=DIR: the `autobatch report` output, from the baselines as this run left them."""
    from .options import option
    out_dir = option(config, "autobatch_report", str, None)
    if not out_dir or state.settings is None:
        return
    from .errors import AutobatchError
    from .report.markdown import write_report
    try:
        path = write_report(state.settings.baselines, config.invocation_params.dir / out_dir,
                            run=list(state.record.results.values()))
    except AutobatchError as exc:
        terminalreporter.write_line(f"autobatch report not written: {exc}", red=True)
        return
    terminalreporter.write_line(f"autobatch report written to {path}")


@pytest.fixture
def optimal_batch(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``optimal_batch(model, example_input=None, *, mode="inference", name=None, max_latency_s=None,
    cap=None, **workload_options)`` -> a BatchResult, searched once per session per test and name,
    or re-measured against the stored baseline and gated."""
    state = _state(request.config)
    item = request.node

    def optimal_batch(model: Any, example_input: Any = None, *, mode: str = "inference",
                      name: str | None = None, max_latency_s: float | None = None,
                      cap: int | None = None, **workload_options: Any) -> Any:
        return state.run(item, model, example_input, mode=mode, name=name, max_latency_s=max_latency_s,
                         cap=cap, **workload_options)
    return optimal_batch


@pytest.fixture(scope="session")
def autobatch_device(pytestconfig: pytest.Config) -> Any:
    """The Device chosen with --autobatch-device (a sim:, cpu or cuda device)."""
    state = _state(pytestconfig)
    if not state.enabled:
        pytest.skip(SKIP_REASON)
    return state.session.device


class _XdistHooks:
    """Registered only when pytest-xdist is present (its hooks are unknown otherwise)."""

    def __init__(self, state: AutobatchState):
        self.state = state

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {}).get(USER_PROPERTY)
        if output:
            self.state.record.merge(output)


class _BenchmarkHooks:
    """pytest-benchmark integration, registered only when it is installed."""

    def __init__(self, state: AutobatchState):
        self.state = state

    def pytest_benchmark_update_machine_info(self, config: pytest.Config, machine_info: dict[str, Any]) -> None:
        from .errors import AutobatchError
        if not self.state.enabled:
            return
        try:
            device = self.state.session.device
            machine_info["autobatch"] = {"device": device.name, "hardware_key": device.hardware_key(),
                                         "hardware": device.hardware()}
        except AutobatchError as exc:
            machine_info["autobatch"] = {"error": str(exc)}

    def pytest_benchmark_update_json(self, config: pytest.Config, benchmarks: Any,
                                     output_json: dict[str, Any]) -> None:
        results = self.state.record.results
        if results:
            output_json["autobatch"] = [results[key] for key in sorted(results)]
