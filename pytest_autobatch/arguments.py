"""Checks of what a test passes to ``optimal_batch(...)`` and the ``autobatch`` marker, before any
work: each message names the argument, the value and what is accepted. No torch here."""

from __future__ import annotations

import math
from typing import Any

from .devices.base import MODES
from .errors import ConfigError

#: What each marker target accepts, for the messages.
MARKER_RANGES = {
    "min_speedup": "a number > 0 (throughput at the optimal batch over the smallest batch, e.g. 2.0)",
    "max_latency_s": "a number of seconds > 0 (e.g. 0.05): it limits the search, as the keyword does",
    "min_throughput": "a number of samples per second > 0",
    "max_memory_bytes": "a whole number of bytes > 0",
}


def _is_positive_number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_call(*, name: Any, cap: Any, max_latency_s: Any, mode: Any) -> None:
    """ConfigError naming the first bad argument of ``optimal_batch(...)``."""
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"optimal_batch(name={_shown(name)}): name must be a non-empty string, the "
                          f"baseline entry's name, e.g. name='resnet50'")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"optimal_batch(cap={_shown(cap)}): cap must be an integer >= 1, the largest "
                          f"batch to search, e.g. cap=512")
    if max_latency_s is not None and not _is_positive_number(max_latency_s):
        raise ConfigError(f"optimal_batch(max_latency_s={_shown(max_latency_s)}): max_latency_s must be a "
                          f"number of seconds > 0 per batch, e.g. max_latency_s=0.05")
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigError(f"optimal_batch(mode={_shown(mode)}): unknown mode; use one of {', '.join(MODES)}")


def check_marker(targets: dict[str, Any], where: str = "autobatch marker") -> None:
    """ConfigError naming the first bad target of ``@pytest.mark.autobatch(...)`` (or ``expect()``)."""
    for target, value in targets.items():
        if target not in MARKER_RANGES or value is None:
            continue
        fine = _is_positive_number(value)
        if target == "max_memory_bytes":
            fine = fine and isinstance(value, int)
        if not fine:
            raise ConfigError(f"{where} {target}={_shown(value)}: {target} must be "
                              f"{MARKER_RANGES[target]}")
