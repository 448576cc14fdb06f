"""The plugin as a user's project uses it (pytester), on simulated GPUs so it runs on a CPU."""

import json

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("outside_xdist")

MODELS = '''
import json, os
import pytest
from pytest_autobatch.devices.simulated import SimulatedModel

FLOPS = {flops} / 16  # the profiles' peaks are FP32 since issue 15: about 1/16 of the FP16 ones
ACTIVATIONS = {activations}


def record(result):
    out = os.environ.get("AUTOBATCH_OUT")
    if out:
        with open(out, "a") as stream:
            stream.write(json.dumps(dict(result.as_summary(), cached=result.cached)) + "\\n")
    return result


def test_toy(optimal_batch):
    record(optimal_batch(SimulatedModel("toy", weights_bytes=2_000_000_000,
                                        activation_bytes_per_sample=ACTIVATIONS,
                                        flops_per_sample=FLOPS))).expect_targets()


@pytest.mark.parametrize("layers", [1, 2])
def test_layers(optimal_batch, layers):
    record(optimal_batch(SimulatedModel("stack", weights_bytes=layers * 500_000_000,
                                        activation_bytes_per_sample=layers * 20_000_000,
                                        flops_per_sample=layers * 2e10 / 16)))


def test_plain():
    pass
'''

SIM = ("--autobatch", "--autobatch-device=sim:h100")
TOY_KEY = "test_models.py::test_toy::toy"


@pytest.fixture
def project(pytester, monkeypatch):
    """A user's project with three benchmark tests and one plain test; results land in results.jsonl."""
    pytester.makepyfile(test_models=MODELS.format(flops=4e10, activations=50_000_000))
    monkeypatch.setenv("AUTOBATCH_OUT", str(pytester.path / "results.jsonl"))
    return pytester


def results(pytester):
    path = pytester.path / "results.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return {entry["key"]: entry for entry in map(json.loads, lines)}


def baseline(pytester, key="sim-h100"):
    return pytester.path / "baselines" / key / "test_models.json"


def test_without_autobatch_benchmarks_skip_naming_the_option(project):
    result = project.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["*run it with pytest --autobatch*"])
    assert not (project.path / "baselines").exists()


def test_record_then_cached_run_does_no_search(project):
    first = project.runpytest(*SIM)
    first.assert_outcomes(passed=4)
    recorded = results(project)
    assert set(recorded) == {TOY_KEY, "test_models.py::test_layers[1]::stack",
                             "test_models.py::test_layers[2]::stack"}
    assert all(entry["status"] == "new" and entry["probes"] > 0 for entry in recorded.values())
    first.stdout.fnmatch_lines(["*= autobatch =*", "model*device*optimal*max*samples/s*speedup*memory*"
                                "probes*OOMs*search*baseline*change*raw*machine",
                                "test_models.py::test_toy::toy*sim:h100*new*"])
    stored = json.loads(baseline(project).read_text())
    assert stored["hardware_key"] == "sim-h100" and set(stored["entries"]) == set(recorded)
    toy = stored["entries"][TOY_KEY]
    assert (toy["optimal_batch"], toy["max_batch"]) == (recorded[TOY_KEY]["optimal_batch"],
                                                         recorded[TOY_KEY]["max_batch"])
    assert toy["targets"]["min_speedup"] >= 1.0 and len(toy["throughput_samples"]) >= 15
    assert any(probe["outcome"] == "oom" for probe in toy["probes"])
    before = baseline(project).read_text()

    second = project.runpytest(*SIM)
    second.assert_outcomes(passed=4)
    cached = results(project)
    assert all(entry["cached"] and entry["probes"] == 0 and entry["ooms"] == 0 for entry in cached.values())
    assert cached[TOY_KEY]["optimal_batch"] == toy["optimal_batch"]
    assert abs(cached[TOY_KEY]["change"]) < 0.10
    second.stdout.fnmatch_lines(["test_models.py::test_toy::toy*cached*%*%*x"])
    assert baseline(project).read_text() == before


