"""A torch model and one kind of work (inference, a training step, generation) at any batch size.

Batches come from an example input (batched along ``batch_dim``, 0 by default; ``Samples`` lists
batched by repeating samples), a ``make_batch(b)`` factory, or a ``dataset`` and ``collate_fn``
(``torch_inputs``). A tensor input is called as ``model(x)``, a tuple/list as ``model(*x)``, a dict
as ``model(**x)``, a ``Samples`` list as ``model(samples)``.

Before any probe the workload runs what its mode runs (a forward pass; ``generate`` for generation)
on the example, on the smallest batch the model takes (``min_batch``, or found by trying 1 and 2
below the example's batch: BatchNorm in training needs 2) and on one sample more, so a model and an
input that do not go together, or a batch taken along the wrong dimension, fail here with a message
naming the shapes and the option to pass, never deep inside the search or silently.

- ``inference``: a forward pass under ``torch.inference_mode()``.
- ``train``: gradients zeroed (set to None), forward, ``loss_fn(output, inputs)`` (default: the sum
  of the floating-point outputs), backward, ``optimizer.step()`` (default: AdamW). A model wrapped in
  ``DistributedDataParallel`` runs it under ``no_sync()`` (no gradient all-reduce), except in
  ``probe_synchronised``: a rank that runs out of memory in a probe cannot leave another waiting.
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
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Protocol

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, NoBatchFits, catch_oom, is_oom_error
from ..stats import median
from .base import MODES, PairedSamples, Watch, stable_hash
from .reference import describe as describe_reference
from .reference import make_reference
from .torch_inputs import (
    SMALLEST_PROBE_HINT,
    BatchSource,
    Leaf,
    batch_size,
    batched_leaves,
    call_model,
    describe,
    expand,
    suspicious_batch_dim,
)
from .torch_memory import FakeModel, Prediction, predict, state_tensors
from .torch_timing import Meter, Timing, TimingBudget, measure_throughput

DEFAULT_MAX_NEW_TOKENS = 32

#: Options of every mode: precision, timing, and where batches come from.
_COMMON_OPTIONS = frozenset({"dtype", "autocast", "timing", "batch_dim", "min_batch", "make_batch", "dataset",
                             "collate_fn", "largest"})
_OPTIONS_BY_MODE = {
    "inference": _COMMON_OPTIONS,
    "train": _COMMON_OPTIONS | {"loss_fn", "optimizer"},
    "generate": _COMMON_OPTIONS | {"max_new_tokens"},
}
#: Below the example's batch, these are tried for the smallest batch the model takes.
_SMALL_BATCHES = (1, 2)

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


# --- example inputs (see torch_inputs) -------------------------------------------------------

def _leaves(example: Any, where: str = "example input") -> list[tuple[str, Any]]:
    """(location, value) for every leaf of a tensor / dict / tuple / list input."""
    if isinstance(example, dict):
        return [leaf for key, value in example.items() for leaf in _leaves(value, f"{where}[{key!r}]")]
    if isinstance(example, (tuple, list)):
        return [leaf for index, value in enumerate(example) for leaf in _leaves(value, f"{where}[{index}]")]
    return [(where, example)]


def example_batch_size(example: Any, batch_dim: Any = None) -> int:
    """The example's batch size (shared by its batched tensors), or a ConfigError saying what is wrong."""
    return batch_size(example, batch_dim)


def expand_batch(example: Any, batch: int, batch_dim: Any = None) -> Any:
    """The example with every tensor's rows (samples) repeated in turn to ``batch``: fresh memory, as real data."""
    return expand(example, batch_dim, batch)


