"""Where the batch is in a model's inputs, and how a batch of any size is built.

Three sources of inputs:

- an **example input**: a tensor, or a dict/tuple/list of them, batched along ``batch_dim`` (0 by
  default; an int for every tensor, or a dict/tuple mirroring the input with an int per input, None
  for an input that is not batched), with ``Samples`` lists of per-sample items batched by
  repeating samples. A batch of ``b`` repeats the example's rows (samples) in turn, as fresh memory;
- ``make_batch(b)``: the user's factory, any structure, checked to hold exactly ``b`` samples;
- a ``dataset`` (``len`` and ``[i]``) and a ``collate_fn`` (default ``default_collate``): batch
  ``b`` is the collated first ``b`` samples, the ``largest`` first when the user says which they are.

A tensor input is called as ``model(x)``, a tuple/list as ``model(*x)``, a dict as
``model(**x)``, a ``Samples`` as ``model(samples)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError, is_oom_error
from ..inputs import Samples

SMALLEST_PROBE_HINT = ("if the model needs more than one sample per batch (BatchNorm in training "
                       "does), give an example of 2 samples or pass min_batch=2")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def map_tensors(value: Any, action: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``action`` applied to every tensor of a dict/tuple/list/Samples structure."""
    if isinstance(value, torch.Tensor):
        return action(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, action) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, action) for item in value)
    return value


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Samples):
        return model(list(inputs))
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


# --- batch_dim -------------------------------------------------------------------------------------

def check_batch_dim(spec: Any, where: str = "batch_dim") -> None:
    """A ConfigError unless ``spec`` is an int, None, or a dict/tuple/list of those."""
    if spec is None or (isinstance(spec, int) and not isinstance(spec, bool)):
        return
    if isinstance(spec, dict):
        for key, value in spec.items():
            check_batch_dim(value, f"{where}[{key!r}]")
        return
    if isinstance(spec, (tuple, list)):
        for index, value in enumerate(spec):
            check_batch_dim(value, f"{where}[{index}]")
        return
    raise ConfigError(f"{where}={spec!r}: give an int (the batch dimension of every input tensor), "
                      f"None (an input that is not batched), or a dict/tuple with one per input, "
                      f"e.g. batch_dim=1 or batch_dim={{'input_ids': 0, 'hidden': 1}}")


@dataclass(frozen=True)
class Leaf:
    """One batched input: where it is, its batch size, the batch dimension (None: a Samples list)."""

    where: str
    size: int
    dim: int | None
    shape: tuple[int, ...] | None

    def text(self) -> str:
        if self.dim is None:
            return f"{self.where} (a list of {self.size} samples)"
        return f"{self.where} of shape {list(self.shape or ())} (batch dimension {self.dim}: {self.size})"


def _child_spec(spec: Any, key: Any, where: str, is_dict: bool) -> Any:
    if isinstance(spec, dict):
        if not is_dict:
            raise ConfigError(f"batch_dim is a dict, but {where} is a tuple/list: give a tuple with one "
                              f"batch dimension per position, or one int")
        return spec.get(key, 0)
    if isinstance(spec, (tuple, list)):
        if is_dict:
            raise ConfigError(f"batch_dim is a tuple, but {where} is a dict: give a dict with one "
                              f"batch dimension per key, or one int")
        return spec[key]
    return spec


