"""One results model for every report: the stored entries with their device, and the figures
and formats drawn from them (Markdown tables, plots and the terminal alike).

Reads the baseline JSON files (``baselines/<hardware_key>/<module>.json``, see DESIGN.md) and
imports neither torch nor pytest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import units
from ..baselines import BaselineStore, split_entry_key
from ..errors import BaselineError


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


def simulated_label(device: str) -> str | None:
    """For a simulated device ("sim:h100" or hardware key "sim-h100"): its figures are simulated,
    with the profile's precision and calibration error; None for a real device."""
    from ..devices.simulated import PROFILES  # no torch there
    name = str(device)
    if not name.startswith(("sim:", "sim-")):
        return None
    profile = PROFILES.get(name[4:])
    if profile is None:
        return "simulated, not measured (unknown profile)"
    fitted = ("uncalibrated: no published figures for this card" if profile.calibration_error is None
              else f"within {profile.calibration_error:.0%} of published measurements")
    return f"simulated, not measured ({profile.precision}; {fitted})"


def simulated_notes(devices: list[str]) -> list[str]:
    """One line per simulated device, for under a table of figures."""
    return [f"{device}: {label}" for device in sorted(set(devices))
            if (label := simulated_label(device)) is not None]


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


def cell(value: Any) -> str:
    return "–" if value is None else str(value)


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
    return cell(max_batch)


def search_cells(entry: dict[str, Any]) -> tuple[str, str]:
    search = entry.get("search") or {}
    return (format_seconds(search.get("seconds")),
            f"{cell(search.get('probes'))} / {cell(search.get('ooms'))}")
