"""A search that every rank of a data-parallel job agrees on, over any device.

``AgreedDevice`` wraps one rank's device so that each call the search makes on it (a probe, a
timing, a prediction, the capacity) runs on every rank and the outcomes are combined before any
rank moves on: an out-of-memory error on any rank is one for all, the peak is the largest rank's,
the capacity the smallest rank's, throughput is summed over ranks (the job's samples/s). So the
unchanged searches in ``search/`` take the same steps on every rank and end with the same answer:
the largest per-rank batch that fits on every rank, the optimal one by the job's throughput.

A probe runs the rank's own step with no collective inside it (a DDP model's under ``no_sync()``),
so a rank that runs out of memory cannot leave another waiting in a gradient all-reduce; only the
small outcome exchange is shared. A DDP training step is then verified at the maximum found: every
rank arrives (with the timeout), runs one synchronised step, and the search steps down, agreed,
while that step runs out of memory on any rank (``synchronised_probe``).
A rank that raises anything else stops every rank: it re-raises its own error, the others raise
``RankFailed`` naming it. How the outcomes travel (and the timeout naming a silent rank) is the
``Exchange``'s business: ``distributed.py`` implements it on torch.distributed. No torch here.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

from ..baselines import BaselineStore, module_key, split_entry_key
from ..errors import AutobatchError, ConfigError, OutOfMemory, is_oom_error
from .base import Device, PairedSamples, Workload, stable_hash

_Local = TypeVar("_Local")

#: How long a rank waits for the others at each step of the search: longer than the slowest
#: rank's probe or timing block, short enough that a dead rank is reported while someone watches.
DEFAULT_RANK_TIMEOUT_S = 300.0

_LAUNCHER_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_distributed(environ: Any = os.environ) -> bool:
    """True under torchrun (or another launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    return all(name in environ for name in _LAUNCHER_ENVIRONMENT)


class RankFailed(AutobatchError):
    """Another rank raised an error that is not an out-of-memory error; every rank stopped."""


class RankSilent(AutobatchError):
    """A rank did not reach a step of the search in time: killed, hung, or running something else."""


class RanksDiffer(ConfigError):
    """The ranks were given different models or inputs, so no batch can be agreed for them."""


class RanksOutOfMemory(OutOfMemory):
    """A batch ran out of memory on ``ranks`` (and so counts as out of memory on every rank)."""

    def __init__(self, message: str, *, ranks: list[int], batch: int | None, needed_bytes: int | None,
                 available_bytes: int | None, limit: str):
        super().__init__(message, batch=batch, needed_bytes=needed_bytes, available_bytes=available_bytes,
                         limit=limit)
        self.ranks = ranks


class Exchange(Protocol):
    """Every rank's value at one step of the search, in rank order."""

    rank: int
    world_size: int
    backend: str

    def gather(self, step: str, value: Any) -> list[Any]:
        """All ranks' ``value`` for ``step``; RankSilent names the ranks that do not arrive in time."""


@dataclass(frozen=True)
class _Outcome:
    """What one rank's call came to: ``kind`` "ok" (with ``shared``), "oom" or "error"."""

    kind: str
    shared: Any = None
    error: str = ""
    batch: int | None = None
    needed_bytes: int | None = None
    available_bytes: int | None = None
    limit: str = "device"


def _describe(error: BaseException) -> str:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first_line}"


