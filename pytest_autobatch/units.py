"""Sizes ("2GiB", "512MB") and fractions ("10%") as people write them, turned into numbers and back."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
    "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4,
    "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")

SIZE_FORMS = ("bytes (1073741824) or a number with a unit: 512MB, 2GiB, 1.5G "
              "(KB/MB/GB/TB are powers of 1000; K/M/G/T and KiB/MiB/GiB/TiB powers of 1024)")


def parse_size(value: int | str, *, what: str = "--autobatch-memory-budget") -> int:
    """Bytes in ``value`` (an int or a size string); ConfigError naming ``what`` when it is not a size."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} {value!r} is not a size: use {SIZE_FORMS}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value).lower())
        if match is None or match.group(2) not in _UNITS:
            raise ConfigError(f"{what} {value!r} is not a size: use {SIZE_FORMS}")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ConfigError(f"{what} {value!r} must be more than 0 bytes: use {SIZE_FORMS}")
    return size


def parse_fraction(text: str | float, *, what: str = "tolerance") -> float:
    """"10%" or "0.1" -> 0.1: a fraction in [0, 1); ConfigError saying it is no ``what`` otherwise."""
    raw = str(text).strip()
    try:
        value: float | None = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 1:
        raise ConfigError(f"{text!r} is not a {what}: use a percentage such as 10% or a "
                          f"fraction such as 0.1 (at least 0, below 100%)")
    return value


def format_bytes(count: float | None, *, missing: str = "n/a") -> str:
    """Bytes in binary units for messages and reports: 512 B, 1.50 KiB, 3.25 GiB."""
    if count is None:
        return missing
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"
