"""What counts as an out-of-memory error (and so is caught by the search) and what propagates."""

from __future__ import annotations

import sys
import types

import pytest

from pytest_autobatch.errors import OutOfMemory, is_oom_error


@pytest.mark.parametrize("error", [
    OutOfMemory("batch 64 does not fit", batch=64, limit="budget"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"),
    RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                 "non-contiguous input."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 137438953472 bytes."),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    MemoryError(),
])
def test_oom_errors_are_recognised(error):
    assert is_oom_error(error)


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x512 and 256x10)"),
    ValueError("out of memory"),  # only runtime errors carry allocator messages
    KeyError("input_ids"),
    TypeError("forward() missing 1 required positional argument"),
])
def test_other_errors_are_not_taken_for_an_oom(error):
    assert not is_oom_error(error)


def test_torch_out_of_memory_error_is_recognised_without_importing_torch(monkeypatch):
    class OutOfMemoryError(Exception):
        """Stands in for torch.OutOfMemoryError (a RuntimeError subclass in real torch)."""

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))
    assert is_oom_error(OutOfMemoryError("Tried to allocate 1.00 GiB"))
    monkeypatch.delitem(sys.modules, "torch")
    assert not is_oom_error(OutOfMemoryError("Tried to allocate 1.00 GiB"))


def test_real_torch_out_of_memory_error_is_recognised():
    torch = pytest.importorskip("torch")
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB"))
    assert not is_oom_error(torch.cuda.DeferredCudaCallError("CUDA call failed lazily"))
