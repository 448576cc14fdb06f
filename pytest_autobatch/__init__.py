"""pytest-autobatch: find the maximum and optimal batch size, keep per-GPU baselines, gate CI.

Names are imported lazily on first use, so importing the package (as pytest does for the plugin)
imports neither torch nor the search.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "stored_optimal_batch": "api", "stored_entry": "api", "agreed_batch": "api", "AgreedBatch": "api",
    "BaselineStore": "baselines",
    "compare_throughput": "stats", "mann_whitney_u": "stats", "summarize": "stats",
    "find_max_batch": "search", "find_optimal_batch": "search",
    "SimulatedModel": "devices.simulated", "simulated_device": "devices.simulated", "Samples": "inputs",
    "get_device": "devices",
    "record_entry": "record", "remeasure": "record", "check_entry": "gate",
    "BatchResult": "session",
    "AutobatchError": "errors", "ConfigError": "errors", "OutOfMemory": "errors",
    "NoBatchFits": "errors", "BaselineError": "errors", "MissingDependency": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_autobatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
