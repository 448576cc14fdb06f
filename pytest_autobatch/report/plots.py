"""PNG plots of the stored baselines: throughput, latency and memory against batch size.

One figure per model and device, with the optimal and the maximum safe batch marked. Uses
matplotlib's object API (no pyplot, no global backend change); matplotlib is imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..devices.base import slug
from ..errors import MissingDependency
from .results import Result, format_max_batch

PLOTS_DIR = "plots"
OPTIMAL_STYLE = {"color": "tab:green", "linestyle": "--", "linewidth": 1.5}
MAX_STYLE = {"color": "tab:red", "linestyle": ":", "linewidth": 1.8}


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependency("matplotlib", "report", "Plotting the baselines") from exc
    return Figure


def _memory_unit(values: list[float]) -> tuple[str, float]:
    return ("GiB", 2**30) if max(values, default=0) >= 2 * 2**30 else ("MiB", 2**20)


def _mark_batches(axis: Any, entry: dict[str, Any]) -> None:
    """Vertical lines at the optimal and the maximum safe batch, each tagged at the top at its own
    height, so the two stay apart when the batches are close."""
    transform = axis.get_xaxis_transform()   # x in data, y in axis fractions
    if entry.get("optimal_batch"):
        axis.axvline(entry["optimal_batch"], label=f"optimal batch {entry['optimal_batch']}",
                     **OPTIMAL_STYLE)
        axis.text(entry["optimal_batch"], 0.97, " opt", transform=transform, ha="right", va="top",
                  color=OPTIMAL_STYLE["color"], fontsize="small")
    if entry.get("max_batch"):
        axis.axvline(entry["max_batch"], label=f"max safe batch {format_max_batch(entry)}",
                     **MAX_STYLE)
        axis.text(entry["max_batch"], 0.88, " max", transform=transform, ha="left", va="top",
                  color=MAX_STYLE["color"], fontsize="small")


def _spread(axis: Any, batch: int | None, samples: Any, color: str, label: str) -> None:
    """The raw samples at ``batch`` as a box: quartiles as the bar, min and max as the whiskers."""
    if not batch or not isinstance(samples, list) or len(samples) < 2:
        return
    values = sorted(float(value) for value in samples)
    q25, median, q75 = (values[int(q * (len(values) - 1))] for q in (0.25, 0.5, 0.75))
    axis.errorbar([batch], [median], yerr=[[median - values[0]], [values[-1] - median]], fmt="none",
                  ecolor=color, elinewidth=1, capsize=4)
    axis.errorbar([batch], [median], yerr=[[median - q25], [q75 - median]], fmt="D", color=color,
                  elinewidth=5, markersize=5, label=label)


def _band(axis: Any, entry: dict[str, Any], best: float) -> None:
    """The optimal batch's band: every batch whose throughput reaches it counts as optimal."""
    band = entry.get("optimal_band", entry.get("tolerance"))
    if isinstance(band, (int, float)) and 0 < band < 1 and best > 0:
        axis.axhspan((1 - band) * best, best, color="tab:green", alpha=0.12,
                     label=f"within {band:.0%} of the best")


