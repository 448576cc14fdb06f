"""A simulated GPU: memory and throughput models that let the search and the plugin run on a CPU.

Memory at batch b (bytes the caching allocator reserves, excluding the CUDA context):
    weights + workspace + activations * b + curvature * b**2 + jitter(b), rounded up to 2 MiB blocks.
A batch fits when that is at most the device's capacity (total memory minus the CUDA context);
otherwise ``probe`` and ``measure`` raise ``errors.OutOfMemory`` with limit="simulated", as the
CUDA path does. A sequence model's activations grow per token and per token squared
(``SimulatedModel.at_length``: the model on sequences of that many tokens). The jitter is a
seeded, deterministic function of the batch of at most one sample's activations, so memory stays
monotone and "the largest batch that fits" is well defined.

Time per step (roofline with launch overhead): kernels * launch overhead + the larger of
(weights + activation traffic) / memory bandwidth and FLOPs / (peak FLOP/s * utilisation).
Small batches are bound by reading the weights, so batching pays until compute saturates; past
``knee_batch`` the step slows down by ``falloff`` per knee-width (memory contention), so
throughput can fall. Timing samples carry seeded noise and occasional slow outliers.

To simulate a regression without changing the model's fingerprint, build the device with
``slowdown`` (throughput divided by it) or ``memory_overhead_bytes`` (extra bytes at every
batch): ``simulated_device("sim:h100", slowdown=1.5)``. A slower machine is ``machine_speed``
(0.4: everything, the reference workload too, runs at 40%); one whose memory alone is slower (a
neighbour's memory traffic) is ``memory_speed``: memory-bound steps and the reference's memory
part slow down, compute does not. A busy machine is ``unsteady`` (the reasons its measurements
report). A genuinely different (slower) model is
a ``SimulatedModel`` with more ``flops_per_sample``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, OutOfMemory
from .base import MODES, PairedSamples, whole_rate

MiB = 1 << 20
GiB = 1 << 30
ALLOCATOR_BLOCK_BYTES = 2 * MiB
#: The simulated reference workload's rate on a profile at machine_speed 1.
REFERENCE_UNITS_PER_S = 1000.0  # the CUDA caching allocator reserves large segments in 2 MiB steps
# (static memory, per-sample memory, FLOPs) multipliers per mode. Training keeps gradients and
# two Adam states (4x weights), saves activations for backward (~3x) and does ~3x the FLOPs.
_MODE_FACTORS = {"inference": (1.0, 1.0, 1.0), "train": (4.0, 3.0, 3.0), "generate": (1.0, 2.0, 1.0)}
# Options the cpu/cuda workloads take; a simulated workload accepts and ignores them.
_TORCH_ONLY_OPTIONS = frozenset({"loss_fn", "optimizer", "max_new_tokens", "dtype", "autocast", "batch_dim",
                                 "min_batch", "make_batch", "dataset", "collate_fn", "largest"})


@dataclass(frozen=True)
class GpuProfile:
    """Public figures of a GPU and a speed model fitted to published measurements.

    ``precision`` is what the figures assume: FP32 tensors in eager PyTorch with its defaults
    (cuDNN may use TF32 for convolutions); ``peak_flops`` is the card's dense FP32 rate.
    ``launch_overhead_s`` is the host's time to dispatch one kernel (framework plus launch), which
    overlaps with the GPU's work; ``kernel_overhead_s`` is the GPU's fixed cost per kernel;
    ``efficiency`` is the achievable fraction of ``peak_flops`` by kind of work
    (``SimulatedModel.work``). ``calibration_error`` is the largest relative error on the published
    figures (``pytest_autobatch/devices/calibration.json``), None when there are none for the card.
    """

    name: str
    label: str
    total_bytes: int
    context_bytes: int
    peak_flops: float
    memory_bandwidth: float  # bytes/s
    launch_overhead_s: float  # per kernel, host side (overlaps with the GPU)
    power_w: float
    kernel_overhead_s: float = 2e-6  # per kernel, GPU side (launch latency, ramp and tail)
    efficiency: tuple[tuple[str, float], ...] = (("conv", 0.5), ("light-conv", 0.25), ("matmul", 0.7),
                                                 ("decode", 0.3))
    precision: str = "FP32, eager PyTorch defaults"
    calibration_error: float | None = None

    def efficiency_for(self, work: str) -> float:
        """The achievable fraction of peak FLOP/s for ``work`` (ConfigError for an unknown kind)."""
        table = dict(self.efficiency)
        if work not in table:
            raise ConfigError(f"unknown kind of work {work!r} for sim:{self.name}: known are {', '.join(table)}")
        return table[work]


# Fitted speed parameters (see calibration.json and benchmarks/bench_simulated.py).
# Host dispatch per kernel: the batch-1 latencies over the derived kernel counts. Efficiency: the
# FLOP rate the large batches reach, over the FP32 peak. "light-conv" (narrow and depthwise
# convolutions, YOLO-n) and "matmul"/"decode" on the H100 scale the RTX 5070 Ti's ratios; "matmul"
# on the H100 assumes FP32 matmuls (no TF32) at 70% of peak; "decode" is bound by reading weights.
H100_LAUNCH, H100_KERNEL = 6.3e-6, 2e-6
H100_EFF = (("conv", 0.527), ("light-conv", 0.377), ("matmul", 0.7), ("decode", 0.3))
H100_ERR: float | None = 0.14
RTX_LAUNCH, RTX_KERNEL = 11.1e-6, 2e-6
RTX_EFF = (("conv", 0.282), ("light-conv", 0.2016), ("matmul", 0.375), ("decode", 0.16))
RTX_ERR: float | None = 0.12

PROFILES: dict[str, GpuProfile] = {
    profile.name: profile for profile in (
        # H100 SXM5 80GB: 67 TFLOP/s FP32 (989 BF16 tensor dense), 3.35 TB/s HBM3, 700 W.
        # Overheads and efficiencies fitted to published ResNet-50 and ResNet-18 sweeps.
        GpuProfile("h100", "NVIDIA H100 80GB HBM3 (simulated)", 85_045_231_616, 536 * MiB,
                   67e12, 3.35e12, H100_LAUNCH, 700.0, kernel_overhead_s=H100_KERNEL,
                   efficiency=H100_EFF, calibration_error=H100_ERR),
        # RTX A5000: 24 GB GDDR6, 768 GB/s, 27.8 TFLOP/s FP32, 230 W. No published figures:
        # overheads and efficiencies taken from the RTX 5070 Ti (uncalibrated).
        GpuProfile("a5000", "NVIDIA RTX A5000 (simulated)", 25_425_608_704, 420 * MiB,
                   27.8e12, 768e9, RTX_LAUNCH, 230.0, kernel_overhead_s=RTX_KERNEL, efficiency=RTX_EFF),
        # RTX 5070 Ti: 16 GB GDDR7, 896 GB/s, 43.9 TFLOP/s FP32, 300 W. Fitted to published
        # ResNet-50 and YOLO11n-pose figures.
        GpuProfile("rtx5070ti", "NVIDIA GeForce RTX 5070 Ti (simulated)", 17_094_475_776, 400 * MiB,
                   43.9e12, 896e9, RTX_LAUNCH, 300.0, kernel_overhead_s=RTX_KERNEL, efficiency=RTX_EFF,
                   calibration_error=RTX_ERR),
    )
}


@dataclass(frozen=True)
class SimulatedModel:
    """A model described by its memory and compute per sample (see the module docstring)."""

    name: str
    weights_bytes: int
    activation_bytes_per_sample: int
    flops_per_sample: float
    curvature_bytes: float = 0.0  # extra bytes * batch**2 (attention over batch x sequence, fragmentation)
    workspace_bytes: int = 0  # batch-independent scratch (cuBLAS/cuDNN workspaces)
    memory_jitter: float = 0.0  # 0..1: deterministic per-batch noise, in units of one sample's activations
    kernels: int = 100  # kernel launches per step
    utilisation: float = 0.5  # fraction of peak FLOP/s reached once compute-bound (when work is None)
    work: str | None = None  # kind of work ("conv", "matmul", ...): the profile's efficiency applies
    weight_reads: int = 1  # times a step reads the weights (forward passes of a generation)
    measured_mode: str | None = None  # the figures are already for this mode: no mode factors in it
    knee_batch: int | None = None  # past this batch, throughput falls
    falloff: float = 0.0  # slowdown per knee_batch past the knee
    prediction_error: float = 0.1  # signed relative error of predict_peak_bytes on batch-dependent memory
    seed: int = 0  # seeds the memory jitter
    token_bytes: float = 0.0  # per sample and token of a sequence (KV cache, activations): see at_length
    token_squared_bytes: float = 0.0  # per sample and token squared (attention scores over the prompt)
    flops_per_token: float = 0.0  # per sample and token

    def __post_init__(self) -> None:
        for field in ("weights_bytes", "activation_bytes_per_sample", "curvature_bytes", "workspace_bytes",
                      "falloff"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ConfigError(f"SimulatedModel {self.name!r}: {field} must be a number >= 0, got {value!r}")
        if not self.flops_per_sample > 0:
            raise ConfigError(f"SimulatedModel {self.name!r}: flops_per_sample must be > 0, "
                              f"got {self.flops_per_sample!r}")
        if not 0 <= self.memory_jitter <= 1:
            raise ConfigError(f"SimulatedModel {self.name!r}: memory_jitter must be in [0, 1] "
                              f"(one sample's activations at most), got {self.memory_jitter!r}")
        if not 0 < self.utilisation <= 1:
            raise ConfigError(f"SimulatedModel {self.name!r}: utilisation must be in (0, 1], "
                              f"got {self.utilisation!r}")
        if self.knee_batch is not None and self.knee_batch < 1:
            raise ConfigError(f"SimulatedModel {self.name!r}: knee_batch must be >= 1 or None, "
                              f"got {self.knee_batch!r}")
        for field in ("token_bytes", "token_squared_bytes", "flops_per_token"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ConfigError(f"SimulatedModel {self.name!r}: {field} must be a number >= 0, got {value!r}")
        if self.activation_bytes_per_sample == 0 and self.curvature_bytes == 0:
            raise ConfigError(f"SimulatedModel {self.name!r}: memory must grow with the batch; "
                              f"set activation_bytes_per_sample or curvature_bytes > 0")

    def at_length(self, tokens: int) -> SimulatedModel:
        """This model on sequences of ``tokens`` tokens: per-sample memory grows by ``token_bytes``
        per token and ``token_squared_bytes`` per token squared, the work by ``flops_per_token``."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ConfigError(f"SimulatedModel {self.name!r}: a length must be a positive integer "
                              f"number of tokens, got {tokens!r}")
        grown = self.token_bytes * tokens + self.token_squared_bytes * tokens * tokens
        return dataclasses.replace(self, name=f"{self.name}@{tokens}",
                                   activation_bytes_per_sample=int(self.activation_bytes_per_sample + grown),
                                   flops_per_sample=self.flops_per_sample + self.flops_per_token * tokens)


