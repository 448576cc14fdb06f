"""BaselineStore: file layout and format, merges under a lock, corrupt files, unused entries."""

import json
import multiprocessing

import pytest

from pytest_autobatch.baselines import BaselineStore, dumps, entry_key, module_key, split_entry_key
from pytest_autobatch.errors import BaselineError, ConfigError

HARDWARE = {"device": "sim:h100", "name": "NVIDIA H100 80GB HBM3 (simulated)", "total_memory_bytes": 1}


def entry(optimal=8, **more):
    """A valid entry with the fields the schema requires."""
    return {"model": "toy", "optimal_batch": optimal, "max_batch": 64, "throughput": 1000.0,
            "throughput_samples": [990.0, 1000.0, 1010.0], "peak_memory_bytes": 2**20, **more}


@pytest.mark.parametrize("nodeid, expected", [
    ("tests/test_models.py::test_resnet[224]", "tests__test_models"),
    ("benchmarks/test_zoo.py::TestVision::test_vit", "benchmarks__test_zoo"),
    ("test_top.py::test_a", "test_top"),
    ("tests\\win path.py::test_a", "tests__win_path+a58d416430aa"),
    ("test_a/test_x.py::t", "test_a__test_x"),
    ("test_a__test_x.py::t", "test_a__test_x+a69731a23ddf"),
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


def _run_writers(root, target, processes, count, method="spawn"):
    """Run ``target(root, worker, count)`` in ``processes`` processes at once; the entries after."""
    context = multiprocessing.get_context(method)
    workers = [context.Process(target=target, args=(root, worker, count)) for worker in range(processes)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    return BaselineStore(root, "sim-h100").entries("tests__test_a")


def test_parallel_processes_lose_no_entry(tmp_path):
    assert len(_run_writers(tmp_path, _write_entries, 4, 15)) == 60


@pytest.mark.parametrize("content, problem", [
    ('{"entries": {', "not valid JSON"),
    ("<<<<<<< HEAD\n{}\n=======\n{}\n>>>>>>> branch\n", "not valid JSON"),
    ('{"schema": 1, "entries": []}', "no 'entries' object"),
    ('{"schema": 99, "hardware_key": "sim-h100", "entries": {}}', "schema 99, newer than schema 1"),
    ('{"schema": 1, "hardware_key": "sim-h100", "entries": {"a::b": 3}}', "must be an object"),
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
    with pytest.raises(BaselineError, match="'throughput' = nan must be a finite number"):
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


# ---- hostile and careless inputs (issue 13) ----------------------------------------------------

KEY = "tests/test_a.py::test_b::toy"


def _store_with(tmp_path, document_or_text):
    """A store whose tests__test_a.json holds ``document_or_text`` (bytes, str or a document)."""
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    path = store.path("tests__test_a")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(document_or_text, bytes):
        path.write_bytes(document_or_text)
    elif isinstance(document_or_text, str):
        path.write_text(document_or_text)
    else:
        path.write_text(json.dumps(document_or_text))
    return store, path


def _document(**fields):
    return {"schema": 1, "hardware_key": "sim-h100", "hardware": HARDWARE,
            "entries": {KEY: entry(**fields)}}


def _assert_refused_untouched(store, path, *fragments):
    before = path.read_bytes()
    for action in (lambda: store.get(KEY), lambda: store.put("tests/test_a.py::test_c::toy", entry())):
        with pytest.raises(BaselineError) as caught:
            action()
        message = str(caught.value)
        assert str(path) in message, message
        for fragment in fragments:
            assert fragment in message, message
    assert path.read_bytes() == before
    return message


@pytest.mark.parametrize("content, problem", [
    (b'{"schema": 1, "entries": {"\xff\xfe": 1}}', "not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_undecodable_or_deeply_nested_file_is_a_baseline_error(tmp_path, content, problem):
    store, path = _store_with(tmp_path, content)
    _assert_refused_untouched(store, path, problem, "git checkout")


def test_huge_file_is_refused_before_parsing(tmp_path, monkeypatch):
    import pytest_autobatch.baselines as baselines
    monkeypatch.setattr(baselines, "MAX_FILE_BYTES", 1000)
    store, path = _store_with(tmp_path, _document(padding="x" * 2000))
    _assert_refused_untouched(store, path, "more than the 1,000 a baseline file may hold")


@pytest.mark.parametrize("field, value, problem", [
    ("throughput", "fast", "'throughput' = 'fast' must be a finite number greater than 0"),
    ("throughput", float("nan"), "'throughput' = nan must be a finite number"),
    ("throughput", -5, "'throughput' = -5 must be a finite number greater than 0"),
    ("peak_memory_bytes", None, None),   # null: not measured, allowed
    ("optimal_batch", 0, "'optimal_batch' = 0 must be a whole batch size from 1"),
    ("optimal_batch", -4, "'optimal_batch' = -4 must be a whole batch size"),
    ("optimal_batch", 10**30, "'optimal_batch' = 1000000000000000000000000000000 must be"),
    ("optimal_batch", 65, "'optimal_batch' = 65 is above the entry's max_batch of 64"),
    ("optimal_batch", True, "'optimal_batch' = True must be a whole batch size"),
    ("max_batch", 128, None),
    ("throughput_samples", ["fast"], "'throughput_samples[0]' = 'fast' must be a finite number"),
    ("throughput_samples", [], "'throughput_samples' = [] must hold at least one sample"),
    ("targets", {"min_speedup": "2x"}, "'targets.min_speedup' = '2x' must be a finite number"),
    ("targets", [1], "'targets' = [1] must be an object"),
    ("search", {"probes": -1}, "'search.probes' = -1 must be a whole number"),
    ("probes", [{"batch": 2, "peak_bytes": "big"}], "'probes[0].peak_bytes' = 'big' must be a whole number of bytes"),
    ("cap", 32, "'max_batch' = 64 is above the entry's cap of 32"),
    ("reference_samples", [1.0, 2.0], None),   # unknown (newer) field: kept
])
def test_every_bad_field_is_named_with_value_and_fix(tmp_path, field, value, problem):
    document = _document(**{field: value})
    text = json.dumps(document)     # NaN as the bare NaN token, as a careless edit would leave it
    store, path = _store_with(tmp_path, text)
    if problem is None:
        assert store.get(KEY)[field] == value
        store.put("tests/test_a.py::test_c::toy", entry())
        assert json.loads(path.read_text())["entries"][KEY][field] == value
        return
    message = _assert_refused_untouched(store, path, f"entry '{KEY}'", problem, "--autobatch-update")
    assert "Nothing was written" in message


def test_missing_required_field_is_named(tmp_path):
    document = _document()
    del document["entries"][KEY]["peak_memory_bytes"]
    store, path = _store_with(tmp_path, document)
    _assert_refused_untouched(store, path, "'peak_memory_bytes' = '(missing)' is required")


def test_bad_entry_is_refused_before_anything_is_written(tmp_path):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    store.put(KEY, entry())
    before = store.path("tests__test_a").read_text()
    for bad in (entry(throughput=float("inf")), entry(optimal_batch=0), {"model": "toy"}):
        with pytest.raises(BaselineError, match="tests/test_a.py::test_c::toy"):
            store.put("tests/test_a.py::test_c::toy", bad)
    assert store.path("tests__test_a").read_text() == before


def test_newer_schema_is_refused_naming_the_version(tmp_path):
    document = _document()
    document["schema"] = 2
    store, path = _store_with(tmp_path, document)
    _assert_refused_untouched(store, path, "schema 2, newer than schema 1", "upgrade pytest-autobatch")


def test_foreign_document_is_refused_and_not_rewritten(tmp_path):
    document = _document()
    document["hardware_key"] = "sim-a5000"
    store, path = _store_with(tmp_path, document)
    _assert_refused_untouched(store, path, "hardware_key is 'sim-a5000'", "folder of 'sim-h100'")


def test_escape_sequences_in_a_stored_key_never_reach_the_terminal(tmp_path):
    document = _document()
    document["entries"] = {"t.py::test_x::\x1b[2J\x1b[32mPASSED": entry()}
    store, path = _store_with(tmp_path, document)
    message = _assert_refused_untouched(store, path, "control characters")
    assert "\x1b" not in message and "\\x1b" in message


def test_symlinked_hardware_folder_outside_the_baselines_is_not_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    BaselineStore(outside, "sim-h100", HARDWARE).put(KEY, entry())
    root = tmp_path / "baselines"
    root.mkdir()
    (root / "sim-h100").symlink_to(outside / "sim-h100")
    store = BaselineStore(root, "sim-h100", HARDWARE)
    for action in (store.modules, lambda: store.get(KEY), lambda: store.put(KEY, entry(4))):
        with pytest.raises(BaselineError, match="leads outside the baselines directory"):
            action()
    assert BaselineStore(outside, "sim-h100").get(KEY) == entry()


def test_symlink_planted_at_the_lock_path_is_a_clear_error(tmp_path):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    store.put(KEY, entry())
    lock = tmp_path / "sim-h100" / ".tests__test_a.json.lock"
    lock.symlink_to(tmp_path / "target")
    with pytest.raises(BaselineError, match=r"symbolic link.*delete it"):
        store.put(KEY, entry(4))
    assert not (tmp_path / "target").exists() and store.get(KEY) == entry()


def test_locks_live_beside_the_baselines_and_are_removed(tmp_path):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    with store.search_lock(KEY) as lock:
        assert lock.path.parent == tmp_path / "sim-h100" and lock.path.exists()
        store.put(KEY, entry())
    assert sorted(path.name for path in (tmp_path / "sim-h100").iterdir()) == ["tests__test_a.json"]


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_folder_names_the_file_and_the_fix(tmp_path):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    store.put(KEY, entry())
    folder = tmp_path / "sim-h100"
    folder.chmod(0o555)
    try:
        with pytest.raises(BaselineError, match=r"tests__test_a.json.*not writable.*--autobatch-baselines"):
            store.put(KEY, entry(4))
    finally:
        folder.chmod(0o755)
    assert store.get(KEY) == entry()


@pytest.mark.parametrize("code, fix", [(28, r"disk .* is full"), (30, r"not writable.*--autobatch-baselines")])
def test_full_disk_or_read_only_target_names_the_file_and_keeps_it(tmp_path, monkeypatch, code, fix):
    import os

    import pytest_autobatch.baselines as baselines
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    store.put(KEY, entry())
    before = store.path("tests__test_a").read_text()

    def fail(fd):   # 28 ENOSPC, 30 EROFS
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(baselines.os, "fsync", fail)
    with pytest.raises(BaselineError, match=rf"tests__test_a.json.*left as it was.*{fix}"):
        store.put(KEY, entry(4))
    monkeypatch.undo()
    assert store.path("tests__test_a").read_text() == before
    assert not list((tmp_path / "sim-h100").glob(".*.tmp"))


def test_name_collisions_of_the_old_naming_are_gone():
    pairs = [("test_a/test_x.py::t", "test_a__test_x.py::t"), ("test_y z.py::t", "test_y_z.py::t"),
             ("a_/b.py::t", "a/_b.py::t"), ("a+b.py::t", "a_b.py::t")]
    for first, second in pairs:
        assert module_key(first) != module_key(second)


def test_old_shared_file_is_migrated_and_unused_never_touches_another_module(tmp_path):
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    old = store.path("test_a__test_x")
    store._update("test_a__test_x", {"test_a/test_x.py::t::toy": entry(),
                                     "test_a__test_x.py::t::toy": entry(4)}, ())
    assert store.unused("test_a__test_x", collected={"test_a/test_x.py::t"}, finished=set(),
                        used=set()) == []
    messages = store.migrate()
    assert len(messages) == 1 and "moved 1 baseline entry" in messages[0]
    assert list(json.loads(old.read_text())["entries"]) == ["test_a/test_x.py::t::toy"]
    assert store.get("test_a__test_x.py::t::toy") == entry(4)
    assert store.path_for_key("test_a__test_x.py::t::toy") != old
    assert store.migrate() == []


def test_staged_entries_are_written_once_per_file(tmp_path, monkeypatch):
    import pytest_autobatch.baselines as baselines
    writes = []
    real = baselines._atomic_write
    monkeypatch.setattr(baselines, "_atomic_write", lambda path, text: (writes.append(path), real(path, text)))
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    for index in range(50):
        store.put(f"tests/test_a.py::test_{index}::toy", entry(), now=False)
        store.put(f"tests/test_b.py::test_{index}::toy", entry(), now=False)
    assert store.get("tests/test_a.py::test_3::toy") == entry() and not writes
    store.flush()
    assert len(writes) == 2 and store.staged == 0
    assert len(BaselineStore(tmp_path, "sim-h100").entries("tests__test_a")) == 50


def _write_batched(root, worker, count):
    store = BaselineStore(root, "sim-h100", HARDWARE)
    for index in range(count):
        store.put(f"tests/test_a.py::test_{worker}_{index}::toy", entry(index % 8 + 1), now=index % 2 == 0)
    store.flush()


def test_eight_concurrent_writers_lose_no_entry_and_leave_no_lock(tmp_path):
    assert len(_run_writers(tmp_path, _write_batched, 8, 20, "fork")) == 160
    assert [path.name for path in (tmp_path / "sim-h100").iterdir()] == ["tests__test_a.json"]


def _write_forever(root):
    store = BaselineStore(root, "sim-h100", HARDWARE)
    big = [float(i + 1) for i in range(2000)]
    index = 0
    while True:
        store.put(f"tests/test_a.py::test_k{index}::toy", entry(throughput_samples=big))
        index += 1


def test_killed_writer_leaves_the_file_intact_and_the_next_write_cleans_up(tmp_path):
    import os
    import signal
    import time
    store = BaselineStore(tmp_path, "sim-h100", HARDWARE)
    store.put(KEY, entry())
    folder = tmp_path / "sim-h100"
    for delay in (0.05, 0.15, 0.3):
        process = multiprocessing.get_context("fork").Process(target=_write_forever, args=(tmp_path,))
        process.start()
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        (folder / ".tests__test_a.json.crash1.tmp").write_text("{half")   # as a kill mid-write leaves
        entries = BaselineStore(tmp_path, "sim-h100").entries("tests__test_a")   # parses: intact
        assert entries[KEY] == entry()
        store.put(KEY, entry())
        assert not list(folder.glob(".*.tmp"))


def test_committed_baselines_validate():
    from pathlib import Path
    root = Path(__file__).parent.parent / "baselines"
    for folder in root.iterdir():
        store = BaselineStore(root, folder.name)
        for module in store.modules():
            assert store.read_entries(module)
        assert store.misplaced() == {}


def test_stored_optimal_batch_and_report_raise_baseline_errors_on_bad_files(tmp_path, capsys):
    from pytest_autobatch import stored_optimal_batch
    from pytest_autobatch.cli import main
    for bad in (_document(optimal_batch="8"), _document(probes=[{"batch": 2, "peak_bytes": "big"}])):
        _store_with(tmp_path, bad)
        with pytest.raises(BaselineError, match="field"):
            stored_optimal_batch("toy", tmp_path, hardware_key="sim-h100")
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "out"), "--no-plots"]) == 1
        assert "autobatch report: error: baseline file" in capsys.readouterr().err
