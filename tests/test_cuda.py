"""The CUDA device: its probe/OOM logic against a fake allocator (runs anywhere), then real-GPU tests
that skip cleanly without one."""

from __future__ import annotations

import json
import weakref
from types import SimpleNamespace

import pytest

from pytest_autobatch.errors import OutOfMemory

torch = pytest.importorskip("torch")

from pytest_autobatch.devices import torch_devices as torch_device_module  # noqa: E402
from pytest_autobatch.devices.torch_devices import CudaDevice, OomLeakWarning  # noqa: E402
from pytest_autobatch.devices.torch_timing import FAST  # noqa: E402

GIB = 1024 ** 3
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class FakeAllocator:
    """The slice of torch.cuda the device uses, with memory that follows real CPU tensors' lifetimes."""

    def __init__(self, monkeypatch, *, free=60 * GIB, reserved=2 * GIB):
        self.allocated = 1 * GIB
        self.peak = self.allocated
        self.free = free
        self.reserved = reserved
        self.calls: list[str] = []
        props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * GIB, major=9, minor=0,
                                multi_processor_count=132, uuid="aaaa-1111")
        for name, value in {
            "synchronize": lambda index=None: self.calls.append("synchronize"),
            "memory_allocated": lambda index=None: self.allocated,
            "max_memory_allocated": lambda index=None: self.peak,
            "max_memory_reserved": lambda index=None: self.peak + 64 * 1024 ** 2,
            "memory_reserved": lambda index=None: self.reserved,
            "reset_peak_memory_stats": lambda index=None: self._reset_peak(),
            "empty_cache": lambda: self.calls.append("empty_cache"),
            "mem_get_info": lambda index=None: (self.free, 80 * GIB),
            "get_device_properties": lambda index=None: props,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch_device_module, "open_gpu", lambda uuid: "not available: test")

    def _reset_peak(self):
        self.calls.append("reset_peak")
        self.peak = self.allocated

    def allocate(self, nbytes):
        """A CPU token standing for ``nbytes`` of device memory, freed when the token dies."""
        token = torch.empty(1)
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)
        weakref.finalize(token, self._free, nbytes)
        return token

    def _free(self, nbytes):
        self.allocated -= nbytes


class StubWorkload:
    """Allocates 10 MiB per sample; batches over ``fits`` fail like the caching allocator does."""

    def __init__(self, allocator, *, fits=100, leak_into=None, error=None):
        self.allocator = allocator
        self.fits = fits
        self.leak_into = leak_into
        self.error = error

    def run_batch(self, batch):
        activations = self.allocator.allocate(batch * 10 * 1024 ** 2)
        if self.leak_into is not None:
            self.leak_into.append(activations)
        if self.error is not None:
            raise self.error
        if batch > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")


def test_probe_resets_peak_runs_synchronises_and_reports_allocated_and_reserved(monkeypatch):
    allocator = FakeAllocator(monkeypatch)
    device = CudaDevice(0)
    peak = device.probe_peak(StubWorkload(allocator), 8)
    assert peak == 1 * GIB + 8 * 10 * 1024 ** 2
    assert allocator.calls == ["synchronize", "reset_peak", "synchronize"]
    record = device.probe_extras(8)["probe"]
    assert record["peak_reserved_bytes"] == peak + 64 * 1024 ** 2
    assert record["allocated_before_bytes"] == 1 * GIB


def test_oom_releases_memory_and_checks_it_came_back(monkeypatch, recwarn):
    allocator = FakeAllocator(monkeypatch)
    device = CudaDevice(0)
    with pytest.raises(OutOfMemory) as caught:
        device.probe_peak(StubWorkload(allocator), 500)
    assert caught.value.limit == "device" and caught.value.batch == 500
    assert "CUDA out of memory" in str(caught.value)
    assert "empty_cache" in allocator.calls
    assert allocator.allocated == 1 * GIB
    assert device.oom_events[-1] == {"batch": 500, "limit": "device", "allocated_before_bytes": GIB,
                                     "allocated_after_bytes": GIB, "leaked_bytes": 0}
    assert not [w for w in recwarn if issubclass(w.category, OomLeakWarning)]


def test_memory_kept_after_an_oom_is_reported_as_a_leak(monkeypatch):
    allocator = FakeAllocator(monkeypatch)
    device = CudaDevice(0)
    kept: list = []
    with pytest.warns(OomLeakWarning, match=r"cuda:0: after the OOM at batch 500, 4.88 GiB more"), \
            pytest.raises(OutOfMemory):
        device.probe_peak(StubWorkload(allocator, leak_into=kept), 500)
    assert device.oom_events[-1]["leaked_bytes"] == 500 * 10 * 1024 ** 2
    assert device.probe_extras(500)["oom"]["leaked_bytes"] == 500 * 10 * 1024 ** 2


