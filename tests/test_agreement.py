"""The agreed search over simulated devices, ranks as threads: what the ranks agree on and who stops."""

import threading

import pytest

from pytest_autobatch.devices.agreement import (
    AgreedDevice,
    RankFailed,
    RanksDiffer,
    RanksOutOfMemory,
    RankZeroStore,
)
from pytest_autobatch.devices.hardware import distributed_key
from pytest_autobatch.devices.simulated import SimulatedDevice, model_for_max_batch
from pytest_autobatch.errors import OutOfMemory
from pytest_autobatch.record import record_entry
from pytest_autobatch.search import find_max_batch
from pytest_autobatch.session import AutobatchSession, Settings

GIB = 1 << 30


class ThreadExchange:
    """Ranks as threads of one process: a barrier per step, the values on a shared board."""

    backend = "threads"

    def __init__(self, board, rank):
        self.board, self.rank, self.world_size = board, rank, board.world_size

    def gather(self, step, value):
        self.board.values[self.rank] = value
        self.board.barrier.wait(timeout=30)
        values = list(self.board.values)
        self.board.barrier.wait(timeout=30)   # nobody overwrites the board before everyone read it
        return values


class Board:
    def __init__(self, world_size):
        self.world_size = world_size
        self.values = [None] * world_size
        self.barrier = threading.Barrier(world_size)


