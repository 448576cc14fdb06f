"""From production code: the stored optimal batch for the hardware at hand, and the per-rank
batch of a data-parallel job, searched by all its ranks together.

    from pytest_autobatch import stored_optimal_batch
    batch = stored_optimal_batch("resnet50", baselines_dir="baselines", default=32)
    batch = stored_optimal_batch("llama", length=prompt_tokens + new_tokens, default=1)   # a frontier

    from pytest_autobatch import agreed_batch          # on every rank of a torchrun job
    batch = agreed_batch(model, example, mode="train").optimal_batch

No pytest here. The hardware key comes from the device (torch is imported only for cpu/cuda/auto,
to fingerprint the hardware) unless it is passed in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .baselines import BaselineStore, split_entry_key
from .errors import ConfigError

_NO_DEFAULT: Any = object()


def _matches(key: str, entry: dict[str, Any], name: str) -> bool:
    nodeid, model = split_entry_key(key)
    return name in (key, nodeid, model, entry.get("model"))


def stored_entry(name: str, baselines_dir: str | os.PathLike[str] = "baselines", device: str = "auto",
                 *, hardware_key: str | None = None) -> dict[str, Any] | None:
    """The baseline entry for ``name`` on this hardware, or None when there is none.

    ``name`` is an entry key (``<test id>::<model>``), a test id, or a model name. Several
    entries that match with different optimal batches are ambiguous: ConfigError lists them.
    """
    if hardware_key is None:
        from .devices import get_device
        hardware_key = get_device(device).hardware_key()
    store = BaselineStore(baselines_dir, hardware_key)
    found = {key: entry for module in store.modules() for key, entry in store.entries(module).items()
             if _matches(key, entry, name)}
    if len({entry.get("optimal_batch") for entry in found.values()}) > 1:
        raise ConfigError(f"{name!r} matches several baselines with different optimal batches on "
                          f"{hardware_key}: {', '.join(sorted(found))}; pass the full entry key")
    return next(iter(found.values()), None)


def stored_optimal_batch(name: str, baselines_dir: str | os.PathLike[str] = "baselines",
                         device: str = "auto", default: int = _NO_DEFAULT, *,
                         hardware_key: str | None = None, length: int | None = None) -> int:
    """The optimal batch CI stored for ``name`` on this hardware; ``default`` for unknown hardware.

    ``length`` (tokens, prompt plus new) reads a frontier entry: the row of the nearest stored
    length at or above it, never a batch measured on shorter inputs. Without a default, a missing
    baseline raises ConfigError saying how to record one.
    """
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ConfigError(f"length must be a positive integer number of tokens (prompt plus new), got {length!r}")
    entry = stored_entry(name, baselines_dir, device, hardware_key=hardware_key)
    if entry is not None:
        return int((entry if length is None else frontier_row(entry, length, name))["optimal_batch"])
    if default is not _NO_DEFAULT:
        return default
    raise ConfigError(f"no baseline for {name!r} in {baselines_dir} for this hardware: record one with "
                      f"pytest --autobatch on it, or pass default=<batch> for unknown hardware")


def frontier_row(entry: dict[str, Any], length: int, name: str) -> dict[str, Any]:
    """The row of ``entry``'s frontier at the nearest stored length (prompt plus new tokens) at or
    above ``length``, the smaller optimal batch where two rows tie; ConfigError when there is none."""
    rows = entry.get("frontier")
    if not rows:
        raise ConfigError(f"the baseline of {name!r} was recorded at one length, not as a frontier: record "
                          f"it with prompt_tokens=[...] to ask for length={length}, or leave length out")
    covering = [row for row in rows if _tokens(row) >= length]
    if not covering:
        longest = max(_tokens(row) for row in rows)
        raise ConfigError(f"the frontier of {name!r} stops at {longest} tokens, short of length={length}: a batch "
                          f"measured on shorter inputs could run out of memory; record the frontier up to "
                          f"{length} tokens")
    nearest = min(_tokens(row) for row in covering)
    return min((row for row in covering if _tokens(row) == nearest), key=lambda row: row["optimal_batch"])


def _tokens(row: dict[str, Any]) -> int:
    return int(row["prompt_tokens"]) + int(row["new_tokens"])


@dataclass(frozen=True)
class AgreedBatch:
    """The batch every rank of a job agreed on, per rank; ``throughput`` is the job's (summed over ranks)
    at ``optimal_batch``.

    ``limited_by``: the ranks that ran out of memory just above ``max_batch`` (None: the cap was
    reached); ``probes``/``ooms``: memory probes made, and how many ran out of memory.
    ``synchronised_step``: for a model wrapped in DDP, the one synchronised training step verified
    at ``max_batch`` (``batch``, ``peak_bytes``, ``peak_bytes_by_rank``; ``stepped_down_from``: the
    larger batch whose synchronised step ran out of memory, on the ranks in ``oom_ranks``).
    """

    optimal_batch: int
    max_batch: int
    throughput: float
    world_size: int
    limited_by: list[int] | None
    probes: int
    ooms: int
    synchronised_step: dict[str, Any] | None = None


def agreed_batch(model: Any, example_input: Any = None, *, mode: str = "train", device: str = "auto",
                 memory_budget: int | str | None = None, cap: int | None = None,
                 max_latency_s: float | None = None, timeout_s: float | None = None,
                 **options: Any) -> AgreedBatch:
    """Search the per-rank batch of a data-parallel job; call it on every rank, before the DataLoader.

    Every rank probes the same batches and ends with the same answer: the largest per-rank batch
    that fits on every rank, and the optimal one by the job's throughput. ``model`` is the rank's
    plain module, or the module wrapped in ``DistributedDataParallel`` (its synchronised step is
    then verified), not FSDP; ``example_input`` and ``options`` as for the ``optimal_batch``
    fixture. The process group is the caller's, or started from torchrun's
    environment; ``timeout_s`` bounds each wait for the other ranks. Nothing is stored: record
    baselines with ``torchrun -m pytest --autobatch``.
    """
    from .devices.agreement import DEFAULT_RANK_TIMEOUT_S
    from .devices.distributed import agreed_device
    from .record import DEFAULT_CAP, search_batches
    from .stats import median
    from .units import parse_size
    budget = None if memory_budget is None else parse_size(memory_budget, what="memory budget")
    job = agreed_device(device, memory_budget=budget, timeout_s=timeout_s or DEFAULT_RANK_TIMEOUT_S)
    workload = job.workload(model, example_input, mode=mode, **options)
    try:
        cap = DEFAULT_CAP if cap is None else cap
        limit = workload.batch_limit
        maximum, optimal = search_batches(workload, job.capacity_bytes(), max_latency_s=max_latency_s,
                                          cap=min(cap, limit) if limit is not None else cap)
    finally:
        workload.close()
    return AgreedBatch(optimal.optimal_batch, optimal.max_batch or maximum.max_batch,
                       median(optimal.measurements[optimal.optimal_batch]), job.world_size,
                       workload.limited_by(), len(maximum.probes), maximum.ooms + len(optimal.oom_batches),
                       workload.synchronised_step())