def model_for_max_batch(profile: GpuProfile | str, max_batch: float, *, weights_fraction: float,
                        curvature_share: float = 0.0, name: str = "sim-model", **fields: Any) -> SimulatedModel:
    """A model whose largest fitting inference batch on ``profile`` is about ``max_batch``.

    ``weights_fraction`` of the capacity holds the weights (>= 1: batch 1 does not fit);
    ``curvature_share`` of the rest of the memory at ``max_batch`` grows with batch squared.
    """
    gpu = get_profile(profile)
    capacity = gpu.total_bytes - gpu.context_bytes
    weights = int(capacity * weights_fraction)
    # Leave room for one allocator block and the jitter (up to one sample) at max_batch.
    dynamic = max(capacity - weights - ALLOCATOR_BLOCK_BYTES, capacity * 0.01)
    activations = max(1, int(dynamic * (1 - curvature_share) / (max_batch + fields.get("memory_jitter", 0.0))))
    curvature = dynamic * curvature_share / max_batch ** 2
    fields.setdefault("flops_per_sample", 4e9)
    return SimulatedModel(name, weights, activations, curvature_bytes=curvature, **fields)


def get_profile(profile: GpuProfile | str) -> GpuProfile:
    """The profile for "h100", "sim:h100" or a GpuProfile; ConfigError naming the known ones."""
    if isinstance(profile, GpuProfile):
        return profile
    key = str(profile).strip().lower().removeprefix("sim:")
    try:
        return PROFILES[key]
    except KeyError:
        known = ", ".join(f"sim:{name}" for name in PROFILES)
        raise ConfigError(f"unknown simulated GPU {profile!r}: known profiles are {known}") from None


