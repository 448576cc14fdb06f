"""Peak memory from the tensors a workload actually holds, and predicted without running it.

``LiveMemory`` is a dispatch mode that sees every tensor an operator returns and counts its
storage while the storage is alive (a weak reference says when it dies). Counting storages, not
tensors, counts views once. It measures real CPU runs and, under ``FakeTensorMode``, predicts: fake
tensors have shapes, dtypes and storages but no data, so a ResNet-50 at 224x224 and batch 512 is
"run" in a fraction of a second, allocating nothing.

With a budget, an operator that would push live memory past it is refused before it runs (its
output sizes come from the operator's meta kernel), so a batch far too big never allocates.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map_only

from ..errors import OutOfMemory
from ..units import format_bytes

_SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                 torch.ops.aten.is_nonzero.default)


def _storage(tensor: torch.Tensor) -> Any:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested layouts own no plain storage
        return None


def _allocating_returns(func: Any) -> list[bool]:
    """Per schema return: True when it is a fresh tensor, False when it aliases an input (views, out=)."""
    return [ret.alias_info is None for ret in func._schema.returns]


def _to_meta(value: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


class LiveMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storages, optionally refusing to exceed ``budget_bytes``.

    ``fake`` says it runs over a FakeTensorMode. ``scalar_reads`` then answers data-dependent reads
    (``.item()``, ``if tensor:``) of fake tensors, which have no data, so that control flow such as
    generation's stopping test can run on them.
    """

    def __init__(self, *, budget_bytes: int | None = None, round_to: int = 1, fake: bool = False,
                 scalar_reads: Callable[[torch.Tensor], Any] | None = None):
        super().__init__()
        self.fake = fake
        self.budget_bytes = budget_bytes
        self.round_to = round_to
        self.scalar_reads = scalar_reads
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to

    def _forget_storage(self, key: int, _reference: object) -> None:
        self._forget(key)

    def _forget(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that exist already (weights, gradients, optimizer state)."""
        for tensor in tensors:
            self._add(tensor)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _add(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage is None:
            return
        key = storage._cdata
        size = self._rounded(storage.nbytes())
        if key in self._sizes:  # seen before; resize_ may have grown it
            self.live_bytes += size - self._sizes[key]
            self._sizes[key] = size
            return
        self._sizes[key] = size
        self._refs[key] = weakref.ref(storage, partial(self._forget_storage, key))
        self.live_bytes += size

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _refuse(self, needed: int, func: Any) -> None:
        raise OutOfMemory(
            f"memory budget exceeded: {func} would bring live tensors to {format_bytes(needed)}, "
            f"over the budget of {format_bytes(self.budget_bytes)}",
            needed_bytes=needed, available_bytes=self.budget_bytes, limit="budget")

    def _bytes_if_run(self, func: Any, args: tuple, kwargs: dict) -> int:
        """Bytes ``func`` would allocate, from its meta kernel; 0 when that cannot be known beforehand."""
        fresh = _allocating_returns(func)
        if not any(fresh):
            return 0
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, _to_meta, (args, kwargs))
        if "device" in meta_kwargs:
            meta_kwargs["device"] = torch.device("meta")
        try:
            outputs = func(*meta_args, **meta_kwargs)
        except Exception:  # no meta kernel or data-dependent shape: checked after the run instead
            return 0
        per_return = outputs if len(fresh) > 1 else (outputs,)
        return sum(self._rounded(value.untyped_storage().nbytes())
                   for output, is_fresh in zip(per_return, fresh) if is_fresh
                   for value in tree_flatten(output)[0] if isinstance(value, torch.Tensor))

    def _record(self, func: Any, result: Any) -> Any:
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor):
                self._add(value)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.budget_bytes is not None and self.live_bytes > self.budget_bytes:
            self._refuse(self.live_bytes, func)
        return result

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.fake:
            tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
            if tensors and not any(isinstance(tensor, FakeTensor) for tensor in tensors):
                # A model constant that is no buffer (a stride table): computed for real, since a
                # fake copy of it could not be read, e.g. as a fill value.
                with _disable_current_modes():
                    return self._record(func, func(*args, **kwargs))
            if self.scalar_reads is not None and func in _SCALAR_READS:
                return self.scalar_reads(args[0])
        if self.budget_bytes is not None:
            needed = self.live_bytes + self._bytes_if_run(func, args, kwargs)
            if needed > self.budget_bytes:
                self._refuse(needed, func)
        return self._record(func, func(*args, **kwargs))


def state_tensors(model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """What a workload holds between runs: parameters, their gradients, buffers, optimizer state,
    and tensors modules keep as plain attributes (torchvision's anchor generator replaces its
    ``cell_anchors`` list on every forward pass: not counted, the swap would read as a leak)."""
    tensors = [*model.parameters(), *model.buffers(), *_attribute_tensors(model)]
    tensors += [param.grad for param in model.parameters() if param.grad is not None]
    if optimizer is not None:
        tensors += [value for state in optimizer.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor)]
    return tensors


def _attribute_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors held as plain module attributes, alone or in a list/tuple (not parameters or buffers)."""
    found = []
    for module in model.modules():
        for value in vars(module).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            found += [item for item in items if isinstance(item, torch.Tensor)]
    return found


class FakeModel:
    """The model's parameters and buffers as fake tensors, swapped in for the length of a ``with``.

    Real tensors met inside are faked on the fly; ``fake_inputs`` fakes an example input upfront.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._stack = ExitStack()
        self.state: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "FakeModel":
        self._stack.enter_context(self.mode)
        self.state = {name: self.mode.from_tensor(tensor)
                      for name, tensor in [*self.model.named_parameters(),
                                           *self.model.named_buffers()]}
        self._stack.enter_context(_reparametrize_module(self.model, self.state, tie_weights=True))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.state = {}
        self._stack.close()

    def fake_inputs(self, example: Any) -> Any:
        return tree_map_only(torch.Tensor, self.mode.from_tensor, example)

    def parameters(self) -> list[torch.Tensor]:
        """Fake parameters in ``model.parameters()`` order (for a fake optimizer)."""
        return [self.state[name] for name, _ in self.model.named_parameters()]


@dataclass(frozen=True)
class Prediction:
    peak_bytes: int
    flops: int
    """FLOPs of the measured step (torch.utils.flop_counter: matmuls, convolutions, attention)."""


def predict(model: torch.nn.Module, run: Callable[[FakeModel], Callable[[], None] | None], *,
            round_to: int = 1, scalar_reads: Callable[[torch.Tensor], Any] | None = None) -> Prediction:
    """Peak bytes (weights included) and FLOPs of ``run`` on fake tensors.

    ``run(fake)`` does the work; it may return a second callable, the step to measure, when the
    first part only prepares steady state (a training step creating optimizer state): peak and
    FLOPs are then those of the second call, with what the first left behind counted as resident.
    """
    from torch.utils.flop_counter import FlopCounterMode
    with FakeModel(model) as fake:
        tracker = LiveMemory(round_to=round_to, fake=True, scalar_reads=scalar_reads)
        tracker.track(fake.state.values())
        with tracker, FlopCounterMode(display=False) as flops:
            step = run(fake)
            if step is not None:
                tracker.reset_peak()
                flops_before = flops.get_total_flops()
                step()
            else:
                flops_before = 0
        return Prediction(peak_bytes=tracker.peak_bytes, flops=flops.get_total_flops() - flops_before)
