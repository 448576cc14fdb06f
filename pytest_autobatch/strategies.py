"""Hypothesis strategies for simulated models, devices and workloads, for property tests of code
that searches or gates batch sizes (ours, and users' own).

    from hypothesis import given
    from pytest_autobatch.strategies import simulated_workloads

    @given(simulated_workloads())
    def test_my_search(workload):
        assert my_search(workload.probe) == workload.true_max_batch(8192)
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

from .devices.base import MODES
from .devices.simulated import PROFILES, SimulatedDevice, SimulatedModel, SimulatedWorkload, model_for_max_batch
from .errors import ConfigError


def gpu_profiles() -> st.SearchStrategy[str]:
    """Names of the simulated GPU profiles ("h100", "a5000", "rtx5070ti")."""
    return st.sampled_from(sorted(PROFILES))


def simulated_devices(profiles: st.SearchStrategy[str] | None = None, *,
                      timing_noise: float = 0.02) -> st.SearchStrategy[SimulatedDevice]:
    """Simulated devices on any profile, with seeded timing noise."""
    return st.builds(lambda profile, seed: SimulatedDevice(profile, seed=seed, timing_noise=timing_noise),
                     profiles if profiles is not None else gpu_profiles(), st.integers(0, 2 ** 32 - 1))


@st.composite
def simulated_models(draw: st.DrawFn, profile: str = "h100", *, min_max_batch: int = 1, max_max_batch: int = 16384,
                     batch_one_fits: bool | None = True) -> SimulatedModel:
    """Models whose largest inference batch on ``profile`` is about ``min_max_batch..max_max_batch``
    (log-uniform): linear or curved memory, jitter, a throughput knee or none.

    ``batch_one_fits``: True (default), False (weights alone exceed the memory) or None (either).
    """
    fits = draw(st.booleans()) if batch_one_fits is None else batch_one_fits
    log_max = draw(st.floats(math.log(min_max_batch), math.log(max_max_batch)))
    knee = draw(st.none() | st.integers(1, 2 * max_max_batch))
    return model_for_max_batch(
        profile, math.exp(log_max),
        weights_fraction=draw(st.floats(0.0, 0.8) if fits else st.floats(1.05, 1.5)),
        curvature_share=draw(st.just(0.0) | st.floats(0.05, 0.5)),
        name=f"sim-{draw(st.integers(0, 10 ** 6))}",
        memory_jitter=draw(st.just(0.0) | st.floats(0.0, 1.0)),
        flops_per_sample=draw(st.floats(1e8, 1e12)),
        kernels=draw(st.integers(1, 500)),
        knee_batch=knee,
        falloff=draw(st.floats(0.1, 2.0)) if knee is not None else 0.0,
        prediction_error=draw(st.floats(-0.3, 0.3)),
        seed=draw(st.integers(0, 2 ** 32 - 1)))


@st.composite
def simulated_workloads(draw: st.DrawFn, *, modes: tuple[str, ...] = ("inference",), min_max_batch: int = 1,
                        max_max_batch: int = 16384, batch_one_fits: bool | None = True,
                        timing_noise: float = 0.02) -> SimulatedWorkload:
    """A simulated model running on a simulated device of the same profile.

    The maximum batch range refers to inference; training needs more memory per sample.
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ConfigError(f"unknown modes {', '.join(sorted(unknown))}: use {', '.join(MODES)}")
    profile = draw(gpu_profiles())
    device = draw(simulated_devices(st.just(profile), timing_noise=timing_noise))
    model = draw(simulated_models(profile, min_max_batch=min_max_batch, max_max_batch=max_max_batch,
                                  batch_one_fits=batch_one_fits))
    return device.workload(model, mode=draw(st.sampled_from(modes)))