def describe_ranks(ranks: list[int]) -> str:
    """"rank 1" or "ranks 0, 2"."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def agreed(exchange: Exchange, step: str, action: Callable[[], _Local],
           share: Callable[[_Local], Any] = lambda value: value) -> tuple[_Local, list[Any]]:
    """Run ``action`` on this rank, then agree: (this rank's result, every rank's ``share`` of it).

    An OOM on any rank raises RanksOutOfMemory on every rank; another error on a rank is re-raised
    there unchanged, and raised as RankFailed naming that rank on the others.
    """
    local: Any = None
    own_error: Exception | None = None
    try:
        local = action()
        outcome = _Outcome("ok", share(local))
    except Exception as error:   # every rank must reach the exchange, whatever happened here
        if is_oom_error(error):
            outcome = _Outcome("oom", error=_describe(error), batch=getattr(error, "batch", None),
                               needed_bytes=getattr(error, "needed_bytes", None),
                               available_bytes=getattr(error, "available_bytes", None),
                               limit=getattr(error, "limit", "device"))
        else:
            outcome = _Outcome("error", error=_describe(error))
        own_error = error
    outcomes: list[_Outcome] = exchange.gather(step, outcome)
    failed = [rank for rank, other in enumerate(outcomes) if other.kind == "error"]
    if failed:
        if own_error is not None and not is_oom_error(own_error):
            raise own_error
        raise RankFailed(f"{describe_ranks(failed)} raised {outcomes[failed[0]].error} while {step}; every rank "
                         f"stopped (rank {failed[0]}'s output has the traceback)") from None
    ooms = [rank for rank, other in enumerate(outcomes) if other.kind == "oom"]
    if ooms:
        first = outcomes[ooms[0]]
        raise RanksOutOfMemory(f"{step}: out of memory on {describe_ranks(ooms)} of {exchange.world_size} "
                               f"({first.error})", ranks=ooms, batch=first.batch, needed_bytes=first.needed_bytes,
                               available_bytes=first.available_bytes, limit=first.limit) from own_error
    return local, [other.shared for other in outcomes]


def _job_samples(per_rank: list[list[float]]) -> list[float]:
    """The job's throughput per timed block: the ranks' samples summed, block by block."""
    blocks = min(len(samples) for samples in per_rank)
    return [sum(samples[block] for samples in per_rank) for block in range(blocks)]


def _fingerprint_difference(first: dict[str, Any], other: dict[str, Any]) -> str:
    fields = sorted(name for name in set(first) | set(other) if first.get(name) != other.get(name))
    return "; ".join(f"{name} {first.get(name)!r} vs {other.get(name)!r}" for name in fields[:4])


class AgreedWorkload:
    """Implements ``Workload`` for one rank; every call is agreed with the other ranks."""

    def __init__(self, exchange: Exchange, build: Callable[[], Workload]):
        self.exchange = exchange
        built: list[Workload] = []

        def prepare() -> Workload:
            built.append(build())
            return built[0]

        def summary(workload: Workload) -> tuple[dict[str, Any], int, int | None]:
            limit = getattr(workload, "batch_limit", None)
            return workload.fingerprint(), getattr(workload, "min_batch", 1), limit

        try:
            self.inner, shared = agreed(exchange, "preparing the workload", prepare, summary)
        except AutobatchError:
            for workload in built:
                workload.close()
            raise
        fingerprints = [fingerprint for fingerprint, _, _ in shared]
        differing = [rank for rank, fingerprint in enumerate(fingerprints)
                     if stable_hash(fingerprint) != stable_hash(fingerprints[0])]
        if differing:
            self.inner.close()
            raise RanksDiffer(f"rank 0 and {describe_ranks(differing)} were given different models or inputs "
                              f"({_fingerprint_difference(fingerprints[0], fingerprints[differing[0]])}): "
                              "every rank of a data-parallel job must search the same model on the same "
                              "per-sample inputs; build them the same way (same seed, config and shapes)")
        self.min_batch: int = max(smallest for _, smallest, _ in shared)
        limits = [limit for _, _, limit in shared if limit is not None]
        self.batch_limit: int | None = min(limits) if limits else None
        #: peak bytes per rank of every batch that fit on all ranks; the ranks that ran out at the others
        self.peaks_by_rank: dict[int, list[int]] = {}
        self.oom_ranks: dict[int, list[int]] = {}
        #: the same for synchronised steps (DDP's gradient all-reduce included); None: no DDP training step
        self._synchronising: Any = self.inner if getattr(self.inner, "synchronises_gradients", False) else None
        self.synchronised_probe = self._probe_synchronised if self._synchronising is not None else None
        self.synchronised_peaks_by_rank: dict[int, list[int]] = {}
        self.synchronised_oom_ranks: dict[int, list[int]] = {}

    def _agreed(self, step: str, action: Callable[[], Any]) -> list[Any]:
        return agreed(self.exchange, step, action)[1]

    def fingerprint(self) -> dict[str, Any]:
        return self.inner.fingerprint()   # the same on every rank: checked when prepared

    def predict_peak_bytes(self, batch: int) -> int | None:
        predictions = self._agreed(f"predicting batch {batch}", lambda: self.inner.predict_peak_bytes(batch))
        return None if None in predictions else max(predictions)

    def probe(self, batch: int) -> int:
        return self._probe(f"probing batch {batch}", batch, self.inner.probe, self.peaks_by_rank, self.oom_ranks)

    def _probe_synchronised(self, batch: int) -> int:
        """One synchronised training step on every rank; every rank has arrived (within the timeout)
        before any enters DDP's all-reduce, so a silent rank is named instead of waited for."""
        self.exchange.gather(f"arriving at the synchronised step at batch {batch}", None)
        try:
            return self._probe(f"running a synchronised step at batch {batch}", batch,
                               self._synchronising.probe_synchronised, self.synchronised_peaks_by_rank,
                               self.synchronised_oom_ranks)
        except RanksOutOfMemory:
            self._synchronising.reset_synchronisation()
            raise

    def _probe(self, step: str, batch: int, probe: Callable[[int], int], peaks_by_rank: dict[int, list[int]],
               oom_ranks: dict[int, list[int]]) -> int:
        try:
            peaks = self._agreed(step, lambda: probe(batch))
        except RanksOutOfMemory as error:
            oom_ranks[batch] = error.ranks
            raise
        peaks_by_rank[batch] = peaks
        return max(peaks)

    def measure(self, batch: int) -> list[float]:
        return _job_samples(self._agreed(f"timing batch {batch}", lambda: self.inner.measure(batch)))

    def measure_paired(self, batch: int, blocks: int) -> PairedSamples:
        paired: list[PairedSamples] = self._agreed(f"timing batch {batch} beside the reference",
                                                   lambda: self.inner.measure_paired(batch, blocks))
        unsteady = [f"rank {rank}: {reason}" for rank, samples in enumerate(paired) for reason in samples.unsteady]
        parts = {part: _job_samples([samples.reference_parts[part] for samples in paired])
                 for part in paired[0].reference_parts}
        return PairedSamples(_job_samples([samples.model for samples in paired]),
                             _job_samples([samples.reference for samples in paired]), unsteady,
                             paired[0].reference_kind, parts)

    def limited_by(self) -> list[int] | None:
        """The ranks that ran out of memory just above the largest batch that fit on all: the ranks
        that set the maximum (None when no batch above it was seen to run out)."""
        largest = max(self.peaks_by_rank, default=0)
        above = [batch for batch in self.oom_ranks if batch > largest]
        return self.oom_ranks[min(above)] if above else None

    def extras(self, batch: int) -> dict[str, Any]:
        """Rank 0's figures at ``batch``, with the job's: every rank's peak, which ranks set the maximum."""
        first = self._agreed(f"collecting figures at batch {batch}", lambda: self.inner.extras(batch))[0]
        ranks = {"world_size": self.exchange.world_size, "backend": self.exchange.backend,
                 "peak_bytes_by_rank": self.peaks_by_rank.get(batch), "limited_by": self.limited_by(),
                 "oom_ranks": {str(b): ranks for b, ranks in sorted(self.oom_ranks.items())}}
        if self.synchronised_probe is not None:
            ranks["synchronised_step"] = self.synchronised_step()
        return {**first, "ranks": ranks}

    def synchronised_step(self) -> dict[str, Any] | None:
        """The verified synchronised step: its batch (the largest that fit), every rank's peak there,
        the batch it stepped down from and the ranks that ran out of memory (None: never run)."""
        if not self.synchronised_peaks_by_rank and not self.synchronised_oom_ranks:
            return None
        batch = max(self.synchronised_peaks_by_rank, default=None)
        peaks = self.synchronised_peaks_by_rank.get(batch) if batch is not None else None
        return {"batch": batch, "peak_bytes": max(peaks) if peaks else None, "peak_bytes_by_rank": peaks,
                "stepped_down_from": max(self.synchronised_oom_ranks, default=None),
                "oom_ranks": {str(b): ranks for b, ranks in sorted(self.synchronised_oom_ranks.items())}}

    def close(self) -> None:
        self.inner.close()


