"""Markdown report of the stored baselines: one row per model and device, plus a side-by-side
comparison where the baselines hold several devices.

Reads the baseline JSON files (``baselines/<hardware_key>/<module>.json``, see DESIGN.md) and
imports neither torch nor pytest. ``write_report`` is what the console script and the plugin's
``--autobatch-report=DIR`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baselines import BaselineStore, split_entry_key
from . import units
from .errors import BaselineError, ConfigError

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class Result:
    """One stored entry, with the device it was recorded on."""

    hardware_key: str
    hardware: dict[str, Any]
    module: str
    key: str
    entry: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.entry.get("model") or split_entry_key(self.key)[1])

    @property
    def label(self) -> str:
        """The model, with its mode when it is not plain inference (e.g. "resnet50 (train)")."""
        mode = self.entry.get("mode", "inference")
        return self.model if mode == "inference" or mode in self.model else f"{self.model} ({mode})"


def read_results(baselines_dir: str | Path) -> list[Result]:
    """Every entry of every baseline file under ``baselines_dir``, sorted by model then device.

    Raises BaselineError for a missing directory or a file that is not a baseline file.
    """
    root = Path(baselines_dir)
    if not root.is_dir():
        raise BaselineError(f"no baselines directory at '{root}': run `pytest --autobatch` to "
                            f"record baselines, or pass the directory that holds them")
    results = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        store = BaselineStore(root, folder.name)
        for module in store.modules():
            document = store.read(module)
            hardware = dict(document.get("hardware") or {})
            for key, entry in sorted(document["entries"].items()):
                results.append(Result(folder.name, hardware, module, key, entry))
    return sorted(results, key=lambda r: (r.label, r.module, r.key, r.hardware_key))


# ---- formatting -------------------------------------------------------------------------------

def format_bytes(value: float | None) -> str:
    return units.format_bytes(value, missing="–")


def format_number(value: float | None) -> str:
    """Three significant figures, thousands separated: 12,345 / 123 / 12.3 / 0.0123."""
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.1f} s"


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]], *, text_columns: int = 1) -> list[str]:
    """A Markdown table: the first ``text_columns`` left-aligned, the figures right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# ---- figures drawn from an entry --------------------------------------------------------------

def latency_at_optimal(entry: dict[str, Any]) -> float | None:
    """Seconds per batch at the optimal batch: batch / throughput."""
    throughput, batch = entry.get("throughput"), entry.get("optimal_batch")
    return batch / throughput if throughput and batch else None


def memory_prediction(entry: dict[str, Any]) -> tuple[int, int, int] | None:
    """(batch, predicted, measured) bytes at the largest probed batch with both figures, or None."""
    pairs = [(p["batch"], p["predicted_bytes"], p["peak_bytes"]) for p in entry.get("probes", [])
             if p.get("predicted_bytes") and p.get("peak_bytes")]
    return max(pairs) if pairs else None


def format_prediction(entry: dict[str, Any]) -> str:
    found = memory_prediction(entry)
    if found is None:
        return "–"
    batch, predicted, measured = found
    error = (predicted - measured) / measured * 100
    return f"{format_bytes(predicted)} / {format_bytes(measured)} ({error:+.0f}%) at {batch}"


def energy_per_sample(entry: dict[str, Any]) -> float | None:
    return (entry.get("extras") or {}).get("energy_per_sample_j")


def format_max_batch(entry: dict[str, Any]) -> str:
    """The maximum safe batch, marked "(cap)" when the search stopped at the cap, not at memory."""
    max_batch = entry.get("max_batch")
    if max_batch is not None and max_batch == entry.get("cap"):
        return f"{max_batch} (cap)"
    return _cell(max_batch)


def _search_cell(entry: dict[str, Any]) -> tuple[str, str]:
    search = entry.get("search") or {}
    return (format_seconds(search.get("seconds")),
            f"{_cell(search.get('probes'))} / {_cell(search.get('ooms'))}")


# ---- the report -------------------------------------------------------------------------------

RESULT_HEADER = ["model", "device", "optimal batch", "max safe batch", "throughput @ optimal (/s)",
                 "throughput @ 1 (/s)", "speedup", "peak memory @ optimal", "search time",
                 "probes / OOMs", "memory predicted / measured"]


def results_table(results: list[Result]) -> list[str]:
    """One row per model and device, with every figure the search recorded."""
    with_energy = any(energy_per_sample(r.entry) is not None for r in results)
    header = RESULT_HEADER + (["energy / sample"] if with_energy else [])
    rows = []
    for result in results:
        entry = result.entry
        speedup = entry.get("speedup")
        row = [result.label, f"`{result.hardware_key}`", _cell(entry.get("optimal_batch")),
               format_max_batch(entry), format_number(entry.get("throughput")),
               format_number(entry.get("batch1_throughput")),
               "–" if speedup is None else f"{speedup:.2f}×",
               format_bytes(entry.get("peak_memory_bytes")), *_search_cell(entry),
               format_prediction(entry)]
        if with_energy:
            energy = energy_per_sample(entry)
            row.append("–" if energy is None else f"{energy:.3g} J")
        rows.append(row)
    return _table(header, rows, text_columns=2)


