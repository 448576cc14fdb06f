"""The plugin with a real torch model on the CPU device, as a user's project runs it."""

import json

import pytest

pytest.importorskip("torch")
pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("outside_xdist")

PROJECT = '''
import torch

FAST = {"warmup_s": 0.0, "warmup_iterations": 1, "block_s": 0.02, "min_blocks": 5,
        "max_blocks": 8, "max_time_s": 0.2}


def test_mlp(optimal_batch):
    torch.set_num_threads(1)   # the suite runs under xdist on two cores: no thread oversubscription
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10)).eval()
    result = optimal_batch(model, torch.rand(1, 256), name="mlp", cap=4096, timing=FAST)
    print(f"RESULT {result.status} {result.optimal_batch} {result.max_batch} {result.probes} {result.ooms}")
'''


def outcome(run):
    line = next(line for line in run.outlines if "RESULT " in line)
    status, *numbers = line.split("RESULT ")[1].split()
    return status, [int(number) for number in numbers]


def test_cpu_budget_search_records_the_exact_maximum_then_serves_it_cached(pytester):
    pytester.makepyfile(test_project=PROJECT)
    # The gate's tolerance is wide: this checks the search and the cache, and CI shares the cores.
    args = ("--autobatch", "--autobatch-device=cpu", "--autobatch-memory-budget=24MiB",
            "--autobatch-tolerance=99%", "-s")

    first = pytester.runpytest_subprocess(*args)   # in-process reruns would re-import torch
    first.assert_outcomes(passed=1)
    status, (optimal, maximum, probes, ooms) = outcome(first)
    assert status == "new" and 1 <= optimal <= maximum < 4096 and probes > 0 and ooms >= 1
    [path] = (pytester.path / "baselines").glob("cpu-*/test_project.json")
    stored = json.loads(path.read_text())
    entry = stored["entries"]["test_project.py::test_mlp::mlp"]
    assert stored["hardware"]["memory_budget_bytes"] == 24 * 2**20
    probes_by_batch = {row["batch"]: row for row in entry["probes"]}
    assert probes_by_batch[maximum]["outcome"] == "ok"
    assert probes_by_batch[maximum]["peak_bytes"] <= 24 * 2**20
    assert probes_by_batch[maximum + 1]["outcome"] == "oom"     # exact: the next batch was seen to fail
    assert probes_by_batch[maximum]["predicted_bytes"] == pytest.approx(
        probes_by_batch[maximum]["peak_bytes"], rel=0.15)

    second = pytester.runpytest_subprocess(*args)
    second.assert_outcomes(passed=1)
    assert outcome(second) == ("cached", [optimal, maximum, 0, 0])