def _walk(value: Any, spec: Any, where: str, out: list[Leaf]) -> None:
    if isinstance(value, Samples):
        if not value:
            raise ConfigError(f"{where} is an empty Samples list: give at least one sample")
        out.append(Leaf(where, len(value), None, None))
        return
    if isinstance(value, dict):
        if isinstance(spec, dict):
            unknown = [key for key in spec if key not in value]
            if unknown:
                raise ConfigError(f"batch_dim names {', '.join(map(repr, unknown))}, not among the keys of "
                                  f"{where}: {', '.join(map(repr, value))}")
        for key, item in value.items():
            _walk(item, _child_spec(spec, key, where, True), f"{where}[{key!r}]", out)
        return
    if isinstance(value, (tuple, list)):
        if isinstance(spec, (tuple, list)) and len(spec) != len(value):
            raise ConfigError(f"batch_dim={spec!r} has {len(spec)} entries, but {where} has {len(value)}: "
                              f"give one batch dimension per input")
        for index, item in enumerate(value):
            _walk(item, _child_spec(spec, index, where, False), f"{where}[{index}]", out)
        return
    if not isinstance(value, torch.Tensor) or spec is None:
        return
    if isinstance(spec, (dict, tuple, list)):
        raise ConfigError(f"batch_dim for {where} is {spec!r}, but {where} is one tensor: give an int")
    if value.dim() == 0:
        raise ConfigError(f"{where} is a 0-dim tensor with no batch dimension: give it a leading batch "
                          f"dimension, e.g. tensor.unsqueeze(0), or batch_dim None for it (not batched)")
    if not -value.dim() <= spec < value.dim():
        raise ConfigError(f"batch_dim={spec} is outside {where} of shape {list(value.shape)}: it has "
                          f"dimensions 0 to {value.dim() - 1} (or -{value.dim()} to -1)")
    dim = spec % value.dim()
    out.append(Leaf(where, value.shape[dim], dim, tuple(value.shape)))


def batched_leaves(inputs: Any, spec: Any, where: str = "example input") -> list[Leaf]:
    out: list[Leaf] = []
    _walk(inputs, 0 if spec is None else spec, where, out)
    return out


def batch_size(inputs: Any, spec: Any, where: str = "example input") -> int:
    """The batch size the inputs' batched tensors and sample lists agree on, or a ConfigError."""
    if inputs is None:
        raise ConfigError("cpu/cuda workloads need an example input whose first dimension is the batch, "
                          "e.g. torch.randn(1, 3, 224, 224) or {'input_ids': ids}, a Samples list of "
                          "per-sample tensors, make_batch=... or dataset=...")
    leaves = batched_leaves(inputs, spec, where)
    if not leaves:
        raise ConfigError(f"{where} {type(inputs).__name__} holds no tensor to batch: give a tensor, a "
                          f"dict/tuple/list of tensors whose first dimension is the batch, or a Samples list")
    sizes = {leaf.size for leaf in leaves}
    if len(sizes) > 1:
        raise ConfigError(f"{where}: the inputs disagree on the batch size: "
                          f"{'; '.join(leaf.text() for leaf in leaves)}. Give every input the same batch "
                          f"size, or say where each input's batch is with batch_dim (an int per input, "
                          f"e.g. batch_dim={{'x': 0, 'state': 1}}; None for an input that is not batched)")
    return sizes.pop()


def suspicious_batch_dim(inputs: Any) -> Leaf | None:
    """A tensor whose dimension 0, taken as the batch by default, is > 1 while another is 1: the
    batch is probably that other dimension (an LSTM's (seq, batch, features) example)."""
    for leaf in batched_leaves(inputs, 0):
        if leaf.dim == 0 and leaf.shape is not None and leaf.size > 1 and 1 in leaf.shape[1:]:
            return leaf
    return None


def expand(inputs: Any, spec: Any, batch: int) -> Any:
    """A batch of ``batch`` samples from ``inputs``: rows (samples) repeated in turn, as fresh memory."""
    return _expand(inputs, 0 if spec is None else spec, batch)


def _expand(value: Any, spec: Any, batch: int) -> Any:
    if isinstance(value, Samples):
        return Samples(map_tensors(value[index % len(value)], torch.clone) for index in range(batch))
    if isinstance(value, dict):
        return {key: _expand(item, spec.get(key, 0) if isinstance(spec, dict) else spec, batch)
                for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_expand(item, spec[index] if isinstance(spec, (tuple, list)) else spec, batch)
                           for index, item in enumerate(value))
    if not isinstance(value, torch.Tensor) or spec is None:
        return value
    dim = spec % value.dim()
    rows = torch.arange(batch, device=value.device) % value.shape[dim]
    return value.index_select(dim, rows)


