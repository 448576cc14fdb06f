"""Hardware fingerprints: what the baselines are keyed by, and the peak rates utilisation is judged against."""

from __future__ import annotations

import os
import platform
import re
from typing import Any

from .base import slug, stable_hash

#: Share of physical memory the CPU device may use when no budget is given.
DEFAULT_CPU_BUDGET_SHARE = 0.25

#: Dense peak TFLOP/s by GPU name word(s) and compute dtype (vendor datasheets, no sparsity).
#: "tf32" is used for float32 when TF32 matmuls are enabled. More specific fragments come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.0}),
    ("h100", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),
    ("h200", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),
    ("a100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}),
    ("l40s", {"bfloat16": 362.0, "float16": 362.0, "tf32": 183.0, "float32": 91.6}),
    ("l4", {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3}),
    ("a10", {"bfloat16": 125.0, "float16": 125.0, "tf32": 62.5, "float32": 31.2}),
    ("v100", {"float16": 125.0, "float32": 15.7}),
    ("t4", {"float16": 65.0, "float32": 8.1}),
)


def _meminfo_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_limit_bytes() -> int | None:
    """The container's memory limit (cgroup v2 or v1), which /proc/meminfo does not show."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def physical_memory_bytes() -> int | None:
    """RAM this process can use: the machine's, or the container's limit when lower."""
    limits = [value for value in (_meminfo_total_bytes(), _cgroup_limit_bytes()) if value]
    return min(limits) if limits else None


def default_cpu_budget_bytes() -> int:
    """A quarter of RAM: room for the model's peak while pytest, the OS and other tests keep theirs."""
    total = physical_memory_bytes()
    return int(total * DEFAULT_CPU_BUDGET_SHARE) if total else 2 * 1024 ** 3


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


#: Instruction-set extensions that decide which kernels torch runs (visible even inside a VM).
_ISA_PREFIXES = ("avx512", "amx", "avx_vnni")
_ISA_FLAGS = ("avx", "avx2", "fma", "f16c")


def cpu_isa() -> list[str]:
    """The speed-relevant ISA flags of this CPU (/proc/cpuinfo), sorted; [] where not visible."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f in _ISA_FLAGS or f.startswith(_ISA_PREFIXES))
    except OSError:
        pass
    return []


def isa_level(isa: list[str]) -> str:
    """The widest vector unit: what selects torch's CPU kernels (amx > avx512 > avx2 > base)."""
    if any(flag.startswith("amx") for flag in isa):
        return "amx"
    if "avx512f" in isa:
        return "avx512"
    return "avx2" if "avx2" in isa else "base"


def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_hardware(budget_bytes: int) -> dict[str, Any]:
    import torch
    return {
        "device": "cpu",
        "name": cpu_model_name(),
        "machine": platform.machine(),
        "cpus": usable_cpu_count(),
        "isa": cpu_isa(),
        "torch_threads": torch.get_num_threads(),
        "total_memory_bytes": physical_memory_bytes(),
        "memory_budget_bytes": budget_bytes,
        "torch": torch.__version__,
    }


def cuda_hardware(index: int, nvml_info: dict[str, Any]) -> dict[str, Any]:
    """GPU name, memory, compute capability, driver (from NVML), CUDA and torch versions."""
    import torch
    props = torch.cuda.get_device_properties(index)
    return {
        "device": f"cuda:{index}",
        "name": props.name,
        "total_memory_bytes": int(props.total_memory),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": int(props.multi_processor_count),
        "driver": nvml_info.get("driver_version"),
        "power_limit_w": nvml_info.get("power_limit_w"),
        "max_clocks_mhz": nvml_info.get("max_clocks_mhz"),
        "mig": nvml_info.get("mig"),
        "ecc": nvml_info.get("ecc"),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "nvml": nvml_info,
    }


def key_of_hardware(info: dict[str, Any]) -> str:
    """"nvidia-h100-80gb-hbm3-79gib" or "cpu-amd-epyc-7r13-processor-avx2-2cpus": stable per hardware kind.

    In the key: what decides which kernels run and how many run at once (the CPU model where the
    VM shows it, its ISA level and cores; the GPU model and memory). A new key means a new
    baseline. Clocks, power limit, MIG, ECC, driver and torch versions and torch's threads are
    only reported when they differ from the recording (gate.hardware_note): a baseline stays
    comparable across them, judged relative to the reference workload.
    """
    if info["device"] == "distributed":
        return distributed_key([rank.get("hardware_key") or key_of_hardware(rank) for rank in info["ranks"]])
    if info["device"] == "cpu":
        return f"cpu-{slug(info['name'])}-{isa_level(info.get('isa') or [])}-{info['cpus']}cpus"
    gib = round(info["total_memory_bytes"] / 1024 ** 3)
    return f"{slug(info['name'])}-{gib}gib"


#: Longer keys of jobs over many kinds of device keep the first and a hash of the whole list.
MAX_DISTRIBUTED_KEY = 120


def distributed_key(rank_keys: list[str]) -> str:
    """"world2-cpu-...-2cpus", or "world3-2x-nvidia-h100-80gib-1x-nvidia-a100-40gib" when ranks differ:
    a job on 8 GPUs is not a job on 1, and a job with a smaller card is not one without."""
    kinds = list(dict.fromkeys(rank_keys))
    if len(kinds) == 1:
        key = f"world{len(rank_keys)}-{kinds[0]}"
    else:
        key = f"world{len(rank_keys)}-" + "-".join(f"{rank_keys.count(kind)}x-{kind}" for kind in kinds)
    if len(key) <= MAX_DISTRIBUTED_KEY:
        return key
    return f"world{len(rank_keys)}-{kinds[0]}-and-{len(kinds) - 1}-more-{stable_hash(rank_keys)[:8]}"


def datasheet_peak_tflops(gpu_name: str, dtype_name: str, *, tf32: bool = False) -> float | None:
    """The GPU's dense peak for ``dtype_name`` ("bfloat16", "float32", ...); None when unknown."""
    lowered = gpu_name.lower()
    key = "tf32" if dtype_name == "float32" and tf32 else dtype_name
    for fragment, peaks in PEAK_TFLOPS:
        if re.search(rf"\b{fragment}\b", lowered):
            return peaks.get(key)
    return None
