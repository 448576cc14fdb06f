"""Every tuned constant of the search, in one place, so each can be switched off and measured.

``benchmarks/bench_search.py`` runs the search once per field with that field at its "off"
value (``OFF``) and prints what it costs, so each constant earns its place by a figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tuning:
    """Where the searches probe next. None of these can make an answer wrong, only slower."""

    #: Peaks are reported in allocator blocks: two measurements closer than this say nothing about slope.
    memory_granularity_bytes: int = 2 << 20
    #: With a start and a capacity, probe the start first (certified by its neighbour), not batch 1.
    start_first: bool = True
    #: After the start ran out of memory, probe this share below it before falling back to batch 1
    #: (a prediction 30% low puts the start ~43% high; the corrected prediction aims from there).
    start_backoff: float = 0.4
    #: Follow the workload's prediction, corrected by the measured peaks, while it agrees with them.
    trust_prediction: bool = True
    #: Fraction of a ``start`` prediction probed first: memory predicted ~30% low puts it ~43% high.
    start_safety: float = 0.7
    #: Share of the memory at the limit assumed to grow with batch squared when only a line is fitted.
    curvature_prior: float = 0.5
    #: Weight of the shift-one-peak view of the fit's error (a fit resting on a few noisy points).
    leverage_weight: float = 0.25
    #: Peaks this many batches apart at least tell curvature from jitter (up to one sample each).
    curvature_spread: int = 2
    #: After an OOM the next guess backs off at least this share of the bracket: an aim that
    #: overshot by a few batches would otherwise walk down one OOM at a time.
    oom_backoff_share: float = 1 / 32
    #: Geometric growth (no trustworthy fit yet) goes to this share of a rough fit's limit...
    growth_share: float = 1 / 3
    #: ...by a factor of at most this: two peaks a batch apart give the slope only within its jitter.
    growth_limit: float = 256.0
    #: A safe jump must cover this share of the distance to the predicted limit; shorter ones creep.
    min_jump_share: float = 0.75
    #: The optimal-batch refinement stops once neighbouring measured batches are this close (ratio)
    #: around the peak, and around the tolerance crossing.
    peak_resolution: float = 1.05
    crossing_resolution: float = 1.1


DEFAULT = Tuning()

#: The value that switches each heuristic off (the plain behaviour it refines).
OFF: dict[str, object] = {
    "start_first": False,         # batch 1 first, then a safe share of the start
    "start_backoff": 0.0,         # after the start ran out of memory, batch 1 next
    "trust_prediction": False,    # the fitted search only, whatever the prediction
    "start_safety": 1.0,          # probe the predicted start itself
    "curvature_prior": 0.0,       # trust a line fitted through the peaks
    "leverage_weight": 0.0,       # judge the fit by its slope error alone
    "curvature_spread": 1,        # fit a parabola through any three peaks
    "oom_backoff_share": 0.0,     # after an OOM, back off by the surprise count only
    "growth_share": 0.0,          # plain doubling until the first OOM
    "min_jump_share": 1.0,        # jump only when the fit is good enough to aim
    "peak_resolution": 2.0,       # refine the peak only to within a factor of 2
    "crossing_resolution": 2.0,   # refine the tolerance crossing only to within a factor of 2
}
