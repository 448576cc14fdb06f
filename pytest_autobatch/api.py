"""Read what CI measured from production code: the stored optimal batch for the hardware at hand.

    from pytest_autobatch import stored_optimal_batch
    batch = stored_optimal_batch("resnet50", baselines_dir="baselines", default=32)
    batch = stored_optimal_batch("llama", length=prompt_tokens + new_tokens, default=1)   # a frontier

No pytest and no search here. The hardware key comes from the device (torch is imported only for
cpu/cuda/auto, to fingerprint the hardware) unless it is passed in.
"""

from __future__ import annotations

import os
from typing import Any

from .baselines import BaselineStore, split_entry_key
from .errors import ConfigError

_NO_DEFAULT: Any = object()


def _matches(key: str, entry: dict[str, Any], name: str) -> bool:
    nodeid, model = split_entry_key(key)
    return name in (key, nodeid, model, entry.get("model"))


def stored_entry(name: str, baselines_dir: str | os.PathLike[str] = "baselines", device: str = "auto",
                 *, hardware_key: str | None = None) -> dict[str, Any] | None:
    """The baseline entry for ``name`` on this hardware, or None when there is none.

    ``name`` is an entry key (``<test id>::<model>``), a test id, or a model name. Several
    entries that match with different optimal batches are ambiguous: ConfigError lists them.
    """
    if hardware_key is None:
        from .devices import get_device
        hardware_key = get_device(device).hardware_key()
    store = BaselineStore(baselines_dir, hardware_key)
    found = {key: entry for module in store.modules() for key, entry in store.entries(module).items()
             if _matches(key, entry, name)}
    if len({entry.get("optimal_batch") for entry in found.values()}) > 1:
        raise ConfigError(f"{name!r} matches several baselines with different optimal batches on "
                          f"{hardware_key}: {', '.join(sorted(found))}; pass the full entry key")
    return next(iter(found.values()), None)


def stored_optimal_batch(name: str, baselines_dir: str | os.PathLike[str] = "baselines",
                         device: str = "auto", default: int = _NO_DEFAULT, *,
                         hardware_key: str | None = None, length: int | None = None) -> int:
    """The optimal batch CI stored for ``name`` on this hardware; ``default`` for unknown hardware.

    ``length`` (tokens, prompt plus new) reads a frontier entry: the row of the nearest stored
    length at or above it, never a batch measured on shorter inputs. Without a default, a missing
    baseline raises ConfigError saying how to record one.
    """
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ConfigError(f"length must be a positive integer number of tokens (prompt plus new), got {length!r}")
    entry = stored_entry(name, baselines_dir, device, hardware_key=hardware_key)
    if entry is not None:
        return int((entry if length is None else frontier_row(entry, length, name))["optimal_batch"])
    if default is not _NO_DEFAULT:
        return default
    raise ConfigError(f"no baseline for {name!r} in {baselines_dir} for this hardware: record one with "
                      f"pytest --autobatch on it, or pass default=<batch> for unknown hardware")


def frontier_row(entry: dict[str, Any], length: int, name: str) -> dict[str, Any]:
    """The row of ``entry``'s frontier at the nearest stored length (prompt plus new tokens) at or
    above ``length``, the smaller optimal batch where two rows tie; ConfigError when there is none."""
    rows = entry.get("frontier")
    if not rows:
        raise ConfigError(f"the baseline of {name!r} was recorded at one length, not as a frontier: record "
                          f"it with prompt_tokens=[...] to ask for length={length}, or leave length out")
    covering = [row for row in rows if _tokens(row) >= length]
    if not covering:
        longest = max(_tokens(row) for row in rows)
        raise ConfigError(f"the frontier of {name!r} stops at {longest} tokens, short of length={length}: a batch "
                          f"measured on shorter inputs could run out of memory; record the frontier up to "
                          f"{length} tokens")
    nearest = min(_tokens(row) for row in covering)
    return min((row for row in covering if _tokens(row) == nearest), key=lambda row: row["optimal_batch"])


def _tokens(row: dict[str, Any]) -> int:
    return int(row["prompt_tokens"]) + int(row["new_tokens"])