def describe(inputs: Any, spec: Any = None) -> Any:
    """Per-sample shapes and dtypes (the batch dimension dropped), for fingerprints."""
    return _describe(inputs, 0 if spec is None else spec)


def _describe(value: Any, spec: Any, whole: bool = False) -> Any:
    """``whole``: inside a Samples list, where every tensor is one sample's, whole."""
    if isinstance(value, Samples):
        return {"samples": [_describe(item, None, True) for item in value]}
    if isinstance(value, torch.Tensor):
        if spec is None:
            whole_tensor = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
            return whole_tensor if whole else {**whole_tensor, "batched": False}
        dim = spec % max(value.dim(), 1)
        shape = [size for index, size in enumerate(value.shape) if index != dim]
        described: dict[str, Any] = {"shape": shape, "dtype": _dtype_name(value.dtype)}
        if dim:
            described["batch_dim"] = dim
        return described
    if isinstance(value, dict):
        return {str(key): _describe(item, spec.get(key, 0) if isinstance(spec, dict) else spec, whole)
                for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_describe(item, spec[index] if isinstance(spec, (tuple, list)) else spec, whole)
                for index, item in enumerate(value)]
    return value if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__


def _qualname(value: Any) -> str:
    return getattr(value, "__qualname__", None) or type(value).__qualname__


# --- where batches come from ---------------------------------------------------------------------

