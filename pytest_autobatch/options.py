"""The plugin's command-line and ini options: declared once, parsed and checked at start-up into
a ``session.Settings``.

Each option is also an ini option of the same name; the command line wins, and an ini value is
checked the same way. A bad value is a usage error naming the option, the value and the fix.
Imports nothing beyond the standard library and pytest until an option is parsed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from .session import Settings


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` that turns our ConfigError into a usage error."""
    def convert(text: str) -> Any:
        from .errors import ConfigError
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def parse_fraction(text: str) -> float:
    from .units import parse_fraction as parse
    return parse(text)


def parse_device(text: str) -> str:
    from .devices.base import parse_device_name
    name = parse_device_name(text)
    if name.startswith("sim:"):
        from .devices.simulated import get_profile  # standard library only
        get_profile(name)                             # an unknown profile fails at start-up
    return name


def parse_size(text: str) -> int:
    from .units import parse_size as parse
    return parse(text)


def parse_budgets(text: str) -> tuple[int, ...]:
    """One memory budget for every rank, or a comma-separated list giving rank i the i-th."""
    return tuple(parse_size(part.strip()) for part in text.split(","))


def parse_seconds(text: str) -> float:
    """A positive number of seconds."""
    from .errors import ConfigError
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{text!r} is not a number of seconds > 0")
    return value


INCONCLUSIVE_POLICIES = ("warn", "retry", "fail")


def parse_inconclusive(text: str) -> str:
    """What an inconclusive throughput verdict does: warn (report it), retry (measure again after a
    pause, then warn), fail (fail the test)."""
    from .errors import ConfigError
    value = str(text).strip().lower()
    if value not in INCONCLUSIVE_POLICIES:
        raise ConfigError(f"{text!r} is not a choice: use {', '.join(INCONCLUSIVE_POLICIES)}")
    return value


# (flag, dest == ini name, parse or None for a flag, default, help)
_OPTIONS: tuple[tuple[str, str, Callable[[str], Any] | None, Any, str], ...] = (
    ("--autobatch", "autobatch", None, False,
     "run benchmark tests (those using optimal_batch or marked autobatch); skipped otherwise"),
    ("--autobatch-device", "autobatch_device", parse_device, "auto",
     "device to search on: auto (CUDA if available, else CPU), cuda, cuda:N, cpu or sim:PROFILE"),
    ("--autobatch-update", "autobatch_update", None, False,
     "search again and rewrite the baselines of the tests that run; remove unused entries"),
    ("--autobatch-baselines", "autobatch_baselines", str, "baselines",
     "directory of the baseline JSON files (default: baselines/ at the rootdir)"),
    ("--autobatch-tolerance", "autobatch_tolerance", parse_fraction, 0.10,
     "throughput drop that fails the gate when significant, e.g. 10%% or 0.1 (default 10%%)"),
    ("--autobatch-memory-tolerance", "autobatch_memory_tolerance", parse_fraction, 0.10,
     "peak-memory growth at the stored optimal batch that fails the gate (default 10%%)"),
    ("--autobatch-strict", "autobatch_strict", None, False,
     "fail a benchmark test whose baseline is missing instead of recording it"),
    ("--autobatch-memory-budget", "autobatch_memory_budget", parse_budgets, None,
     "memory the cpu device may use, e.g. 8GiB (default: a share of RAM); under torchrun one per "
     "rank, e.g. 8GiB,3GiB gives rank 1 3GiB"),
    ("--autobatch-inconclusive", "autobatch_inconclusive", parse_inconclusive, "warn",
     "when the machine is too busy to judge throughput: warn (default; the verdict is shown, the "
     "test passes), retry (measure again after a pause, then warn) or fail"),
    ("--autobatch-report", "autobatch_report", str, None,
     "at the end of the session, write the Markdown report and PNG plots of the baselines to DIR"),
    ("--autobatch-rank-timeout", "autobatch_rank_timeout", parse_seconds, None,
     "under torchrun: seconds each rank waits for the others at each step of a search before it "
     "stops with an error naming the silent rank (default 300)"),
)

_METAVARS = {parse_device: "DEVICE", str: "DIR", parse_fraction: "TOLERANCE", parse_budgets: "SIZE[,SIZE...]",
             parse_inconclusive: "{warn,retry,fail}", parse_seconds: "SECONDS"}


