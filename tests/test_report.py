"""The Markdown report and the PNG plots, from a two-device sample of baselines (tests/data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_autobatch.errors import BaselineError
from pytest_autobatch.report.markdown import render_markdown, write_report
from pytest_autobatch.report.results import read_results

SAMPLE = Path(__file__).parent / "data" / "report_baselines"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_row(markdown: str, *cells: str) -> str:
    """The one table line that starts with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, f"expected one row starting {prefix!r}, found {rows}"
    return rows[0]


def test_reads_every_entry_of_every_device():
    results = read_results(SAMPLE)
    assert sorted((r.hardware_key, r.label) for r in results) == [
        ("cpu-sample", "llama (generate)"), ("cpu-sample", "resnet50"),
        ("sim-h100", "resnet50"), ("sim-h100", "resnet50-train")]


def test_devices_table_names_each_device_and_the_cpu_budget():
    markdown = render_markdown(read_results(SAMPLE))
    assert table_row(markdown, "`cpu-sample`") == (
        "| `cpu-sample` | Sample CPU (2 cores) | cpu | 24.00 GiB | 2.00 GiB |")
    assert table_row(markdown, "`sim-h100`") == (
        "| `sim-h100` | Simulated NVIDIA H100 80GB | sim:h100 | 80.00 GiB | – |")


def test_results_table_holds_the_search_figures():
    markdown = render_markdown(read_results(SAMPLE))
    row = table_row(markdown, "resnet50", "`sim-h100`")
    entry = json.loads((SAMPLE / "sim-h100" / "benchmarks__test_models.json").read_text())[
        "entries"]["benchmarks/test_models.py::test_model[resnet50]::resnet50"]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # 2925.7 samples/s, 400.0 at batch 1, speedup 7.314, 27,648,851,968 bytes, as the reader sees them
    assert cells[2:8] == [str(entry["optimal_batch"]), str(entry["max_batch"]), "2,926", "400", "7.31×",
                          "25.75 GiB"]
    assert cells[8] == "12.5 s"
    assert cells[9] == f"{entry['search']['probes']} / {entry['search']['ooms']}"
    assert cells[10] == "73.47 GiB / 77.33 GiB (-5%) at 812"   # predicted vs measured at max batch
    assert cells[11] == "0.012 J"


def test_max_batch_at_the_cap_is_marked_and_missing_figures_are_dashes():
    row = table_row(render_markdown(read_results(SAMPLE)), "llama (generate)", "`cpu-sample`")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3] == "64 (cap)"
    assert cells[10] == "–" and cells[11] == "–"   # no memory prediction, no energy on the CPU


def test_several_devices_are_compared_side_by_side():
    markdown = render_markdown(read_results(SAMPLE))
    assert "## Devices side by side" in markdown
    section = markdown.split("### Throughput at the optimal batch")[1].split("###")[0]
    assert table_row(section, "resnet50") == "| resnet50 | 240 (16) | 2,926 (256) |"
    latency = markdown.split("### Latency of one batch")[1].split("###")[0]
    assert table_row(latency, "resnet50") == "| resnet50 | 66.7 ms | 87.5 ms |"
    assert "### Energy per sample (J)" in markdown


def test_one_device_has_no_comparison(tmp_path):
    shutil.copytree(SAMPLE / "cpu-sample", tmp_path / "cpu-sample")
    markdown = render_markdown(read_results(tmp_path))
    assert "side by side" not in markdown
    assert "energy / sample" not in markdown


def test_write_report_writes_markdown_and_one_png_per_model_and_device(tmp_path):
    report = write_report(SAMPLE, tmp_path / "out")
    pngs = sorted((tmp_path / "out" / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["cpu-sample--llama-generate.png", "cpu-sample--resnet50.png",
                                      "sim-h100--resnet50-train.png", "sim-h100--resnet50.png"]
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    text = report.read_text()
    for png in pngs:
        assert f"](plots/{png.name})" in text


def test_write_report_without_plots(tmp_path):
    report = write_report(SAMPLE, tmp_path, plots=False)
    assert report.exists() and not (tmp_path / "plots").exists()
    assert "## Plots" not in report.read_text()


def test_missing_and_empty_directories_are_clear_errors(tmp_path):
    with pytest.raises(BaselineError, match="no baselines directory at .*pytest --autobatch"):
        write_report(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(BaselineError, match="no baseline entries under"):
        write_report(tmp_path, tmp_path / "out")


def test_a_corrupt_baseline_file_is_named_and_left_untouched(tmp_path):
    shutil.copytree(SAMPLE, tmp_path / "baselines")
    broken = tmp_path / "baselines" / "sim-h100" / "benchmarks__test_models.json"
    broken.write_text("<<<<<<< HEAD\n{}")
    with pytest.raises(BaselineError, match="benchmarks__test_models.json"):
        write_report(tmp_path / "baselines", tmp_path / "out")
    assert broken.read_text() == "<<<<<<< HEAD\n{}"
    assert not (tmp_path / "out" / "report.md").exists()


def test_reports_entries_recorded_by_the_search_on_simulated_gpus(tmp_path):
    from pytest_autobatch.baselines import BaselineStore
    from pytest_autobatch.devices.simulated import SimulatedModel, simulated_device
    from pytest_autobatch.record import record_entry

    model = SimulatedModel("sim-resnet", weights_bytes=2**30, activation_bytes_per_sample=90 * 2**20,
                           flops_per_sample=8e9)
    recorded = {}
    for profile in ("sim:h100", "sim:a5000"):
        device = simulated_device(profile)
        workload = device.workload(model)
        entry = record_entry(device, workload, model="sim-resnet")
        store = BaselineStore(tmp_path / "baselines", device.hardware_key(), device.hardware())
        store.put("benchmarks/test_sim.py::test_sim::sim-resnet", entry)
        recorded[device.hardware_key()] = entry

    report = write_report(tmp_path / "baselines", tmp_path / "out")
    markdown = report.read_text()
    for hardware_key, entry in recorded.items():
        cells = table_row(markdown, "sim-resnet", f"`{hardware_key}`").strip("|").split("|")
        assert [cell.strip() for cell in cells[2:4]] == [str(entry["optimal_batch"]),
                                                         str(entry["max_batch"])]
    assert "## Devices side by side" in markdown
    assert len(list((tmp_path / "out" / "plots").glob("*.png"))) == 2
