"""What every device offers the search, the plugin and the reports, how a device is named, and
the two hashes and slugs that fingerprints and file names are made of.

A device turns (model, example input, mode) into a Workload that can be probed for memory and
measured for throughput at any batch size. Devices: ``sim:PROFILE`` (pure Python, no torch),
``cpu`` and ``cuda[:N]`` (torch, imported only when such a device is asked for).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import ConfigError

MODES = ("inference", "train", "generate")


@dataclass(frozen=True)
class PairedSamples:
    """Throughput samples of a model, each with the reference workload's rate timed right after it.

    ``unsteady`` lists why the OS says the window's timings cannot be trusted (empty: steady);
    ``reference_kind`` says which reference was timed, since only like can be compared with like;
    ``reference_parts`` holds each part's rate beside each sample (``reference`` is the whole's).
    """

    model: list[float]
    reference: list[float]
    unsteady: list[str]
    reference_kind: dict[str, Any]
    reference_parts: dict[str, list[float]] = field(default_factory=dict)


def whole_rate(rates: dict[str, float]) -> float:
    """Units per second of the whole reference workload (one unit of every part) from its parts'."""
    return 1 / sum(1 / rate for rate in rates.values())


class Watch(Protocol):
    """Started before a measurement; ``reasons()`` after it says why its timings cannot be trusted."""

    def reasons(self) -> list[str]: ...


class Workload(Protocol):
    """One model running one kind of work, runnable at any batch size."""

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model and workload: architecture, parameter shapes, dtype, input shape, mode."""

    def predict_peak_bytes(self, batch: int) -> int | None:
        """Peak memory predicted without running (fake tensors / analytic model); None if unknown."""

    def probe(self, batch: int) -> int:
        """Run once at ``batch``; return peak memory in bytes; raise an OOM error when it does not fit."""

    def measure(self, batch: int) -> list[float]:
        """Raw throughput samples in samples per second at ``batch`` (one per timed block)."""

    def measure_paired(self, batch: int, blocks: int) -> PairedSamples:
        """``blocks`` throughput samples at ``batch`` after one warm-up, with the device's reference
        timed beside each (the gate's samples, taken in one go)."""

    def extras(self, batch: int) -> dict[str, Any]:
        """Optional figures at ``batch`` (energy per sample, FLOPs per sample, ...); {} when none."""

    def close(self) -> None:
        """Release what the workload holds (models, cached memory)."""


class Device(Protocol):
    name: str

    def hardware(self) -> dict[str, Any]:
        """JSON-serialisable hardware fingerprint (GPU name, memory, driver, versions...)."""

    def hardware_key(self) -> str:
        """Short, stable, filesystem-safe key for the baselines of this hardware."""

    def capacity_bytes(self) -> int | None:
        """Memory the search may use (free device memory, or the CPU budget)."""

    def workload(self, model: Any, example_input: Any = None, *, mode: str = "inference",
                 **options: Any) -> Workload:
        """Prepare ``model`` for probing and measuring."""


def parse_device_name(spec: str) -> str:
    """Normalise a device spec ("auto", "cpu", "cuda", "cuda:N", "sim:PROFILE") or raise ConfigError."""
    text = (spec or "auto").strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    if text.startswith("sim:") and text[4:]:
        return text
    raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or sim:PROFILE "
                      f"(e.g. sim:h100)")


def stable_hash(value: Any) -> str:
    """16 hex digits of SHA-256 over ``value`` as sorted JSON: the same value, the same hash, anywhere."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """Lower-case, filesystem-safe: letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"
