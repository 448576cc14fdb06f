"""The maximum-batch search's core state: a bracket that only an observed fit or OOM can move.

``low`` was probed and fit; ``high`` was probed and ran out of memory. Whatever the guide
suggests, ``inside`` keeps the next probe strictly between them (and within ``min_batch`` .. cap),
so every probe narrows the bracket, the search ends, and its answer is certified by two observations.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ..errors import ConfigError, OutOfMemory


@dataclass(frozen=True)
class Probe:
    """One run of ``probe``: the batch and its peak bytes, None when it ran out of memory."""

    batch: int
    peak_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.peak_bytes is not None


@dataclass
class Bracket:
    """What the probes proved: ``low`` fits (0: nothing fit yet), ``high`` does not (None: nothing
    failed yet). No batch below ``min_batch`` (the smallest the model takes) is ever probed."""

    cap: int
    capacity: int | None
    start: int | None
    min_batch: int = 1
    probes: list[Probe] = field(default_factory=list)
    peaks: dict[int, int] = field(default_factory=dict)
    low: int = 0
    high: int | None = None
    oom_streak: int = 0   # consecutive OOMs
    fit_streak: int = 0   # consecutive fits since the first OOM
    last_oom: BaseException | None = None

    @property
    def settled(self) -> bool:
        """The bracket is closed, or ``min_batch`` itself ran out of memory (nothing can fit)."""
        return self.low >= self.cap or (self.high is not None
                                        and (self.high - self.low <= 1 or self.high <= self.min_batch))

    def inside(self, guess: int) -> int:
        """``guess`` moved strictly inside the bracket (and into ``min_batch`` .. cap): every probe narrows it."""
        ceiling = self.cap if self.high is None else self.high - 1
        return min(max(guess, self.low + 1, self.min_batch), ceiling)

    def record_fit(self, batch: int, peak: object) -> None:
        checked = checked_peak(peak, batch)
        self.probes.append(Probe(batch, checked))
        self.peaks[batch] = checked
        self.low = max(self.low, batch)
        self.oom_streak = 0
        self.fit_streak += self.high is not None

    def record_oom(self, batch: int, error: BaseException) -> None:
        self.last_oom = error
        if self.capacity is None and isinstance(error, OutOfMemory) and error.available_bytes:
            self.capacity = error.available_bytes  # the device told us: guide the rest by memory
        self.probes.append(Probe(batch, None))
        self.high = batch if self.high is None else min(self.high, batch)
        self.oom_streak += 1
        self.fit_streak = 0


def checked_peak(peak: object, batch: int) -> int:
    if isinstance(peak, bool) or not isinstance(peak, numbers.Real) or not math.isfinite(peak) or peak < 0:
        raise ConfigError(f"probe({batch}) returned {peak!r}: it must return the peak memory in bytes "
                          f"(a number >= 0) and raise an out-of-memory error when the batch does not fit")
    return int(peak)  # type: ignore[call-overload]  # numbers.Real is int()-able, typeshed says otherwise