class SimulatedDevice:
    """A ``Device`` backed by a GPU profile; see the module docstring for the models."""

    def __init__(self, profile: GpuProfile | str = "h100", *, seed: int = 0, slowdown: float = 1.0,
                 machine_speed: float = 1.0, memory_speed: float = 1.0, memory_overhead_bytes: int = 0,
                 timing_noise: float = 0.02, repeats: int = 5, capacity_bytes: int | None = None,
                 unsteady: tuple[str, ...] = ()):
        for option, value in (("slowdown", slowdown), ("machine_speed", machine_speed),
                              ("memory_speed", memory_speed)):
            if not value > 0:
                raise ConfigError(f"{option} must be > 0 (1.0 = as fast as the profile), got {value!r}")
        if repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {repeats!r}")
        if timing_noise < 0:
            raise ConfigError(f"timing_noise must be >= 0, got {timing_noise!r}")
        self.profile = get_profile(profile)
        self.name = f"sim:{self.profile.name}"
        self.seed = seed
        self.slowdown = slowdown
        self.machine_speed = machine_speed
        self.memory_speed = memory_speed
        self.unsteady = list(unsteady)
        self.memory_overhead_bytes = memory_overhead_bytes
        self.timing_noise = timing_noise
        self.repeats = repeats
        self._capacity = (self.profile.total_bytes - self.profile.context_bytes
                          if capacity_bytes is None else capacity_bytes)

    def hardware(self) -> dict[str, Any]:
        return {"device": self.name, "name": self.profile.label, "total_memory_bytes": self.profile.total_bytes,
                "peak_flops": self.profile.peak_flops, "memory_bandwidth_bytes_per_s": self.profile.memory_bandwidth,
                "simulated": True}

    def hardware_key(self) -> str:
        return f"sim-{self.profile.name}"

    def capacity_bytes(self) -> int:
        return self._capacity

    def workload(self, model: Any, example_input: Any = None, *, mode: str = "inference",
                 **options: Any) -> SimulatedWorkload:
        if not isinstance(model, SimulatedModel):
            raise ConfigError(f"{self.name} runs SimulatedModel instances (pytest_autobatch.simulate), "
                              f"got {type(model).__name__}; use device cpu or cuda for torch models")
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        unknown = set(options) - _TORCH_ONLY_OPTIONS
        if unknown:
            raise ConfigError(f"unknown workload option(s) {', '.join(sorted(unknown))}: "
                              f"known are {', '.join(sorted(_TORCH_ONLY_OPTIONS))}")
        return SimulatedWorkload(self, model, mode)


