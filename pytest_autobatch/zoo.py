"""Real models from the ecosystem, built from configs with random weights (nothing is downloaded).

Each zoo entry has two sizes: the real architecture and resolution for a GPU, and a smaller
resolution or config for the CPU, so that the whole main job (``pytest --autobatch benchmarks/``)
finishes on a 2-core CPU in minutes. The size is chosen from the device name: ``cuda``/``cuda:N``
gets the GPU size, anything else (``cpu``) the CPU size.

Torch and the model libraries are imported only when a model is built; a missing one raises
``MissingDependency`` naming the extra to install (vision, yolo, llm).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple

from .errors import AutobatchError, ConfigError, MissingDependency

SEED = 0


class ModelBuildError(AutobatchError):
    """A zoo factory failed; the message names the model and the size it was building."""


class BuiltModel(NamedTuple):
    """What a device's ``workload(model, example_input, mode=..., **options)`` takes."""

    model: Any
    example_input: Any
    options: dict[str, Any]


def size_class(device: str) -> str:
    """"gpu" for cuda devices, "cpu" for everything else: which size of a zoo model to build."""
    return "gpu" if str(device).strip().lower().startswith("cuda") else "cpu"


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: what it is, its GPU and CPU sizes, and how to build it."""

    name: str
    mode: str
    description: str
    extra: str
    factory: Callable[..., BuiltModel] = field(repr=False)
    gpu_size: Mapping[str, Any] = field(default_factory=dict)
    cpu_size: Mapping[str, Any] = field(default_factory=dict)
    runs_on: tuple[str, ...] = ("gpu", "cpu")   # size classes whose kernels the model has

    def size(self, device: str = "cpu") -> dict[str, Any]:
        """The factory arguments used on ``device`` (e.g. {"image_size": 224})."""
        return dict(self.gpu_size if size_class(device) == "gpu" else self.cpu_size)

    def size_label(self, device: str = "cpu") -> str:
        """The size used on ``device`` in words, for reports and test ids."""
        return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in self.size(device).items())

    def build(self, device: str = "cpu") -> BuiltModel:
        """Build the model at the size for ``device`` and move it there, with a batch-1 example input.

        The model is in eval mode unless it trains; the random weights are seeded, so two builds
        are identical. The example input stays on the CPU (the workload moves its batches).
        """
        if size_class(device) not in self.runs_on:
            raise ConfigError(f"zoo model {self.name!r} runs on {' and '.join(self.runs_on)} devices only, "
                              f"not {device}: pick another model or device")
        torch = _require("torch", "torch", f"the {self.name} model")
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                built = self.factory(**self.size(device))
            return built._replace(model=built.model.to(device))
        except MissingDependency:
            raise
        except Exception as exc:
            raise ModelBuildError(f"building zoo model {self.name!r} ({self.size_label(device)}) "
                                  f"failed: {type(exc).__name__}: {exc}") from exc


def _require(module: str, extra: str, purpose: str) -> Any:
    """Import ``module`` or raise MissingDependency naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise MissingDependency(package, extra, purpose) from exc


def _image_batch(torch: Any, image_size: int) -> Any:
    return torch.rand(1, 3, image_size, image_size)


def build_torchvision_classifier(*, arch: str, image_size: int, train: bool = False) -> BuiltModel:
    """A torchvision classifier with random weights; for training, SGD with momentum on cross-entropy."""
    torch = _require("torch", "torch", f"torchvision {arch}")
    models = _require("torchvision.models", "vision", f"torchvision {arch}")
    extra_args = {"image_size": image_size} if arch.startswith("vit") else {}
    model = getattr(models, arch)(weights=None, **extra_args)
    if not train:
        return BuiltModel(model.eval(), _image_batch(torch, image_size), {})
    model.train()
    optimizer = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4)
    return BuiltModel(model, _image_batch(torch, image_size),
                      {"loss_fn": classification_loss, "optimizer": optimizer})


def classification_loss(output: Any, batch_input: Any) -> Any:
    """Cross-entropy against fixed pseudo-labels: a real classification loss without a dataset."""
    import torch
    labels = torch.arange(output.shape[0], device=output.device) % output.shape[-1]
    return torch.nn.functional.cross_entropy(output.float(), labels)


