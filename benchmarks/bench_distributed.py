"""The agreed search of a torchrun job against independent single-rank searches, and what the
collectives cost per probe, on the CPU (gloo).

Independent: each rank searches alone (what accelerate's per-rank retry loop amounts to), then
the job takes the smallest maximum with one all_reduce; agreed: ``devices.agreement`` over
``devices.distributed``; agreed, DDP: the same model wrapped in DistributedDataParallel, probed
under ``no_sync()`` and verified by synchronised steps at the maximum (counted as probes; the two
warm-up steps at the smallest batch are not). Per rank: memory budget, maximum and optimal batch, probes, OOMs and
seconds. Then the exchange alone, timed over many steps: the store-side arrival with its timeout
and the all_gather of the outcomes, against the time of one probe.

    torchrun --nproc-per-node=2 benchmarks/bench_distributed.py 8MB,3MB
    torchrun --nproc-per-node=3 benchmarks/bench_distributed.py 8MB,8MB,3MB
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pytest_autobatch.devices.agreement import AgreedWorkload
from pytest_autobatch.devices.distributed import TorchExchange
from pytest_autobatch.devices.torch_devices import CpuDevice
from pytest_autobatch.record import search_batches
from pytest_autobatch.units import format_bytes, parse_size

TIMING = {"warmup_s": 0.0, "warmup_iterations": 1, "block_s": 0.01, "min_blocks": 3, "max_blocks": 3,
          "max_time_s": 0.1}
EXCHANGE_STEPS = 200


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))


def example() -> torch.Tensor:
    return torch.rand(1, 64)


class CountingWorkload:
    """Counts a workload's probes, OOMs and seconds spent probing."""

    def __init__(self, workload: Any):
        self.workload = workload
        self.probes = self.ooms = 0
        self.probe_seconds: list[float] = []

    def probe(self, batch: int) -> int:
        self.probes += 1
        began = time.perf_counter()
        try:
            return int(self.workload.probe(batch))
        except Exception:
            self.ooms += 1
            raise
        finally:
            self.probe_seconds.append(time.perf_counter() - began)


def search(device: CpuDevice, workload: Any, capacity: int) -> dict[str, Any]:
    counted = CountingWorkload(workload)
    began = time.perf_counter()
    maximum, optimal = search_batches(workload, capacity, cap=8192, probe=counted.probe)
    return {"max": optimal.max_batch or maximum.max_batch, "optimal": optimal.optimal_batch,
            "probes": counted.probes, "ooms": counted.ooms + len(optimal.oom_batches),
            "seconds": time.perf_counter() - began, "probe_s": statistics.median(counted.probe_seconds)}


def warm_up(device: CpuDevice) -> None:
    """One prediction and one probe, untimed: the first of each imports and compiles what later ones reuse."""
    workload = device.workload(make_model(), example(), mode="train", timing=TIMING)
    workload.predict_peak_bytes(8)
    workload.probe(8)
    workload.close()


def independent(device: CpuDevice) -> dict[str, Any]:
    workload = device.workload(make_model(), example(), mode="train", timing=TIMING)
    try:
        found = search(device, workload, device.capacity_bytes())
    finally:
        workload.close()
    began = time.perf_counter()
    smallest = torch.tensor([found["max"]])
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)   # the job can only use the smallest maximum
    found["job_max"] = int(smallest)
    found["seconds"] += time.perf_counter() - began
    return found


def agreed(device: CpuDevice, exchange: TorchExchange, *, ddp: bool = False) -> dict[str, Any]:
    """The agreed search; with ``ddp`` the model is wrapped in DistributedDataParallel, and the
    synchronised steps that verify the maximum count as probes (their OOMs as OOMs)."""
    def build() -> Any:
        model = make_model()
        return device.workload(DistributedDataParallel(model) if ddp else model, example(), mode="train",
                               timing=TIMING)

    workload = AgreedWorkload(exchange, build)
    try:
        capacity = min(exchange.gather("capacity", device.capacity_bytes()))
        found = search(device, workload, capacity)
    finally:
        workload.close()
    found["job_max"] = found["max"]
    found["limited_by"] = workload.limited_by()
    found["synchronised_step"] = workload.synchronised_step()
    found["probes"] += len(workload.synchronised_peaks_by_rank) + len(workload.synchronised_oom_ranks)
    found["ooms"] += len(workload.synchronised_oom_ranks)
    return found


