"""The CPU device with real small models, workloads of every kind, timing, fingerprints and bad input."""

from __future__ import annotations

import json
import os
import re
import time
from types import SimpleNamespace

import pytest

from pytest_autobatch.devices import get_device
from pytest_autobatch.errors import ConfigError
from pytest_autobatch.units import parse_size

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from pytest_autobatch.devices import hardware, nvml  # noqa: E402
from pytest_autobatch.devices.torch_devices import CpuDevice  # noqa: E402
from pytest_autobatch.devices.torch_timing import FAST, TimingBudget, measure_throughput  # noqa: E402
from pytest_autobatch.devices.torch_workload import expand_batch  # noqa: E402

MIB = 1024 ** 2


# --- sizes, devices, hardware --------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("512MB", 512 * 1000 ** 2), ("2GiB", 2 * 1024 ** 3), ("1.5G", int(1.5 * 1024 ** 3)),
    (" 64 mib ", 64 * MIB), ("1048576", MIB), (4096, 4096),
])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "2 gigs", "-1GB", "0", "", True])
def test_bad_size_names_the_option_and_the_accepted_forms(bad):
    with pytest.raises(ConfigError) as caught:
        parse_size(bad)
    message = str(caught.value)
    assert "--autobatch-memory-budget" in message and repr(bad) in message and "GiB" in message


def test_cpu_device_defaults_to_a_quarter_of_ram():
    device = get_device("cpu")
    assert isinstance(device, CpuDevice)
    ram = hardware.physical_memory_bytes()
    assert ram / 5 < device.capacity_bytes() <= ram / 4
    assert device.hardware()["memory_budget_bytes"] == device.capacity_bytes()


def test_cpu_device_takes_a_size_string_budget_and_rejects_a_bad_one():
    assert get_device("cpu", memory_budget="512MiB").capacity_bytes() == 512 * MIB
    with pytest.raises(ConfigError, match="memory budget 'half' is not a size"):
        get_device("cpu", memory_budget="half")


def test_unknown_device_name_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        get_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_without_a_gpu_says_so_and_auto_falls_back_to_cpu():
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        get_device("cuda:0")
    assert get_device("auto").name == "cpu"


def test_cpu_hardware_fingerprint_and_key():
    device = get_device("cpu", memory_budget="1GiB")
    info = device.hardware()
    json.dumps(info)
    assert info["device"] == "cpu" and info["cpus"] >= 1 and info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads()
    key = device.hardware_key()
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d+cpus", key) and key == device.hardware_key()


def test_gpu_keys_and_peaks():
    info = {"device": "cuda:0", "name": "NVIDIA H100 80GB HBM3", "total_memory_bytes": 85_045_870_592}
    assert hardware.key_of_hardware(info) == "nvidia-h100-80gb-hbm3-79gib"
    assert hardware.datasheet_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert hardware.datasheet_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert hardware.datasheet_peak_tflops("NVIDIA A100-SXM4-40GB", "float32", tf32=True) == 156.0
    assert hardware.datasheet_peak_tflops("NVIDIA L40", "bfloat16") is None  # not an L4
    assert hardware.datasheet_peak_tflops("NVIDIA L4", "bfloat16") == 121.0


# --- NVML, against a fake pynvml --------------------------------------------------------------

class _NotSupported(Exception):
    pass


def _fake_pynvml(uuids, *, energy=True):
    counter = {"mj": 1_000_000}

    def energy_reading(handle):
        if not energy:
            raise _NotSupported("Not Supported")
        counter["mj"] += 2500
        return counter["mj"]

    return SimpleNamespace(
        nvmlDeviceGetCount=lambda: len(uuids),
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetUUID=lambda handle: uuids[handle],
        nvmlDeviceGetName=lambda handle: f"GPU {handle}",
        nvmlSystemGetDriverVersion=lambda: "580.65.06",
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(total=80, free=70, used=10),
        nvmlDeviceGetPowerUsage=lambda handle: 350_000,
        nvmlDeviceGetEnforcedPowerLimit=lambda handle: 700_000,
        nvmlDeviceGetTotalEnergyConsumption=energy_reading)


