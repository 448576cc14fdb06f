"""BaselineStore: file layout and format, merges under a lock, corrupt files, unused entries."""

import json
import multiprocessing

import pytest

from pytest_autobatch.baselines import BaselineStore, dumps, entry_key, module_key, split_entry_key
from pytest_autobatch.errors import BaselineError, ConfigError

HARDWARE = {"device": "sim:h100", "name": "NVIDIA H100 80GB HBM3 (simulated)", "total_memory_bytes": 1}


def entry(optimal=8, **more):
    return {"model": "toy", "optimal_batch": optimal, "max_batch": 64, **more}


@pytest.mark.parametrize("nodeid, expected", [
    ("tests/test_models.py::test_resnet[224]", "tests__test_models"),
    ("benchmarks/test_zoo.py::TestVision::test_vit", "benchmarks__test_zoo"),
    ("test_top.py::test_a", "test_top"),
    ("tests\\win path.py::test_a", "tests__win_path"),
])
def test_module_key(nodeid, expected):
    assert module_key(nodeid) == expected


def test_entry_key_round_trips_and_rejects_separator_in_name():
    key = entry_key("tests/test_a.py::TestX::test_b[1-2]", "resnet50")
    assert split_entry_key(key) == ("tests/test_a.py::TestX::test_b[1-2]", "resnet50")
    with pytest.raises(ConfigError, match="must not contain"):
        entry_key("tests/test_a.py::test_b", "a::b")


def test_put_writes_the_documented_layout_and_stable_format(tmp_path):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    path = store.put("tests/test_a.py::test_b::toy", entry())
    assert path == tmp_path / "sim-h100" / "tests__test_a.json"
    text = path.read_text()
    document = json.loads(text)
    assert text == dumps(document) and text.endswith("}\n")
    assert list(document) == sorted(document)
    assert document["schema"] == 1 and document["hardware_key"] == "sim-h100"
    assert document["hardware"] == HARDWARE
    assert store.get("tests/test_a.py::test_b::toy") == entry()
    assert store.modules() == ["tests__test_a"]
    assert not list(path.parent.glob("*.tmp"))


def test_put_keeps_entries_written_by_another_store_meanwhile(tmp_path):
    first = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    second = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    first.put("tests/test_a.py::test_1::toy", entry(1))
    second.put("tests/test_a.py::test_2::toy", entry(2))
    first.put("tests/test_a.py::test_1::toy", entry(3))
    entries = first.entries("tests__test_a")
    assert {key: value["optimal_batch"] for key, value in entries.items()} == {
        "tests/test_a.py::test_1::toy": 3, "tests/test_a.py::test_2::toy": 2}


def _write_entries(root, worker, count):
    store = BaselineStore(root, "sim-h100", HARDWARE)
    for index in range(count):
        store.put(f"tests/test_a.py::test_{worker}_{index}::toy", entry(index + 1))


def test_parallel_processes_lose_no_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_entries, args=(tmp_path, worker, 15)) for worker in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    entries = BaselineStore(tmp_path, "sim-h100").entries("tests__test_a")
    assert len(entries) == 60


@pytest.mark.parametrize("content, problem", [
    ('{"entries": {', "not valid JSON"),
    ("<<<<<<< HEAD\n{}\n=======\n{}\n>>>>>>> branch\n", "not valid JSON"),
    ('{"schema": 1, "entries": []}', "no 'entries' object"),
    ('{"schema": 99, "entries": {}}', "schema is 99"),
    ('{"schema": 1, "entries": {"a::b": 3}}', "is not an object"),
])
def test_corrupt_file_raises_with_path_and_fix_and_is_left_untouched(tmp_path, content, problem):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    path = tmp_path / "sim-h100" / "tests__test_a.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(BaselineError) as caught:
        store.put("tests/test_a.py::test_b::toy", entry())
    message = str(caught.value)
    assert str(path) in message and problem in message
    assert "--autobatch-update" in message and "git checkout" in message
    assert path.read_text() == content
    with pytest.raises(BaselineError):
        store.get("tests/test_a.py::test_b::toy")


def test_entry_that_is_not_plain_json_is_refused_without_writing(tmp_path):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    store.put("tests/test_a.py::test_b::toy", entry())
    before = store.path("tests__test_a").read_text()
    with pytest.raises(BaselineError, match="not plain JSON"):
        store.put("tests/test_a.py::test_c::toy", entry(throughput=float("nan")))
    assert store.path("tests__test_a").read_text() == before


def test_bad_hardware_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="hardware key"):
        BaselineStore(tmp_path, "../escape")


def test_unused_entries_are_gone_tests_or_finished_tests_that_did_not_use_them(tmp_path):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    for key in ("t.py::test_kept::toy", "t.py::test_removed::toy", "t.py::test_kept::old_name",
                "t.py::test_deselected::toy", "t.py::test_failed::toy"):
        store.put(key, entry())
    unused = store.unused("t", collected={"t.py::test_kept", "t.py::test_deselected", "t.py::test_failed"},
                          finished={"t.py::test_kept"}, used={"t.py::test_kept::toy"})
    assert unused == ["t.py::test_kept::old_name", "t.py::test_removed::toy"]
    store.remove("t", unused)
    assert sorted(store.entries("t")) == ["t.py::test_deselected::toy", "t.py::test_failed::toy",
                                          "t.py::test_kept::toy"]
