"""The main job: the optimal and maximum batch of every zoo model on this machine's device.

    pytest --autobatch benchmarks/

The first run on a device searches and records ``baselines/<hardware>/benchmarks__test_models.json``;
later runs re-measure the stored batches through the regression gate (throughput, OOM at a stored
batch, memory) and assert the stored minimum speedup. Models are built at their GPU size on CUDA
and at their CPU size on the CPU (see ``pytest_autobatch.zoo``). On a simulated card
(``--autobatch-device=sim:h100``) each model's stored simulated counterpart runs instead, derived
from the real model by ``python -m pytest_autobatch.devices.derive``: a preview in seconds.
"""

from __future__ import annotations

import pytest

from pytest_autobatch.devices.sim_zoo import simulated_counterpart
from pytest_autobatch.zoo import ZOO, size_class

#: Largest batch the CPU search may try, per model: it bounds the time of the throughput search
#: (the maximum batch is timed first and the best is often near it). GPUs search up to the default cap.
CPU_CAPS = {"vit_b_16": 32}
CPU_DEFAULT_CAP = 128

#: Shorter timing blocks on the CPU keep the whole job in minutes on two cores; the gate still
#: gets its raw samples (topped up by further measurements).
CPU_TIMING = {"warmup_s": 0.2, "warmup_iterations": 1, "block_s": 0.1, "min_blocks": 5,
              "max_blocks": 15, "max_time_s": 1.0}


@pytest.mark.parametrize("name", list(ZOO))
def test_model(name, optimal_batch, autobatch_device):
    device = autobatch_device.name
    spec = ZOO[name]
    if device.startswith("sim:"):
        # The model's simulated counterpart, derived from the real model at its GPU size
        # (pytest_autobatch/devices/sim_zoo.json): the whole job runs in seconds, without torch.
        result = optimal_batch(simulated_counterpart(name), mode=spec.mode, name=name)
        print(f"\n{name} (simulated, {spec.size_label('cuda')}) on {device} [{result.status}]: optimal batch "
              f"{result.optimal_batch}, max {result.max_batch}, {result.throughput:,.1f} samples/s (simulated), "
              f"speedup {result.speedup:.2f}x")
        assert 1 <= result.optimal_batch <= result.max_batch
        result.expect_targets()
        return
    if size_class(device) not in spec.runs_on:
        pytest.skip(f"{name} runs on {' and '.join(spec.runs_on)} devices only")
    model, example_input, options = spec.build(device)
    on_cpu = size_class(device) == "cpu"
    if on_cpu:
        options["timing"] = CPU_TIMING
    cap = CPU_CAPS.get(name, CPU_DEFAULT_CAP) if on_cpu else None

    result = optimal_batch(model, example_input, mode=spec.mode, name=name, cap=cap, **options)

    print(f"\n{name} ({spec.size_label(device)}) on {device} [{result.status}]: optimal batch "
          f"{result.optimal_batch}, max {result.max_batch}, {result.throughput:,.1f} samples/s, "
          f"speedup {result.speedup:.2f}x, {result.probes} probes, {result.ooms} OOMs, "
          f"search {result.search_seconds:.1f} s")
    assert 1 <= result.optimal_batch <= result.max_batch <= (cap or result.entry["cap"])
    result.expect_targets()