def test_nvml_maps_the_torch_device_by_uuid_not_index():
    fake = _fake_pynvml(["GPU-aaaa-1111", "GPU-bbbb-2222"])
    gpu = nvml.open_gpu("bbbb-2222", pynvml=fake)   # torch's uuid has no "GPU-" prefix
    assert gpu.name() == "GPU 1"
    assert gpu.power_w() == 350.0
    assert gpu.info()["driver_version"] == "580.65.06"
    meter = nvml.EnergyMeter(gpu)
    meter.start()
    assert meter.stop() == 2.5
    assert meter.method().startswith("nvml total energy counter")


def test_energy_per_sample_is_the_counter_delta_over_the_timed_samples():
    gpu = nvml.open_gpu("aaaa", pynvml=_fake_pynvml(["GPU-aaaa"]))   # 2.5 J between two readings

    class MeteredCpu(CpuDevice):
        def energy_meter(self):
            return nvml.EnergyMeter(gpu)

    workload = MeteredCpu().workload(torch.nn.Linear(4, 2), torch.randn(1, 4), timing=FAST)
    workload.measure(8)
    extras = workload.extras(8)
    timed_items = round(2.5 / extras["energy_per_sample_j"])
    assert timed_items % (FAST.min_blocks * 8) == 0, "energy is divided by the samples of the timed blocks"
    assert extras["power_w"] > 0 and extras["energy_method"].startswith("nvml total energy counter")


def test_nvml_unsupported_and_missing_say_not_available():
    gpu = nvml.open_gpu("aaaa", pynvml=_fake_pynvml(["GPU-aaaa"], energy=False))
    meter = nvml.EnergyMeter(gpu)
    meter.start()
    assert meter.stop() is None and meter.method().startswith("not available: _NotSupported")
    assert nvml.open_gpu("cccc", pynvml=_fake_pynvml(["GPU-aaaa"])).startswith("not available: no NVML")


def test_nvml_is_not_available_on_this_cpu_machine():
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a machine with an NVIDIA driver")
    result = nvml.open_gpu("aaaa")
    assert isinstance(result, str) and result.startswith("not available")


# --- timing ---------------------------------------------------------------------------------

def test_timing_syncs_at_block_ends_only_and_keeps_raw_samples():
    events = []
    budget = TimingBudget(warmup_s=0.0, warmup_iterations=2, block_s=0.05, min_blocks=4,
                          max_blocks=4, max_time_s=10.0, spread=0.0)   # 1 ms runs: even a loaded machine fits two

    def run():
        events.append("run")
        time.sleep(0.001)

    timing = measure_throughput(run, 8, budget=budget, sync=lambda: events.append("sync"))
    assert len(timing.samples) == 4 and all(sample > 0 for sample in timing.samples)
    runs_per_block = timing.items // (4 * 8)
    assert runs_per_block >= 2, "blocks hold several iterations"
    timed = events[2 * 3:]                    # after 2 warm-up runs (sync, run, sync each)
    assert timed == (["sync"] + ["run"] * runs_per_block + ["sync"]) * 4
    assert max(timing.samples) < 8 / 0.001 * 1.01, "samples are items per second"


def test_timing_stops_when_the_spread_is_small_or_the_time_is_spent():
    steady = measure_throughput(lambda: None, 1, budget=TimingBudget(
        warmup_s=0, block_s=0.001, min_blocks=3, max_blocks=40, spread=10.0))
    assert len(steady.samples) == 3
    capped = measure_throughput(lambda: time.sleep(0.002), 1, budget=TimingBudget(
        warmup_s=0, block_s=0.002, min_blocks=3, max_blocks=1000, spread=0.0, max_time_s=0.05))
    assert 3 <= len(capped.samples) < 40


def test_timing_budget_comes_from_a_dict_and_rejects_nonsense():
    assert TimingBudget.coerce({"max_time_s": 1.0}).max_time_s == 1.0
    with pytest.raises(ConfigError, match="fields are"):
        TimingBudget.coerce({"seconds": 1})
    with pytest.raises(ConfigError):
        TimingBudget(min_blocks=5, max_blocks=2)


# --- inputs and bad input ---------------------------------------------------------------------

def test_batch_expansion_repeats_rows_of_every_tensor_in_dicts_tuples_and_lists():
    example = {"ids": torch.tensor([[1, 2], [3, 4]]), "extra": (torch.zeros(2, 3), [torch.ones(2)]),
               "flag": True}
    batch = expand_batch(example, 5)
    assert batch["ids"][:, 0].tolist() == [1, 3, 1, 3, 1]
    assert batch["extra"][0].shape == (5, 3) and batch["extra"][1][0].shape == (5,)
    assert batch["flag"] is True
    assert batch["ids"].untyped_storage().data_ptr() != example["ids"].untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def linear():
    return torch.nn.Linear(4, 2)