def test_report_option_writes_the_report_of_the_baselines_at_session_end(project):
    # In a subprocess: plotting imports numpy, which cannot be imported twice in one process,
    # and an in-process run unloads what it imported.
    result = project.runpytest_subprocess(*SIM, "--autobatch-report=out")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["autobatch report written to *report.md"])
    report = (project.path / "out" / "report.md").read_text()
    assert "toy" in report and "sim-h100" in report
    this_run = report.split("## Devices")[0]
    assert "pytest-autobatch: this run" in this_run and this_run.count("| recorded |") == 3
    assert list((project.path / "out").rglob("*.png"))


def test_slower_model_fails_the_gate_and_keeps_the_baseline(project):
    project.runpytest(*SIM).assert_outcomes(passed=4)
    before = baseline(project).read_text()
    project.makepyfile(test_models=MODELS.format(flops=6e10, activations=50_000_000))
    result = project.runpytest(*SIM)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "*toy on NVIDIA H100 80GB HBM3 (simulated): throughput regression: * -> * samples/s at batch * "
        "(-3*% raw; -3*% relative to the reference, tolerance 10%, Mann-Whitney p=*, 15 vs 15 pairs; "
        "this machine runs the reference as fast as the recording machine*fingerprint changed*flops_per_sample*"
        "--autobatch-baselines at them",
        "test_models.py::test_toy::toy*FAILED*-3*%*-3*%*x"])
    assert baseline(project).read_text() == before

    update = project.runpytest(*SIM, "--autobatch-update")
    update.assert_outcomes(passed=4)
    assert all(entry["status"] == "updated" for entry in results(project).values())
    updated = json.loads(baseline(project).read_text())["entries"][TOY_KEY]
    assert updated["model_fingerprint"]["flops_per_sample"] == 6e10 / 16
    project.runpytest(*SIM).assert_outcomes(passed=4)


def test_model_needing_more_memory_fails_with_oom_and_memory_regression(project):
    project.runpytest(*SIM).assert_outcomes(passed=4)
    project.makepyfile(test_models=MODELS.format(flops=4e10, activations=65_000_000))
    result = project.runpytest(*SIM)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*toy on * out of memory at the stored maximum batch*",
                                 "*toy on * peak memory regression: * GiB -> * GiB at batch * (+2*%, tolerance 10%)*"])


def test_corrupt_baseline_fails_cleanly_and_is_left_untouched(project):
    path = baseline(project)
    path.parent.mkdir(parents=True)
    path.write_text('<<<<<<< HEAD\n{"entries": {\n')
    result = project.runpytest(*SIM)
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines([f"*baseline file {path} cannot be used: it is not valid JSON*left untouched*"
                                 "--autobatch-update*"])
    assert "During handling" not in result.stdout.str()
    assert path.read_text() == '<<<<<<< HEAD\n{"entries": {\n'


def test_second_gpu_profile_adds_its_own_entries_and_keeps_the_others(project):
    project.runpytest(*SIM).assert_outcomes(passed=4)
    h100 = baseline(project).read_text()
    project.runpytest("--autobatch", "--autobatch-device=sim:a5000").assert_outcomes(passed=4)
    a5000 = json.loads(baseline(project, "sim-a5000").read_text())
    assert a5000["hardware"]["name"] == "NVIDIA RTX A5000 (simulated)" and len(a5000["entries"]) == 3
    assert a5000["entries"][TOY_KEY]["max_batch"] < json.loads(h100)["entries"][TOY_KEY]["max_batch"]
    assert baseline(project).read_text() == h100


def test_strict_fails_on_a_missing_baseline(project):
    result = project.runpytest(*SIM, "--autobatch-strict", "-k", "toy")
    result.assert_outcomes(failed=1, deselected=3)
    result.stdout.fnmatch_lines(["*no baseline for test_models.py::test_toy::toy on sim-h100*--autobatch-strict*"])
    assert not baseline(project).exists()


def test_ini_options_configure_the_run(project):
    project.makeini("[pytest]\nautobatch = true\nautobatch_device = sim:a5000\n"
                    "autobatch_baselines = stored\nautobatch_tolerance = 5%\n")
    result = project.runpytest()
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["autobatch: device sim:a5000, baselines */stored, throughput tolerance 5%*"])
    assert (project.path / "stored" / "sim-a5000" / "test_models.json").exists()