def exchange_cost(exchange: TorchExchange) -> dict[str, float]:
    """Microseconds per step: the whole exchange, and the all_gather alone (no store arrival)."""
    outcome = ("ok", 123_456_789)
    whole, gather = [], []
    for step in range(EXCHANGE_STEPS):
        began = time.perf_counter()
        exchange.gather(f"step {step}", outcome)
        whole.append(time.perf_counter() - began)
        gathered: list[Any] = [None] * exchange.world_size
        began = time.perf_counter()
        dist.all_gather_object(gathered, outcome, group=exchange.group)
        gather.append(time.perf_counter() - began)
    return {"exchange_us": statistics.median(whole) * 1e6,
            "exchange_p90_us": statistics.quantiles(whole, n=10)[-1] * 1e6,
            "all_gather_us": statistics.median(gather) * 1e6}


def main() -> None:
    budgets = [parse_size(text) for text in sys.argv[1].split(",")]
    exchange = TorchExchange(timeout_s=120)
    rank, world = exchange.rank, exchange.world_size
    if len(budgets) != world:
        raise SystemExit(f"give one budget per rank ({world}), got {sys.argv[1]}")
    device = CpuDevice(budgets[rank])
    warm_up(device)
    rows = {"independent": independent(device), "agreed": agreed(device, exchange),
            "agreed, DDP": agreed(device, exchange, ddp=True)}
    cost = exchange_cost(exchange)
    everything = exchange.gather("report", (rows, cost))
    if rank != 0:
        return
    print(f"## {world} ranks (gloo, CPU), budgets {', '.join(map(format_bytes, budgets))}, MLP training step\n")
    print("| search | rank | budget | max | optimal | job's max | probes | OOMs | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for approach in rows:
        for other, (other_rows, _) in enumerate(everything):
            row = other_rows[approach]
            print(f"| {approach} | {other} | {format_bytes(budgets[other])} | {row['max']} | {row['optimal']} | "
                  f"{row['job_max']} | {row['probes']} | {row['ooms']} | {row['seconds']:.2f} |")
        job_seconds = max(other_rows[approach]["seconds"] for other_rows, _ in everything)
        print(f"| {approach}: job | all | | | | | "
              f"{sum(other_rows[approach]['probes'] for other_rows, _ in everything)} | "
              f"{sum(other_rows[approach]['ooms'] for other_rows, _ in everything)} | {job_seconds:.2f} |")
    print(f"\nagreed maximum limited by rank(s) {everything[0][0]['agreed']['limited_by']}")
    step = everything[0][0]["agreed, DDP"]["synchronised_step"]
    print(f"DDP: the synchronised step fits at batch {step['batch']} (peak {format_bytes(step['peak_bytes'])}, "
          f"by rank {', '.join(map(format_bytes, step['peak_bytes_by_rank']))}), stepped down from "
          f"{step['stepped_down_from']}; out of memory at {step['oom_ranks']} (batch: ranks)\n")
    print("| rank | exchange per step, median (us) | p90 (us) | all_gather alone (us) | median probe (ms) | "
          "exchange / probe |")
    print("|---|---|---|---|---|---|")
    for other, (other_rows, other_cost) in enumerate(everything):
        probe_ms = other_rows["agreed"]["probe_s"] * 1e3
        print(f"| {other} | {other_cost['exchange_us']:.0f} | {other_cost['exchange_p90_us']:.0f} | "
              f"{other_cost['all_gather_us']:.0f} | {probe_ms:.1f} | "
              f"{other_cost['exchange_us'] / 1e3 / probe_ms:.1%} |")


if __name__ == "__main__":
    main()