@pytest.mark.parametrize("example, message", [
    (None, "need an example input whose first dimension is the batch"),
    (torch.tensor(3.0), r"example input is a 0-dim tensor with no batch dimension"),
    ({"x": torch.zeros(2, 4), "scale": torch.tensor(1.0)}, r"example input\['scale'\] is a 0-dim"),
    ((torch.zeros(2, 4), torch.zeros(3, 4)), "disagree on the batch size"),
    ({"text": "hello"}, "holds no tensor"),
])
def test_bad_example_inputs(linear, example, message):
    with pytest.raises(ConfigError, match=message):
        CpuDevice().workload(linear, example)


def test_example_input_that_does_not_fit_the_model_is_named_with_its_shape(linear):
    with pytest.raises(ConfigError, match=r"Linear fails on the example input \{'shape': \[5\].*"
                                          r"RuntimeError: .*not an out-of-memory error") as caught:
        CpuDevice().workload(linear, torch.zeros(1, 5))
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_model_error_that_is_not_about_the_input_keeps_its_cause():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("a bug in forward")

    with pytest.raises(ConfigError, match="ValueError: a bug in forward") as caught:
        CpuDevice().workload(Broken(), torch.zeros(1, 4))
    assert isinstance(caught.value.__cause__, ValueError)


def test_model_on_another_device_is_refused(linear):
    meta_model = torch.nn.Linear(4, 2, device="meta")
    with pytest.raises(ConfigError, match=r"weight on meta, but device 'cpu' .* model.to\('cpu'\)"):
        CpuDevice().workload(meta_model, torch.zeros(1, 4))


def test_generate_needs_a_generate_method(linear):
    with pytest.raises(ConfigError, match="mode='generate' needs a model with generate"):
        CpuDevice().workload(linear, torch.zeros(1, 4), mode="generate")


@pytest.mark.parametrize("mode, options, message", [
    ("inference", {"loss_fn": sum}, "loss_fn do not apply to mode='inference'"),
    ("serve", {}, "unknown mode 'serve'"),
    ("inference", {"dtype": "float8"}, "dtype='float8' is not a dtype"),
    ("train", {"optimizer": "adam"}, "optimizer='adam': give a torch.optim.Optimizer"),
])
def test_bad_options(linear, mode, options, message):
    with pytest.raises(ConfigError, match=message):
        CpuDevice().workload(linear, torch.zeros(1, 4), mode=mode, **options)


def test_options_left_at_none_are_ignored(linear):
    workload = CpuDevice().workload(linear, torch.zeros(1, 4), loss_fn=None, max_new_tokens=None)
    assert workload.mode == "inference"


def test_not_a_module_is_refused():
    with pytest.raises(ConfigError, match="take a torch.nn.Module, got function"):
        CpuDevice().workload(lambda x: x, torch.zeros(1, 4))


# --- fingerprints -----------------------------------------------------------------------------

def test_fingerprint_is_json_and_follows_what_changes_the_workload():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    device = CpuDevice()
    base = device.workload(model, torch.zeros(1, 4)).fingerprint()
    assert json.loads(json.dumps(base)) == base
    assert base["model_class"] == "torch.nn.modules.container.Sequential"
    assert base["parameters"] == 4 * 8 + 8 + 8 * 2 + 2
    assert base["inputs"] == {"shape": [4], "dtype": "float32"}
    assert base == device.workload(model, torch.zeros(3, 4)).fingerprint(), "batch size is not identity"
    assert device.workload(model, torch.zeros(1, 4), mode="train").fingerprint()["mode"] == "train"
    assert device.workload(model, torch.zeros(1, 4), autocast="bf16").fingerprint()["autocast"] == "bfloat16"
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    other = device.workload(wider, torch.zeros(1, 4)).fingerprint()
    assert other["parameter_shapes_hash"] != base["parameter_shapes_hash"]
    assert other["architecture_hash"] != base["architecture_hash"]


# --- workloads on real small models -------------------------------------------------------------