def build_yolo(*, config: str, image_size: int) -> BuiltModel:
    """An ultralytics YOLO model from its yaml (e.g. yolo11n-pose.yaml), random weights, eval mode."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    torch = _require("torch", "torch", f"YOLO {config}")
    ultralytics = _require("ultralytics", "yolo", f"YOLO {config}")
    model = ultralytics.YOLO(config, verbose=False).model
    return BuiltModel(model.eval(), _image_batch(torch, image_size), {})


def build_llama(*, layers: int, hidden: int, heads: int, vocab: int, prompt_tokens: int,
                new_tokens: int, quantize: str | None = None) -> BuiltModel:
    """A Llama-style causal LM from a LlamaConfig, greedy ``generate`` of exactly ``new_tokens``.

    End-of-sequence is disabled so that every generation runs to its full length: random weights
    would otherwise stop at an arbitrary step and make throughput depend on luck. ``quantize="int8"``
    stores every Linear's weights in int8 (torch's dynamic quantization: activations quantized on
    the fly, CPU kernels, nothing to install).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = _require("torch", "llm", "the Llama-style LM")
    transformers = _require("transformers", "llm", "the Llama-style LM")
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=prompt_tokens + new_tokens, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    if quantize is not None:
        if quantize != "int8":
            raise ConfigError(f"quantize={quantize!r}: the zoo's Llama quantizes to 'int8' (CPU)")
        with warnings.catch_warnings():   # torch deprecates its quantized tensors in favour of torchao
            warnings.simplefilter("ignore", UserWarning)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    generation = model.generation_config
    generation.eos_token_id = None
    generation.pad_token_id = 0
    generation.do_sample = False
    input_ids = torch.randint(1, vocab, (1, prompt_tokens))
    example = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return BuiltModel(model, example, {"max_new_tokens": new_tokens})


def _image_model(name: str, description: str, extra: str, factory: Callable[..., BuiltModel], *,
                 gpu: int, cpu: int, mode: str = "inference") -> ZooModel:
    """A zoo entry whose sizes are square image resolutions."""
    return ZooModel(name, mode, description, extra, factory, gpu_size={"image_size": gpu},
                    cpu_size={"image_size": cpu})


ZOO: dict[str, ZooModel] = {spec.name: spec for spec in (
    _image_model("resnet50", "torchvision ResNet-50 image classification", "vision",
                 partial(build_torchvision_classifier, arch="resnet50"), gpu=224, cpu=64),
    _image_model("vit_b_16", "torchvision ViT-B/16 image classification", "vision",
                 partial(build_torchvision_classifier, arch="vit_b_16"), gpu=224, cpu=48),
    _image_model("yolo11n-pose", "ultralytics YOLO11n pose detection", "yolo",
                 partial(build_yolo, config="yolo11n-pose.yaml"), gpu=640, cpu=160),
    _image_model("yolo11n-seg", "ultralytics YOLO11n instance segmentation", "yolo",
                 partial(build_yolo, config="yolo11n-seg.yaml"), gpu=640, cpu=160),
    ZooModel("llama", "generate", "transformers Llama-style causal LM, greedy generation", "llm",
             build_llama,
             gpu_size={"layers": 8, "hidden": 1024, "heads": 16, "vocab": 32000,
                       "prompt_tokens": 128, "new_tokens": 32},
             cpu_size={"layers": 4, "hidden": 256, "heads": 4, "vocab": 8192,
                       "prompt_tokens": 32, "new_tokens": 16}),
    ZooModel("llama-int8", "generate", "the Llama-style LM with int8 weights (torch dynamic quantization)",
             "llm", partial(build_llama, quantize="int8"),
             gpu_size={"layers": 8, "hidden": 1024, "heads": 16, "vocab": 32000,
                       "prompt_tokens": 128, "new_tokens": 32},
             cpu_size={"layers": 4, "hidden": 256, "heads": 4, "vocab": 8192,
                       "prompt_tokens": 32, "new_tokens": 16}, runs_on=("cpu",)),
    _image_model("resnet50-train", "torchvision ResNet-50 training step (SGD, cross-entropy)",
                 "vision", partial(build_torchvision_classifier, arch="resnet50", train=True),
                 gpu=224, cpu=64, mode="train"),
)}


def get_model(name: str) -> ZooModel:
    """The zoo entry called ``name``, or a ConfigError listing the names there are."""
    try:
        return ZOO[name]
    except KeyError:
        raise ConfigError(f"no zoo model called {name!r}; the zoo has: {', '.join(ZOO)}") from None
