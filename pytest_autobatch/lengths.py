"""A sequence workload at each of its lengths: the checks, the inputs, and the frontier entry.

``record_frontier`` searches the maximum batch at every (prompt tokens, new tokens) point with
``search.frontier.find_frontier`` (the searches share what they learnt), times the optimal batch
at each, and returns one baseline entry: its top-level figures are the longest point's, recorded
as any entry (the worst case, what a fixed-size deployment must survive, and what the gate
re-times), and ``frontier`` holds a row per point.
``frontier_ooms`` re-runs every stored point's batches for the gate. Torch is imported only to
make token inputs; a ``SimulatedModel`` takes its lengths through ``SimulatedModel.at_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .devices.base import Device, Workload
from .errors import ConfigError, catch_oom
from .record import DEFAULT_CAP, DEFAULT_OPTIMAL_BAND, Progress, record_entry, smallest_batch
from .search import Probe, find_optimal_batch
from .search.frontier import Point, find_frontier, frontier_points


def check_points(model: Any, prompt_tokens: Any, new_tokens: Any = (0,)) -> list[Point]:
    """The frontier's points, refused with the fix when a length is not a positive integer or
    exceeds the model's ``max_position_embeddings``."""
    points = frontier_points(prompt_tokens, new_tokens)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(sum(point) for point in points)
    if isinstance(limit, int) and longest > limit:
        name = type(model).__name__
        raise ConfigError(f"{name} takes at most {limit} positions (config.max_position_embeddings), "
                          f"but the frontier asks for {longest} tokens (prompt plus new tokens): list "
                          f"lengths up to {limit}, or build the model with max_position_embeddings >= {longest}")
    return points