def _setup_axis(axis: Any, title: str, ylabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel("batch size")
    axis.set_ylabel(ylabel)
    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_formatter(lambda value, _position: f"{value:g}")
    axis.grid(True, which="major", alpha=0.3)


def plot_entry(result: Result, path: Path) -> Path:
    """Draw one model on one device into ``path`` (PNG)."""
    entry = result.entry
    probes = sorted(entry.get("probes") or [], key=lambda p: p["batch"])
    timed = [p for p in probes if p.get("throughput")]
    fitted = [p for p in probes if p.get("outcome") == "ok" and p.get("peak_bytes")]
    predicted = [p for p in probes if p.get("predicted_bytes")]
    failed = [p for p in probes if p.get("outcome") == "oom"]
    capacity = entry.get("capacity_bytes")

    frontier = entry.get("frontier")
    figure = _figure_class()(figsize=(21 if frontier else 16, 5), layout="constrained")
    throughput_axis, latency_axis, memory_axis, *frontier_axis = figure.subplots(1, 4 if frontier else 3)

    _setup_axis(throughput_axis, "Throughput", "throughput (samples/s)")
    throughput_axis.plot([p["batch"] for p in timed], [p["throughput"] for p in timed],
                         "o-", color="tab:blue", label="measured (median)")
    _band(throughput_axis, entry, max((p["throughput"] for p in timed), default=0.0))
    _spread(throughput_axis, entry.get("optimal_batch"), entry.get("throughput_samples"), "tab:green",
            "samples at the optimal batch (IQR, range)")
    _spread(throughput_axis, 1, entry.get("batch1_throughput_samples"), "tab:gray", "samples at batch 1")
    throughput_axis.set_ylim(bottom=0)

    _setup_axis(latency_axis, "Latency of one batch", "latency (ms)")
    latency_axis.plot([p["batch"] for p in timed],
                      [1000 * (p.get("latency_s") or p["batch"] / p["throughput"]) for p in timed],
                      "o-", color="tab:purple", label="measured (median)")
    latency_axis.set_ylim(bottom=0)

    memory_values = [p["peak_bytes"] for p in fitted] + [p["predicted_bytes"] for p in predicted]
    unit, scale = _memory_unit(memory_values + ([capacity] if capacity else []))
    _setup_axis(memory_axis, "Peak memory", f"peak memory ({unit})")
    memory_axis.plot([p["batch"] for p in fitted], [p["peak_bytes"] / scale for p in fitted],
                     "o-", color="tab:orange", label="measured")
    if predicted:
        memory_axis.plot([p["batch"] for p in predicted],
                         [p["predicted_bytes"] / scale for p in predicted],
                         "s", color="tab:gray", fillstyle="none", markersize=8, label="predicted")
    if capacity:
        memory_axis.axhline(capacity / scale, color="black", linewidth=1,
                            label=f"memory limit {capacity / scale:,.1f} {unit}")
    if failed:
        oom_level = (capacity or max(memory_values, default=0)) / scale
        memory_axis.plot([p["batch"] for p in failed], [oom_level] * len(failed), "x",
                         color="tab:red", markersize=12, markeredgewidth=3, label="out of memory")
    memory_axis.set_ylim(bottom=0)

    for axis in (throughput_axis, latency_axis, memory_axis):
        _mark_batches(axis, entry)
        axis.legend(fontsize="small", loc="best")
    if frontier:
        _plot_frontier(frontier_axis[0], frontier)
    name = result.hardware.get("name")
    figure.suptitle(f"{result.label} on {result.hardware_key}" + (f" · {name}" if name else ""),
                    fontsize="x-large")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    return path


def _plot_frontier(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Maximum and optimal batch against length (prompt plus new tokens), and tokens/s beside them."""
    rows = sorted(rows, key=lambda row: row["prompt_tokens"] + row["new_tokens"])
    lengths = [row["prompt_tokens"] + row["new_tokens"] for row in rows]
    _setup_axis(axis, "Batch by length", "batch")
    axis.set_xlabel("length (prompt + new tokens)")
    axis.plot(lengths, [row["max_batch"] for row in rows], "o-", color="tab:red", label="maximum batch")
    axis.plot(lengths, [row["optimal_batch"] for row in rows], "o-", color="tab:green", label="optimal batch")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize="small", loc="upper right")
    rate = axis.twinx()
    rate.plot(lengths, [row["tokens_per_s"] for row in rows], "s--", color="tab:blue", label="tokens/s @ optimal")
    rate.set_ylabel("tokens/s @ optimal")
    rate.set_ylim(bottom=0)
    rate.legend(fontsize="small", loc="upper center")


def write_plots(results: list[Result], out_dir: Path) -> dict[tuple[str, str], Path]:
    """One PNG per result under ``out_dir/plots/``, named after the device and the model."""
    _figure_class()
    written: dict[tuple[str, str], Path] = {}
    used_names: set[str] = set()
    for result in results:
        name = f"{result.hardware_key}--{slug(result.label)}"
        if name in used_names:
            name = f"{result.hardware_key}--{slug(result.module)}--{slug(result.key)}"
        used_names.add(name)
        written[(result.hardware_key, result.key)] = plot_entry(
            result, Path(out_dir) / PLOTS_DIR / f"{name}.png")
    return written
