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
    #: Geometric growth (no trustworthy fit yet) goes to this share of a rough fit's limit...
    growth_share: float = 1 / 3
    #: ...by a factor of at most this: two peaks a batch apart give the slope only within its jitter.
    growth_limit: float = 256.0
    #: A safe jump must cover this share of the distance to the predicted limit; shorter ones creep.
    min_jump_share: float = 0.75
    #: An aim at the fitted limit L lands on floor(L + this). The maximum T and T + 1 both close
    #: the search in two probes (T fits and T + 1 runs out of memory, in either order), and the
    #: true limit lies in [T, T + 1): the aim is centred on the estimate, not its floor (which lands
    #: on T - 1 whenever the estimate is a fraction low, and then creeps up a batch at a time).
    aim_offset: float = 0.5
    #: The optimal batch from a model of step time (largest batch and batch 1 first, then where
    #: the model puts the peak and the band crossing), not a sweep of every power of two.
    throughput_model: bool = True
    #: A measured batch must beat the largest by this share before the peak is searched below it,
    #: and the peak is narrowed only towards neighbours this much slower (timing noise is ~1-2%).
    peak_margin: float = 0.02
    #: Rounds of measuring again the batches within ``peak_margin`` of the best (a close call).
    decide_rounds: int = 2
    #: At most this many measurements aimed at the band crossing: the line through step times
    #: lands on it or next to it, and the band is a tolerance, not a target.
    crossing_steps: int = 3
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
    "growth_share": 0.0,          # plain doubling until the first OOM
    "min_jump_share": 1.0,        # jump only when the fit is good enough to aim
    "aim_offset": 0.0,            # aim at the floor of the fitted limit
    "throughput_model": False,    # time every power of two up to the maximum, then refine
    "peak_margin": 0.0,           # chase any batch that measured above the largest
    "decide_rounds": 0,           # the best median of one measurement each wins
    "crossing_steps": 64,         # aim at the crossing until its neighbours are close
    "peak_resolution": 2.0,       # refine the peak only to within a factor of 2
    "crossing_resolution": 2.0,   # refine the tolerance crossing only to within a factor of 2
}