def _positive_int(value: Any, option: str, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option}={value!r}: give an integer >= 1 ({what})")
    return value


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
        self.name = type(model).__name__
        self._check_model_device()
        min_batch = _positive_int(options.get("min_batch"), "min_batch",
                                  "the smallest batch the model takes, e.g. 2 for BatchNorm in training")
        max_new_tokens = _positive_int(options.get("max_new_tokens"), "max_new_tokens",
                                       "the number of tokens each generation makes")
        self.loss_fn = options.get("loss_fn")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError(f"loss_fn={self.loss_fn!r} is not callable: give a function "
                              f"loss_fn(output, inputs) returning a scalar loss")
        if mode == "train" and not any(True for _ in model.parameters()):
            raise ConfigError(f"mode='train': {self.name} has no parameters, so a training step has "
                              f"nothing to update (an optimizer over it gets an empty parameter "
                              f"list): give a model with parameters, or use mode='inference'")

        self.dtype = _dtype_option(options["dtype"], "dtype") if options.get("dtype") is not None else None
        autocast = options.get("autocast")
        if autocast is not None and not isinstance(autocast, (bool, str, torch.dtype)):
            raise ConfigError(f"autocast={autocast!r}: give True (the device's autocast dtype), False, "
                              f"or a dtype such as torch.bfloat16 or 'fp16'")
        self.autocast_dtype = (None if autocast in (None, False) else
                               torch.get_autocast_dtype(backend.torch_device.type) if autocast is True
                               else _dtype_option(autocast, "autocast"))
        self.timing = TimingBudget.coerce(options.get("timing"))
        self.source = BatchSource(self.name, example_input, batch_dim=options.get("batch_dim"),
                                  make_batch=options.get("make_batch"), dataset=options.get("dataset"),
                                  collate_fn=options.get("collate_fn"), largest=options.get("largest"),
                                  to_device=self._to_device)
        self.example_batch = (None if self.source.example is None
                              else batch_size(self.source.example, self.source.batch_dim))
        if self.source.kind == "example" and options.get("batch_dim") is None:
            self._refuse_suspicious_batch_dim(suspicious_batch_dim(self.source.example))
        #: The largest batch the inputs can make (a dataset's size); None: no limit.
        self.batch_limit = self.source.limit
        if self.dtype is not None:
            model.to(self.dtype)
        self.max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        self.optimizer = _make_optimizer(options.get("optimizer"), model) if mode == "train" else None
        #: DDP's gradient all-reduce runs only in ``probe_synchronised``; probes and timing skip it.
        self.synchronises_gradients = mode == "train" and isinstance(model, DistributedDataParallel)
        self._synchronise = False
        self._synchronised_warmups = 0
        self._owns_optimizer = mode == "train" and options.get("optimizer") is None
        self._was_training = model.training
        model.train(mode == "train")
        #: The smallest batch the search tries: the option, else the smallest the model takes.
        self.min_batch = 1
        self.described: Any = None
        self._check_example_fits_model(min_batch)
        self._predictions: dict[int, Prediction | str] = {}
        self._throughput: dict[int, float] = {}
        self._measure_extras: dict[int, dict[str, Any]] = {}
        self._reference: dict[str, Callable[[], None]] | None = None

    def _refuse_suspicious_batch_dim(self, leaf: Leaf | None) -> None:
        if leaf is None or leaf.shape is None:
            return
        other = leaf.shape.index(1, 1)
        raise ConfigError(
            f"{self.name}: {leaf.where} has shape {list(leaf.shape)}; dimension 0, taken as the batch, "
            f"is {leaf.size} while dimension {other} is 1, so the batch is probably dimension {other} "
            f"(an LSTM or Transformer with batch_first=False takes (sequence, batch, features)) and "
            f"the search would count sequence steps as samples. Pass batch_dim={other} (an int per "
            f"input when inputs differ, e.g. batch_dim={{'x': {other}}}), or batch_dim=0 to confirm "
            f"that dimension 0 is the batch")

    def _check_run(self, inputs: Any) -> tuple[BaseException | None, BaseException | None]:
        """Run what the mode runs on ``inputs`` once: (error, out-of-memory error), None for each that
        did not happen. A training step's forward pass runs without gradients."""
        try:
            with catch_oom() as caught:
                if self.mode == "train":
                    with torch.no_grad(), self._autocast():
                        call_model(self.model, inputs)
                else:
                    self.step(inputs)
        except ConfigError:
            raise
        except Exception as exc:   # catch_oom let it through: not an out-of-memory error
            return exc, None
        return None, caught.error

    def _check_example_fits_model(self, min_batch: int | None) -> None:
        """The mode's work on the example as given, on the smallest batch the model takes and on one
        sample more, so a model and inputs that do not go together, or a batch taken along the wrong
        dimension, fail here with a message that says so, not deep inside the search."""
        given = self.example_batch
        first = min_batch or (given if given is not None else 1)
        if self.batch_limit is not None and first > self.batch_limit:
            raise ConfigError(f"{self.name}: the dataset has {self.batch_limit} samples, fewer than the "
                              f"smallest batch asked for ({first}): give a larger dataset or a smaller min_batch")
        inputs = self.source.example if first == given else self.source.build(first)
        error, oom = self._check_run(inputs)
        if error is not None:
            what = (f"the example input {describe(inputs, self.source.batch_dim)} (per-sample shapes)"
                    if first == given else f"a batch of {first} from {self.source.kind} "
                    f"{describe(inputs, self.source.batch_dim)}")
            hints = ["this is not an out-of-memory error"]
            if isinstance(inputs, (tuple, list)) and self.source.kind == "example":
                hints.append("a tuple/list input is passed as positional arguments, model(*inputs); a list "
                             "of per-sample tensors (detection models) is Samples([...])")
            if first == 1 and self.mode == "train":
                hints.append(SMALLEST_PROBE_HINT)
            raise ConfigError(f"{self.name} fails on {what}: {type(error).__name__}: {error}. Give inputs "
                              f"that the model's {self._what_runs()} takes; {'; '.join(hints)}") from error
        if oom is not None:
            raise NoBatchFits(f"{self.name}: the example input alone (batch {first}) does not fit on "
                              f"{self.backend.name}: {oom}") from oom
        self.described = self.source.describe(inputs)
        smallest, first_error = first, None
        if min_batch is None:
            for candidate in (batch for batch in _SMALL_BATCHES if batch < first):
                error, oom = self._check_run(self.source.build(candidate))
                if error is None:
                    smallest = candidate
                    break
                first_error = first_error or error
        self.min_batch = smallest
        self._check_one_more(smallest if first_error is None else first, first_error)

    def _check_one_more(self, batch: int, smaller_error: BaseException | None) -> None:
        """One sample more than ``batch`` must run too, else the batch is not where it is taken."""
        larger = batch + 1
        if self.batch_limit is not None and larger > self.batch_limit:
            return
        inputs = self.source.build(larger)
        error, _oom = self._check_run(inputs)
        if error is None:
            return
        leaves = "; ".join(leaf.text() for leaf in batched_leaves(inputs, self.source.batch_dim, "input"))
        also = "" if smaller_error is None else (f" (and at smaller batches: {type(smaller_error).__name__}: "
                                                 f"{smaller_error})")
        raise ConfigError(
            f"{self.name} runs at batch {batch} but fails at batch {larger}, with the batch taken as {leaves}: "
            f"{type(error).__name__}: {error}{also}. The dimension taken as the batch is probably not the "
            f"batch: say where it is with batch_dim=... (an int, or one per input), pass a list of "
            f"per-sample tensors (detection models) as Samples([...]), or build batches with "
            f"make_batch=lambda b: ...") from error

    def _what_runs(self) -> str:
        return "generate()" if self.mode == "generate" else "forward"

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

    def _gradient_sync(self) -> Any:
        """DDP's ``no_sync()`` unless this is the synchronised step: without it a training step holds
        a gradient all-reduce, which a rank that ran out of memory would leave the others waiting in."""
        if self.synchronises_gradients and not self._synchronise:
            return self._ddp().no_sync()
        return nullcontext()

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
            with self._gradient_sync():
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
                  fake: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Build a batch of ``batch`` samples and run one step on it (what a probe measures). After a
        failed training step (an OOM in backward) the gradients it left go, as a next step's would."""
        try:
            self.step(self.source.build(batch, fake), optimizer)
        except BaseException:
            if self.mode == "train" and fake is None:
                self.model.zero_grad(set_to_none=True)
            raise

    def resident_tensors(self) -> list[torch.Tensor]:
        return state_tensors(self.model, self.optimizer)

    def ensure_steady_state(self) -> None:
        """A first training step at the smallest batch creates the optimizer state every later step holds."""
        if self.optimizer is not None and not self.optimizer.state:
            self.run_batch(self.min_batch)

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
            "inputs": self.described,
            "mode": self.mode,
            "autocast": _dtype_name(self.autocast_dtype),
        }
        if self.mode == "train":
            fingerprint["optimizer"] = type(self.optimizer).__name__
            fingerprint["loss"] = getattr(self.loss_fn, "__qualname__", None) or "sum of outputs"
        if self.mode == "generate":
            fingerprint["max_new_tokens"] = self.max_new_tokens
        quantized = sorted({f"{type(module).__module__}.{type(module).__qualname__}"
                            for module in self.model.modules() if ".quantized" in type(module).__module__})
        if quantized:   # packed weights are no parameters: the parameter hashes cannot see them
            fingerprint["quantization"] = quantized
        if self.min_batch > 1:
            fingerprint["min_batch"] = self.min_batch
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
            def to_fake(tensor: torch.Tensor) -> torch.Tensor:
                return tensor if isinstance(tensor, FakeTensor) else fake.mode.from_tensor(tensor)

            if self.mode != "train":
                self.run_batch(batch, fake=to_fake)
                return None
            assert self.optimizer is not None  # a train workload always has one
            optimizer = _fake_optimizer(self.optimizer, fake.parameters())
            self.run_batch(self.min_batch, optimizer, to_fake)
            return lambda: self.run_batch(batch, optimizer, to_fake)

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

    def probe_synchronised(self, batch: int) -> int:
        """A probe of the full DDP training step, gradient all-reduce included (its buckets in the peak).

        The first call runs two synchronised steps at the smallest batch first: DDP rebuilds its
        buckets (a collective in the forward pass) on its second synchronised step, and a rank whose
        step ran out of memory would skip that rebuild while the others wait in it. When the step runs
        out of memory here, the ranks where it fits are waiting in DDP's all-reduce for this rank's
        gradients: they get zeros, as DDP's ``join`` gives them for a rank out of inputs, so every
        rank leaves the step; then every rank calls ``reset_synchronisation`` and the search steps down.
        """
        self._synchronise = True
        try:
            while self._synchronised_warmups < 2:
                self.run_batch(self.min_batch)
                self._synchronised_warmups += 1
            return self.probe(batch)
        except Exception as error:
            if is_oom_error(error):
                self._match_waiting_all_reduces()
            raise
        finally:
            self._synchronise = False

    def _match_waiting_all_reduces(self) -> None:
        reducer = self._ddp().reducer
        for bucket in reducer._get_zeros_like_grad_buckets():
            reducer._run_comm_hook(bucket).wait()
        self.backend.release()

    def reset_synchronisation(self) -> None:
        """After a synchronised step ran out of memory on any rank, on every rank: DDP's reducer is
        reset (it then rebuilds its buckets), so the next synchronised probe warms it up again."""
        self._ddp().reducer._reset_state()
        self._synchronised_warmups = 0

    def _ddp(self) -> Any:
        """The model, a DistributedDataParallel: untyped, as its reducer is a private C++ object."""
        return self.model

    def measure(self, batch: int) -> list[float]:
        return self._timed(batch, meter=self.backend.energy_meter()).samples

    def measure_paired(self, batch: int, blocks: int) -> PairedSamples:
        if self._reference is None:
            self._reference = make_reference(self.backend.torch_device, self.compute_dtype())
        watch = self.backend.watch()
        timing = self._timed(batch, meter=None, reference=self._reference,
                             budget=replace(self.timing, min_blocks=blocks, max_blocks=blocks))
        return PairedSamples(timing.samples, timing.reference, watch.reasons(),
                             describe_reference(self.backend.torch_device.type, self.compute_dtype()),
                             timing.reference_parts)

    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or next((p.dtype for p in self.model.parameters()), torch.float32)

    def _timed(self, batch: int, *, meter: Meter | None, reference: dict[str, Callable[[], None]] | None = None,
               budget: TimingBudget | None = None) -> Timing:
        self.ensure_steady_state()
        before = self.backend.allocated_bytes()
        step = partial(self.step, self.source.build(batch))
        with catch_oom() as caught:
            timing = measure_throughput(step, batch, budget=budget or self.timing, sync=self.backend.synchronize,
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