class SimulatedWorkload:
    """One simulated model in one mode on a simulated device (a ``Workload``)."""

    def __init__(self, device: SimulatedDevice, model: SimulatedModel, mode: str):
        self.device = device
        self.model = model
        self.mode = mode
        static, per_sample, flops = (1.0, 1.0, 1.0) if model.measured_mode == mode else _MODE_FACTORS[mode]
        self._static_bytes = model.weights_bytes * static + model.workspace_bytes + device.memory_overhead_bytes
        self._sample_bytes = model.activation_bytes_per_sample * per_sample
        self._curvature = model.curvature_bytes * per_sample
        self._flops = model.flops_per_sample * flops
        self._rng = random.Random(f"{device.seed}:{model.name}:{mode}")
        self.probes: list[int] = []  # batches probed or measured, in order (for tests)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "simulated", "mode": self.mode, **dataclasses.asdict(self.model)}

    def needed_bytes(self, batch: int) -> int:
        """Peak reserved bytes at ``batch``, without running or counting anything."""
        jitter = 0.0
        if self.model.memory_jitter:
            jitter = self.model.memory_jitter * self._sample_bytes * random.Random(
                f"{self.model.seed}:{batch}").random()
        raw = self._static_bytes + self._sample_bytes * batch + self._curvature * batch * batch + jitter
        return math.ceil(raw / ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES

    def fits(self, batch: int) -> bool:
        return self.needed_bytes(batch) <= self.device.capacity_bytes()

    def true_max_batch(self, cap: int) -> int:
        """The largest batch <= cap that fits (0 if none): ground truth for tests and benchmarks."""
        if not self.fits(1):
            return 0
        low, high = 1, cap + 1  # fits(low), and high is past the cap or does not fit
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.fits(middle) else (low, middle)
        return low

    def predict_peak_bytes(self, batch: int) -> int:
        """An analytic estimate that, like a real predictor, is off: it misjudges the batch-dependent
        memory by ``prediction_error`` and knows nothing of jitter or allocator rounding."""
        dynamic = self._sample_bytes * batch + self._curvature * batch * batch
        return int(self._static_bytes + dynamic * (1 + self.model.prediction_error))

    def probe(self, batch: int) -> int:
        self._run(batch)
        return self.needed_bytes(batch)

    def step_time_s(self, batch: int) -> float:
        """Noise-free seconds per step at ``batch``: the host dispatching kernels and the GPU running
        them overlap, so the step takes the longer of the two. The GPU pays a fixed cost per kernel
        plus a roofline (the larger of memory traffic over bandwidth and FLOPs over achievable FLOP/s)."""
        gpu = self.device.profile
        memory_s = (self.model.weights_bytes * self.model.weight_reads
                    + 2 * self._sample_bytes * batch) / (gpu.memory_bandwidth * self.device.memory_speed)
        utilisation = self.model.utilisation if self.model.work is None else gpu.efficiency_for(self.model.work)
        compute_s = self._flops * batch / (gpu.peak_flops * utilisation)
        gpu_s = self.model.kernels * gpu.kernel_overhead_s + max(memory_s, compute_s)
        seconds = max(self.model.kernels * gpu.launch_overhead_s, gpu_s)
        knee = self.model.knee_batch
        if knee is not None and batch > knee:
            seconds *= 1 + self.model.falloff * (batch - knee) / knee
        return seconds * self.device.slowdown / self.device.machine_speed

    def expected_throughput(self, batch: int) -> float:
        """Noise-free samples per second at ``batch``."""
        return batch / self.step_time_s(batch)

    def measure(self, batch: int) -> list[float]:
        return self._samples(batch, self.device.repeats)

    def _samples(self, batch: int, count: int) -> list[float]:
        self._run(batch)
        seconds = self.step_time_s(batch)
        samples = []
        for _ in range(count):
            factor = max(0.5, 1 + self._rng.gauss(0, self.device.timing_noise))
            if self.device.timing_noise and self._rng.random() < 0.05:  # a slow outlier (clocks, another process)
                factor *= 1.25
            samples.append(batch / (seconds * factor))
        return samples

    def measure_paired(self, batch: int, blocks: int) -> PairedSamples:
        """The samples with the reference's parts' rates beside each: the machine's speed moves the
        model and both parts, its memory speed the memory part (and memory-bound steps), the
        model's own ``slowdown`` only the model."""
        samples = self._samples(batch, blocks)
        speeds = {"compute": self.device.machine_speed,
                  "memory": self.device.machine_speed * self.device.memory_speed}
        rates = [{part: REFERENCE_UNITS_PER_S * speed * max(0.5, 1 + self._rng.gauss(0, self.device.timing_noise))
                  for part, speed in speeds.items()} for _ in samples]
        return PairedSamples(samples, [whole_rate(rate) for rate in rates], list(self.device.unsteady),
                             {"kind": "simulated"}, {part: [rate[part] for rate in rates] for part in speeds})

    def extras(self, batch: int) -> dict[str, Any]:
        seconds = self.step_time_s(batch)
        return {"flops_per_sample": self._flops,
                "energy_per_sample_j": self.device.profile.power_w * seconds / batch}

    def close(self) -> None:
        """Nothing is held."""

    def _run(self, batch: int) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size must be an integer >= 1, got {batch!r}")
        self.probes.append(batch)
        needed, available = self.needed_bytes(batch), self.device.capacity_bytes()
        if needed > available:
            raise OutOfMemory(f"CUDA out of memory (simulated {self.device.name}): batch {batch} needs "
                              f"{needed / GiB:.2f} GiB, {available / GiB:.2f} GiB available",
                              batch=batch, needed_bytes=needed, available_bytes=available, limit="simulated")


def simulated_device(name: str, **options: Any) -> SimulatedDevice:
    """The device for "sim:PROFILE" (options as SimulatedDevice); ConfigError naming the known profiles."""
    return SimulatedDevice(get_profile(name), **options)
