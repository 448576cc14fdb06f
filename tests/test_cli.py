"""The ``autobatch report`` console script: exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_autobatch.cli import main

SAMPLE = Path(__file__).parent / "data" / "report_baselines"


def test_report_prints_the_markdown_and_writes_the_files(tmp_path, capsys):
    assert main(["report", str(SAMPLE), "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == (tmp_path / "report.md").read_text()
    assert "| resnet50 | `sim-h100` | 256 | 812 |" in out
    assert f"wrote {tmp_path / 'report.md'}" in err
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4


def test_no_plots(tmp_path, capsys):
    assert main(["report", str(SAMPLE), "--out", str(tmp_path), "--no-plots"]) == 0
    assert not (tmp_path / "plots").exists()


def test_missing_directory_exits_1_with_a_clear_message(tmp_path, capsys):
    missing = tmp_path / "baselines"
    assert main(["report", str(missing), "--out", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"no baselines directory at '{missing}'" in err and "pytest --autobatch" in err
    assert not (tmp_path / "out").exists()


def test_bad_command_line_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reprot"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'reprot'" in capsys.readouterr().err


def test_console_script_runs_without_importing_torch(tmp_path):
    code = ("import sys; from pytest_autobatch.cli import main; "
            f"rc = main(['report', {str(SAMPLE)!r}, '--out', {str(tmp_path)!r}, '--no-plots']); "
            "assert 'torch' not in sys.modules, 'the report imported torch'; sys.exit(rc)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "# pytest-autobatch results" in completed.stdout


def test_readme_gets_the_report_between_its_markers_and_keeps_the_rest(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nintro\n\n<!-- autobatch report: start -->\nold table\n"
                      "<!-- autobatch report: end -->\n\nafter\n")
    assert main(["report", str(SAMPLE), "--out", str(tmp_path / "out"), "--no-plots",
                 "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Project\n\nintro\n\n<!-- autobatch report: start -->\n### pytest-autobatch results")
    assert "old table" not in text and "| resnet50 | `sim-h100` | 256 | 812 |" in text
    assert "#### Devices" in text and text.endswith("<!-- autobatch report: end -->\n\nafter\n")


def test_readme_without_markers_is_an_error_and_left_alone(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    assert main(["report", str(SAMPLE), "--out", str(tmp_path / "out"), "--readme", str(readme)]) == 1
    assert "has no report markers" in capsys.readouterr().err
    assert readme.read_text() == "# Project\n"