@pytest.mark.parametrize("args, message", [
    (("--autobatch-tolerance=fast",), "*argument --autobatch-tolerance: 'fast' is not a tolerance*10%*"),
    (("--autobatch-memory-tolerance=150%",), "*'150%' is not a tolerance*"),
    (("--autobatch-device=tpu",), "*argument --autobatch-device: unknown device 'tpu'*sim:PROFILE*"),
    (("--autobatch-memory-budget=lots",), "*argument --autobatch-memory-budget*not a size*2GiB*"),
    (("--autobatch-memory-budget=8MB,",), "*argument --autobatch-memory-budget*not a size*"),
    (("--autobatch-inconclusive=ignore",), "*argument --autobatch-inconclusive: 'ignore' is not a choice: use warn, "
                                           "retry, fail*"),
    (("--autobatch-rank-timeout=0",), "*argument --autobatch-rank-timeout: '0' is not a number of seconds > 0*"),
])
def test_bad_option_values_are_usage_errors(project, args, message):
    result = project.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_ini_value_is_a_usage_error(project):
    project.makeini("[pytest]\nautobatch_tolerance = ten\n")
    result = project.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini option autobatch_tolerance = 'ten'*not a tolerance*"])


def test_marker_targets_are_asserted_and_validated(pytester):
    pytester.makepyfile(test_marked='''
        import pytest
        from pytest_autobatch.devices.simulated import SimulatedModel
        MODEL = SimulatedModel("toy", weights_bytes=10**9, activation_bytes_per_sample=10**7, flops_per_sample=1e10)

        @pytest.mark.autobatch(min_speedup=1e6)
        def test_too_ambitious(optimal_batch):
            optimal_batch(MODEL)

        @pytest.mark.autobatch(min_speedup=1.5, max_latency_s=10.0)
        def test_met(optimal_batch):
            result = optimal_batch(MODEL)
            result.expect(min_speedup=1.5)
            with pytest.raises(AssertionError, match="latency .* ms per batch of .* is above"):
                result.expect(max_latency_s=1e-9)

        @pytest.mark.autobatch
        def test_marked_only():
            pass

        def test_device(autobatch_device):
            assert autobatch_device.name == "sim:h100"
            assert autobatch_device.hardware_key() == "sim-h100"
    ''')
    assert pytester.runpytest("-rs").parseoutcomes() == {"skipped": 4}
    result = pytester.runpytest(*SIM)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*toy on sim:h100: speedup *x over batch 1 is below 1000000.00x*"])
    pytester.makepyfile(test_typo='''
        import pytest
        @pytest.mark.autobatch(min_sped=2)
        def test_typo():
            pass
    ''')
    typo = pytester.runpytest(*SIM, "test_typo.py")
    assert typo.ret == pytest.ExitCode.USAGE_ERROR
    typo.stderr.fnmatch_lines(["*unknown @pytest.mark.autobatch argument(s) min_sped*"])


def test_unused_entries_are_reported_then_removed_by_update(project):
    project.runpytest(*SIM).assert_outcomes(passed=4)
    project.makepyfile(test_models=MODELS.format(flops=4e10, activations=50_000_000).replace(
        "def test_toy(", "def no_longer_a_test("))

    narrowed = project.runpytest(*SIM, "test_models.py::test_plain")
    assert "baseline entry unused" not in narrowed.stdout.str()
    report = project.runpytest(*SIM)
    report.assert_outcomes(passed=3)
    report.stdout.fnmatch_lines(["1 baseline entry unused:", f"  {TOY_KEY}  (*test_models.json)",
                                 "Re-run with pytest --autobatch --autobatch-update*"])
    assert TOY_KEY in json.loads(baseline(project).read_text())["entries"]

    deselected = project.runpytest(*SIM, "-k", "not layers")
    deselected.stdout.fnmatch_lines(["1 baseline entry unused:"])   # gone, not merely deselected
    project.runpytest(*SIM, "--autobatch-update").stdout.fnmatch_lines(["1 baseline entry removed:"])
    assert TOY_KEY not in json.loads(baseline(project).read_text())["entries"]
    assert len(json.loads(baseline(project).read_text())["entries"]) == 2


