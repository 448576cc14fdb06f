"""Print the simulated profiles against the published figures they are calibrated to (Markdown).

    python benchmarks/bench_simulated.py

The figures and their sources are in ``pytest_autobatch/devices/calibration.json``; the models'
simulated counterparts in ``pytest_autobatch/devices/sim_zoo.json``
(re-derive with ``python -m pytest_autobatch.devices.derive``).
"""

from __future__ import annotations

from pytest_autobatch.devices.calibration import calibration_errors, markdown_table
from pytest_autobatch.devices.simulated import PROFILES

if __name__ == "__main__":
    print(markdown_table())
    print()
    for name, error in calibration_errors().items():
        print(f"sim:{name} ({PROFILES[name].precision}): largest error {error:.0%}")
