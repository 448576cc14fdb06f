"""The batch-by-length frontier: exact and certified at every length, cheaper than a search per
length, checked input, a schema-valid entry, gated at every stored point, read by length."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

pytest_plugins = ["pytester"]

from pytest_autobatch.api import stored_optimal_batch
from pytest_autobatch.baselines import BaselineStore
from pytest_autobatch.devices.simulated import SimulatedDevice, SimulatedModel
from pytest_autobatch.errors import ConfigError, NoBatchFits, OutOfMemory, catch_oom
from pytest_autobatch.gate import frontier_oom_findings
from pytest_autobatch.lengths import check_points, frontier_ooms, record_frontier, token_inputs
from pytest_autobatch.schema import parse_entry
from pytest_autobatch.search import find_max_batch
from pytest_autobatch.search.frontier import find_frontier, frontier_points, predicted_shape, search_order

GiB = 1 << 30
#: A Llama-like memory: weights, a KV cache per token, attention scores per token squared.
LLM = SimulatedModel("llm", weights_bytes=14 * GiB, activation_bytes_per_sample=2 << 20, flops_per_sample=1e9,
                     token_bytes=512 << 10, token_squared_bytes=300, prediction_error=0.2)
PROMPTS = [128, 256, 384, 512, 1024]


class Counted:
    """A workload's probe, remembering every batch it ran and whether it fit."""

    def __init__(self, workload):
        self.workload = workload
        self.runs: list[tuple[int, bool]] = []

    def __call__(self, batch):
        with catch_oom() as caught:
            peak = self.workload.probe(batch)
        self.runs.append((batch, caught.error is None))
        if caught.error is not None:
            raise caught.error
        return peak


def frontier_on(device, model, points, **options):
    workloads = {point: device.workload(model.at_length(sum(point))) for point in points}
    probes = {point: Counted(workload) for point, workload in workloads.items()}
    result = find_frontier(lambda point: probes[point], points, capacity_bytes=options.pop("capacity", None),
                           predict_at=lambda point: workloads[point].predict_peak_bytes, **options)
    return result, workloads, probes


@pytest.mark.parametrize("profile", ["h100", "a5000"])
@pytest.mark.parametrize("memory_jitter", [0.0, 0.7])
def test_exact_and_certified_at_every_length(profile, memory_jitter):
    device = SimulatedDevice(profile)
    model = dataclasses.replace(LLM, memory_jitter=memory_jitter)
    points = frontier_points(PROMPTS, [0, 64])
    result, workloads, probes = frontier_on(device, model, points, capacity=device.capacity_bytes())
    assert [(p.prompt_tokens, p.new_tokens) for p in result.points] == points
    for found in result.points:
        point = (found.prompt_tokens, found.new_tokens)
        assert found.max_batch == workloads[point].true_max_batch(8192)
        runs = dict(probes[point].runs)
        assert runs[found.max_batch] is True and runs[found.max_batch + 1] is False   # seen here, both
        assert [(p.batch, p.fits) for p in found.probes] == probes[point].runs


@pytest.mark.parametrize("curvature_bytes", [0.0, 4e4], ids=["linear", "curving with the batch"])
def test_under_half_the_probes_of_a_search_per_length_and_one_oom_each(curvature_bytes):
    device = SimulatedDevice("h100")
    model = dataclasses.replace(LLM, curvature_bytes=curvature_bytes)
    points = frontier_points(PROMPTS)
    result, workloads, _ = frontier_on(device, model, points, capacity=device.capacity_bytes())
    alone = 0
    for point in points:
        probe = Counted(device.workload(model.at_length(sum(point))))
        find_max_batch(probe, capacity_bytes=device.capacity_bytes())
        alone += len(probe.runs)
    assert [found.max_batch for found in result.points] == [workloads[p].true_max_batch(8192) for p in points]
    assert result.probes < 0.5 * alone
    assert max(found.ooms for found in result.points) == 1