def on_every_rank(devices, job):
    """``job(agreed_device)`` on one thread per rank: every rank's result or exception."""
    board = Board(len(devices))
    outcomes = [None] * len(devices)

    def rank_main(rank):
        try:
            outcomes[rank] = job(AgreedDevice(devices[rank], ThreadExchange(board, rank)))
        except Exception as error:
            outcomes[rank] = error

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(len(devices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


MODEL = model_for_max_batch("h100", 700, weights_fraction=0.2, name="net")


def test_the_job_is_timed_beside_each_part_of_the_reference_on_every_rank():
    devices = [SimulatedDevice("h100", seed=rank) for rank in range(2)]
    outcomes = on_every_rank(devices, lambda device: device.workload(MODEL).measure_paired(8, 6))
    alone = [SimulatedDevice("h100", seed=rank).workload(MODEL).measure_paired(8, 6) for rank in range(2)]
    for paired in outcomes:
        assert paired.model == [a + b for a, b in zip(alone[0].model, alone[1].model)]
        assert paired.reference_parts == {part: [a + b for a, b in zip(alone[0].reference_parts[part],
                                                                        alone[1].reference_parts[part])]
                                          for part in ("compute", "memory")}


def test_the_agreed_maximum_is_the_smallest_ranks_exact_maximum_and_names_that_rank():
    small = 60 * GIB
    devices = [SimulatedDevice("h100", seed=rank, capacity_bytes=small if rank == 1 else None) for rank in range(3)]

    def search(device):
        workload = device.workload(MODEL)
        entry = record_entry(device, workload, model="net", steady_pause_s=0.0)
        return entry, workload.limited_by()

    results = on_every_rank(devices, search)
    alone = SimulatedDevice("h100", capacity_bytes=small)
    expected = find_max_batch(alone.workload(MODEL).probe, capacity_bytes=small).max_batch
    assert expected < SimulatedDevice("h100").workload(MODEL).true_max_batch(8192)
    for entry, limited_by in results:
        assert entry["max_batch"] == expected
        assert limited_by == [1]
        assert entry["extras"]["ranks"]["limited_by"] == [1]
        assert entry["capacity_bytes"] == small
    assert len({entry["optimal_batch"] for entry, _ in results}) == 1
    # the job's throughput: three ranks' samples summed, so about three times one rank's
    one_rank = alone.workload(MODEL).expected_throughput(results[0][0]["optimal_batch"])
    assert results[0][0]["throughput"] == pytest.approx(3 * one_rank, rel=0.15)


class DdpLike(SimulatedDevice):
    """A device whose workloads' synchronised step (DDP's) needs ``extra`` bytes more than a probe."""

    extra = 2 * GIB

    def workload(self, model, *args, **options):
        inner = super().workload(model, *args, **options)
        device = self

        class Synchronised:
            synchronises_gradients = True
            resets = 0

            def __getattr__(self, name):
                return getattr(inner, name)

            def probe_synchronised(self, batch):
                needed = inner.needed_bytes(batch) + device.extra
                if needed > device.capacity_bytes():
                    raise OutOfMemory(f"batch {batch} needs {needed} B", batch=batch, needed_bytes=needed,
                                      available_bytes=device.capacity_bytes(), limit="device")
                return needed

            def reset_synchronisation(self):
                Synchronised.resets += 1

        return Synchronised()


def test_a_ddp_step_that_does_not_fit_at_the_maximum_steps_down_on_every_rank_to_where_it_fits(tmp_path):
    small = 60 * GIB
    devices = [DdpLike("h100", seed=rank, capacity_bytes=small if rank == 1 else None) for rank in range(2)]

    def search(device):
        workload = device.workload(MODEL)
        entry = record_entry(device, workload, model="net", steady_pause_s=0.0)
        return entry, workload.inner.resets

    results = on_every_rank(devices, search)
    needed = SimulatedDevice("h100").workload(MODEL).needed_bytes
    probed_max = max(batch for batch in range(1, 8192) if needed(batch) <= small)
    synchronised_max = max(batch for batch in range(1, 8192) if needed(batch) + DdpLike.extra <= small)
    assert synchronised_max < probed_max
    for entry, resets in results:
        step = entry["extras"]["ranks"]["synchronised_step"]
        assert entry["max_batch"] == step["batch"] == synchronised_max
        assert entry["optimal_batch"] <= synchronised_max
        assert step["stepped_down_from"] == probed_max
        assert step["oom_ranks"][str(synchronised_max + 1)] == [1]
        assert step["peak_bytes"] == needed(synchronised_max) + DdpLike.extra
        assert resets == len(step["oom_ranks"])   # every rank reset DDP after each agreed OOM


def test_an_oom_on_one_rank_is_an_oom_on_every_rank():
    devices = [SimulatedDevice("h100"), SimulatedDevice("h100", capacity_bytes=20 * GIB)]
    outcomes = on_every_rank(devices, lambda device: device.workload(MODEL).probe(600))
    assert all(isinstance(outcome, RanksOutOfMemory) and outcome.ranks == [1] for outcome in outcomes)
    assert "out of memory on rank 1 of 2" in str(outcomes[0])


def test_a_rank_that_raises_stops_every_rank_with_its_error():
    class Broken(SimulatedDevice):
        def workload(self, model, example_input=None, **options):
            workload = super().workload(model, **options)
            workload.probe = lambda batch: (_ for _ in ()).throw(ValueError(f"bad shape at {batch}"))
            return workload

    outcomes = on_every_rank([SimulatedDevice("h100"), Broken("h100")], lambda device: device.workload(MODEL).probe(8))
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "bad shape at 8"
    assert isinstance(outcomes[0], RankFailed)
    assert "rank 1 raised ValueError: bad shape at 8 while probing batch 8" in str(outcomes[0])


def test_ranks_given_different_models_are_refused_naming_the_difference():
    other = model_for_max_batch("h100", 500, weights_fraction=0.2, name="net")
    models = [MODEL, MODEL, other]
    outcomes = on_every_rank([SimulatedDevice("h100")] * 3,
                             lambda device: device.workload(models[device.rank]))
    assert all(isinstance(outcome, RanksDiffer) for outcome in outcomes)
    assert "rank 0 and rank 2 were given different models or inputs" in str(outcomes[0])


def test_the_key_names_the_world_size_and_every_kind_of_rank():
    assert distributed_key(["nvidia-h100-80gib"] * 8) == "world8-nvidia-h100-80gib"
    assert (distributed_key(["nvidia-h100-80gib", "nvidia-h100-80gib", "nvidia-a100-40gib"])
            == "world3-2x-nvidia-h100-80gib-1x-nvidia-a100-40gib")
    many = distributed_key([f"gpu-model-{index}-with-a-long-name-80gib" for index in range(8)])
    assert many.startswith("world8-gpu-model-0-") and len(many) <= 120


def session_on_every_rank(tmp_path, world_size, capacities=None):
    """One pytest session per rank of a simulated job, each searching the same test's model."""
    capacities = capacities or [None] * world_size

    def run(device):
        session = AutobatchSession(Settings(baselines=tmp_path, steady_pause_s=0.0),
                                   device_factory=lambda *_, **__: device, batch_writes=True)
        result = session.run("test_x.py::test_net", MODEL)
        assert isinstance(session.store, RankZeroStore)
        return result, session.flush()

    return on_every_rank([SimulatedDevice("h100", seed=rank, capacity_bytes=capacities[rank])
                          for rank in range(world_size)], run)


def test_rank_zero_writes_the_baseline_once_and_every_rank_is_served_from_it(tmp_path):
    first = session_on_every_rank(tmp_path, 2)
    (result, written), (other, nothing) = first
    assert result.status == other.status == "new" and result.optimal_batch == other.optimal_batch
    assert [path.parent.name for path in written] == ["world2-sim-h100"] and nothing == []
    second = session_on_every_rank(tmp_path, 2)
    assert [result.status for result, _ in second] == ["cached", "cached"]
    assert {result.max_batch for result, _ in second} == {result.max_batch}


def test_the_gate_fails_every_rank_when_one_rank_no_longer_fits_the_stored_batch(tmp_path):
    [(recorded, _), _] = session_on_every_rank(tmp_path, 2)
    squeezed = SimulatedDevice("h100").workload(MODEL).needed_bytes(recorded.max_batch) - 1
    gated = session_on_every_rank(tmp_path, 2, capacities=[None, squeezed])
    for result, _ in gated:
        assert result.status == "cached" and result.failed
        [oom] = [finding for finding in result.findings if finding.failed]
        assert oom.kind == "oom"
        assert f"out of memory on rank 1 at the stored maximum batch {recorded.max_batch} " in oom.message


def test_a_changed_world_size_records_a_new_entry_instead_of_failing(tmp_path):
    session_on_every_rank(tmp_path, 2)
    with pytest.warns(UserWarning, match=r"other jobs \(world2-sim-h100\) but none for this one \(world3-sim-h100\)"):
        grown = session_on_every_rank(tmp_path, 3)
    assert [result.status for result, _ in grown] == ["new"] * 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["world2-sim-h100", "world3-sim-h100"]


def test_an_fsdp_model_is_refused_before_any_probe_saying_what_to_search_instead():
    class FullyShardedDataParallel:
        pass

    outcomes = on_every_rank([SimulatedDevice("h100")] * 2,
                             lambda device: device.workload(FullyShardedDataParallel()))
    assert all("cannot search a FullyShardedDataParallel" in str(outcome)
               and "Search the plain module" in str(outcome) for outcome in outcomes)