class BatchSource:
    """Builds the model's inputs for any batch size from an example, a factory or a dataset."""

    def __init__(self, model_name: str, example: Any, *, batch_dim: Any = None, make_batch: Any = None,
                 dataset: Any = None, collate_fn: Any = None, largest: Any = None,
                 to_device: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor):
        check_batch_dim(batch_dim)
        self.model_name = model_name
        self.batch_dim = batch_dim
        self.make_batch = make_batch
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.to_device = to_device
        self.kind = "make_batch" if make_batch is not None else "dataset" if dataset is not None else "example"
        self.limit: int | None = None
        self._order: list[int] | None = None
        self._largest = largest
        given = [name for name, value in (("an example input", example), ("make_batch", make_batch),
                                          ("dataset", dataset)) if value is not None]
        if len(given) > 1:
            raise ConfigError(f"{model_name}: give one of an example input, make_batch or dataset, "
                              f"not {' and '.join(given)}")
        if make_batch is not None and not callable(make_batch):
            raise ConfigError(f"make_batch={make_batch!r} is not callable: give a function of the batch "
                              f"size returning the model's inputs, e.g. lambda b: torch.randn(b, 3, 224, 224)")
        if collate_fn is not None and dataset is None:
            raise ConfigError("collate_fn is given without dataset: it builds batches from dataset samples")
        if largest is not None and dataset is None:
            raise ConfigError("largest is given without dataset: it says which dataset samples are largest")
        if dataset is not None:
            self._check_dataset()
        self.example = None if example is None else map_tensors(example, to_device)
        if self.kind == "example":
            batch_size(self.example, batch_dim)   # a ConfigError for a missing or unbatchable example

    def _check_dataset(self) -> None:
        dataset = self.dataset
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ConfigError(f"dataset={type(dataset).__name__}: give a map-style dataset (len() and "
                              f"dataset[i]), e.g. a torch.utils.data.Dataset or a list of samples")
        self.limit = len(dataset)
        if self.limit < 1:
            raise ConfigError(f"{self.model_name}: the dataset is empty: give at least one sample")
        if self.collate_fn is None:
            from torch.utils.data import default_collate
            self.collate_fn = default_collate
        elif not callable(self.collate_fn):
            raise ConfigError(f"collate_fn={self.collate_fn!r} is not callable: give a function of a list "
                              f"of samples returning the model's inputs")
        largest = self._largest
        if largest is not None and not callable(largest):
            if isinstance(largest, (str, bytes)) or not hasattr(largest, "__iter__"):
                raise ConfigError(f"largest={largest!r}: give the indices of the largest samples, or a "
                                  f"function of a sample returning its size")
            indices = list(largest)
            bad = [index for index in indices if isinstance(index, bool) or not isinstance(index, int)
                   or not 0 <= index < self.limit]
            if bad:
                raise ConfigError(f"largest: {bad[:5]!r} are not indices of the dataset of {self.limit} "
                                  f"samples (0 to {self.limit - 1})")

    def order(self) -> list[int]:
        """Dataset indices in the order batches take them: the largest samples first when known."""
        if self._order is None:
            count = self.limit or 0
            largest = self._largest
            if largest is None:
                self._order = list(range(count))
            elif callable(largest):
                self._order = sorted(range(count), key=lambda index: -largest(self._sample(index)))
            else:
                first = list(dict.fromkeys(largest))
                chosen = set(first)
                self._order = first + [index for index in range(count) if index not in chosen]
        return self._order

    def _sample(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as exc:
            if is_oom_error(exc):
                raise
            raise ConfigError(f"{self.model_name}: dataset[{index}] failed: {type(exc).__name__}: {exc}") from exc

    # --- building batches ---

    def build(self, batch: int, fake: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
        """The inputs for ``batch`` samples; ``fake`` turns real tensors into fake ones (predictions)."""
        if self.kind == "example":
            example = self.example if fake is None else map_tensors(self.example, fake)
            return expand(example, self.batch_dim, batch)
        if self.kind == "make_batch":
            what = f"make_batch({batch})"
            try:
                inputs = self.make_batch(batch)
            except Exception as exc:
                if is_oom_error(exc) or isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"{self.model_name}: {what} failed: {type(exc).__name__}: {exc}") from exc
            fix = (f"make_batch must return the model's inputs for exactly {batch} samples (a list of "
                   f"per-sample tensors as Samples([...]))")
        else:
            what = f"collate_fn ({_qualname(self.collate_fn)}) on {batch} dataset samples"
            inputs = self._collate(batch, fake)
            fix = f"collate_fn must return the model's inputs for the {batch} samples it is given"
        inputs = map_tensors(inputs, self.to_device if fake is None else (lambda t: self.to_device(fake(t))))
        try:
            size = batch_size(inputs, self.batch_dim, where=what)
        except ConfigError as exc:
            raise ConfigError(f"{self.model_name}: {exc}; {fix}") from None
        if size != batch:
            shapes = "; ".join(leaf.text() for leaf in batched_leaves(inputs, self.batch_dim, what))
            raise ConfigError(f"{self.model_name}: {what} returned a batch of {size}, not {batch} ({shapes}): "
                              f"{fix}, or pass batch_dim=... when the batch is not the first dimension")
        return inputs

    def _collate(self, batch: int, fake: Callable[[torch.Tensor], torch.Tensor] | None) -> Any:
        assert self.limit is not None and self.collate_fn is not None
        if batch > self.limit:
            raise ConfigError(f"{self.model_name}: batch {batch} asked for, but the dataset has only "
                              f"{self.limit} samples: give a larger dataset, or cap={self.limit}")
        indices = self.order()[:batch]
        samples = [self._sample(index) for index in indices]
        if fake is not None:
            samples = [map_tensors(sample, fake) for sample in samples]
        try:
            return self.collate_fn(samples)
        except Exception as exc:
            if is_oom_error(exc):
                raise
            shown = f"{indices[:8]}{'...' if len(indices) > 8 else ''}"
            raise ConfigError(
                f"{self.model_name}: collate_fn ({_qualname(self.collate_fn)}) failed on {batch} samples "
                f"(dataset indices {shown}): {type(exc).__name__}: {exc}. Give a collate_fn that builds "
                f"the model's inputs from a list of samples (pad variable-length samples, or return a "
                f"Samples list of variable-size images)") from exc

    def describe(self, built: Any) -> Any:
        """The fingerprint's inputs: per-sample shapes, with where they came from when not an example."""
        described = describe(built, self.batch_dim)
        if self.kind == "make_batch":
            return {"make_batch": _qualname(self.make_batch), "batch": described}
        if self.kind == "dataset":
            return {"dataset": type(self.dataset).__name__, "samples": self.limit,
                    "collate_fn": _qualname(self.collate_fn), "largest_first": self._largest is not None,
                    "batch": described}
        return described
