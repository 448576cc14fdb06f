"""The reference workload the gate times beside the model, so that it can tell a slower machine
from a slower model.

It has two parts, timed apart: ``compute``, a GEMM at the model's dtype small enough to run from
the caches (what compute-bound layers do), and ``memory``, a read-and-write pass over buffers
several times larger than a server's last-level cache (what memory-bound layers do, and what a
model does that streams weights larger than the caches, such as ViT-B at a small image size).
A shared host can change one without the other: on this project's 2-core VM a neighbour's memory
traffic slowed ViT-B/16 by 29% over an afternoon while the GEMM ran as fast as before. Timed
apart, the parts bound how much the machine alone can explain (``gate``); adding many tiny ops
made the reference react 5-10 times more than the models to contention, so contention is left
to ``steadiness`` to detect instead.
"""

from __future__ import annotations

from typing import Callable

import torch

#: GEMM size and bytes per elementwise buffer (three buffers) per device type: each part of a
#: unit takes a few ms on a 2-core CPU and well under 1 ms on a datacenter GPU.
_SIZES = {"cpu": (576, 32 << 20), "cuda": (4096, 128 << 20)}
PARTS = ("compute", "memory")


def describe(device_type: str, dtype: torch.dtype) -> dict[str, object]:
    """What the entry stores to say which reference its samples are of."""
    gemm, elementwise = _SIZES.get(device_type, _SIZES["cpu"])
    return {"kind": "gemm|elementwise", "gemm": gemm, "elementwise_bytes": elementwise,
            "dtype": str(dtype).removeprefix("torch.")}


def make_reference(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """One unit of each part of the reference workload on ``device``, its tensors allocated once."""
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

    def compute() -> None:
        with torch.inference_mode():
            torch.mm(a, b, out=product)

    def memory() -> None:
        with torch.inference_mode():
            torch.add(x, y, alpha=0.5, out=z)

    parts = {"compute": compute, "memory": memory}
    for unit in parts.values():
        unit()
    return parts