def test_a_correction_that_lowers_memory_is_not_carried_beyond_the_lengths_measured():
    """The prediction is 20% high at the longest length and right at the shortest: aimed with the
    longest's correction, the shortest's first probe would run out of memory."""
    device = SimulatedDevice("h100")
    long, short = (1024, 0), (128, 0)
    models = {long: dataclasses.replace(LLM.at_length(1024), prediction_error=0.2),
              short: dataclasses.replace(LLM.at_length(128), prediction_error=0.0)}
    workloads = {point: device.workload(model) for point, model in models.items()}
    probes = {point: Counted(workload) for point, workload in workloads.items()}
    result = find_frontier(lambda point: probes[point], [long, short], capacity_bytes=device.capacity_bytes(),
                           predict_at=lambda point: workloads[point].predict_peak_bytes)
    assert [found.max_batch for found in result.points] == [workloads[long].true_max_batch(8192),
                                                             workloads[short].true_max_batch(8192)]
    assert probes[short].runs[0][1] is True and result.points[1].ooms == 1


def test_a_prediction_off_by_a_different_factor_at_each_length_is_still_exact():
    device = SimulatedDevice("a5000")
    points = frontier_points(PROMPTS, [32])
    models = {point: dataclasses.replace(LLM.at_length(sum(point)), prediction_error=error, memory_jitter=0.5)
              for point, error in zip(points, [-0.3, 0.25, -0.1, 0.3, 0.0])}
    workloads = {point: device.workload(model) for point, model in models.items()}
    probes = {point: Counted(workload) for point, workload in workloads.items()}
    result = find_frontier(lambda point: probes[point], points, capacity_bytes=device.capacity_bytes(),
                           predict_at=lambda point: workloads[point].predict_peak_bytes)
    for found, point in zip(result.points, points):
        assert found.max_batch == workloads[point].true_max_batch(8192)
        runs = dict(probes[point].runs)
        assert runs[found.max_batch] is True and runs[found.max_batch + 1] is False


def test_each_length_is_predicted_as_a_parabola_through_three_predictions():
    def quadratic(batch):
        return 1000 + 30 * batch + 2 * batch * batch

    shape = predicted_shape(quadratic, capacity=100_000, cap=8192, min_batch=1)
    assert (shape.static, shape.linear, shape.squared) == pytest.approx((1000, 30, 2))
    assert shape.largest_within(99_000) == max(b for b in range(1, 500) if quadratic(b) - 1000 <= 99_000)
    bending_down = predicted_shape(lambda batch: 1000 + int(100 * batch ** 0.9), 100_000, 8192, 1)
    assert bending_down is not None and bending_down.squared == 0 and bending_down.linear > 0
    assert predicted_shape(lambda batch: 1000, 100_000, 8192, 1) is None
    assert predicted_shape(lambda batch: None, 100_000, 8192, 1) is None


def test_exact_without_capacity_or_predictions():
    device = SimulatedDevice("rtx5070ti")
    points = frontier_points([64, 128, 512])
    model = dataclasses.replace(LLM, weights_bytes=2 * GiB)
    workloads = {point: device.workload(model.at_length(sum(point))) for point in points}

    def bare(point):
        def probe(batch):
            try:
                return workloads[point].probe(batch)
            except OutOfMemory:
                raise RuntimeError("CUDA out of memory.") from None
        return probe

    result = find_frontier(bare, points)
    assert [found.max_batch for found in result.points] == [workloads[p].true_max_batch(8192) for p in points]


def test_a_longer_length_that_takes_more_is_still_exact():
    """Memory that shrinks with length breaks the bounds the searches share; the answers stay exact."""
    device = SimulatedDevice("h100")
    short, long = (64, 0), (512, 0)
    models = {short: dataclasses.replace(LLM, activation_bytes_per_sample=400 << 20),
              long: dataclasses.replace(LLM, activation_bytes_per_sample=100 << 20)}
    workloads = {point: device.workload(model) for point, model in models.items()}
    result = find_frontier(lambda point: workloads[point].probe, [short, long], capacity_bytes=device.capacity_bytes())
    assert [found.max_batch for found in result.points] == [workloads[short].true_max_batch(8192),
                                                             workloads[long].true_max_batch(8192)]
    assert result.points[0].max_batch < result.points[1].max_batch


def test_no_batch_fits_names_the_length():
    device = SimulatedDevice("a5000")
    heavy = dataclasses.replace(LLM, weights_bytes=4 * GiB, token_bytes=float(GiB))
    with pytest.raises(NoBatchFits, match="at 1024 prompt tokens and 0 new tokens: batch 1 does not fit"):
        frontier_on(device, heavy, frontier_points([2, 1024]), capacity=device.capacity_bytes())