def add_options(parser: pytest.Parser) -> None:
    """Every option on the command line and in the ini file."""
    group = parser.getgroup("autobatch", "batch-size search and throughput regression gate (pytest-autobatch)")
    for flag, dest, parse, default, help_text in _OPTIONS:
        ini_help = help_text.replace("%%", "%")
        if parse is None:
            group.addoption(flag, action="store_true", default=None, dest=dest, help=help_text)
            parser.addini(dest, ini_help, type="bool", default=default)
        else:
            group.addoption(flag, action="store", default=None, dest=dest, metavar=_METAVARS[parse],
                            type=_argument_type(parse), help=help_text)
            parser.addini(dest, ini_help, type="string", default="")


def option(config: pytest.Config, dest: str, parse: Callable[[str], Any] | None, default: Any) -> Any:
    """The command-line value, else the ini value (validated the same way), else the default.

    A conftest may set the command-line value itself before the plugin reads it (the main job's
    does): text is validated as if it had been typed, anything else is taken as already parsed.
    """
    value = config.getoption(dest)
    if isinstance(value, str) and parse not in (None, str):
        return _parsed(parse, value, f"option {dest} = {value!r} (set by a conftest)")
    if value is not None:
        return value
    raw = config.getini(dest)
    if parse is None:
        return bool(raw)
    if raw in ("", None):
        return default
    return _parsed(parse, raw, f"ini option {dest} = {raw!r}")


def _parsed(parse: Callable[[str], Any], text: str, where: str) -> Any:
    try:
        return _argument_type(parse)(text)
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"{where}: {exc}") from None


def settings(config: pytest.Config) -> Settings | None:
    """The Settings when --autobatch is on (None otherwise); every value is validated either way."""
    values = {dest: option(config, dest, parse, default) for _, dest, parse, default, _ in _OPTIONS}
    if not values["autobatch"]:
        return None
    from .devices.agreement import DEFAULT_RANK_TIMEOUT_S, launched_distributed
    from .session import Settings
    distributed = launched_distributed()
    rank = int(os.environ.get("RANK", 0))
    budget = _rank_budget(values["autobatch_memory_budget"], distributed, rank)
    folder = Path(values["autobatch_baselines"])
    if config.getoption("autobatch_baselines") is not None:
        base = config.invocation_params.dir
    else:
        base = config.inipath.parent if config.getini("autobatch_baselines") and config.inipath else config.rootpath
    return Settings(baselines=base / folder, device=values["autobatch_device"],
                    update=values["autobatch_update"], strict=values["autobatch_strict"],
                    tolerance=values["autobatch_tolerance"],
                    memory_tolerance=values["autobatch_memory_tolerance"],
                    memory_budget=budget, inconclusive=values["autobatch_inconclusive"],
                    distributed=distributed, rank=rank,
                    rank_timeout_s=values["autobatch_rank_timeout"] or DEFAULT_RANK_TIMEOUT_S)


def _rank_budget(given: int | tuple[int, ...] | None, distributed: bool, rank: int) -> int | None:
    """This rank's budget: the only one given, or the rank's own from a list with one per rank
    (a conftest that sets the option itself may give one number of bytes)."""
    if given is None:
        return None
    budgets = (given,) if isinstance(given, int) else tuple(given)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
    if len(budgets) > 1 and len(budgets) != world_size:
        where = f"this torchrun job has {world_size} ranks" if distributed else "this is not a torchrun job"
        raise pytest.UsageError(
            f"--autobatch-memory-budget lists {len(budgets)} budgets, but {where}: give one budget for "
            f"every rank, or one list entry per rank (rank i gets the i-th) under torchrun --nproc-per-node=N")
    for budget in budgets:
        _check_memory_budget(budget)
    return budgets[rank] if len(budgets) > 1 else budgets[0]


def _check_memory_budget(budget: int) -> None:
    """A budget beyond the machine's memory is a typo: refused at start-up, naming both."""
    from .devices.hardware import physical_memory_bytes
    from .units import format_bytes
    memory = physical_memory_bytes()
    if memory is not None and budget > memory:
        raise pytest.UsageError(
            f"--autobatch-memory-budget {format_bytes(budget)} ({budget:,} B) is more than this "
            f"machine's memory, {format_bytes(memory)} ({memory:,} B): pass a budget of at most "
            f"{format_bytes(memory)}, or leave the option out for a share of RAM")