#: Sharded wrappers, whose every step gathers parameters with collectives (FSDP2's classes are named FSDP<Module>).
_SHARDED_WRAPPERS = ("FullyShardedDataParallel",)


class AgreedDevice:
    """Implements ``Device`` for one rank of a job: the job's hardware, the tightest rank's capacity."""

    def __init__(self, inner: Device, exchange: Exchange):
        self.inner = inner
        self.exchange = exchange
        self.rank = exchange.rank
        self.world_size = exchange.world_size
        self.name = f"{inner.name} x{exchange.world_size} ranks"
        self._hardware: dict[str, Any] | None = None

    def hardware(self) -> dict[str, Any]:
        """Rank 0's fields (what the gate notes changes of), the world size, and every rank's own
        with its key (the job's key is made of them)."""
        if self._hardware is None:
            ranks = agreed(self.exchange, "describing the hardware",
                           lambda: {**self.inner.hardware(), "hardware_key": self.inner.hardware_key()})[1]
            self._hardware = {**ranks[0], "device": "distributed", "world_size": self.world_size,
                              "backend": self.exchange.backend, "ranks": ranks}
        return self._hardware

    def hardware_key(self) -> str:
        from .hardware import key_of_hardware
        return key_of_hardware(self.hardware())

    def capacity_bytes(self) -> int | None:
        capacities = agreed(self.exchange, "reading free memory", self.inner.capacity_bytes)[1]
        return None if None in capacities else min(capacities)

    def workload(self, model: Any, example_input: Any = None, *, mode: str = "inference",
                 **options: Any) -> AgreedWorkload:
        wrapper = type(model).__name__
        if wrapper in _SHARDED_WRAPPERS or wrapper.startswith("FSDP"):
            raise ConfigError(f"the agreed search cannot search a {wrapper}: every FSDP step gathers parameters "
                              "with collectives, even its forward pass, so no probe of it can run without one and "
                              "a rank that ran out of memory would leave the others waiting (and it is not "
                              "verified here). Search the plain module (it holds every parameter, gradient and "
                              "optimizer state that FSDP shards, so its batch is a conservative one for FSDP), or "
                              "the module wrapped in DistributedDataParallel, then wrap it in FSDP")
        return AgreedWorkload(self.exchange, lambda: self.inner.workload(model, example_input, mode=mode,
                                                                         **options))

    def baseline_store(self, root: Any, hardware_key: str, hardware: dict[str, Any]) -> "RankZeroStore":
        return RankZeroStore(root, hardware_key, hardware, exchange=self.exchange)