def devices_table(results: list[Result]) -> list[str]:
    """The devices the baselines were recorded on."""
    devices = {r.hardware_key: r.hardware for r in results}
    with_budget = any(hw.get("memory_budget_bytes") for hw in devices.values())
    header = ["hardware key", "name", "device", "memory"] + (["memory budget"] if with_budget else [])
    rows = [[f"`{key}`", _cell(hw.get("name")), _cell(hw.get("device")),
             format_bytes(hw.get("total_memory_bytes"))]
            + ([format_bytes(hw.get("memory_budget_bytes"))] if with_budget else [])
            for key, hw in sorted(devices.items())]
    return _table(header, rows, text_columns=3)


def comparison_tables(results: list[Result], *, heading: str = "###") -> list[str]:
    """Side by side across devices: throughput, latency and energy per sample at the optimal batch.

    Empty when the baselines hold one device only.
    """
    devices = sorted({r.hardware_key for r in results})
    if len(devices) < 2:
        return []
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for result in results:
        by_model.setdefault(result.label, {})[result.hardware_key] = result.entry
    metrics = [("Throughput at the optimal batch (samples/s, optimal batch in brackets)",
                lambda e: f"{format_number(e.get('throughput'))} ({_cell(e.get('optimal_batch'))})"),
               ("Latency of one batch at the optimal batch",
                lambda e: format_seconds(latency_at_optimal(e))),
               ("Speedup of the optimal batch over batch 1",
                lambda e: "–" if e.get("speedup") is None else f"{e['speedup']:.2f}×")]
    if any(energy_per_sample(r.entry) is not None for r in results):
        metrics.append(("Energy per sample (J)",
                        lambda e: "–" if energy_per_sample(e) is None else f"{energy_per_sample(e):.3g}"))
    lines: list[str] = []
    for title, cell in metrics:
        rows = [[label] + [cell(entries[d]) if d in entries else "–" for d in devices]
                for label, entries in sorted(by_model.items())]
        lines += ["", f"{heading} {title}", ""] + _table(["model"] + [f"`{d}`" for d in devices], rows)
    return lines


def render_markdown(results: list[Result], plot_files: dict[tuple[str, str], str] | None = None, *,
                    level: int = 1) -> str:
    """The whole report; ``plot_files`` maps (hardware_key, entry key) to a PNG path relative to it.

    ``level`` is the heading level of its title, so the report can sit inside another document.
    """
    title, section = "#" * level, "#" * (level + 1)
    lines = [f"{title} pytest-autobatch results", "", f"{section} Devices", "", *devices_table(results),
             "", f"{section} Results", "", *results_table(results)]
    comparison = comparison_tables(results, heading=section + "#")
    if comparison:
        lines += ["", f"{section} Devices side by side", *comparison]
    if plot_files:
        lines += ["", f"{section} Plots", ""]
        for result in results:
            path = plot_files.get((result.hardware_key, result.key))
            if path:
                lines.append(f"![{result.label} on {result.hardware_key}]({path})")
    return "\n".join(lines) + "\n"


README_START = "<!-- autobatch report: start -->"
README_END = "<!-- autobatch report: end -->"


def update_readme(readme: str | Path, baselines_dir: str | Path = "baselines") -> Path:
    """Replace the text between the README's report markers with the report of ``baselines_dir``.

    This is how the README's results table stays a product of the committed baselines.
    """
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ConfigError(f"{path} has no report markers: put a line {README_START} and a line "
                          f"{README_END} where the report belongs")
    results = read_results(baselines_dir)
    if not results:
        raise BaselineError(f"no baseline entries under '{baselines_dir}': run `pytest --autobatch` "
                            f"to record some")
    report = render_markdown(results, level=3)
    path.write_text(f"{text[:start]}{README_START}\n{report}{text[end:]}", encoding="utf-8")
    return path


def write_report(baselines_dir: str | Path = "baselines", out_dir: str | Path = "reports", *,
                 plots: bool = True) -> Path:
    """Write ``out_dir/report.md`` and, with ``plots``, one PNG per model and device; return the report path.

    Raises BaselineError when there is nothing to report, MissingDependency when plots are asked
    for without matplotlib.
    """
    results = read_results(baselines_dir)
    if not results:
        raise BaselineError(f"no baseline entries under '{baselines_dir}': run `pytest --autobatch` "
                            f"to record some")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_files: dict[tuple[str, str], str] = {}
    if plots:
        from .plots import write_plots
        for (hardware_key, key), path in write_plots(results, out).items():
            plot_files[(hardware_key, key)] = path.relative_to(out).as_posix()
    report = out / REPORT_FILE
    report.write_text(render_markdown(results, plot_files), encoding="utf-8")
    return report
