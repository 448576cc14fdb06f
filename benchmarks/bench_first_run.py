"""The first run of the main job, for one checkout or several side by side: wall time, and per
model what the search spent (seconds, probes, throughput measurements), read from the entries it
recorded.

    python benchmarks/bench_first_run.py [CHECKOUT ...] [-k EXPR]

Each checkout (default: this one) runs ``pytest --autobatch --autobatch-baselines DIR
benchmarks/`` into an empty folder, one after the other, with the checkout first on PYTHONPATH
and the offline switches set (an older checkout's benchmarks may not set them). Compare
checkouts in one run of this script, back to back on one machine, and read the ratio: the time
itself moves 2-4x between hosts here. ``-k`` selects the same models in each (``-k "not
llama-int8"`` for a checkout from before that model). Run it under ``chrt -f 10`` on a shared
machine. A script, not a pytest module.

Measured on the 2-core VM, the version the search issues were filed against (``5d7137f``) then
``5a8277f``, six models: 623 s and 505 s (0.81x); probes 27 and 10, measurements 88 and 44. In a
later session, ``5d7137f``, ``145df72`` and ``aa70a4d`` back to back: 669 s, 680 s and 486 s
(probes 27, 12, 10; measurements 86, 58, 42): one checkout's first run moves by a fifth between
runs here, with the number of close calls its noise makes the search measure again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def first_run(checkout: Path, select: str | None) -> tuple[float, list[dict[str, Any]]]:
    """Wall seconds of the main job's first run in ``checkout``, and the search of each entry."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--autobatch",
                   f"--autobatch-baselines={folder}", "benchmarks/", *(["-k", select] if select else [])]
        environment = {**os.environ, "PYTHONPATH": str(checkout), "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        began = time.perf_counter()
        subprocess.run(command, cwd=checkout, env=environment, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - began
        searches = []
        for path in Path(folder).glob("*/*.json"):
            document = json.loads(path.read_text())
            for entry in document.get("entries", document).values():
                if isinstance(entry, dict) and "search" in entry:
                    searches.append({"model": entry["model"], **entry["search"]})
    return wall, sorted(searches, key=lambda search: str(search["model"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="*", type=Path, default=[ROOT])
    parser.add_argument("-k", dest="select", help="pytest -k expression, the same for every checkout")
    args = parser.parse_args()
    print("| checkout | wall | probes | measurements | seconds per model (in the entries) |")
    print("|---|---|---|---|---|")
    for checkout in args.checkouts:
        wall, searches = first_run(checkout.resolve(), args.select)
        per_model = ", ".join(f"{search['model']} {search['seconds']:.0f}" for search in searches)
        print(f"| {checkout} | {wall:.0f} s | {sum(search['probes'] for search in searches)} "
              f"| {sum(search['measurements'] for search in searches)} | {per_model} |", flush=True)


if __name__ == "__main__":
    main()