class _NoLock:
    """What ranks other than 0 hold while rank 0 holds the search lock: nothing to wait for."""

    contended = False

    def __enter__(self) -> "_NoLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


class RankZeroStore(BaselineStore):
    """Baselines of a distributed job: rank 0 reads, locks and writes; every rank gets rank 0's view,
    so all ranks take the same branch (search or re-measure) and no two processes write one file."""

    def __init__(self, root: Any, hardware_key: str, hardware: dict[str, Any], *, exchange: Exchange):
        super().__init__(root, hardware_key, hardware)
        self.exchange = exchange

    def _from_rank_zero(self, step: str, read: Callable[[], _Local]) -> _Local:
        value: _Local = agreed(self.exchange, step, lambda: read() if self.exchange.rank == 0 else None)[1][0]
        return value

    def get(self, key: str) -> dict[str, Any] | None:
        return self._from_rank_zero(f"reading the baseline of {key}", lambda: self._get_noting_other_jobs(key))

    def _get_noting_other_jobs(self, key: str) -> dict[str, Any] | None:
        """The entry; when there is none, a warning naming the other jobs (world sizes, devices) that have one."""
        entry = super().get(key)
        if entry is None:
            module = module_key(split_entry_key(key)[0])
            others = []
            for folder in sorted(self.root.glob("world*")):
                try:
                    other = BaselineStore(self.root, folder.name)
                    if folder.name != self.hardware_key and key in other.entries(module):
                        others.append(folder.name)
                except AutobatchError:
                    continue   # another job's unreadable file is that job's business
            if others:
                warnings.warn(f"pytest-autobatch: {key} has baselines for other jobs ({', '.join(others)}) but "
                              f"none for this one ({self.hardware_key}): the world size or a rank's device "
                              "changed, so this job is searched and recorded as a new baseline", stacklevel=2)
        return entry

    def recorded_hardware(self, key: str) -> dict[str, Any]:
        return self._from_rank_zero(f"reading the hardware of {key}",
                                    lambda: super(RankZeroStore, self).recorded_hardware(key))

    def put(self, key: str, entry: dict[str, Any], *, now: bool = True) -> Any:
        return super().put(key, entry, now=now) if self.exchange.rank == 0 else self.path_for_key(key)

    def flush(self) -> list[Any]:
        return super().flush() if self.exchange.rank == 0 else []

    def migrate(self) -> list[str]:
        return super().migrate() if self.exchange.rank == 0 else []

    def search_lock(self, key: str) -> Any:
        return super().search_lock(key) if self.exchange.rank == 0 else _NoLock()
