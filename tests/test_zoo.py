"""The model zoo: every model builds at its CPU size and runs at batch 2; sizes follow the device."""

from __future__ import annotations

import sys

import pytest

from pytest_autobatch.errors import ConfigError, MissingDependency
from pytest_autobatch.zoo import ZOO, ModelBuildError, ZooModel, build_yolo, get_model, size_class

torch = pytest.importorskip("torch")


def batch_of(example, batch):
    """The batch-1 example repeated ``batch`` times along the first dimension."""
    if isinstance(example, dict):
        return {key: value.expand(batch, *value.shape[1:]) for key, value in example.items()}
    return example.expand(batch, *example.shape[1:])


def tensors_in(output):
    """Every tensor of a model output (YOLO heads return nested tuples and dicts)."""
    if isinstance(output, dict):
        return tensors_in(list(output.values()))
    if isinstance(output, (tuple, list)):
        return [tensor for part in output for tensor in tensors_in(part)]
    return [output]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_builds_at_cpu_size_and_runs_batch_2(name):
    spec = ZOO[name]
    model, example, options = spec.build("cpu")
    inputs = batch_of(example, 2)
    if spec.mode == "generate":
        with torch.inference_mode():
            output = model.generate(**inputs, **options)
        prompt = example["input_ids"].shape[1]
        assert output.shape == (2, prompt + options["max_new_tokens"])   # never stops early
    elif spec.mode == "train":
        assert model.training
        optimizer = options["optimizer"](model.parameters())
        before = model.fc.weight.detach().clone()
        loss = options["loss_fn"](model(inputs), inputs)
        loss.backward()
        optimizer.step()
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert not torch.equal(before, model.fc.weight)
    else:
        assert not model.training
        with torch.inference_mode():
            output = model(inputs)
        assert {tensor.shape[0] for tensor in tensors_in(output)} == {2}


def test_builds_are_reproducible():
    spec = get_model("yolo11n-seg")
    first, second = spec.build("cpu").model, spec.build("cpu").model
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values()))


def test_the_device_picks_the_size():
    assert size_class("cuda") == size_class("cuda:1") == "gpu"
    assert size_class("cpu") == "cpu"
    for spec in ZOO.values():
        assert spec.size("cuda:0") == dict(spec.gpu_size) != spec.size("cpu") == dict(spec.cpu_size)
    assert get_model("resnet50").size("cuda") == {"image_size": 224}
    assert get_model("vit_b_16").size("cuda") == {"image_size": 224}
    assert get_model("yolo11n-pose").size("cuda") == {"image_size": 640}
    assert get_model("llama").size_label("cpu") == (
        "layers 4, hidden 256, heads 4, vocab 8192, prompt tokens 32, new tokens 16")


def test_cpu_size_builds_the_smaller_input():
    model, example, _ = get_model("resnet50").build("cpu")
    assert example.shape == (1, 3, 64, 64)


def test_unknown_model_lists_the_zoo():
    with pytest.raises(ConfigError, match="no zoo model called 'resnet5'.*resnet50, vit_b_16"):
        get_model("resnet5")


@pytest.mark.parametrize("name, module, extra", [("resnet50", "torchvision.models", "vision"),
                                                 ("yolo11n-pose", "ultralytics", "yolo"),
                                                 ("llama", "transformers", "llm")])
def test_a_missing_library_names_the_extra(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)   # makes `import module` fail
    with pytest.raises(MissingDependency, match=rf"pip install 'pytest-autobatch\[{extra}\]'"):
        get_model(name).build("cpu")


def test_a_failing_factory_names_the_model():
    broken = ZooModel("yolo-broken", "inference", "a yaml that does not exist", "yolo",
                      lambda **size: build_yolo(config="yolo-nonexistent.yaml", **size),
                      cpu_size={"image_size": 32})
    with pytest.raises(ModelBuildError, match=r"building zoo model 'yolo-broken' \(image size 32\)"):
        broken.build("cpu")


@pytest.mark.slow
def test_the_int8_llama_is_fingerprinted_as_quantized_and_searched_without_a_prediction():
    from pytest_autobatch.devices import get_device
    from pytest_autobatch.lengths import record_frontier
    from pytest_autobatch.zoo import build_llama

    tiny = dict(layers=1, hidden=64, heads=4, vocab=256, prompt_tokens=32, new_tokens=2)
    model = build_llama(**tiny, quantize="int8").model
    assert any(".quantized" in type(module).__module__ for module in model.modules())
    device = get_device("cpu", memory_budget=256 << 10)
    entry = record_frontier(device, model, name="llama-int8", prompt_tokens=[4, 16, 32], new_tokens=[2], cap=64,
                            timing={"warmup_s": 0.0, "warmup_iterations": 1, "block_s": 0.01, "min_blocks": 1,
                                    "max_blocks": 1})
    assert "torch.ao.nn.quantized.dynamic.modules.linear.Linear" in entry["model_fingerprint"]["quantization"]
    batches = [row["max_batch"] for row in entry["frontier"]]
    assert batches == sorted(batches, reverse=True) and batches[0] > batches[-1]
    with pytest.raises(ConfigError, match="quantizes to 'int8'"):
        build_llama(**tiny, quantize="int4")


def test_a_cpu_only_model_refuses_cuda_with_the_fix():
    with pytest.raises(ConfigError, match="'llama-int8' runs on cpu devices only, not cuda:0"):
        get_model("llama-int8").build("cuda:0")
