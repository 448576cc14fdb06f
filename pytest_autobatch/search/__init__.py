"""The batch-size search: the exact maximum batch that fits, and the batch with the best throughput.

Neither search knows what it runs: ``probe(b)`` returns peak bytes or raises an out-of-memory
error, ``measure(b)`` returns throughput samples. No torch here.

- ``bracket``: the maximum search's certified core (what fit, what did not);
- ``guide`` and ``memory_fit``: where to probe next, from memory fitted against batch;
- ``max_batch``: ``find_max_batch``; ``optimal_batch``: ``find_optimal_batch``;
- ``tuning``: every tuned constant, switchable for the ablation benchmark.
"""

from __future__ import annotations

from .bracket import Probe
from .guide import predicted_max_batch
from .max_batch import MaxBatchResult, find_max_batch
from .optimal_batch import OptimalBatchResult, find_optimal_batch
from .tuning import DEFAULT, OFF, Tuning

__all__ = ["DEFAULT", "OFF", "MaxBatchResult", "OptimalBatchResult", "Probe", "Tuning", "find_max_batch",
           "find_optimal_batch", "predicted_max_batch"]
