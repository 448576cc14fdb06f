"""torch.distributed under the agreed search (``agreement.py``): how the ranks' outcomes travel.

Each step of the search, every rank first marks its arrival in the job's key-value store (the one
torchrun or ``init_process_group`` set up) and waits, with a timeout, for every other rank's mark:
a rank that is killed, hung, or busy elsewhere is named in the error instead of leaving the others
blocked in a collective. Only then do the outcomes travel, in an ``all_gather_object`` on a gloo
group of their own: a few hundred bytes on the CPU, so an NCCL job's GPU streams are never touched
and a CUDA error on one rank cannot hang the exchange.
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .agreement import DEFAULT_RANK_TIMEOUT_S, AgreedDevice, RankSilent, launched_distributed
from .base import Device


def _initialised_group() -> None:
    """The default process group: the caller's, or one started from torchrun's environment."""
    if not dist.is_available():
        raise ConfigError(f"a distributed batch search needs torch.distributed, which this torch "
                          f"({torch.__version__}) was built without")
    if dist.is_initialized():
        return
    if not launched_distributed():
        raise ConfigError("a distributed batch search was asked for, but the torch.distributed process "
                          "group is not initialised and this is not a torchrun job: call "
                          "torch.distributed.init_process_group(...) first, or launch with "
                          "torchrun --nproc-per-node=N")
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


class TorchExchange:
    """Implements ``agreement.Exchange`` over the default process group's store and a gloo group."""

    def __init__(self, timeout_s: float = DEFAULT_RANK_TIMEOUT_S):
        if not timeout_s > 0:
            raise ConfigError(f"the rank timeout must be > 0 seconds, got {timeout_s!r}")
        _initialised_group()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = str(dist.get_backend())
        self.timeout = timedelta(seconds=timeout_s)
        self.store = dist.distributed_c10d._get_default_store()
        group = dist.new_group(backend="gloo", timeout=self.timeout)
        assert isinstance(group, dist.ProcessGroup)   # every rank is a member
        self.group = group
        names = [uuid.uuid4().hex]
        dist.broadcast_object_list(names, src=0, group=self.group)
        self.prefix = f"pytest-autobatch/{names[0]}"   # keys of earlier searches in the job never match
        self.steps = 0

    def gather(self, step: str, value: Any) -> list[Any]:
        number = self.steps
        self.steps += 1
        keys = [f"{self.prefix}/{number}/{rank}" for rank in range(self.world_size)]
        self._store(lambda: self.store.set(keys[self.rank], step), step)
        try:
            self.store.wait(keys, self.timeout)
        except Exception:   # the store's timeout error differs between torch versions
            missing = self._store(lambda: [rank for rank, key in enumerate(keys) if not self.store.check([key])], step)
            silent = (("rank " if len(missing) == 1 else "ranks ") + ", ".join(map(str, missing))) if missing \
                else "a rank"
            raise RankSilent(f"{silent} did not reach the batch search's step {number} ({step}) within "
                             f"{self.timeout.total_seconds():g} s (seen from rank {self.rank}): that rank was "
                             "killed, hung, or is running other code (a test or script that does not call "
                             "the search on every rank); see its output") from None
        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, (step, value), group=self.group)
        except Exception as error:
            raise RankSilent(f"rank {self.rank}: the exchange of step {number} ({step}) broke off: "
                             f"{error}; a rank died during it (see the ranks' output)") from None
        steps = {rank: other_step for rank, (other_step, _) in enumerate(gathered)}
        if len(set(steps.values())) > 1:
            raise RankSilent(f"the ranks are out of step at step {number}: "
                             + "; ".join(f"rank {rank} is {what}" for rank, what in steps.items())
                             + ": every rank must make the same search calls in the same order")
        return [shared for _, shared in gathered]

    def _store(self, call: Callable[[], Any], step: str) -> Any:
        try:
            return call()
        except Exception as error:
            raise RankSilent(f"rank {self.rank}: lost the job's rendezvous store while {step} ({error}): "
                             "rank 0 (or the torchrun agent) that holds it is gone") from None


def local_device_spec(spec: str, environ: Any = os.environ) -> str:
    """Each rank's own GPU: "auto" and "cuda" become cuda:LOCAL_RANK; anything else stays."""
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(environ.get('LOCAL_RANK', 0))}"
    return spec


def agreed_device(spec: str = "auto", *, memory_budget: int | None = None,
                  make_device: Callable[..., Device] | None = None,
                  timeout_s: float = DEFAULT_RANK_TIMEOUT_S) -> AgreedDevice:
    """This rank's device for ``spec``, wrapped so that every search on it is agreed by all ranks."""
    exchange = TorchExchange(timeout_s)
    if make_device is None:
        from . import get_device
        make_device = get_device
    local = make_device(local_device_spec(spec), memory_budget=memory_budget)
    return AgreedDevice(local, exchange)
