"""Settings of the main job (``pytest --autobatch benchmarks/``) when it runs on the CPU.

A 1 GiB memory budget. The CPU device's default budget, a quarter of RAM, is far more than the
CPU-sized zoo models use below their caps, so every maximum safe batch would be the cap. Under
1 GiB the training step runs into the budget as it would into GPU memory, and the search finds its
maximum by memory, with the OOM handling that goes with it. The throughput tolerance is the
plugin's default: the gate judges throughput relative to a reference workload timed beside the
model, so a slower or faster host of the same kind passes, and a busy one is named, not judged.

An option given on the command line or in the ini file wins; GPUs keep the plugin's defaults.
"""

from __future__ import annotations

import os

import pytest

# The zoo builds every model from its config: no model hub is ever asked.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CPU_BUDGET = "1GiB"


def _option(config: pytest.Config, name: str) -> object:
    """A pytest-autobatch option from the command line, else the ini file, else None."""
    value = config.getoption(name, default=None)
    return value if value not in (None, "") else (config.getini(name) or None)


def _searches_on_cpu(config: pytest.Config) -> bool:
    from pytest_autobatch.devices.base import parse_device_name
    device = parse_device_name(str(_option(config, "autobatch_device") or "auto"))
    if device != "auto":
        return device == "cpu"
    import torch  # the CPU and CUDA devices import it anyway
    return not torch.cuda.is_available()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Runs before pytest-autobatch reads its options (tryfirst), so the defaults reach it."""
    if not _option(config, "autobatch") or not _searches_on_cpu(config):
        return
    from pytest_autobatch.units import parse_size
    if _option(config, "autobatch_memory_budget") is None:
        config.option.autobatch_memory_budget = parse_size(CPU_BUDGET)
