"""The real devices: ``cpu`` (peak memory from live tensors, against a budget) and ``cuda[:N]``.

A probe runs one step at a batch size and reports its peak memory; an out-of-memory error is
caught, everything the failed step held is released, and the device checks that memory went back
to where it was before the probe. What did not is reported as a leak (a warning and a record in
``oom_events``), then the OOM is raised for the search as ``errors.OutOfMemory``.
"""

from __future__ import annotations

import gc
import traceback
import warnings
from abc import ABC, abstractmethod
from typing import Any

import torch

from ..errors import ConfigError, OutOfMemory, catch_oom
from ..units import format_bytes, parse_size
from .base import Watch, parse_device_name
from .hardware import cpu_hardware, cuda_hardware, datasheet_peak_tflops, default_cpu_budget_bytes, key_of_hardware
from .nvml import EnergyMeter, GpuWatch, NvmlGpu, open_gpu
from .steadiness import Watch as CpuWatch
from .torch_memory import LiveMemory
from .torch_workload import TorchWorkload


class OomLeakWarning(RuntimeWarning):
    """Memory held before an OOM did not come back after it: something keeps the failed step alive."""


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {tensor.untyped_storage()._cdata: tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


class _TorchDevice(ABC):
    """What the CPU and CUDA devices share: workloads, the OOM aftermath, fingerprints."""

    name: str
    torch_device: torch.device
    prediction_rounding = 1

    def __init__(self, budget_bytes: int | None):
        self.budget_bytes = budget_bytes
        self.oom_events: list[dict[str, Any]] = []

    def workload(self, model: Any, example_input: Any = None, *, mode: str = "inference",
                 **options: Any) -> TorchWorkload:
        return TorchWorkload(self, model, example_input, mode=mode, **options)

    @abstractmethod
    def hardware(self) -> dict[str, Any]: ...

    def hardware_key(self) -> str:
        return key_of_hardware(self.hardware())

    @abstractmethod
    def allocated_bytes(self, tracker: LiveMemory | None = None) -> int: ...

    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @abstractmethod
    def probe_peak(self, workload: TorchWorkload, batch: int) -> int: ...

    @abstractmethod
    def synchronize(self) -> None: ...

    @abstractmethod
    def watch(self) -> Watch: ...

    @abstractmethod
    def energy_meter(self) -> EnergyMeter | None: ...

    @abstractmethod
    def other_allocated_bytes(self, workload: TorchWorkload) -> int: ...

    @abstractmethod
    def peak_tflops(self, dtype: torch.dtype) -> float | None: ...

    def release(self) -> None:
        gc.collect()

    def after_oom(self, exc: BaseException, batch: int, before: int, tracker: LiveMemory | None,
                   *, limit: str, needed: int | None, available: int | None) -> OutOfMemory:
        """Free what the failed step held, record whether memory came back, and describe the OOM."""
        traceback.clear_frames(exc.__traceback__)  # the frames' locals hold the batch and activations
        self.release()
        after = self.allocated_bytes(tracker)
        leaked = max(0, after - before)
        self.oom_events.append({"batch": batch, "limit": limit, "allocated_before_bytes": before,
                                "allocated_after_bytes": after, "leaked_bytes": leaked})
        if leaked:
            warnings.warn(OomLeakWarning(
                f"{self.name}: after the OOM at batch {batch}, {format_bytes(leaked)} more is allocated "
                f"than before the probe ({format_bytes(after)} vs {format_bytes(before)}): something "
                f"(a hook, a cache, a global) keeps tensors of the failed step alive"), stacklevel=3)
        what = ("the memory budget" if limit == "budget" else f"{self.name} memory")
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return OutOfMemory(f"batch {batch} does not fit in {what} "
                           f"({format_bytes(available)} available; {cause})",
                           batch=batch, needed_bytes=needed, available_bytes=available, limit=limit)

    def probe_extras(self, batch: int) -> dict[str, Any]:
        events = [event for event in self.oom_events if event["batch"] == batch]
        return {"oom": events[-1]} if events else {}


class CpuDevice(_TorchDevice):
    """Real runs on the CPU; peak memory counted from the tensors allocated, against a budget."""

    name = "cpu"
    torch_device = torch.device("cpu")

    def __init__(self, budget_bytes: int | None = None):
        self.budget: int = budget_bytes or default_cpu_budget_bytes()
        super().__init__(self.budget)

    def hardware(self) -> dict[str, Any]:
        return cpu_hardware(self.budget)

    def capacity_bytes(self) -> int:
        return self.budget

    def allocated_bytes(self, tracker: LiveMemory | None = None) -> int:
        return tracker.live_bytes if tracker is not None else 0

    def probe_peak(self, workload: TorchWorkload, batch: int) -> int:
        tracker = LiveMemory(budget_bytes=self.budget_bytes)
        tracker.track(workload.resident_tensors())
        before = tracker.live_bytes
        with catch_oom() as caught, tracker:
            workload.run_batch(batch)
        if caught.error is not None:
            error = caught.error
            over_budget = isinstance(error, OutOfMemory) and error.limit == "budget"
            raise self.after_oom(error, batch, before, tracker, limit="budget" if over_budget else "device",
                                 needed=getattr(error, "needed_bytes", None), available=self.budget_bytes)
        return tracker.peak_bytes

    def synchronize(self) -> None:
        pass

    def watch(self) -> Watch:
        return CpuWatch(torch.get_num_threads())

    def energy_meter(self) -> None:
        return None

    def other_allocated_bytes(self, workload: TorchWorkload) -> int:
        return 0

    def peak_tflops(self, dtype: torch.dtype) -> None:
        return None


class CudaDevice(_TorchDevice):
    """One CUDA GPU: caching-allocator statistics for memory, NVML for power and energy."""

    prediction_rounding = 512  # the caching allocator rounds every block up to 512 bytes

    def __init__(self, index: int, budget_bytes: int | None = None):
        super().__init__(budget_bytes)
        self.index = index
        self.name = f"cuda:{index}"
        self.torch_device = torch.device("cuda", index)
        self.nvml: NvmlGpu | str = open_gpu(torch.cuda.get_device_properties(index).uuid)
        self._probe_records: dict[int, dict[str, int]] = {}

    def hardware(self) -> dict[str, Any]:
        info = self.nvml.info() if isinstance(self.nvml, NvmlGpu) else {"unavailable": self.nvml}
        return cuda_hardware(self.index, info)

    def capacity_bytes(self) -> int:
        """Free device memory now plus what this process's allocator has cached (reusable)."""
        free, _total = torch.cuda.mem_get_info(self.index)
        capacity = free + torch.cuda.memory_reserved(self.index)
        return min(capacity, self.budget_bytes) if self.budget_bytes else capacity

    def allocated_bytes(self, tracker: LiveMemory | None = None) -> int:
        return torch.cuda.memory_allocated(self.index)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def probe_peak(self, workload: TorchWorkload, batch: int) -> int:
        torch.cuda.synchronize(self.index)
        before = torch.cuda.memory_allocated(self.index)
        torch.cuda.reset_peak_memory_stats(self.index)
        with catch_oom() as caught:
            workload.run_batch(batch)
            torch.cuda.synchronize(self.index)
        if caught.error is not None:
            raise self.after_oom(caught.error, batch, before, None, limit="device", needed=None,
                                 available=self.capacity_bytes())
        peak = torch.cuda.max_memory_allocated(self.index)
        self._probe_records[batch] = {"peak_allocated_bytes": peak,
                                      "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.index),
                                      "allocated_before_bytes": before}
        if self.budget_bytes and peak > self.budget_bytes:
            raise OutOfMemory(f"batch {batch} peaks at {format_bytes(peak)}, over the memory budget "
                              f"of {format_bytes(self.budget_bytes)}", batch=batch, needed_bytes=peak,
                              available_bytes=self.budget_bytes, limit="budget")
        return peak

    def probe_extras(self, batch: int) -> dict[str, Any]:
        extras = super().probe_extras(batch)
        if batch in self._probe_records:
            extras["probe"] = self._probe_records[batch]
        return extras

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def watch(self) -> Watch:
        return GpuWatch(self.nvml)

    def energy_meter(self) -> EnergyMeter:
        return EnergyMeter(self.nvml)

    def other_allocated_bytes(self, workload: TorchWorkload) -> int:
        """Allocated on this GPU by anything but the workload's own state (other models, caches)."""
        own = _storage_bytes([t for t in workload.resident_tensors() if t.device == self.torch_device])
        return max(0, torch.cuda.memory_allocated(self.index) - own)

    def peak_tflops(self, dtype: torch.dtype) -> float | None:
        name = torch.cuda.get_device_properties(self.index).name
        return datasheet_peak_tflops(name, str(dtype).removeprefix("torch."),
                                    tf32=torch.backends.cuda.matmul.allow_tf32)


def torch_device(name: str, memory_budget: int | str | None = None) -> CpuDevice | CudaDevice:
    """The device for "auto", "cpu", "cuda" or "cuda:N"; ``memory_budget`` caps what probes may use."""
    spec = parse_device_name(name)
    budget = None if memory_budget is None else parse_size(memory_budget, what="memory budget")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return CpuDevice(budget)
    if not spec.startswith("cuda"):
        raise ConfigError(f"device {name!r} is not a torch device: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here (torch "
                          f"{torch.__version__}, built for CUDA {torch.version.cuda}): use device "
                          f"'cpu', or 'auto' to take a GPU when there is one")
    index = torch.cuda.current_device() if spec == "cuda" else int(spec.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA "
                          f"device(s) are visible: use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return CudaDevice(index, budget)
