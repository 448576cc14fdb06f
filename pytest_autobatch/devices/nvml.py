"""NVML (nvidia-ml-py's ``pynvml``) for what torch does not tell: driver, power and energy.

NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, so a torch device is matched to
its NVML handle by UUID, never by index. Every figure is optional: without NVML, or when a call is
not supported (consumer cards, MIG slices, energy before Volta), the figure is None and the reason
reads "not available: ...".
"""

from __future__ import annotations

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

    def info(self) -> dict[str, Any]:
        """What goes into the hardware fingerprint."""
        memory = self.memory()
        return {"name": self.name(), "driver_version": self.driver_version(),
                "memory_total_bytes": memory["total"] if memory else None,
                "power_limit_w": self.power_limit_w(), "unavailable": dict(self.unavailable)}


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
