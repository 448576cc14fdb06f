"""The one schema of a baseline file, checked on every read, in this one place.

A document is ``{"schema": SCHEMA, "hardware_key": ..., "hardware": {...}, "entries": {key: entry}}``
(see DESIGN.md). ``parse_document`` checks the whole document and turns each entry into an
``Entry``: types, ranges and finiteness of every known field. Unknown fields are kept as they are
(newer writers add calibration and fingerprint fields); to check a new field, add one line to
``_FIELDS``. Any violation is a BaselineError naming the file, the entry, the field, the value and
the fix. Standard library only: this runs whenever baselines are read, also from
``stored_optimal_batch`` in production code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import BaselineError, printable

#: The schema this version writes. Older files with no difference that matters are read as is;
#: a newer one is refused, naming its version.
SCHEMA = 1

#: Largest batch any entry may hold when it names no cap (far above any real batch).
MAX_BATCH = 2**31

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

FIX = ("fix the value by hand, restore the file from version control (git checkout -- FILE), "
       "or re-record the entry with pytest --autobatch --autobatch-update")


class EntryProblem(ValueError):
    """One field of one entry is wrong: raised by the checks, turned into a BaselineError."""

    def __init__(self, field: str, value: Any, problem: str):
        super().__init__(problem)
        self.field = field
        self.value = value
        self.problem = problem


@dataclass(frozen=True)
class Entry:
    """The checked figures of one entry; ``data`` is the whole entry, unknown fields included."""

    key: str
    model: str
    optimal_batch: int
    max_batch: int
    cap: int | None
    throughput: float
    throughput_samples: tuple[float, ...]
    peak_memory_bytes: int | None
    data: dict[str, Any]


# ---- field checks: each returns nothing and raises EntryProblem ---------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _positive(field: str, value: Any) -> None:
    if not _is_number(value) or not value > 0:
        raise EntryProblem(field, value, "must be a finite number greater than 0")


def _non_negative(field: str, value: Any) -> None:
    if not _is_number(value) or value < 0:
        raise EntryProblem(field, value, "must be a finite number of at least 0")


def _bytes(field: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise EntryProblem(field, value, "must be a whole number of bytes, at least 0")


def _count(field: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise EntryProblem(field, value, "must be a whole number, at least 0")


def _batch(field: str, value: Any) -> None:
    if not _is_int(value) or not 1 <= value <= MAX_BATCH:
        raise EntryProblem(field, value, f"must be a whole batch size from 1 to {MAX_BATCH}")


def _samples(field: str, value: Any) -> None:
    if not isinstance(value, list):
        raise EntryProblem(field, value, "must be a list of throughputs (samples/s)")
    for index, sample in enumerate(value):
        _positive(f"{field}[{index}]", sample)


def _text(field: str, value: Any) -> None:
    if not isinstance(value, str):
        raise EntryProblem(field, value, "must be a string")


def _object(field: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise EntryProblem(field, value, "must be an object")


def _search(field: str, value: Any) -> None:
    _object(field, value)
    for name in ("probes", "ooms", "measurements"):
        if name in value:
            _count(f"{field}.{name}", value[name])
    if "seconds" in value:
        _non_negative(f"{field}.seconds", value["seconds"])


def _probes(field: str, value: Any) -> None:
    if not isinstance(value, list):
        raise EntryProblem(field, value, "must be a list of probe rows")
    for index, row in enumerate(value):
        where = f"{field}[{index}]"
        _object(where, row)
        _batch(f"{where}.batch", row.get("batch"))
        for name in ("peak_bytes", "predicted_bytes"):
            if row.get(name) is not None:
                _bytes(f"{where}.{name}", row[name])
        for name in ("throughput", "latency_s"):
            if row.get(name) is not None:
                _non_negative(f"{where}.{name}", row[name])


def _targets(field: str, value: Any) -> None:
    _object(field, value)
    for name in ("min_speedup", "max_latency_s"):
        if value.get(name) is not None:
            _positive(f"{field}.{name}", value[name])


Check = Callable[[str, Any], None]

#: field -> (required, may be null, check). Unknown fields are kept unchecked.
_FIELDS: dict[str, tuple[bool, bool, Check]] = {
    "model": (True, False, _text),
    "optimal_batch": (True, False, _batch),
    "max_batch": (True, False, _batch),
    "throughput": (True, False, _positive),
    "throughput_samples": (True, False, _samples),
    "peak_memory_bytes": (True, True, _bytes),
    "cap": (False, True, _batch),
    "device": (False, True, _text),
    "mode": (False, True, _text),
    "model_fingerprint": (False, True, _object),
    "model_fingerprint_hash": (False, True, _text),
    "max_latency_s": (False, True, _positive),
    "optimal_band": (False, True, _non_negative),
    "tolerance": (False, True, _non_negative),      # older name of optimal_band
    "batch1_throughput": (False, True, _positive),
    "min_batch": (False, True, _batch),
    "batch1_throughput_samples": (False, True, _samples),
    "speedup": (False, True, _positive),
    "max_batch_peak_memory_bytes": (False, True, _bytes),
    "capacity_bytes": (False, True, _bytes),
    "extras": (False, True, _object),
    "search": (False, True, _search),
    "probes": (False, True, _probes),
    "targets": (False, True, _targets),
    "recorded_at": (False, True, _text),
}


def _check_entry(entry: dict[str, Any]) -> None:
    for name, (required, nullable, check) in _FIELDS.items():
        if name not in entry:
            if required:
                raise EntryProblem(name, "(missing)", "is required")
            continue
        value = entry[name]
        if value is None and nullable:
            continue
        check(name, value)
    if not entry["throughput_samples"]:
        raise EntryProblem("throughput_samples", [], "must hold at least one sample")
    cap = entry.get("cap")
    if cap is not None and entry["max_batch"] > cap:
        raise EntryProblem("max_batch", entry["max_batch"], f"is above the entry's cap of {cap}")
    if entry["optimal_batch"] > entry["max_batch"]:
        raise EntryProblem("optimal_batch", entry["optimal_batch"],
                           f"is above the entry's max_batch of {entry['max_batch']}")


def show(value: Any, limit: int = 80) -> str:
    """A value as it may appear in a message: repr, control characters escaped, shortened."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_entry(key: str, entry: Any, where: str) -> Entry:
    """The checked Entry of ``entry``; BaselineError naming ``where``, the key, field, value, fix."""
    try:
        if not isinstance(entry, dict):
            raise EntryProblem("(entry)", entry, "must be an object")
        _check_entry(entry)
    except EntryProblem as problem:
        raise BaselineError(
            f"baseline file {where}: entry {show(key, 200)}: field {problem.field!r} = "
            f"{show(problem.value)} {problem.problem}. Nothing was written. To fix it, "
            f"{FIX.replace('FILE', where)}.") from None
    return Entry(key=key, model=entry["model"], optimal_batch=entry["optimal_batch"],
                 max_batch=entry["max_batch"], cap=entry.get("cap"), throughput=float(entry["throughput"]),
                 throughput_samples=tuple(float(s) for s in entry["throughput_samples"]),
                 peak_memory_bytes=entry["peak_memory_bytes"], data=entry)


