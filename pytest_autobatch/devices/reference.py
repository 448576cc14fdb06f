"""The reference workload the gate times beside the model, so that it can tell a slower machine
from a slower model.

One unit is a GEMM at the model's dtype (what compute-bound layers do) and an elementwise pass
over buffers larger than the caches (what memory-bound layers do). Measured on a 2-core VM
(benchmarks/bench_gate_cpu.py and the issue's notes): this mix tracked ResNet-18/50 and a small
transformer best among six candidates; adding many tiny ops made the reference react 5-10 times
more than the models to contention, so contention is left to ``steadiness`` to detect instead.
"""

from __future__ import annotations

from typing import Callable

import torch

#: Sizes per device type: a unit takes ~5 ms on a 2-core CPU and ~1 ms on a datacenter GPU.
_SIZES = {"cpu": (576, 16 << 20), "cuda": (4096, 128 << 20)}


def describe(device_type: str, dtype: torch.dtype) -> dict[str, object]:
    """What the entry stores to say which reference its samples are of."""
    gemm, elementwise = _SIZES.get(device_type, _SIZES["cpu"])
    return {"kind": "gemm+elementwise", "gemm": gemm, "elementwise_bytes": elementwise,
            "dtype": str(dtype).removeprefix("torch.")}


def make_reference(device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """One unit of the reference workload on ``device``, its tensors allocated once."""
    gemm, elementwise = _SIZES.get(device.type, _SIZES["cpu"])
    if not dtype.is_floating_point or (device.type == "cpu" and dtype == torch.float16):
        dtype = torch.float32   # integer or CPU-half models: the GEMM runs in float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(gemm, gemm, generator=generator).to(device, dtype)
    b = torch.randn(gemm, gemm, generator=generator).to(device, dtype)
    product = torch.empty(gemm, gemm, device=device, dtype=dtype)
    count = elementwise // 4
    x = torch.randn(count, generator=generator).to(device)
    y = torch.randn(count, generator=generator).to(device)
    z = torch.empty(count, device=device)

    def unit() -> None:
        with torch.inference_mode():
            torch.mm(a, b, out=product)
            torch.add(x, y, alpha=0.5, out=z)
            torch.mul(z, y, out=z)

    unit()
    return unit