def test_progress_lines_with_verbose_output(project):
    result = project.runpytest(*SIM, "-v", "-k", "toy")
    result.stdout.fnmatch_lines(["autobatch: toy on sim:h100: probing batch *",
                                 "autobatch: toy on sim:h100: batch * out of memory",
                                 "autobatch: toy on sim:h100: timing batch *"])
    quiet = project.runpytest(*SIM, "-q", "-k", "toy")
    assert "probing batch" not in quiet.stdout.str()


def test_plain_run_help_and_sim_run_import_no_torch(project):
    project.makeconftest('''
        import sys
        def pytest_unconfigure(config):
            heavy = sorted(name for name in ("torch", "pynvml", "git", "numpy") if name in sys.modules)
            with open("imported.txt", "a") as stream:
                stream.write(",".join(heavy) + "\\n")
    ''')
    project.runpytest_subprocess().assert_outcomes(passed=1, skipped=3)
    assert project.runpytest_subprocess("--help").ret == 0
    project.runpytest_subprocess(*SIM).assert_outcomes(passed=4)
    assert (project.path / "imported.txt").read_text().splitlines() == ["", "", ""]


def test_xdist_workers_record_everything_and_the_controller_reports(project):
    first = project.runpytest_subprocess(*SIM, "-n", "2")
    first.assert_outcomes(passed=4)
    first.stdout.fnmatch_lines(["*= autobatch =*"])
    assert len([line for line in first.stdout.lines if "sim:h100" in line and " new " in line]) == 3
    assert len(json.loads(baseline(project).read_text())["entries"]) == 3
    second = project.runpytest_subprocess(*SIM, "-n", "2")
    second.assert_outcomes(passed=4)
    assert len([line for line in second.stdout.lines if " cached " in line]) == 3
    assert all(entry["probes"] == 0 for entry in results(project).values())
    project.makepyfile(test_models=MODELS.format(flops=4e10, activations=50_000_000).replace(
        "def test_toy(", "def no_longer_a_test("))
    project.runpytest_subprocess(*SIM, "-n", "2").stdout.fnmatch_lines(
        ["1 baseline entry unused:", f"  {TOY_KEY}  (*)"])


@pytest.mark.parametrize("device, warned", [("cpu", True), ("sim:h100", False)])
def test_xdist_workers_sharing_one_device_are_warned_about(pytester, device, warned):
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("--autobatch", f"--autobatch-device={device}", "-n", "2")
    result.assert_outcomes(passed=1)
    message = "*2 xdist workers share one device (cpu)*-n 0 on the CPU*"
    if warned:
        result.stdout.fnmatch_lines([message])
    else:
        result.stdout.no_fnmatch_line("*xdist workers share*")


def test_xdist_worker_i_gets_gpu_i_of_the_outer_mask(project, monkeypatch):
    project.makeconftest('''
        import os
        def pytest_sessionstart(session):
            worker = os.environ.get("PYTEST_XDIST_WORKER", "controller")
            with open(f"gpu-{worker}.txt", "w") as stream:
                stream.write(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    ''')
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    project.runpytest_subprocess("--autobatch", "--autobatch-device=cuda", "-n", "2", "-k", "plain")
    assert (project.path / "gpu-gw0.txt").read_text() == "3"
    assert (project.path / "gpu-gw1.txt").read_text() == "5"
    assert (project.path / "gpu-controller.txt").read_text() == "3,5"


def test_pytest_benchmark_gets_hardware_and_results(pytester):
    pytester.makepyfile(test_bench='''
        from pytest_autobatch.devices.simulated import SimulatedModel
        def test_bench(benchmark, optimal_batch):
            optimal_batch(SimulatedModel("toy", weights_bytes=10**9, activation_bytes_per_sample=10**7,
                                         flops_per_sample=1e10))
            benchmark(sum, [1, 2, 3])
    ''')
    pytester.runpytest(*SIM, "-p", "no:xdist", "--benchmark-json=bench.json").assert_outcomes(passed=1)
    saved = json.loads((pytester.path / "bench.json").read_text())
    assert saved["machine_info"]["autobatch"]["hardware_key"] == "sim-h100"
    assert saved["autobatch"][0]["key"] == "test_bench.py::test_bench::toy"
    assert saved["benchmarks"][0]["extra_info"]["autobatch"][0]["optimal_batch"] >= 1


