"""The maximum-batch search: the exact largest batch that fits, in few probes.

The answer is certified, never estimated: ``max_batch`` was probed and fit, and ``max_batch + 1``
(when <= cap) was seen to run out of memory. Where to probe next is the ``Guide``'s business
(``guide.py``); whatever it says, the core keeps the probe strictly inside the bracket, so every
probe narrows it and the search ends. ``probe(b)`` returns peak bytes or raises an out-of-memory
error (``errors.is_oom_error``); any other error propagates unchanged. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError, NoBatchFits, OutOfMemory, catch_oom
from .bracket import Bracket, Probe
from .guide import Guide
from .tuning import DEFAULT, Tuning


@dataclass
class MaxBatchResult:
    """``max_batch`` fit and ``max_batch + 1`` ran out of memory (or ``max_batch`` is the cap).

    ``capacity_bytes``: the capacity the search went by, given or reported by an OOM (None: neither).
    """

    max_batch: int
    probes: list[Probe]
    ooms: int
    capacity_bytes: int | None = None

    @property
    def peak_bytes(self) -> int:
        """Peak memory measured at ``max_batch``."""
        return next(p.peak_bytes for p in self.probes if p.batch == self.max_batch and p.peak_bytes is not None)


def _attempt(probe: Callable[[int], int], bracket: Bracket, batch: int) -> bool:
    with catch_oom() as caught:
        peak = probe(batch)
    if caught.error is not None:
        bracket.record_oom(batch, caught.error)
        return False
    bracket.record_fit(batch, peak)
    return True


def find_max_batch(probe: Callable[[int], int], *, cap: int = 8192, capacity_bytes: int | None = None,
                   start: int | None = None, min_batch: int = 1, tuning: Tuning = DEFAULT,
                   predict: Callable[[int], int | None] | None = None) -> MaxBatchResult:
    """The exact largest batch <= ``cap`` that fits; see the module docstring.

    ``capacity_bytes`` (memory the search may use) lets the guide aim at the limit; ``start`` is a
    predicted maximum batch to begin from: with a capacity it is probed first and certified by its
    neighbour. ``min_batch`` is the smallest batch the model takes (2 for BatchNorm in training):
    probed first when there is no such start, and nothing below it is ever probed. ``predict(b)``:
    predicted peak bytes at b (None: unknown), the shape the guide corrects by the measured peaks
    and follows while it keeps agreeing with them. Raises NoBatchFits when ``min_batch`` does not fit.
    """
    if isinstance(min_batch, bool) or not isinstance(min_batch, int) or min_batch < 1:
        raise ConfigError(f"min_batch must be an integer >= 1 (the smallest batch the model takes), "
                          f"got {min_batch!r}")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < min_batch:
        raise ConfigError(f"cap must be an integer >= {min_batch} (the largest batch to try; the smallest "
                          f"the model takes is {min_batch}), got {cap!r}")
    if capacity_bytes is not None and not capacity_bytes > 0:
        raise ConfigError(f"capacity_bytes must be > 0 or None (unknown), got {capacity_bytes!r}")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 1):
        raise ConfigError(f"start must be an integer >= 1 or None, got {start!r}")
    bracket = Bracket(cap, capacity_bytes, start, min_batch)
    guide = Guide(bracket, tuning, predict)
    while not bracket.settled:
        _attempt(probe, bracket, bracket.inside(guide.next_batch()))
    if bracket.low == 0:  # min_batch ran out of memory (the bracket only settles at 0 when high is min_batch)
        raise NoBatchFits(_no_fit_message(bracket.last_oom, bracket.capacity, min_batch))
    return MaxBatchResult(bracket.low, bracket.probes, sum(not p.fits for p in bracket.probes),
                          bracket.capacity)


def _no_fit_message(error: BaseException | None, capacity: int | None, batch: int = 1) -> str:
    needed = error.needed_bytes if isinstance(error, OutOfMemory) else None
    available = error.available_bytes if isinstance(error, OutOfMemory) else None
    available = available if available is not None else capacity
    unit = _gib
    if needed is not None and available is not None and _gib(needed) == _gib(available):
        unit = "{:,} bytes".format
    amounts = [f"it needs {unit(needed)}"] if needed is not None else []
    if available is not None:
        amounts.append(f"{unit(available)} available")
    detail = ", ".join(amounts) if amounts else str(error)
    smallest = "" if batch == 1 else " (the smallest batch the model takes)"
    return (f"batch {batch}{smallest} does not fit in memory: {detail}. Use a smaller model, a lower precision, "
            f"or a device with more memory")


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"
