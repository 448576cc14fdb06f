"""What the terminal shows: a live progress line while a search runs, and the end-of-session
summary (one row per model, then notes and unused baselines).

The summary works on the plain dicts of ``BatchResult.as_summary()`` (they also arrive from
xdist workers). The progress line writes through anything shaped like pytest's terminal reporter.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

from ..errors import printable
from ..units import format_bytes
from .results import simulated_notes

_COLUMNS = ("model", "device", "optimal", "max", "samples/s", "speedup", "memory", "probes", "OOMs",
            "search", "baseline", "change", "raw", "machine")


def percent(change: float | None) -> str:
    return "-" if change is None else f"{change:+.1%}"


def machine(speed: float | None) -> str:
    """This machine's reference speed against the recording machine's: "0.41x"."""
    return "-" if speed is None else f"{speed:.2f}x"


def _row(result: dict[str, Any]) -> tuple[str, ...]:
    verdict = result.get("verdict", result["status"])
    status = {"failed": "FAILED", "passed": "cached", "inconclusive": "cached?"}.get(verdict, verdict)
    return (result["key"], result["device"], str(result["optimal_batch"]), str(result["max_batch"]),
            f"{result['throughput']:,.1f}", f"{result['speedup']:.2f}x",
            format_bytes(result.get("peak_memory_bytes")), str(result["probes"]), str(result["ooms"]),
            f"{result['search_seconds']:.1f}s" if result["status"] != "cached" else "-",
            status, percent(result.get("change")), percent(result.get("raw_change")),
            machine(result.get("machine_speed")))


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()
    return [line(header)] + [line(row) for row in rows]


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    """Table of results (sorted by key), then every finding that did not fail a test.

    "change" is what the gate went by (relative to the reference workload), "raw" samples/s
    against samples/s, "machine" this machine's reference speed over the recording machine's;
    "cached?" marks an inconclusive throughput verdict (its reason is among the notes).
    """
    ordered = sorted(results, key=lambda result: result["key"])
    lines = table([_row(result) for result in ordered], _COLUMNS)
    notes = [finding["message"] for result in ordered for finding in result.get("findings", ())
             if not finding["failed"]]
    simulated = simulated_notes([result["device"] for result in ordered])
    if simulated:
        lines.append("")
        lines.extend(f"simulated: {note}" for note in simulated)
    if notes:
        lines.append("")
        lines.extend(f"note: {note}" for note in notes)
    return [printable(line) for line in lines]


def unused_lines(unused: dict[str, list[str]], *, removed: bool) -> list[str]:
    """syrupy-style report of baseline entries whose tests are gone or no longer use them."""
    count = sum(len(keys) for keys in unused.values())
    if not count:
        return []
    verb = "removed" if removed else "unused"
    lines = [f"{count} baseline entr{'y' if count == 1 else 'ies'} {verb}:"]
    for path in sorted(unused):
        lines.extend(f"  {key}  ({path})" for key in unused[path])
    if not removed:
        lines.append("Re-run with pytest --autobatch --autobatch-update to remove unused entries.")
    return [printable(line) for line in lines]


class ProgressLine:
    """A live line while a search runs: rewritten in place on a terminal, whole lines with -v elsewhere.

    ``terminal`` returns the reporter to write to (None: stay quiet); ``uncaptured`` suspends
    output capturing while a line is written, so the line reaches the terminal.
    """

    def __init__(self, terminal: Callable[[], Any], uncaptured: Callable[[], AbstractContextManager[Any]],
                 verbosity: int):
        self._terminal = terminal
        self._uncaptured = uncaptured
        self._verbosity = verbosity
        self._live = False

    def show(self, text: str) -> None:
        terminal = self._terminal()
        if terminal is None:
            return
        with self._uncaptured():
            if terminal.isatty():
                if not self._live:
                    terminal.ensure_newline()
                terminal.rewrite(f"autobatch: {text}", erase=True)
                self._live = True
            elif self._verbosity > 0:
                terminal.write_line(f"autobatch: {text}")

    def end(self, text: str) -> None:
        terminal = self._terminal()
        if self._live and terminal is not None:
            with self._uncaptured():
                terminal.rewrite(f"autobatch: {text}", erase=True)
        self._live = False