def test_runs_without_xdist_and_pytest_benchmark(project):
    project.runpytest(*SIM, "-p", "no:xdist", "-p", "no:benchmark").assert_outcomes(passed=4)


# ---- hostile and careless inputs through the plugin (issue 13) ---------------------------------

ONE_TEST = '''
from pytest_autobatch.devices.simulated import SimulatedModel


def test_one(optimal_batch):
    optimal_batch(SimulatedModel("{name}", weights_bytes=10**9, activation_bytes_per_sample=10**7,
                                 flops_per_sample=1e10))
'''


@pytest.mark.parametrize("first, second", [("test_a/test_x.py", "test_a__test_x.py"),
                                           ("test_y z.py", "test_y_z.py")])
def test_modules_with_colliding_old_names_never_lose_each_others_entries(pytester, first, second):
    for path, name in ((first, "first"), (second, "second")):
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(ONE_TEST.format(name=name))
    pytester.runpytest(*SIM).assert_outcomes(passed=2)
    files = sorted((pytester.path / "baselines" / "sim-h100").glob("*.json"))
    assert len(files) == 2
    plain = pytester.runpytest(*SIM, first)
    plain.assert_outcomes(passed=1)
    assert "unused" not in plain.stdout.str()
    update = pytester.runpytest(*SIM, "--autobatch-update", first.split("/")[0] if "/" in first else first)
    update.assert_outcomes(passed=1)
    assert "removed" not in update.stdout.str()
    keys = {key for path in files for key in json.loads(path.read_text())["entries"]}
    assert keys == {f"{first}::test_one::first", f"{second}::test_one::second"}


def test_old_shared_baseline_file_is_migrated_with_a_message(pytester):
    for path, name in (("test_a/test_x.py", "first"), ("test_a__test_x.py", "second")):
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(ONE_TEST.format(name=name))
    pytester.runpytest(*SIM).assert_outcomes(passed=2)
    folder = pytester.path / "baselines" / "sim-h100"
    merged: dict = {}
    for path in sorted(folder.glob("*.json")):     # put both modules' entries in the old shared file
        document = json.loads(path.read_text())
        merged.setdefault("document", document)["entries"].update(document["entries"])
        path.unlink()
    (folder / "test_a__test_x.json").write_text(json.dumps(merged["document"]))
    result = pytester.runpytest(*SIM)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*moved 1 baseline entry from *test_a__test_x.json to "
                                 "*test_a__test_x+*.json*commit both files*"])
    assert "unused" not in result.stdout.str()
    assert len(list(folder.glob("*.json"))) == 2


@pytest.mark.parametrize("args, message", [
    (("--autobatch-device=sim:h1000",), "*unknown simulated GPU 'sim:h1000': known profiles are sim:*"),
    (("--autobatch", "--autobatch-memory-budget=999999999TiB"),
     "*--autobatch-memory-budget * is more than this machine's memory*pass a budget of at most*"),
    (("--autobatch", "--autobatch-memory-budget=8MB,3MB"),
     "*--autobatch-memory-budget lists 2 budgets, but this is not a torchrun job: give one budget for every "
     "rank, or one list entry per rank*"),
])
def test_options_are_checked_at_start_up(project, args, message):
    result = project.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


@pytest.mark.parametrize("budget", ["1 << 30", "'1GiB'", "(1 << 30,)"])
def test_a_budget_a_conftest_sets_itself_is_taken(project, budget):
    """As the main job's conftest does: the option set in pytest_configure, before the plugin reads it."""
    project.makeconftest(f"""
        import pytest

        @pytest.hookimpl(tryfirst=True)
        def pytest_configure(config):
            config.option.autobatch_memory_budget = {budget}
    """)
    project.runpytest(*SIM).assert_outcomes(passed=4)


def test_a_budget_a_conftest_sets_itself_is_checked(project):
    project.makeconftest("""
        import pytest

        @pytest.hookimpl(tryfirst=True)
        def pytest_configure(config):
            config.option.autobatch_memory_budget = 1 << 60
    """)
    result = project.runpytest(*SIM)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--autobatch-memory-budget * is more than this machine's memory*"])