def token_inputs(model: Any, prompt_tokens: int, text: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """One prompt of exactly ``prompt_tokens`` tokens: ``text`` tokenized and repeated or cut to
    length, else seeded random ids below the model's vocabulary size."""
    import torch
    name = type(model).__name__
    if text is not None:
        if not isinstance(text, str):
            raise ConfigError(f"the prompt for {name} must be a string, got {type(text).__name__}")
        if tokenizer is None:
            raise ConfigError(f"a text prompt was given for {name}, which has no tokenizer here: pass "
                              f"tokenizer=<the model's tokenizer>, or leave the prompt out to run random "
                              f"token ids")
        ids = list(tokenizer(text)["input_ids"]) or [0]
        ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
        input_ids = torch.tensor([ids])
    else:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 2:
            raise ConfigError(f"{name} has no config.vocab_size to draw token ids from: give a text "
                              f"prompt and its tokenizer")
        generator = torch.Generator().manual_seed(prompt_tokens)
        input_ids = torch.randint(1, vocab, (1, prompt_tokens), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def point_workload(device: Device, model: Any, point: Point, *, mode: str, text: Any = None,
                   tokenizer: Any = None, **options: Any) -> Workload:
    """The workload at one point: a simulated model at that length, or a torch model on a prompt of
    that length generating exactly that many new tokens (``new_tokens`` 0: a forward pass)."""
    prompt, new = point
    if hasattr(model, "at_length"):
        return device.workload(model.at_length(prompt + new), mode=mode, **options)
    if new:
        options["max_new_tokens"] = new
    return device.workload(model, token_inputs(model, prompt, text, tokenizer), mode=mode, **options)


def record_frontier(device: Device, model: Any, *, name: str, prompt_tokens: Any, new_tokens: Any = (0,),
                    mode: str = "generate", cap: int | None = None, band: float = DEFAULT_OPTIMAL_BAND,
                    progress: Progress | None = None, text: Any = None, tokenizer: Any = None,
                    **options: Any) -> dict[str, Any]:
    """Search the frontier and return its baseline entry (see the module docstring).

    The longest point is recorded as any entry is (``record.record_entry``: the gate's samples, the
    speedup, the targets); its probes then start the frontier, which searches the other points."""
    points = check_points(model, prompt_tokens, new_tokens)
    cap = DEFAULT_CAP if cap is None else cap
    workloads = {point: point_workload(device, model, point, mode=mode, text=text, tokenizer=tokenizer,
                                       **options) for point in points}
    try:
        longest = max(points, key=sum)
        entry = record_entry(device, workloads[longest], model=name, cap=cap, band=band, progress=progress)
        searched = {longest: (entry["max_batch"], [Probe(row["batch"], row["peak_bytes"])
                                                   for row in entry["probes"] if row["peak_bytes"] is not None
                                                   or row["outcome"] == "oom"])}
        smallest = smallest_batch(workloads[longest])
        frontier = find_frontier(lambda point: workloads[point].probe, points, cap=cap,
                                 capacity_bytes=device.capacity_bytes(), min_batch=smallest, searched=searched,
                                 predict_at=lambda point: workloads[point].predict_peak_bytes)
        rows: list[dict[str, Any]] = []
        for found in frontier.points:
            point = (found.prompt_tokens, found.new_tokens)
            if point == longest:
                optimal_batch, throughput = entry["optimal_batch"], entry["throughput"]
            else:
                optimal = find_optimal_batch(workloads[point].measure, max_batch=found.max_batch, band=band,
                                             min_batch=smallest)
                optimal_batch, throughput = optimal.optimal_batch, optimal.throughput
            rows.append({"prompt_tokens": point[0], "new_tokens": point[1], "max_batch": found.max_batch,
                         "optimal_batch": optimal_batch, "throughput": throughput,
                         "tokens_per_s": throughput * max(point[1], 1), "probes": len(found.probes),
                         "ooms": found.ooms})
    finally:
        for workload in workloads.values():
            workload.close()
    entry["frontier"] = rows
    return entry


def frontier_ooms(device: Device, model: Any, entry: dict[str, Any], *, mode: str = "generate",
                  text: Any = None, tokenizer: Any = None, **options: Any) -> list[tuple[Point, int]]:
    """Every stored (point, batch) of a frontier entry that now runs out of memory: each row's
    optimal and maximum batch, at its length."""
    failed = []
    for row in entry.get("frontier") or ():
        point = (row["prompt_tokens"], row["new_tokens"])
        workload = point_workload(device, model, point, mode=mode, text=text, tokenizer=tokenizer, **options)
        try:
            for batch in sorted({row["optimal_batch"], row["max_batch"]}):
                with catch_oom() as caught:
                    workload.probe(batch)
                if caught.error is not None:
                    failed.append((point, batch))
                    break
        finally:
            workload.close()
    return failed


#: The options of ``optimal_batch(...)`` that make a frontier rather than a single search.
SWEEP_OPTIONS = ("prompt_tokens", "new_tokens", "text", "tokenizer")


@dataclass
class LengthSweep:
    """What a test asked a frontier of: the session records it, or gates its stored points."""

    model: Any
    mode: str
    lengths: dict[str, Any]   # SWEEP_OPTIONS given
    options: dict[str, Any] = field(default_factory=dict)   # the workload's own

    @property
    def longest(self) -> Point:
        return max(check_points(self.model, self.lengths["prompt_tokens"], self.lengths.get("new_tokens", (0,))),
                   key=sum)

    def workload(self, device: Device) -> Workload:
        """The longest point's workload: the entry's top-level figures are measured there."""
        inputs = {key: self.lengths.get(key) for key in ("text", "tokenizer")}
        return point_workload(device, self.model, self.longest, mode=self.mode, **inputs, **self.options)

    def record(self, device: Device, *, name: str, cap: int | None, progress: Progress | None) -> dict[str, Any]:
        return record_frontier(device, self.model, name=name, mode=self.mode, cap=cap, progress=progress,
                               **self.lengths, **self.options)

    def ooms(self, device: Device, entry: dict[str, Any]) -> list[tuple[Point, int]]:
        inputs = {key: self.lengths.get(key) for key in ("text", "tokenizer")}
        return frontier_ooms(device, self.model, entry, mode=self.mode, **inputs, **self.options)