def test_other_errors_propagate_unchanged(monkeypatch):
    allocator = FakeAllocator(monkeypatch)
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as caught:
        CudaDevice(0).probe_peak(StubWorkload(allocator, error=error), 4)
    assert caught.value is error


def test_capacity_is_free_plus_cached_memory_capped_by_a_budget(monkeypatch):
    FakeAllocator(monkeypatch, free=30 * GIB, reserved=2 * GIB)
    assert CudaDevice(0).capacity_bytes() == 32 * GIB
    assert CudaDevice(0, budget_bytes=10 * GIB).capacity_bytes() == 10 * GIB


def test_a_probe_over_the_budget_is_an_oom_labelled_budget(monkeypatch):
    allocator = FakeAllocator(monkeypatch)
    device = CudaDevice(0, budget_bytes=int(1.5 * GIB))
    with pytest.raises(OutOfMemory) as caught:
        device.probe_peak(StubWorkload(allocator), 80)
    assert caught.value.limit == "budget" and caught.value.needed_bytes > 1.5 * GIB


def test_hardware_fingerprint(monkeypatch):
    FakeAllocator(monkeypatch)
    device = CudaDevice(0)
    info = device.hardware()
    json.dumps(info)
    assert info["compute_capability"] == "9.0" and info["total_memory_bytes"] == 80 * GIB
    assert info["cuda"] == torch.version.cuda and info["torch"] == torch.__version__
    assert info["nvml"] == {"unavailable": "not available: test"}
    assert device.hardware_key() == "nvidia-h100-80gb-hbm3-80gib"
    assert device.peak_tflops(torch.bfloat16) == 989.4


# --- on a real GPU ----------------------------------------------------------------------------------

@pytest.fixture
def gpu():
    from pytest_autobatch.devices import get_device
    device = get_device("cuda")
    yield device
    device.release()


@pytest.fixture
def resnet18_gpu():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10).cuda()


@needs_gpu
def test_gpu_probe_matches_the_allocator_and_the_prediction(gpu, resnet18_gpu):
    workload = gpu.workload(resnet18_gpu, torch.randn(1, 3, 64, 64), timing=FAST)
    for batch in (4, 64):
        predicted = workload.predict_peak_bytes(batch)
        peak = workload.probe(batch)
        assert peak == torch.cuda.max_memory_allocated()
        assert abs(predicted - peak) / peak < 0.25, (batch, predicted, peak)
        assert gpu.probe_extras(batch)["probe"]["peak_reserved_bytes"] >= peak


@needs_gpu
def test_gpu_oom_is_caught_and_memory_comes_back(gpu, resnet18_gpu):
    workload = gpu.workload(resnet18_gpu, torch.randn(1, 3, 224, 224))
    before = torch.cuda.memory_allocated()
    with pytest.raises(OutOfMemory) as caught:
        workload.probe(20_000)              # the input fits (12 GB), the activations do not
    assert caught.value.limit == "device"
    assert torch.cuda.memory_allocated() == before
    assert gpu.oom_events[-1]["leaked_bytes"] == 0
    assert workload.probe(2) > 0


@needs_gpu
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_gpu_measure_gives_samples_flops_and_energy_fields(gpu, resnet18_gpu, mode):
    workload = gpu.workload(resnet18_gpu, torch.randn(1, 3, 64, 64), mode=mode, timing=FAST)
    samples = workload.measure(16)
    assert len(samples) == FAST.min_blocks and min(samples) > 0
    extras = workload.extras(16)
    json.dumps(extras)
    assert extras["flops_per_sample"] > 0 and extras["attained_tflops"] > 0
    assert "energy_per_sample_j" in extras and extras["energy_method"]
    workload.close()


@needs_gpu
def test_gpu_hardware_fingerprint(gpu):
    info = gpu.hardware()
    json.dumps(info)
    props = torch.cuda.get_device_properties(gpu.index)
    assert info["name"] == props.name and info["compute_capability"] == f"{props.major}.{props.minor}"
    assert gpu.capacity_bytes() > 0


@needs_gpu
def test_gpu_generate(gpu):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).cuda()
    workload = gpu.workload(model, torch.randint(1, 256, (1, 12)), mode="generate", max_new_tokens=4,
                            timing=FAST)
    predicted = workload.predict_peak_bytes(8)
    peak = workload.probe(8)
    assert predicted is not None and peak > 0
    assert min(workload.measure(8)) > 0
