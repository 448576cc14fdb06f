"""Markdown report of the stored baselines: one row per model and device, plus a side-by-side
comparison where the baselines hold several devices.

``write_report`` is what the console script and the plugin's ``--autobatch-report=DIR`` call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BaselineError, ConfigError
from .results import (
    Result,
    cell,
    energy_per_sample,
    format_bytes,
    format_max_batch,
    format_number,
    format_prediction,
    format_seconds,
    latency_at_optimal,
    read_results,
    search_cells,
    simulated_notes,
)
from .terminal import machine, percent

REPORT_FILE = "report.md"


def _table(header: list[str], rows: list[list[str]], *, text_columns: int = 1) -> list[str]:
    """A Markdown table: the first ``text_columns`` left-aligned, the figures right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


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
        row = [result.label, f"`{result.hardware_key}`", cell(entry.get("optimal_batch")),
               format_max_batch(entry), format_number(entry.get("throughput")),
               format_number(entry.get("batch1_throughput")),
               "–" if speedup is None else f"{speedup:.2f}×",
               format_bytes(entry.get("peak_memory_bytes")), *search_cells(entry),
               format_prediction(entry)]
        if with_energy:
            energy = energy_per_sample(entry)
            row.append("–" if energy is None else f"{energy:.3g} J")
        rows.append(row)
    return _table(header, rows, text_columns=2)


def frontier_tables(results: list[Result], *, heading: str = "###") -> list[str]:
    """Per frontier entry, a row per length: the batches and the rate there."""
    lines: list[str] = []
    for result in results:
        rows = result.entry.get("frontier")
        if not rows:
            continue
        lines += ["", f"{heading} {escape(result.label)} on `{result.hardware_key}`: batch by length", ""]
        lines += _table(["prompt + new tokens", "max batch", "optimal batch", "tokens/s @ optimal", "probes / OOMs"],
                        [[f"{row['prompt_tokens']} + {row['new_tokens']}", str(row["max_batch"]),
                          str(row["optimal_batch"]), format_number(row.get("tokens_per_s")),
                          f"{row.get('probes', '–')} / {row.get('ooms', '–')}"]
                         for row in sorted(rows, key=lambda row: (row["prompt_tokens"], row["new_tokens"]))])
    return lines


def devices_table(results: list[Result]) -> list[str]:
    """The devices the baselines were recorded on."""
    devices = {r.hardware_key: r.hardware for r in results}
    with_budget = any(hw.get("memory_budget_bytes") for hw in devices.values())
    header = ["hardware key", "name", "device", "memory"] + (["memory budget"] if with_budget else [])
    rows = [[f"`{key}`", cell(hw.get("name")), cell(hw.get("device")),
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
                lambda e: f"{format_number(e.get('throughput'))} ({cell(e.get('optimal_batch'))})"),
               ("Latency of one batch at the optimal batch",
                lambda e: format_seconds(latency_at_optimal(e))),
               ("Speedup of the optimal batch over batch 1",
                lambda e: "–" if e.get("speedup") is None else f"{e['speedup']:.2f}×")]
    if any(energy_per_sample(r.entry) is not None for r in results):
        metrics.append(("Energy per sample (J)",
                        lambda e: "–" if energy_per_sample(e) is None else f"{energy_per_sample(e):.3g}"))
    lines: list[str] = []
    for title, figure in metrics:
        rows = [[label] + [figure(entries[d]) if d in entries else "–" for d in devices]
                for label, entries in sorted(by_model.items())]
        lines += ["", f"{heading} {title}", ""] + _table(["model"] + [f"`{d}`" for d in devices], rows)
    return lines


_VERDICTS = {"failed": "**failed**", "inconclusive": "inconclusive", "passed": "passed", "new": "recorded",
             "updated": "re-recorded"}


def run_lines(run: list[dict[str, Any]], *, heading: str = "###") -> list[str]:
    """This run's verdicts beside the stored figures (from ``BatchResult.as_summary()``), then every
    finding in words: what CI shows a reviewer."""
    header = ["model", "device", "batch", "stored (/s)", "now (/s)", "raw change", "relative change",
              "machine", "verdict"]
    ordered = sorted(run, key=lambda result: result["key"])
    rows = [[result["key"], f"`{result['hardware_key']}`", str(result["optimal_batch"]),
             format_number(result.get("stored_throughput")), format_number(result.get("throughput")),
             percent(result.get("raw_change")), percent(result.get("change")), machine(result.get("machine_speed")),
             _VERDICTS.get(result.get("verdict", ""), str(result.get("verdict")))] for result in ordered]
    lines = [f"{heading} pytest-autobatch: this run", "", *_table(header, rows, text_columns=3)]
    findings = [(result["key"], finding) for result in ordered for finding in result.get("findings", ())]
    if findings:
        lines.append("")
        lines += [f"- {'**failed**: ' if finding['failed'] else ''}{escape(finding['message'])}"
                  for _, finding in findings]
    lines += ["", '"relative change" is judged against a reference workload timed beside the model; '
              '"machine" is how fast this machine ran it against the recording machine.']
    return lines


def escape(text: str) -> str:
    """Text safe inside a Markdown list item (no table pipes, no HTML)."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def render_markdown(results: list[Result], plot_files: dict[tuple[str, str], str] | None = None, *,
                    level: int = 1, run: list[dict[str, Any]] | None = None) -> str:
    """The whole report; ``plot_files`` maps (hardware_key, entry key) to a PNG path relative to it.

    ``level`` is the heading level of its title, so the report can sit inside another document;
    ``run`` (the session's results) puts this run's measurements first, beside the stored ones.
    """
    title, section = "#" * level, "#" * (level + 1)
    lines = [f"{title} pytest-autobatch results", ""]
    if run:
        lines += [*run_lines(run, heading=section), ""]
    lines += [f"{section} Devices", "", *devices_table(results), "", f"{section} Results", "",
              *results_table(results)]
    simulated = simulated_notes([r.hardware_key for r in results])
    if simulated:
        lines += ["", "Figures on simulated devices are simulated, not measured "
                  "(profiles calibrated against published figures: `python benchmarks/bench_simulated.py`):", ""]
        lines += [f"- `{key}`: {label}" for key, label in
                  (note.split(": ", 1) for note in simulated)]
    lines += frontier_tables(results, heading=section)
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
                 plots: bool = True, run: list[dict[str, Any]] | None = None) -> Path:
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
    report.write_text(render_markdown(results, plot_files, run=run), encoding="utf-8")
    return report
