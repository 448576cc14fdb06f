"""Derive each zoo model's simulated counterpart from the real model; writes ``sim_zoo.json``.

    python -m pytest_autobatch.devices.derive [--out PATH] [NAME ...]

For each zoo model at its GPU size, built on the CPU with random weights:

- ``weights_bytes``: parameters and buffers, counted;
- ``activation_bytes_per_sample``: from the fake-tensor peak prediction of the workload
  (``TorchWorkload.predict_peak_bytes`` on a ``CpuDevice``) at batches 1 and 8;
  ``workspace_bytes``: what the batch-1 peak holds beyond weights and one sample (optimizer state);
- ``flops_per_sample``: PyTorch's FLOP counter over that step at batch 8, divided by 8;
- ``kernels``: aten ops dispatched once on fake tensors at batch 1, views and allocations left out.

The figures are for the model's own mode (``measured_mode``), so no mode factors apply. Only this
module imports torch; the stored JSON is read without it (``pytest_autobatch.devices.sim_zoo``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .sim_zoo import DATA_PATH, WORK_KIND

_BATCH = 8
# Ops that launch no GPU kernel: views, allocations without a fill, metadata and host reads.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "_local_scalar_dense",
              "alias", "lift_fresh_copy", "sym_size", "sym_stride", "sym_numel", "is_same_size",
              "_to_copy", "set_", "resize_", "new_empty", "new_empty_strided"}


def _is_kernel(func: Any) -> bool:
    name = func.__name__.split(".")[0]
    return not (getattr(func, "is_view", False) or name in _NO_KERNEL or str(func).startswith("prim."))


def _specs() -> dict[str, Any]:
    """The zoo, plus ResNet-18 (not in the zoo; published H100 figures calibrate the profiles)."""
    from functools import partial

    from ..zoo import ZOO, _image_model, build_torchvision_classifier
    resnet18 = _image_model("resnet18", "torchvision ResNet-18 (calibration only)", "vision",
                            partial(build_torchvision_classifier, arch="resnet18"), gpu=224, cpu=64)
    return {**ZOO, "resnet18": resnet18}


def derive_model(name: str) -> dict[str, Any]:
    """The simulated counterpart of zoo model ``name`` (SimulatedModel fields), derived as above."""
    import torch

    from . import torch_memory
    from .torch_devices import CpuDevice

    spec = _specs()[name]
    # The GPU size, built on the CPU (the fake-tensor prediction never runs it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        built = spec.factory(**spec.gpu_size)
    model, example, options = built
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    counts: Counter[str] = Counter()
    forwards = [0]
    hook = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    class CountingMemory(torch_memory.LiveMemory):
        def _record(self, func: Any, result: Any) -> Any:
            if self.fake and _is_kernel(func):
                counts[str(func)] += 1
            return super()._record(func, result)

        def reset_peak(self) -> None:  # a training step: count only the measured step
            counts.clear()
            super().reset_peak()

    original = torch_memory.LiveMemory
    torch_memory.LiveMemory = CountingMemory  # type: ignore[misc]
    try:
        workload = CpuDevice().workload(model, example, mode=spec.mode, **options)
        counts.clear()
        forwards[0] = 0
        one = workload._predict(1)
        kernels, weight_reads = sum(counts.values()), forwards[0]
        many = workload._predict(_BATCH)
    finally:
        torch_memory.LiveMemory = original  # type: ignore[misc]
        hook.remove()
    for prediction in (one, many):
        if isinstance(prediction, str):
            raise RuntimeError(f"fake-tensor prediction {prediction}")
    assert not isinstance(one, str) and not isinstance(many, str)
    per_sample = max(1, (many.peak_bytes - one.peak_bytes) // (_BATCH - 1))
    return {"name": name, "weights_bytes": params, "activation_bytes_per_sample": per_sample,
            "workspace_bytes": max(0, one.peak_bytes - per_sample - params),
            "flops_per_sample": many.flops / _BATCH, "kernels": kernels,
            "weight_reads": max(1, weight_reads) if spec.mode == "generate" else 1, "measured_mode": spec.mode,
            "work": WORK_KIND[name], "size": spec.size_label("cuda"),
            "top_ops": dict(counts.most_common(5))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="zoo models (default: all)")
    parser.add_argument("--out", type=Path, default=DATA_PATH)
    args = parser.parse_args(argv)
    existing = json.loads(args.out.read_text()) if args.out.exists() else {"models": {}}
    failures = 0
    for name in args.names or list(_specs()):
        try:
            existing["models"][name] = derive_model(name)
            print(f"{name}: {existing['models'][name]}")
        except Exception as exc:  # noqa: BLE001 - reported, and the hand-given model stays
            failures += 1
            print(f"{name}: derivation failed ({type(exc).__name__}: {exc}); "
                  f"falls back to the hand-given SimulatedModel", file=sys.stderr)
    existing["derived_with"] = "python -m pytest_autobatch.devices.derive"
    args.out.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