def test_order_longest_then_shortest_then_farthest():
    assert search_order(frontier_points([10, 20, 30, 40, 80])) == [(80, 0), (10, 0), (40, 0), (30, 0), (20, 0)]


@pytest.mark.parametrize("prompts, new, message", [
    ([], [0], "prompt_tokens must be a non-empty list"),
    ([0, 8], [0], "each a positive integer; got 0"),
    ([8, 2.5], [0], "got 2.5"),
    ("128", [0], "non-empty list of token counts, got '128'"),
    ([8, True], [0], "got True"),
    ([8, 8], [0], "lists a length twice"),
    ([8], [-1], "new_tokens must hold token counts, each an integer >= 0; got -1"),
])
def test_bad_lengths_are_refused_with_the_fix(prompts, new, message):
    with pytest.raises(ConfigError, match=message):
        frontier_points(prompts, new)


def test_a_length_beyond_the_position_embeddings_names_the_limit():
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=512))
    assert check_points(model, [256, 448], [64]) == [(256, 64), (448, 64)]
    with pytest.raises(ConfigError, match=r"at most 512 positions \(config.max_position_embeddings\), but the "
                                          r"frontier asks for 576 tokens.*up to 512"):
        check_points(model, [256, 512], [64])


def test_a_text_prompt_without_a_tokenizer_is_refused():
    pytest.importorskip("torch")
    model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=100))
    with pytest.raises(ConfigError, match="no tokenizer here: pass tokenizer="):
        token_inputs(model, 8, "Once upon a time")
    ids = token_inputs(model, 8, "ab", tokenizer=lambda text: {"input_ids": [ord(c) for c in text]})["input_ids"]
    assert ids.tolist() == [[97, 98] * 4]
    assert token_inputs(model, 5)["input_ids"].shape == (1, 5)


def test_simulated_memory_grows_per_token_and_per_token_squared():
    device = SimulatedDevice("h100")
    peaks = [device.workload(LLM.at_length(tokens)).needed_bytes(4) for tokens in (100, 200, 400)]
    assert peaks[0] < peaks[1] < peaks[2]
    assert peaks[2] - peaks[1] > 2 * (peaks[1] - peaks[0])   # the squared term
    with pytest.raises(ConfigError, match="a length must be a positive integer"):
        LLM.at_length(0)
    with pytest.raises(ConfigError, match="token_bytes must be a number >= 0"):
        dataclasses.replace(LLM, token_bytes=-1.0)


@pytest.fixture(scope="module")
def recorded():
    device = SimulatedDevice("h100")
    return record_frontier(device, LLM, name="llm", prompt_tokens=[128, 512, 1024], new_tokens=[32])


def test_the_entry_has_a_row_per_length_and_the_longest_on_top(recorded):
    entry = parse_entry("t.py::test_llm::llm", recorded, "baselines/x.json").data
    rows = {(row["prompt_tokens"], row["new_tokens"]): row for row in entry["frontier"]}
    assert list(rows) == [(128, 32), (512, 32), (1024, 32)]
    assert rows[(128, 32)]["max_batch"] > rows[(512, 32)]["max_batch"] > rows[(1024, 32)]["max_batch"]
    assert entry["max_batch"] == rows[(1024, 32)]["max_batch"]
    assert entry["optimal_batch"] == rows[(1024, 32)]["optimal_batch"]
    assert entry["throughput"] == rows[(1024, 32)]["throughput"] and entry["reference_samples"]
    assert all(row["tokens_per_s"] == row["throughput"] * 32 for row in entry["frontier"])


@pytest.mark.parametrize("change, message", [
    (lambda rows: rows[0].update(optimal_batch=rows[0]["max_batch"] + 1), "above the row's max_batch"),
    (lambda rows: rows[1].update(prompt_tokens=rows[0]["prompt_tokens"]), "repeats a length"),
    (lambda rows: rows[0].update(prompt_tokens=0), "prompt_tokens"),
])
def test_the_schema_refuses_a_broken_frontier(recorded, change, message):
    entry = {**recorded, "frontier": [dict(row) for row in recorded["frontier"]]}
    change(entry["frontier"])
    with pytest.raises(Exception, match=message):
        parse_entry("t.py::test_llm::llm", entry, "baselines/x.json")


