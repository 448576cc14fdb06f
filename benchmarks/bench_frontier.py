"""Benchmark of the batch-by-length frontier against one independent search per length.

    python benchmarks/bench_frontier.py --sim [--frontiers 200] [--seed 0] [--prediction-drift 0.3]
    python benchmarks/bench_frontier.py --cpu [--budget-mib 48]

``--sim``: seeded random frontiers on the simulated GPUs (5 lengths spanning 8x; memory per
sample split at random into a constant, a per-token and a per-token-squared part; half with
memory curving with the batch too, half with jitter; each model's prediction off by one factor
at every length, or with ``--prediction-drift`` by a factor that moves across the lengths).
``--cpu``: a Llama-style model from a LlamaConfig (random weights) generating 8 tokens after
prompts of 16 to 128 tokens, on the CPU under a memory budget. Each prints, per length, the
frontier's maximum batch, whether an independent ``find_max_batch`` at that length agrees (and,
on the simulator, the true maximum), the probes and OOMs of both, and the totals. A script, not
a pytest module.

Measured (every length exact on both): ``--sim`` 11.71 probes per frontier against 27.41 (0.43),
one OOM at every length (seeds 1-3 with ``--frontiers 500``: 0.43-0.45, one OOM each); with
``--prediction-drift 0.3`` 14.21 against 27.80 (0.51), 1.06 OOMs per length, 63 of 1000 with two;
``--cpu`` 14 probes against 17, one OOM per length.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_search import CountingProbe  # noqa: E402

from pytest_autobatch.devices.simulated import PROFILES, SimulatedDevice, SimulatedModel  # noqa: E402
from pytest_autobatch.search import find_max_batch, predicted_max_batch  # noqa: E402
from pytest_autobatch.search.frontier import Point, find_frontier, frontier_points  # noqa: E402

CAP = 8192
MIB = 1 << 20


def random_frontier(rng: random.Random, index: int) -> tuple[SimulatedDevice, SimulatedModel, list[int]]:
    """A simulated model and 5 prompt lengths from L to 8L (L from 1 to 256 tokens)."""
    device = SimulatedDevice(rng.choice(sorted(PROFILES)), seed=index)
    capacity = device.capacity_bytes()
    weights = int(capacity * rng.uniform(0.05, 0.6))
    shortest = rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 256])
    lengths = sorted({shortest, 8 * shortest, *rng.sample([shortest * k for k in range(2, 8)], 3)})
    longest = 8 * shortest
    max_at_longest = math.exp(rng.uniform(math.log(2), math.log(2000)))
    per_sample = (capacity - weights) / max_at_longest
    shares = [rng.random(), rng.random(), rng.random() * rng.choice([0, 1])]
    constant, per_token, per_token_squared = (share / sum(shares) * per_sample for share in shares)
    model = SimulatedModel(
        f"frontier-{index}", weights, int(constant) + 1, 1e9, token_bytes=per_token / longest,
        token_squared_bytes=per_token_squared / longest ** 2,
        curvature_bytes=rng.choice([0.0, 0.1 * per_sample / max_at_longest]),
        memory_jitter=rng.choice([0.0, rng.random()]), prediction_error=rng.uniform(-0.3, 0.3), seed=index)
    return device, model, lengths


def independent(workload: Any, capacity: int, cap: int) -> tuple[int, CountingProbe]:
    """find_max_batch at one length, started from the workload's prediction as record_entry does."""
    probe = CountingProbe(workload)
    start = predicted_max_batch(workload.predict_peak_bytes, capacity, cap)
    return find_max_batch(probe, cap=cap, capacity_bytes=capacity, start=start or None).max_batch, probe


def compare(points: list[Point], workload_at: Callable[[Point], Any], capacity: int, cap: int,
            truth: Callable[[Point], int] | None = None) -> list[dict[str, Any]]:
    """The frontier and the independent searches at ``points``: one row per point."""
    workloads = {point: workload_at(point) for point in points}
    probes = {point: CountingProbe(workloads[point]) for point in points}
    longest = max(points, key=sum)
    start = predicted_max_batch(workloads[longest].predict_peak_bytes, capacity, cap)
    frontier = find_frontier(lambda point: probes[point], points, cap=cap, capacity_bytes=capacity,
                             start=start or None, predict_at=lambda point: workloads[point].predict_peak_bytes)
    rows = []
    for found in frontier.points:
        point = (found.prompt_tokens, found.new_tokens)
        alone, alone_probe = independent(workload_at(point), capacity, cap)
        rows.append({"point": point, "frontier": found.max_batch, "independent": alone,
                     "true": truth(point) if truth else None, "probes": len(found.probes), "ooms": found.ooms,
                     "alone_probes": alone_probe.runs, "alone_ooms": alone_probe.ooms,
                     "counted": probes[point].runs})
    return rows


