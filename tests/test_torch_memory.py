"""Memory tracking of live tensors and prediction on fake tensors (CPU, small real models)."""

from __future__ import annotations

import resource
import weakref

import pytest

from pytest_autobatch.errors import OutOfMemory

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from pytest_autobatch.devices.torch_devices import CpuDevice, OomLeakWarning  # noqa: E402
from pytest_autobatch.devices.torch_memory import FakeModel, LiveMemory, predict, state_tensors  # noqa: E402

MIB = 1024 ** 2


def test_views_count_once_and_freed_storages_leave_the_live_count():
    with LiveMemory() as tracker:
        block = torch.zeros(MIB // 4)           # 1 MiB of float32
        view = block[10:]
        second = torch.ones(MIB // 4)
        assert tracker.live_bytes == 2 * MIB
        del block, view
        assert tracker.live_bytes == MIB
        del second
    assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 2 * MIB


def test_existing_tensors_count_as_resident_until_they_die():
    weights = [torch.zeros(MIB // 4), torch.zeros(MIB // 4)]
    tracker = LiveMemory()
    tracker.track(weights + [weights[0][1:]])
    assert tracker.live_bytes == 2 * MIB
    weights.pop()
    assert tracker.live_bytes == MIB


def test_budget_refuses_an_operator_before_it_allocates():
    budget = 8 * MIB
    tracker = LiveMemory(budget_bytes=budget)
    with pytest.raises(OutOfMemory) as caught, tracker:
        small = torch.zeros(MIB // 4)
        torch.empty(2 ** 40, dtype=torch.uint8)  # 1 TiB: would fail or swap if it were allocated
    assert caught.value.limit == "budget"
    assert caught.value.needed_bytes > 2 ** 40 and caught.value.available_bytes == budget
    assert "budget" in str(caught.value) and "empty" in str(caught.value)
    assert tracker.peak_bytes <= budget, "the refused tensor must never have been counted as live"
    del small


def test_fake_model_swaps_weights_in_and_back_out():
    model = torch.nn.Linear(4, 3)
    real_weight = model.weight
    with FakeModel(model) as fake:
        assert model.weight is not real_weight
        assert type(model.weight).__name__ == "FakeTensor"
        assert [tuple(p.shape) for p in fake.parameters()] == [(3, 4), (3,)]
    assert model.weight is real_weight


def test_prediction_of_a_linear_layer_is_its_exact_tensor_bytes():
    model = torch.nn.Linear(256, 128)
    batch = 64

    def run(fake):
        with torch.inference_mode():
            model(fake.fake_inputs(torch.randn(batch, 256)))

    prediction = predict(model, run)
    weights = (256 * 128 + 128) * 4
    assert prediction.peak_bytes == weights + batch * 256 * 4 + batch * 128 * 4
    assert prediction.flops == 2 * batch * 256 * 128


def test_state_tensors_hold_weights_gradients_and_optimizer_state():
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    tensors = state_tensors(model, optimizer)
    # 2 parameters, 2 gradients, Adam's step/exp_avg/exp_avg_sq for each parameter
    assert len(tensors) == 2 + 2 + 6


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18(num_classes=10)


def test_prediction_allocates_nothing(resnet18):
    workload = CpuDevice().workload(resnet18, torch.randn(1, 3, 64, 64))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predicted = workload.predict_peak_bytes(4096)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert predicted > 2 * 1024 ** 3, "batch 4096 at 64x64 needs gigabytes"
    assert rss_growth < predicted / 10


def test_budget_oom_on_a_huge_batch_never_allocates_it_and_memory_comes_back(resnet18):
    device = CpuDevice(budget_bytes=200 * MIB)
    workload = device.workload(resnet18, torch.randn(1, 3, 64, 64))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with pytest.raises(OutOfMemory) as caught:
        workload.probe(100_000)                 # tens of gigabytes
    assert caught.value.limit == "budget" and caught.value.batch == 100_000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before < 400 * MIB
    event = device.oom_events[-1]
    assert event["leaked_bytes"] == 0
    assert event["allocated_after_bytes"] == event["allocated_before_bytes"]
    assert workload.probe(2) > 0                # the device is usable after the OOM


class _OomAfterAllocating(torch.nn.Module):
    """Past batch 2, allocates an activation, then fails like an allocator would; optionally leaks
    the activation. (Batches 1 and 2 run: the workload checks its example input, and one sample
    more, on them.)"""

    def __init__(self, leak_into: list | None = None):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.leak_into = leak_into
        self.activation_ref = None

    def forward(self, x):
        if x.shape[0] <= 2:
            return self.linear(x)
        activation = self.linear(x).repeat(1, 1000)
        self.activation_ref = weakref.ref(activation)
        if self.leak_into is not None:
            self.leak_into.append(activation)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("step", ["probe", "measure"])
def test_oom_drops_the_failed_steps_tensors(step):
    """A probe, or timing (more steps than a probe), that runs out of memory: memory released."""
    device = CpuDevice(budget_bytes=100 * MIB)
    model = _OomAfterAllocating()
    workload = device.workload(model, torch.randn(1, 16))
    with pytest.raises(OutOfMemory) as caught:
        getattr(workload, step)(64)
    assert caught.value.limit == "device" and caught.value.batch == 64
    assert "CUDA out of memory" in str(caught.value)
    assert model.activation_ref() is None, "the traceback's frames still hold the activation"
    assert device.oom_events[-1]["leaked_bytes"] == 0 and device.oom_events[-1]["batch"] == 64


def test_oom_that_leaves_memory_behind_is_reported_as_a_leak():
    device = CpuDevice(budget_bytes=100 * MIB)
    kept: list = []
    workload = device.workload(_OomAfterAllocating(leak_into=kept), torch.randn(1, 16))
    with pytest.warns(OomLeakWarning, match="more is allocated than before"), pytest.raises(OutOfMemory):
        workload.probe(64)
    assert device.oom_events[-1]["leaked_bytes"] == kept[0].untyped_storage().nbytes()


class _Broken(torch.nn.Module):
    """Fails past batch 2 (batches 1 and 2 are where the workload checks its example input)."""

    def forward(self, x):
        if x.shape[0] > 2:
            raise ValueError("shape mismatch in user code")
        return x


def test_a_non_oom_error_propagates_unchanged():
    workload = CpuDevice().workload(_Broken(), torch.randn(1, 4))
    with pytest.raises(ValueError, match="shape mismatch in user code"):
        workload.probe(3)


class _ReadsItsInput(torch.nn.Module):
    """Control flow on data: fake tensors cannot say which branch runs."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_unpredictable_model_says_why_and_still_probes():
    workload = CpuDevice().workload(_ReadsItsInput(), torch.randn(1, 4))
    assert workload.predict_peak_bytes(8) is None
    assert workload.extras(8)["prediction"].startswith("not available: DataDependentOutputException")
    assert workload.probe(8) > 0
