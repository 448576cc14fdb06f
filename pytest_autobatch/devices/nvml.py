"""NVML (nvidia-ml-py's ``pynvml``) for what torch does not tell: driver, power and energy.

NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, so a torch device is matched to
its NVML handle by UUID, never by index. Every figure is optional: without NVML, or when a call is
not supported (consumer cards, MIG slices, energy before Volta), the figure is None and the reason
reads "not available: ...".
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable

NOT_AVAILABLE = "not available"


def _normalised_uuid(uuid: Any) -> str:
    text = str(uuid).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _load_pynvml() -> ModuleType | str:
    try:
        import pynvml
    except ImportError:
        return f"{NOT_AVAILABLE}: nvidia-ml-py is not installed (pip install 'pytest-autobatch[nvml]')"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no NVML here
        return f"{NOT_AVAILABLE}: {exc}"
    return pynvml


def gpu_count() -> int:
    """GPUs NVML sees (it ignores CUDA_VISIBLE_DEVICES and never initialises CUDA); 0 without NVML."""
    module = _load_pynvml()
    if isinstance(module, str):
        return 0
    try:
        return int(module.nvmlDeviceGetCount())
    except Exception:  # a driver that answers nvmlInit but not the count: nothing to spread over
        return 0


class NvmlGpu:
    """One GPU's NVML handle; each reading returns None when NVML cannot give it."""

    def __init__(self, pynvml: ModuleType, handle: Any):
        self._nvml = pynvml
        self._handle = handle
        self.unavailable: dict[str, str] = {}

    def _read(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # NVMLError_NotSupported / NoPermission / UnicodeDecodeError (R555 on WSL)
            self.unavailable[what] = f"{NOT_AVAILABLE}: {type(exc).__name__}: {exc}"
            return None

    def name(self) -> str | None:
        return self._read("name", lambda: self._nvml.nvmlDeviceGetName(self._handle))

    def driver_version(self) -> str | None:
        return self._read("driver_version", self._nvml.nvmlSystemGetDriverVersion)

    def memory(self) -> dict[str, int] | None:
        info = self._read("memory", lambda: self._nvml.nvmlDeviceGetMemoryInfo(self._handle))
        return None if info is None else {"total": int(info.total), "free": int(info.free),
                                          "used": int(info.used)}

    def power_w(self) -> float | None:
        milliwatts = self._read("power", lambda: self._nvml.nvmlDeviceGetPowerUsage(self._handle))
        return None if milliwatts is None else milliwatts / 1000.0

    def power_limit_w(self) -> float | None:
        milliwatts = self._read("power_limit",
                                lambda: self._nvml.nvmlDeviceGetEnforcedPowerLimit(self._handle))
        return None if milliwatts is None else milliwatts / 1000.0

    def energy_mj(self) -> int | None:
        """Millijoules since the driver loaded (Volta or newer): only differences mean anything."""
        return self._read("energy",
                          lambda: self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def other_processes(self) -> list[int]:
        """Pids of other processes with a compute context on this GPU."""
        running = self._read("processes",
                            lambda: self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)) or []
        return [int(p.pid) for p in running if int(p.pid) != os.getpid()]

    def slowdown_reasons(self) -> list[str]:
        bits = self._read("clock_events",
                          lambda: self._nvml.nvmlDeviceGetCurrentClocksThrottleReasons(self._handle))
        return [name for bit, name in _SLOWDOWN_REASONS.items() if bits and int(bits) & bit]

    def max_clocks_mhz(self) -> int | None:
        clocks = self._read("max_clocks", lambda: self._nvml.nvmlDeviceGetMaxClockInfo(
            self._handle, self._nvml.NVML_CLOCK_SM))
        return None if clocks is None else int(clocks)

    def mig_mode(self) -> bool | None:
        mode = self._read("mig", lambda: self._nvml.nvmlDeviceGetMigMode(self._handle))
        return None if mode is None else bool(mode[0])

    def ecc_mode(self) -> bool | None:
        mode = self._read("ecc", lambda: self._nvml.nvmlDeviceGetEccMode(self._handle))
        return None if mode is None else bool(mode[0])

    def info(self) -> dict[str, Any]:
        """What goes into the hardware fingerprint."""
        memory = self.memory()
        return {"name": self.name(), "driver_version": self.driver_version(),
                "memory_total_bytes": memory["total"] if memory else None,
                "power_limit_w": self.power_limit_w(), "max_clocks_mhz": self.max_clocks_mhz(),
                "mig": self.mig_mode(), "ecc": self.ecc_mode(), "unavailable": dict(self.unavailable)}


def open_gpu(torch_uuid: Any, *, pynvml: ModuleType | None = None) -> NvmlGpu | str:
    """The NVML GPU whose UUID is ``torch_uuid`` (torch's ``get_device_properties(i).uuid``),
    or a "not available: ..." reason."""
    module = pynvml if pynvml is not None else _load_pynvml()
    if isinstance(module, str):
        return module
    wanted = _normalised_uuid(torch_uuid)
    try:
        for index in range(module.nvmlDeviceGetCount()):
            handle = module.nvmlDeviceGetHandleByIndex(index)
            if _normalised_uuid(module.nvmlDeviceGetUUID(handle)) == wanted:
                return NvmlGpu(module, handle)
    except Exception as exc:
        return f"{NOT_AVAILABLE}: {type(exc).__name__}: {exc}"
    return f"{NOT_AVAILABLE}: no NVML device has UUID {torch_uuid} (a MIG slice or another container's GPU)"


class EnergyMeter:
    """Energy over a timed window, from the total-energy counter (deltas over seconds, not power samples)."""

    def __init__(self, gpu: NvmlGpu | str):
        self._gpu = gpu
        self._start: int | None = None
        self.reason: str | None = gpu if isinstance(gpu, str) else None

    def start(self) -> None:
        self._start = None if isinstance(self._gpu, str) else self._gpu.energy_mj()

    def stop(self) -> float | None:
        """Joules since ``start``, or None (``reason`` says why)."""
        if isinstance(self._gpu, str):
            return None
        end = self._gpu.energy_mj()
        if self._start is None or end is None:
            self.reason = self._gpu.unavailable.get("energy", f"{NOT_AVAILABLE}: energy counter")
            return None
        return (end - self._start) / 1000.0

    def method(self) -> str:
        return self.reason or "nvml total energy counter, delta over the timed blocks"


#: Clock-event reasons that say the GPU slowed itself (NVML's nvmlClocksEventReason* bits): power
#: cap, thermal (software and hardware), hardware slowdown, power brake.
_SLOWDOWN_REASONS = {0x4: "software power cap", 0x8: "hardware slowdown", 0x20: "software thermal slowdown",
                     0x40: "hardware thermal slowdown", 0x80: "hardware power brake"}


class GpuWatch:
    """Why a GPU timing window cannot be trusted: other processes on the GPU, clocks held down.

    Read when ``reasons()`` is called (NVML has no per-window counters for these); without NVML
    there is nothing to read and nothing is reported.
    """

    def __init__(self, gpu: NvmlGpu | str):
        self._gpu = gpu if isinstance(gpu, NvmlGpu) else None

    def reasons(self) -> list[str]:
        if self._gpu is None:
            return []
        found = []
        others = self._gpu.other_processes()
        if others:
            found.append(f"{len(others)} other process(es) use the GPU (pids {', '.join(map(str, others[:5]))})")
        slowdowns = self._gpu.slowdown_reasons()
        if slowdowns:
            found.append(f"the GPU held its clocks down: {', '.join(slowdowns)}")
        return found
