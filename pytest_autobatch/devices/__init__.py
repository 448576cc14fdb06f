"""The devices a search runs on: ``sim:PROFILE`` (pure Python), ``cpu`` and ``cuda[:N]`` (torch).

``base`` holds the protocols every device and workload implements and the device-name parsing;
torch is imported only when a cpu/cuda device is asked for.
"""

from __future__ import annotations

from .base import MODES, Device, Workload, parse_device_name

__all__ = ["MODES", "Device", "Workload", "get_device", "parse_device_name"]


def get_device(spec: str = "auto", *, memory_budget: int | None = None) -> Device:
    """The device for ``spec``; torch is imported only for cpu/cuda/auto."""
    name = parse_device_name(spec)
    if name.startswith("sim:"):
        from .simulated import simulated_device
        return simulated_device(name)
    from .torch_devices import torch_device
    return torch_device(name, memory_budget=memory_budget)
