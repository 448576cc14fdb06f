"""The zoo's simulated counterparts: SimulatedModels derived from the real models, read without torch.

``sim_zoo.json`` (beside this module) is written by ``python -m pytest_autobatch.devices.derive``.
A model missing there (its derivation failed, and the derive command said why) falls back to
the hand-given model in ``FALLBACK``.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .simulated import SimulatedModel

DATA_PATH = Path(__file__).with_name("sim_zoo.json")

#: The kind of work of each zoo model: picks the profile's achievable fraction of peak FLOP/s.
WORK_KIND = {"resnet50": "conv", "resnet50-train": "conv", "yolo11n-pose": "light-conv",
             "yolo11n-seg": "light-conv", "vit_b_16": "matmul", "llama": "decode", "llama-int8": "decode",
             "resnet18": "conv"}

#: Hand-given counterparts, used when a model has no derived entry (published sizes, fp32).
FALLBACK: dict[str, SimulatedModel] = {model.name: model for model in (
    SimulatedModel("resnet50", 102_000_000, 110_000_000, 8.2e9, kernels=175, work="conv"),
    SimulatedModel("resnet50-train", 102_000_000, 330_000_000, 24.6e9, kernels=700, work="conv",
                   workspace_bytes=102_000_000, measured_mode="train"),
    SimulatedModel("vit_b_16", 346_000_000, 60_000_000, 35.2e9, kernels=250, work="matmul"),
    SimulatedModel("yolo11n-pose", 12_000_000, 300_000_000, 7.4e9, kernels=300, work="light-conv"),
    SimulatedModel("yolo11n-seg", 12_000_000, 320_000_000, 10.4e9, kernels=320, work="light-conv"),
    SimulatedModel("llama", 600_000_000, 40_000_000, 3.0e10, kernels=6000, work="decode",
                   measured_mode="generate"),
    # int8 weights (a quarter of fp32's bytes, embeddings stay fp32); activations and KV cache as fp32.
    SimulatedModel("llama-int8", 310_000_000, 40_000_000, 3.0e10, kernels=6000, work="decode",
                   measured_mode="generate"),
)}

_FIELDS = ("weights_bytes", "activation_bytes_per_sample", "workspace_bytes", "flops_per_sample",
           "kernels", "weight_reads", "measured_mode", "work")


@lru_cache(maxsize=1)
def derived() -> dict[str, dict[str, Any]]:
    """The stored derivations by model name ({} when the file is missing)."""
    if not DATA_PATH.exists():
        return {}
    return dict(json.loads(DATA_PATH.read_text())["models"])


def simulated_counterpart(name: str) -> SimulatedModel:
    """The SimulatedModel for zoo model ``name``: derived if stored, else the hand-given one (warned)."""
    entry = derived().get(name)
    if entry is not None:
        return SimulatedModel(name, **{field: entry[field] for field in _FIELDS if field in entry})
    if name not in FALLBACK:
        raise ConfigError(f"no simulated counterpart for {name!r}: known are {', '.join(sorted(FALLBACK))}")
    warnings.warn(f"{name}: no derived simulated counterpart in {DATA_PATH.name}; using the hand-given one",
                  stacklevel=2)
    return FALLBACK[name]