def problem_of_document(document: Any, hardware_key: str) -> str | None:
    """What is wrong with the document outside its entries (None: nothing)."""
    if not isinstance(document, dict) or not isinstance(document.get("entries"), dict):
        return "it has no 'entries' object"
    schema = document.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        return f"its schema is {show(schema)}, not a schema version (this pytest-autobatch writes {SCHEMA})"
    if schema > SCHEMA:
        return (f"it was written with baseline schema {schema}, newer than schema {SCHEMA} that this "
                f"pytest-autobatch reads: upgrade pytest-autobatch to read it")
    if document.get("hardware_key") != hardware_key:
        return (f"its hardware_key is {show(document.get('hardware_key'))} but it lies in the folder of "
                f"{hardware_key!r}: it belongs to other hardware. Move it to its own folder")
    if not isinstance(document.get("hardware", {}), dict):
        return f"its 'hardware' is {show(document.get('hardware'))}, not an object"
    for key in document["entries"]:
        if not key or _CONTROL.search(key) or "::" not in key:
            return (f"entry key {show(key)} is not '<test id>::<name>' or holds control characters "
                    "(which could rewrite the terminal)")
    return None


def parse_document(document: Any, hardware_key: str, where: str) -> dict[str, Entry]:
    """Every entry of ``document`` checked; BaselineError for the first problem found."""
    problem = problem_of_document(document, hardware_key)
    if problem is not None:
        raise BaselineError(f"baseline file {where} cannot be used: {problem}. It was left untouched. "
                            f"To fix it, {FIX.replace('FILE', where)}.")
    return {key: parse_entry(key, entry, where) for key, entry in document["entries"].items()}
