"""A torch model and one kind of work (inference, a training step, generation) at any batch size.

The example input's first dimension is the batch; a batch of ``b`` repeats its rows (every tensor
of a dict/tuple/list input alike). A tensor input is called as ``model(x)``, a tuple/list as
``model(*x)``, a dict as ``model(**x)``.

- ``inference``: a forward pass under ``torch.inference_mode()``.
- ``train``: gradients zeroed (set to None), forward, ``loss_fn(output, inputs)`` (default: the sum
  of the floating-point outputs), backward, ``optimizer.step()`` (default: AdamW).
- ``generate``: greedy ``model.generate`` of exactly ``max_new_tokens`` (min = max), since the KV
  cache of a whole generation needs more memory than one forward pass.

``dtype`` converts the model (in place) and the floating-point inputs; ``autocast`` (True or a dtype)
runs the step under ``torch.autocast``; ``timing`` is a ``torch_measure.TimingBudget`` or a dict.
The device-specific parts, how a probe measures peak memory and how timing synchronises, come from
the device (``torch_device``) through ``TorchBackend``.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Protocol

import torch

from ..errors import ConfigError, NoBatchFits, catch_oom
from ..stats import median
from .base import MODES, PairedSamples, Watch, stable_hash
from .reference import describe as describe_reference
from .reference import make_reference
from .torch_memory import FakeModel, Prediction, predict, state_tensors
from .torch_timing import Meter, Timing, TimingBudget, measure_throughput

DEFAULT_MAX_NEW_TOKENS = 32

_OPTIONS_BY_MODE = {
    "inference": {"dtype", "autocast", "timing"},
    "train": {"dtype", "autocast", "timing", "loss_fn", "optimizer"},
    "generate": {"dtype", "autocast", "timing", "max_new_tokens"},
}

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float64": torch.float64}


class TorchBackend(Protocol):
    """What a workload needs from its device."""

    name: str
    torch_device: torch.device
    prediction_rounding: int

    def probe_peak(self, workload: "TorchWorkload", batch: int) -> int: ...

    def synchronize(self) -> None: ...

    def energy_meter(self) -> Meter | None: ...

    def other_allocated_bytes(self, workload: "TorchWorkload") -> int: ...

    def allocated_bytes(self) -> int: ...

    def capacity_bytes(self) -> int | None: ...

    def after_oom(self, exc: BaseException, batch: int, before: int, tracker: Any, *, limit: str,
                  needed: int | None, available: int | None) -> Exception: ...

    def probe_extras(self, batch: int) -> dict[str, Any]: ...

    def peak_tflops(self, dtype: torch.dtype) -> float | None: ...

    def release(self) -> None: ...

    def watch(self) -> Watch: ...


def _dtype_option(value: Any, option: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower().removeprefix("torch.")]
    raise ConfigError(f"{option}={value!r} is not a dtype: use a torch.dtype or one of "
                      f"{', '.join(sorted(_DTYPE_NAMES))}")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


# --- example inputs -------------------------------------------------------------------------

def _leaves(example: Any, where: str = "example input") -> list[tuple[str, Any]]:
    """(location, value) for every leaf of a tensor / dict / tuple / list input."""
    if isinstance(example, dict):
        return [leaf for key, value in example.items() for leaf in _leaves(value, f"{where}[{key!r}]")]
    if isinstance(example, (tuple, list)):
        return [leaf for index, value in enumerate(example) for leaf in _leaves(value, f"{where}[{index}]")]
    return [(where, example)]


def example_batch_size(example: Any) -> int:
    """The example's batch size (its tensors' shared first dimension), or a ConfigError saying what is wrong."""
    if example is None:
        raise ConfigError("cpu/cuda workloads need an example input whose first dimension is the "
                          "batch, e.g. torch.randn(1, 3, 224, 224) or {'input_ids': ids}")
    tensors = [(where, value) for where, value in _leaves(example) if isinstance(value, torch.Tensor)]
    if not tensors:
        raise ConfigError(f"example input {type(example).__name__} holds no tensor: give a tensor, or "
                          f"a dict/tuple/list of tensors whose first dimension is the batch")
    sizes = {}
    for where, tensor in tensors:
        if tensor.dim() == 0:
            raise ConfigError(f"{where} is a 0-dim tensor with no batch dimension: give it a leading "
                              f"batch dimension, e.g. tensor.unsqueeze(0)")
        sizes[where] = tensor.shape[0]
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"example input tensors disagree on the batch size (first dimension): "
                          f"{sizes}; give every tensor the same first dimension")
    return next(iter(sizes.values()))


def _map_tensors(example: Any, action: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(example, torch.Tensor):
        return action(example)
    if isinstance(example, dict):
        return {key: _map_tensors(value, action) for key, value in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_map_tensors(value, action) for value in example)
    return example


def expand_batch(example: Any, batch: int) -> Any:
    """The example with every tensor's rows repeated (cyclically) to ``batch`` rows: fresh memory, as real data."""
    def expand(tensor: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(batch, device=tensor.device) % tensor.shape[0]
        return tensor.index_select(0, rows)
    return _map_tensors(example, expand)


def _describe(example: Any) -> Any:
    """Per-sample shapes and dtypes of the example (the batch dimension dropped), for fingerprints."""
    if isinstance(example, torch.Tensor):
        return {"shape": list(example.shape[1:]), "dtype": _dtype_name(example.dtype)}
    if isinstance(example, dict):
        return {str(key): _describe(value) for key, value in example.items()}
    if isinstance(example, (tuple, list)):
        return [_describe(value) for value in example]
    return example if isinstance(example, (bool, int, float, str, type(None))) else type(example).__name__


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def sum_of_outputs(output: Any, _inputs: Any = None) -> torch.Tensor:
    """The default training loss: the sum of every floating-point tensor the model returned."""
    values = getattr(output, "values", None)
    leaves = list(values()) if callable(values) and not isinstance(output, torch.Tensor) else output
    tensors = [value for _, value in _leaves(leaves)
               if isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad]
    if not tensors:
        raise ConfigError("train: the model returned no floating-point tensor that requires grad; "
                          "pass loss_fn=lambda output, inputs: ... returning a scalar loss")
    total = tensors[0].sum()
    for tensor in tensors[1:]:
        total = total + tensor.sum()
    return total


# --- optimizers ----------------------------------------------------------------------------

def _make_optimizer(option: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The user's optimizer; by default AdamW, whose state (two tensors per parameter) is what most
    training holds, so the maximum batch found is one real training can use."""
    if option is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-5)
    if isinstance(option, torch.optim.Optimizer):
        return option
    if callable(option):
        optimizer = option(model.parameters())
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
    raise ConfigError(f"optimizer={option!r}: give a torch.optim.Optimizer over the model's "
                      f"parameters, or a callable such as torch.optim.SGD taking the parameters")


def _fake_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The same optimizer over fake parameters, with the same foreach choice the real one makes."""
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    if defaults.get("foreach") is None and "foreach" in defaults:
        real = [param for group in optimizer.param_groups for param in group["params"]]
        from torch.optim.optimizer import _default_to_fused_or_foreach
        defaults["foreach"] = _default_to_fused_or_foreach(real, differentiable=False, use_fused=False)[1]
    return type(optimizer)(params, **defaults)


# --- the workload ------------------------------------------------------------------------------

class TorchWorkload:
    """Implements device.Workload for a torch model on a CPU or CUDA backend."""

    def __init__(self, backend: TorchBackend, model: Any, example_input: Any, *, mode: str,
                 **options: Any):
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        unknown = {name for name, value in options.items() if value is not None} - _OPTIONS_BY_MODE[mode]
        if unknown:
            raise ConfigError(f"option(s) {', '.join(sorted(unknown))} do not apply to mode={mode!r}; "
                              f"it takes {', '.join(sorted(_OPTIONS_BY_MODE[mode]))}")
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"{backend.name} workloads take a torch.nn.Module, got "
                              f"{type(model).__name__}")
        if mode == "generate" and not callable(getattr(model, "generate", None)):
            raise ConfigError(f"mode='generate' needs a model with generate() (a transformers "
                              f"GenerationMixin model); {type(model).__name__} has none: use "
                              f"mode='inference' or 'train'")
        self.backend = backend
        self.model = model
        self.mode = mode
        self._check_model_device()
        example_batch_size(example_input)

        self.dtype = _dtype_option(options["dtype"], "dtype") if options.get("dtype") is not None else None
        if self.dtype is not None:
            model.to(self.dtype)
        autocast = options.get("autocast")
        self.autocast_dtype = (None if autocast in (None, False) else
                               torch.get_autocast_dtype(backend.torch_device.type) if autocast is True
                               else _dtype_option(autocast, "autocast"))
        self.example = _map_tensors(example_input, self._to_device)
        self.timing = TimingBudget.coerce(options.get("timing"))
        self.loss_fn = options.get("loss_fn")
        self.max_new_tokens = int(options.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        self.optimizer = _make_optimizer(options.get("optimizer"), model) if mode == "train" else None
        self._owns_optimizer = mode == "train" and options.get("optimizer") is None
        self._was_training = model.training
        model.train(mode == "train")
        self._check_example_fits_model()
        self._predictions: dict[int, Prediction | str] = {}
        self._throughput: dict[int, float] = {}
        self._measure_extras: dict[int, dict[str, Any]] = {}
        self._reference: Callable[[], None] | None = None

    def _check_example_fits_model(self) -> None:
        """One forward pass on the example as given, so a model and an example input that do not go
        together fail here with a message that says so, not deep inside the search."""
        try:
            with catch_oom() as caught, torch.no_grad(), self._autocast():
                call_model(self.model, self.example)
        except Exception as exc:
            raise ConfigError(
                f"{type(self.model).__name__} fails on the example input {_describe(self.example)} "
                f"(per-sample shapes, batch dimension first): {type(exc).__name__}: {exc}. "
                f"Give an example input that the model's forward takes; this is not an out-of-memory "
                f"error") from exc
        if caught.error is not None:
            raise NoBatchFits(f"{type(self.model).__name__}: the example input alone does not fit "
                              f"on {self.backend.name}: {caught.error}") from caught.error

    def _check_model_device(self) -> None:
        target = self.backend.torch_device
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if tensor.device != target:
                raise ConfigError(
                    f"model {type(self.model).__name__} has {name} on {tensor.device}, but device "
                    f"{self.backend.name!r} ({target}) was asked for: move it with model.to({str(target)!r}) "
                    f"or ask for device {str(tensor.device)!r}")

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.backend.torch_device)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor

    # --- one step ---

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.backend.torch_device.type, dtype=self.autocast_dtype)

    def _pad_token_id(self) -> int:
        config = getattr(self.model, "generation_config", None)
        for token in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
            if isinstance(token, (list, tuple)):
                token = token[0] if token else None
            if token is not None:
                return int(token)
        return 0

    def step(self, inputs: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
        """One iteration of the workload on already built ``inputs``."""
        if self.mode == "train":
            optimizer = optimizer or self.optimizer
            assert optimizer is not None  # a train workload always has one
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                output = call_model(self.model, inputs)
                loss = (self.loss_fn or sum_of_outputs)(output, inputs)
            loss.backward()
            optimizer.step()
            return
        with torch.inference_mode(), self._autocast():
            if self.mode == "inference":
                call_model(self.model, inputs)
                return
            tokens = self.max_new_tokens
            generate_kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                   pad_token_id=self._pad_token_id())
            generate: Callable[..., Any] = self.model.generate  # type: ignore[assignment]  # checked at construction
            call_model(partial(generate, **generate_kwargs), inputs)

    def run_batch(self, batch: int, optimizer: torch.optim.Optimizer | None = None,
                  example: Any = None) -> None:
        """Build a batch of ``batch`` samples and run one step on it (what a probe measures)."""
        self.step(expand_batch(self.example if example is None else example, batch), optimizer)

    def resident_tensors(self) -> list[torch.Tensor]:
        return state_tensors(self.model, self.optimizer)

    def ensure_steady_state(self) -> None:
        """A first training step at batch 1 creates the optimizer state every later step holds."""
        if self.optimizer is not None and not self.optimizer.state:
            self.run_batch(1)

    # --- Workload protocol ---

    def fingerprint(self) -> dict[str, Any]:
        params = list(self.model.named_parameters())
        model_class = type(self.model)
        first = params[0][1] if params else None
        fingerprint = {
            "model_class": f"{model_class.__module__}.{model_class.__qualname__}",
            "architecture_hash": stable_hash(repr(self.model)),
            "parameter_shapes_hash": stable_hash([(name, list(p.shape), _dtype_name(p.dtype)) for name, p in params]),
            "parameters": sum(p.numel() for _, p in params),
            "dtype": _dtype_name(first.dtype if first is not None else self.dtype),
            "inputs": _describe(self.example),
            "mode": self.mode,
            "autocast": _dtype_name(self.autocast_dtype),
        }
        if self.mode == "train":
            fingerprint["optimizer"] = type(self.optimizer).__name__
            fingerprint["loss"] = getattr(self.loss_fn, "__qualname__", None) or "sum of outputs"
        if self.mode == "generate":
            fingerprint["max_new_tokens"] = self.max_new_tokens
        return fingerprint

    def _generation_reads(self) -> tuple[Callable[[torch.Tensor], Any], Callable[[], None]]:
        """Answers to generate()'s data-dependent reads on fake tensors: "not finished" until the
        model has run max_new_tokens times (prefill plus decode steps), then "finished"."""
        forwards, reads = [0], [0]
        handle = self.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

        def read(tensor: torch.Tensor) -> Any:
            reads[0] += 1
            if forwards[0] > self.max_new_tokens + 1 or reads[0] > 100 * (self.max_new_tokens + 1):
                raise RuntimeError(f"generate() on fake tensors did not stop after {forwards[0]} "
                                   f"forward passes for {self.max_new_tokens} new tokens")
            if tensor.dtype is torch.bool:
                return forwards[0] >= self.max_new_tokens
            return 0.0 if tensor.is_floating_point() else 0

        return read, handle.remove

    def _predict(self, batch: int) -> Prediction | str:
        if batch in self._predictions:
            return self._predictions[batch]
        scalar_reads, remove_hook = self._generation_reads() if self.mode == "generate" else (None, None)

        def run(fake: FakeModel) -> Callable[[], None] | None:
            example = fake.fake_inputs(self.example)
            if self.mode != "train":
                self.run_batch(batch, example=example)
                return None
            assert self.optimizer is not None  # a train workload always has one
            optimizer = _fake_optimizer(self.optimizer, fake.parameters())
            self.run_batch(1, optimizer, example)
            return lambda: self.run_batch(batch, optimizer, example)

        try:
            result: Prediction | str = predict(self.model, run, round_to=self.backend.prediction_rounding,
                                               scalar_reads=scalar_reads)
        except Exception as exc:  # an op fake tensors cannot run: the probes still measure
            result = f"not available: {type(exc).__name__}: {exc}"[:300]
        finally:
            if remove_hook is not None:
                remove_hook()
        self._predictions[batch] = result
        return result

    def predict_peak_bytes(self, batch: int) -> int | None:
        result = self._predict(batch)
        if isinstance(result, str):
            return None
        return result.peak_bytes + self.backend.other_allocated_bytes(self)

    def probe(self, batch: int) -> int:
        self.ensure_steady_state()
        return self.backend.probe_peak(self, batch)

    def measure(self, batch: int) -> list[float]:
        return self._timed(batch, meter=self.backend.energy_meter()).samples

    def measure_paired(self, batch: int) -> PairedSamples:
        if self._reference is None:
            self._reference = make_reference(self.backend.torch_device, self.compute_dtype())
        watch = self.backend.watch()
        timing = self._timed(batch, meter=None, reference=self._reference)
        return PairedSamples(timing.samples, timing.reference, watch.reasons(),
                             describe_reference(self.backend.torch_device.type, self.compute_dtype()))

    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or next((p.dtype for p in self.model.parameters()), torch.float32)

    def _timed(self, batch: int, *, meter: Meter | None, reference: Callable[[], None] | None = None) -> Timing:
        self.ensure_steady_state()
        before = self.backend.allocated_bytes()
        step = partial(self.step, expand_batch(self.example, batch))
        with catch_oom() as caught:
            timing = measure_throughput(step, batch, budget=self.timing, sync=self.backend.synchronize,
                                        meter=meter, reference=reference)
        del step   # the batch it holds goes before the memory check after an OOM
        if caught.error is not None:
            raise self.backend.after_oom(caught.error, batch, before, None, limit="device", needed=None,
                                         available=self.backend.capacity_bytes())
        self._throughput[batch] = median(timing.samples)
        extras: dict[str, Any] = {}
        if meter is not None:
            extras["energy_per_sample_j"] = None if timing.metered is None else timing.metered / timing.items
            extras["power_w"] = None if timing.metered is None else timing.metered / timing.seconds
            extras["energy_method"] = meter.method()
        self._measure_extras[batch] = extras
        return timing

    def extras(self, batch: int) -> dict[str, Any]:
        extras: dict[str, Any] = dict(self._measure_extras.get(batch, {}))
        extras.update(self.backend.probe_extras(batch))
        prediction = self._predict(batch)
        if isinstance(prediction, str):
            extras["prediction"] = prediction
            return extras
        extras["predicted_peak_bytes"] = prediction.peak_bytes + self.backend.other_allocated_bytes(self)
        extras["flops_per_sample"] = prediction.flops / batch
        throughput = self._throughput.get(batch)
        if self.mode == "generate" and throughput is not None:
            extras["tokens_per_second"] = throughput * self.max_new_tokens
        if throughput is not None and prediction.flops:
            attained = prediction.flops / batch * throughput / 1e12
            extras["attained_tflops"] = attained
            peak = self.backend.peak_tflops(self.compute_dtype())
            extras["peak_tflops"] = peak
            extras["fraction_of_peak"] = attained / peak if peak else None
        return extras

    def close(self) -> None:
        self.model.train(self._was_training)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self._owns_optimizer:
                self.optimizer.state.clear()
        self._predictions.clear()
        self._reference = None
        self.backend.release()