def test_a_list_of_budgets_must_have_one_per_rank_of_the_torchrun_job(project, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    result = project.runpytest("--autobatch", "--autobatch-memory-budget=8MB,3MB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--autobatch-memory-budget lists 2 budgets, but this torchrun job has 3 ranks*"])


@pytest.mark.parametrize("content", [b'{"schema": 1, "entries": {"\xff": 1}}',
                                     b"[" * 100_000 + b"]" * 100_000])
def test_undecodable_baseline_fails_the_tests_not_the_session(project, content):
    path = baseline(project)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    result = project.runpytest(*SIM)
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines([f"*baseline file {path} cannot be used*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert path.read_bytes() == content


def test_escape_sequences_in_a_stored_key_are_shown_escaped(project):
    project.runpytest(*SIM).assert_outcomes(passed=4)
    path = baseline(project)
    document = json.loads(path.read_text())
    document["entries"]["test_models.py::test_gone::\x1b[2J\x1b[1;32mALL PASSED"] = document["entries"][TOY_KEY]
    path.write_text(json.dumps(document))
    result = project.runpytest(*SIM)
    output = result.stdout.str() + result.stderr.str()
    assert "\x1b[2J" not in output and "\\x1b[2J" in output
    assert json.loads(path.read_text()) == document


def test_github_step_summary_gets_this_runs_verdicts(project, monkeypatch):
    project.runpytest(*SIM).assert_outcomes(passed=4)
    summary = project.path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    project.makepyfile(test_models=MODELS.format(flops=6e10, activations=50_000_000))
    project.runpytest(*SIM).assert_outcomes(passed=3, failed=1)
    text = summary.read_text()
    assert "pytest-autobatch: this run" in text and "relative change" in text and "machine" in text
    toy = next(line for line in text.splitlines() if line.startswith("| test_models.py::test_toy::toy"))
    assert "**failed**" in toy and "-3" in toy
    assert "- **failed**: toy on NVIDIA H100 80GB HBM3 (simulated): throughput regression:" in text


def test_marker_max_latency_limits_the_search_as_the_keyword_does(pytester):
    test = '''
        import pytest
        from pytest_autobatch.devices.simulated import SimulatedModel
        MODEL = SimulatedModel("toy", weights_bytes=2 * 10**9, activation_bytes_per_sample=5 * 10**7,
                               flops_per_sample=4e10 / 16)

        @pytest.mark.autobatch({marker})
        def test_model(optimal_batch):
            result = optimal_batch(MODEL)
            print(f"RESULT {{result.optimal_batch}} {{result.entry['max_latency_s']}}")
    '''

    def optimal(run):
        line = next(line for line in run.outlines if "RESULT " in line)
        batch, limit = line.split("RESULT ")[1].split()[:2]
        return int(batch), limit

    pytester.makepyfile(test_latency=test.format(marker=""))
    free = pytester.runpytest(*SIM, "-s")
    free.assert_outcomes(passed=1)
    free_batch, _ = optimal(free)
    entry = json.loads(baseline(pytester, "sim-h100").with_name("test_latency.json").read_text())
    [row] = [row for row in entry["entries"]["test_latency.py::test_model::toy"]["probes"]
             if row["batch"] == free_batch]
    limit = row["latency_s"] / 2
    pytester.makepyfile(test_latency=test.format(marker=f"max_latency_s={limit!r}"))
    limited = pytester.runpytest(*SIM, "-s", "--autobatch-update")
    limited.assert_outcomes(passed=1)
    limited_batch, stored_limit = optimal(limited)
    assert limited_batch < free_batch and float(stored_limit) == limit
    entry = json.loads(baseline(pytester, "sim-h100").with_name("test_latency.json").read_text())
    [row] = [row for row in entry["entries"]["test_latency.py::test_model::toy"]["probes"]
             if row["batch"] == limited_batch]
    assert row["latency_s"] <= limit
    pytester.makepyfile(test_bad_marker='''
        import pytest
        @pytest.mark.autobatch(max_latency_s="10ms")
        def test_bad():
            pass
    ''')
    bad = pytester.runpytest(*SIM, "test_bad_marker.py")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*test_bad: autobatch marker max_latency_s='10ms' (str): max_latency_s must be "
                              "a number of seconds > 0*"])