def drifting(rng: random.Random, model: SimulatedModel, lengths: list[int],
             drift: float) -> Callable[[int], SimulatedModel]:
    """The model at each length, its prediction error moved by up to ``drift`` at the shortest and at
    the longest length (each drawn at random), linearly in log length between: a prediction that is
    not off by the same factor at every length."""
    shortest, longest = min(lengths), max(lengths)
    moves = rng.uniform(-drift, drift), rng.uniform(-drift, drift)

    def at(tokens: int) -> SimulatedModel:
        share = math.log(tokens / shortest) / math.log(longest / shortest)
        error = model.prediction_error + moves[0] + (moves[1] - moves[0]) * share
        return dataclasses.replace(model.at_length(tokens), prediction_error=error)
    return at


def simulated(frontiers: int, seed: int, drift: float) -> None:
    rng = random.Random(seed)
    drifts = random.Random(f"drift:{seed}")
    groups: dict[str, list[list[dict[str, Any]]]] = {"all": [], "memory linear in the batch": [],
                                                      "memory curving with the batch": []}
    for index in range(frontiers):
        device, model, lengths = random_frontier(rng, index)
        model_at = drifting(drifts, model, lengths, drift)

        def workload_at(point: Point, device: SimulatedDevice = device,
                        model_at: Callable[[int], SimulatedModel] = model_at) -> Any:
            return device.workload(model_at(sum(point)))

        rows = compare(frontier_points(lengths), workload_at, device.capacity_bytes(), CAP,
                       truth=lambda point: workload_at(point).true_max_batch(CAP))
        groups["all"].append(rows)
        groups["memory curving with the batch" if model.curvature_bytes else "memory linear in the batch"].append(rows)
    drifted = f", prediction error drifting by up to {drift:.0%} across the lengths" if drift else ""
    print(f"{frontiers} random frontiers of 5 lengths spanning 8x on the simulated GPUs (seed {seed}{drifted})\n")
    print("| frontiers | lengths | exact (true maximum) | same as independent | probes per frontier: frontier "
          "/ independent | ratio | ratio median, p90 | OOMs per length: mean, worst, lengths with > 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, frontiers_rows in groups.items():
        rows = [row for frontier in frontiers_rows for row in frontier]
        ratios = sorted(sum(row["probes"] for row in frontier) / sum(row["alone_probes"] for row in frontier)
                        for frontier in frontiers_rows)
        probes = sum(row["probes"] for row in rows)
        alone = sum(row["alone_probes"] for row in rows)
        count = len(frontiers_rows)
        print(f"| {label} ({count}) | {len(rows)} | {sum(row['frontier'] == row['true'] for row in rows)} "
              f"| {sum(row['frontier'] == row['independent'] for row in rows)} | {probes / count:.2f} / "
              f"{alone / count:.2f} | {probes / alone:.2f} | {ratios[len(ratios) // 2]:.2f}, "
              f"{ratios[int(0.9 * len(ratios))]:.2f} | {sum(row['ooms'] for row in rows) / len(rows):.2f}, "
              f"{max(row['ooms'] for row in rows)}, {sum(row['ooms'] > 1 for row in rows)} |")


def cpu(budget_mib: int) -> None:
    import torch
    import transformers

    from pytest_autobatch.devices import get_device
    from pytest_autobatch.lengths import point_workload

    torch.manual_seed(0)
    prompts, new_tokens = [16, 32, 48, 64, 96, 128], [8]
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    device = get_device("cpu", memory_budget=budget_mib * MIB)
    timing = {"warmup_s": 0.0, "warmup_iterations": 1, "block_s": 0.01, "min_blocks": 1, "max_blocks": 1}

    def workload_at(point: Point) -> Any:
        return point_workload(device, model, point, mode="generate", timing=timing)

    # The CPU device's capacity is its budget.
    rows = compare(frontier_points(prompts, new_tokens), workload_at, budget_mib * MIB, 1024)
    print(f"Llama-style LM (2 layers, hidden 128, vocab 1024, random weights), greedy generation of "
          f"{new_tokens[0]} tokens, CPU under a {budget_mib} MiB budget\n")
    print("| prompt + new tokens | max batch (frontier) | independent search | probes (frontier) | OOMs (frontier) "
          "| probes (independent) | OOMs (independent) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        prompt, new = row["point"]
        print(f"| {prompt} + {new} | {row['frontier']} | {row['independent']} | {row['probes']} | {row['ooms']} "
              f"| {row['alone_probes']} | {row['alone_ooms']} |")
    probes = sum(row["probes"] for row in rows)
    alone = sum(row["alone_probes"] for row in rows)
    print(f"| total | {sum(row['frontier'] == row['independent'] for row in rows)}/{len(rows)} agree | | {probes} "
          f"| {sum(row['ooms'] for row in rows)} | {alone} | {sum(row['alone_ooms'] for row in rows)} |")
    print(f"\nprobes: frontier / independent searches = {probes / alone:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sim", action="store_true", help="random frontiers on the simulated GPUs")
    parser.add_argument("--cpu", action="store_true", help="a Llama-style model on the CPU")
    parser.add_argument("--frontiers", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction-drift", type=float, default=0.0,
                        help="move each frontier's prediction error by up to this much across its lengths")
    parser.add_argument("--budget-mib", type=int, default=48)
    args = parser.parse_args()
    if args.sim or not args.cpu:
        simulated(args.frontiers, args.seed, args.prediction_drift)
    if args.cpu:
        cpu(args.budget_mib)


if __name__ == "__main__":
    main()