def test_the_gate_fails_an_oom_at_any_stored_length(recorded):
    same = frontier_ooms(SimulatedDevice("h100"), LLM, recorded)
    assert same == []
    # 10 GiB less memory: the long lengths' stored batches no longer fit.
    smaller = SimulatedDevice("h100", capacity_bytes=SimulatedDevice("h100").capacity_bytes() - 10 * GiB)
    failed = frontier_ooms(smaller, LLM, recorded)
    assert failed and all(point in [(128, 32), (512, 32), (1024, 32)] for point, _ in failed)
    findings = frontier_oom_findings(failed, "llm on sim:h100")
    assert all(finding.failed and finding.kind == "oom" for finding in findings)
    assert "prompt tokens and 32 new tokens" in findings[0].text


def test_production_code_reads_the_nearest_length_at_or_above(tmp_path, recorded):
    BaselineStore(tmp_path, "sim-h100", {"device": "sim:h100"}).put("t.py::test_llm::llm", recorded)
    rows = {row["prompt_tokens"]: row["optimal_batch"] for row in recorded["frontier"]}

    def read(**options):
        return stored_optimal_batch("llm", tmp_path, hardware_key="sim-h100", **options)

    assert read(length=100) == rows[128]
    assert read(length=160) == rows[128]
    assert read(length=161) == rows[512]
    assert read(length=1056) == rows[1024]
    assert read() == rows[1024]
    with pytest.raises(ConfigError, match="stops at 1056 tokens, short of length=2000"):
        read(length=2000)
    with pytest.raises(ConfigError, match="length must be a positive integer"):
        read(length=0)


FRONTIER_TEST = '''
from pytest_autobatch.devices.simulated import SimulatedModel

LLM = SimulatedModel("llm", weights_bytes=14 << 30, activation_bytes_per_sample=2 << 20, flops_per_sample=1e9,
                     token_bytes=512 << 10, token_squared_bytes=300)


def test_llm(optimal_batch):
    result = optimal_batch(LLM, mode="generate", name="llm", prompt_tokens=[128, 512, 1024], new_tokens=[32])
    assert result.max_batch == result.entry["frontier"][-1]["max_batch"]
'''


def test_the_plugin_records_a_frontier_and_gates_every_stored_length(pytester, outside_xdist):
    pytester.makepyfile(test_llm=FRONTIER_TEST)
    pytester.runpytest("--autobatch", "--autobatch-device=sim:h100").assert_outcomes(passed=1)
    path = pytester.path / "baselines" / "sim-h100" / "test_llm.json"
    document = json.loads(path.read_text())
    entry = document["entries"]["test_llm.py::test_llm::llm"]
    assert [(row["prompt_tokens"], row["new_tokens"]) for row in entry["frontier"]] == [(128, 32), (512, 32),
                                                                                       (1024, 32)]
    pytester.runpytest("--autobatch", "--autobatch-device=sim:h100").assert_outcomes(passed=1)
    # A stored batch at the shortest length that no longer fits fails the test, though the longest is fine.
    entry["frontier"][0]["max_batch"] = 4 * entry["frontier"][0]["max_batch"]
    path.write_text(json.dumps(document))
    failed = pytester.runpytest("--autobatch", "--autobatch-device=sim:h100")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*out of memory at the stored batch * for 128 prompt tokens and 32 new tokens*"])


def test_the_report_shows_the_frontier_as_a_table_and_a_plot(tmp_path, recorded):
    pytest.importorskip("matplotlib")
    from pytest_autobatch.report.markdown import write_report

    BaselineStore(tmp_path / "baselines", "sim-h100", {"device": "sim:h100"}).put("t.py::test_llm::llm", recorded)
    report = write_report(tmp_path / "baselines", tmp_path / "reports").read_text()
    assert "## llm (generate) on `sim-h100`: batch by length" in report
    for row in recorded["frontier"]:
        assert f"| {row['prompt_tokens']} + 32 | {row['max_batch']} | {row['optimal_batch']} |" in report
    assert list((tmp_path / "reports" / "plots").glob("*.png"))
