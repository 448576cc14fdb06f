"""The simulated profiles reproduce the published figures; the derived zoo loads without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_autobatch.devices import calibration, sim_zoo
from pytest_autobatch.devices.simulated import PROFILES, SimulatedModel
from pytest_autobatch.zoo import ZOO


def test_every_published_figure_is_within_the_goal():
    rows = calibration.comparisons()
    goal = calibration.published()["goal"]
    assert len(rows) == 10  # 6 figures, 4 speedups
    assert all(row.source for row in rows)
    bad = [f"{row.model} on {row.card}, {row.what}: {row.error:+.0%}" for row in rows if abs(row.error) > goal]
    assert not bad, bad


def test_profiles_state_their_calibration_error_and_precision():
    errors = calibration.calibration_errors()
    assert set(errors) == {"h100", "rtx5070ti"}
    for name, profile in PROFILES.items():
        assert profile.precision.startswith("FP32")
        if name in errors:
            assert profile.calibration_error == pytest.approx(errors[name], abs=0.01)
        else:
            assert profile.calibration_error is None  # no published figures for this card


def test_every_zoo_model_has_a_derived_counterpart():
    for name in ZOO:
        model = sim_zoo.simulated_counterpart(name)
        assert isinstance(model, SimulatedModel) and model.name == name and model.work
        assert model.kernels > 50 and model.flops_per_sample > 1e9
    stored = json.loads(sim_zoo.DATA_PATH.read_text())
    assert "pytest_autobatch.devices.derive" in stored["derived_with"]


def test_a_model_without_derivation_falls_back_to_the_hand_given_one(monkeypatch):
    monkeypatch.setattr(sim_zoo, "derived", lambda: {})
    with pytest.warns(UserWarning, match="resnet50: no derived simulated counterpart"):
        assert sim_zoo.simulated_counterpart("resnet50") is sim_zoo.FALLBACK["resnet50"]


def test_reading_the_simulated_zoo_does_not_import_torch():
    code = ("import sys; from pytest_autobatch.devices import calibration; calibration.comparisons(); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reports_label_simulated_figures_with_the_calibration_error():
    from pytest_autobatch.report.results import simulated_label, simulated_notes
    from pytest_autobatch.report.terminal import summary_lines

    assert simulated_label("cuda:0") is None and simulated_label("cpu-amd-epyc-2cpus") is None
    assert simulated_label("sim-h100") == simulated_label("sim:h100")
    assert "within 14% of published measurements" in str(simulated_label("sim:h100"))
    assert "uncalibrated" in str(simulated_label("sim-a5000"))
    assert simulated_notes(["sim:h100", "cpu", "sim:h100"]) == [f"sim:h100: {simulated_label('sim:h100')}"]
    row = {"key": "m.py::t::toy", "device": "sim:rtx5070ti", "optimal_batch": 4, "max_batch": 8,
           "throughput": 100.0, "speedup": 2.0, "probes": 3, "ooms": 0, "search_seconds": 0.1, "status": "new"}
    lines = summary_lines([row])
    assert lines[-1] == "simulated: sim:rtx5070ti: simulated, not measured (FP32, eager PyTorch defaults; " \
                        "within 12% of published measurements)"


def test_markdown_report_marks_the_simulated_devices():
    from pytest_autobatch.report.markdown import render_markdown
    from pytest_autobatch.report.results import read_results

    text = render_markdown(read_results(Path(__file__).parents[1] / "baselines"))
    assert "Figures on simulated devices are simulated, not measured" in text
    assert "- `sim-h100`: simulated, not measured (FP32, eager PyTorch defaults; within 14%" in text
    assert "`sim-h100`" in text and "`sim-rtx5070ti`" in text  # side by side