def _check_workload(workload, batches=(2, 8)):
    """Predicted and measured peaks agree within 15%; measuring gives raw samples and FLOPs."""
    for batch in batches:
        predicted = workload.predict_peak_bytes(batch)
        measured = workload.probe(batch)
        assert predicted is not None, workload.extras(batch).get("prediction")
        assert abs(predicted - measured) / measured < 0.15, (batch, predicted, measured)
    samples = workload.measure(batches[0])
    assert len(samples) == FAST.min_blocks and min(samples) > 0
    extras = workload.extras(batches[0])
    assert extras["flops_per_sample"] > 0 and extras["attained_tflops"] > 0
    assert extras["fraction_of_peak"] is None  # no CPU peak table
    json.dumps(extras)
    return extras


def test_train_step_uses_the_loss_and_optimizer_and_updates_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    losses = []

    def loss_fn(output, inputs):
        losses.append(inputs.shape[0])
        return output.pow(2).mean()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    workload = CpuDevice().workload(model, torch.randn(1, 4), mode="train", loss_fn=loss_fn,
                                    optimizer=optimizer, timing=FAST)
    before = model[0].weight.detach().clone()
    workload.probe(6)
    assert losses[-1] == 6
    assert not torch.equal(before, model[0].weight)
    assert model.training
    assert model[0].weight.grad is not None
    workload.close()
    assert not model.training, "close() gives the model its own mode back"
    assert model[0].weight.grad is None


def test_paired_samples_are_the_blocks_asked_for_after_one_warm_up_whatever_the_budget():
    steps = []
    model = torch.nn.Linear(4, 2)
    model.register_forward_hook(lambda *_: steps.append(1))
    workload = CpuDevice().workload(model, torch.randn(1, 4), timing=FAST)   # FAST: 3 blocks
    steps.clear()   # the checks on the example input ran it
    paired = workload.measure_paired(4, 7)
    assert len(paired.model) == len(paired.reference) == 7
    assert {part: len(rates) for part, rates in paired.reference_parts.items()} == {"compute": 7, "memory": 7}
    block = (len(steps) - FAST.warmup_iterations) // 7
    assert block >= 1 and len(steps) == FAST.warmup_iterations + 7 * block


def test_measure_leaves_the_thread_count_alone():
    threads = torch.get_num_threads()
    workload = CpuDevice().workload(torch.nn.Linear(4, 2), torch.randn(1, 4), timing=FAST)
    workload.measure(4)
    assert torch.get_num_threads() == threads


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_resnet18(resnet18, mode):
    _check_workload(CpuDevice().workload(resnet18, torch.randn(1, 3, 64, 64), mode=mode, timing=FAST))


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_small_vit(mode):
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                               hidden_dim=64, mlp_dim=128, num_classes=10)
    _check_workload(CpuDevice().workload(vit, torch.randn(1, 3, 32, 32), mode=mode, timing=FAST))


@pytest.fixture(scope="module")
def yolo_pose():
    os.environ.setdefault("YOLO_OFFLINE", "1")
    ultralytics = pytest.importorskip("ultralytics")
    return ultralytics.YOLO("yolo11n-pose.yaml", verbose=False).model


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_yolo11n_pose(yolo_pose, mode):
    _check_workload(CpuDevice().workload(yolo_pose, torch.randn(1, 3, 64, 64), mode=mode, timing=FAST))


@pytest.fixture(scope="module")
def tiny_llama():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.slow
def test_tiny_llama_generate_makes_exactly_max_new_tokens(tiny_llama, monkeypatch):
    ids = torch.randint(1, 256, (1, 12))
    workload = CpuDevice().workload(tiny_llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                    mode="generate", max_new_tokens=6, timing=FAST)
    lengths = []
    generate = tiny_llama.generate
    monkeypatch.setattr(tiny_llama, "generate",
                        lambda *args, **kwargs: lengths.append(generate(*args, **kwargs).shape) or None)
    extras = _check_workload(workload, batches=(2, 8))
    assert set(lengths) >= {torch.Size([2, 18]), torch.Size([8, 18])}
    assert extras["tokens_per_second"] > 0
    assert workload.fingerprint()["max_new_tokens"] == 6


@pytest.mark.slow
def test_tiny_llama_train_with_a_model_loss(tiny_llama):
    ids = torch.randint(1, 256, (1, 12))
    workload = CpuDevice().workload(tiny_llama, {"input_ids": ids, "labels": ids}, mode="train",
                                    loss_fn=lambda output, inputs: output.loss, timing=FAST)
    _check_workload(workload)
    workload.close()
