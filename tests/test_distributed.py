"""The agreed search in real multi-process jobs on the CPU (gloo): torchrun, and ranks launched by hand.

Each job runs a small MLP's training step. Ranks are real processes, so what is checked is what a
user's job does: every rank ends with the same batch, the smallest rank sets the maximum, an error
or a dead rank stops every rank with a message naming it, and baselines are written by rank 0.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from pytest_autobatch import agreed_batch
from pytest_autobatch.devices import get_device
from pytest_autobatch.errors import ConfigError
from pytest_autobatch.search import find_max_batch

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("outside_xdist")

#: Each rank's share of a shared CI machine: timing stays short, the searches stay exact.
FAST = {"warmup_s": 0.0, "warmup_iterations": 1, "block_s": 0.005, "min_blocks": 3, "max_blocks": 3,
        "max_time_s": 0.05}

#: The rank timeout of the job whose rank goes silent: longer than one rank can lag another while
#: starting on a loaded shared machine (importing torch took up to 45 s there at a load of 17).
SLOW_START_S = 30

MODEL = '''
import os
import torch


def report(line):
    """One write for the whole line: two ranks share one pipe, and print's two writes (the text,
    then the newline) let the other rank's report land between them on the same line."""
    os.write(1, (line + "\\n").encode())


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
'''

JOB = MODEL + f'''
import json, signal, sys, time
from pytest_autobatch import agreed_batch

FAST = {FAST!r}
rank = int(os.environ["RANK"])
budgets, trouble_rank, trouble, timeout_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
model = make_model()
if sys.argv[5:] == ["ddp"]:
    torch.distributed.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(model)


def loss(output, inputs):
    """The sum of the outputs; on the troubled rank, past batch 16, the trouble asked for."""
    if rank == trouble_rank and inputs.shape[0] > 16:
        if trouble == "raise":
            raise ValueError(f"rank {{rank}} cannot take batch {{inputs.shape[0]}}")
        if trouble == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if trouble == "hang":
            report(f"HANGING rank {{rank}} at {{time.time()}}")
            time.sleep(3600)
    return output.sum()


try:
    result = agreed_batch(model, torch.rand(1, 64), mode="train", device="cpu",
                          memory_budget=int(budgets.split(",")[rank]), loss_fn=loss, timing=FAST,
                          timeout_s=timeout_s)
except Exception as error:
    report(f"STOPPED rank {{rank}} {{type(error).__name__}}: {{error}}")
    if type(error).__name__ == "RankFailed":
        time.sleep(5)   # torchrun stops the job when a rank exits: let the failing rank report first
    sys.exit(1)
report("AGREED " + json.dumps({{"rank": rank, "optimal": result.optimal_batch, "max": result.max_batch,
                               "limited_by": result.limited_by, "world_size": result.world_size,
                               "synchronised_step": result.synchronised_step}}))
'''


def job_environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(tmp_path, ranks, *args, timeout=600):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                          str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         env=job_environment(), cwd=tmp_path)
    return run, time.monotonic() - began


def lines(output, prefix):
    return [line.split(prefix, 1)[1] for line in output.splitlines() if prefix in line]


def single_process_max_batch(budget):
    """The exact maximum of the same model under ``budget``, searched alone in this process."""
    namespace = {}
    exec(MODEL, namespace)
    device = get_device("cpu", memory_budget=budget)
    workload = device.workload(namespace["make_model"](), torch.rand(1, 64), mode="train", timing=FAST)
    try:
        return find_max_batch(workload.probe, capacity_bytes=budget, min_batch=workload.min_batch).max_batch
    finally:
        workload.close()


def test_without_a_process_group_or_torchrun_the_search_says_how_to_start_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="process group is not initialised and this is not a torchrun job: call "
                                          r"torch.distributed.init_process_group\(...\) first"):
        agreed_batch(torch.nn.Linear(2, 2), torch.rand(1, 2), device="cpu")


def test_two_ddp_ranks_agree_on_the_smaller_ranks_maximum_verified_by_a_synchronised_step(tmp_path):
    """Probes skip DDP's all-reduce and find the smaller rank's exact maximum; the synchronised step
    there holds more (on the CPU count, a bucket-sized copy), runs out of memory on rank 1 alone, and
    every rank steps down together to the largest batch whose synchronised step fits."""
    budgets = (8_000_000, 3_000_000)
    run, _ = torchrun(tmp_path, 2, ",".join(map(str, budgets)), -1, "none", 60, "ddp")
    assert run.returncode == 0, run.stdout + run.stderr
    results = sorted((json.loads(line) for line in lines(run.stdout, "AGREED ")), key=lambda r: r["rank"])
    assert [result["rank"] for result in results] == [0, 1]
    assert results[0] | {"rank": 1} == results[1]   # the same answer on every rank
    assert results[0]["limited_by"] == [1] and results[0]["world_size"] == 2
    step = results[0]["synchronised_step"]
    assert step["stepped_down_from"] == single_process_max_batch(budgets[1])
    assert results[0]["max"] == step["batch"] < step["stepped_down_from"]
    assert step["oom_ranks"][str(step["batch"] + 1)] == [1]   # the exact largest that fits
    assert all(ranks == [1] for ranks in step["oom_ranks"].values())
    assert step["peak_bytes"] == max(step["peak_bytes_by_rank"]) <= budgets[1]


def test_a_rank_that_raises_stops_all_three_with_its_error(tmp_path):
    timeout_s = 300   # far beyond three ranks' start on a loaded machine: a wait for it shows
    run, seconds = torchrun(tmp_path, 3, "8000000,8000000,8000000", 2, "raise", timeout_s)
    assert run.returncode != 0
    stopped = dict(line.split(" ", 1) for line in lines(run.stdout, "STOPPED rank "))
    assert stopped["2"] == "ValueError: rank 2 cannot take batch " + stopped["2"].rsplit(" ", 1)[1]
    for rank in ("0", "1"):
        assert stopped[rank].startswith("RankFailed: rank 2 raised ValueError: rank 2 cannot take batch")
    assert seconds < timeout_s   # nobody waited for the timeout


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_killed_rank_is_named_by_the_others_within_the_timeout(tmp_path):
    """Ranks launched by hand: torchrun's agent would stop the others itself once one dies; a
    job whose launcher does not (or a rank that hangs) relies on the search's own timeout."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    port, timeout_s = free_port(), SLOW_START_S
    processes = [subprocess.Popen([sys.executable, str(script), "8000000,8000000", "1", "kill", str(timeout_s)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                                  env={**job_environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                       "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
                 for rank in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert processes[1].returncode == -signal.SIGKILL
    assert processes[0].returncode == 1, outputs[0]
    [stopped] = lines(outputs[0], "STOPPED rank 0 ")
    assert stopped.startswith("RankSilent: rank 1 did not reach the batch search's step")
    assert f"within {timeout_s} s (seen from rank 0)" in stopped


def test_a_hung_rank_under_torchrun_is_named_and_the_job_ends(tmp_path):
    """Rank 1 sleeps mid-search; rank 0 names it within the timeout and exits with an error, and
    torchrun's agent then stops the sleeping rank: the job ends (it does not wait for the sleep)."""
    run, _ = torchrun(tmp_path, 2, "8000000,8000000", 1, "hang", SLOW_START_S)
    ended = time.time()
    assert run.returncode != 0
    [hanging] = lines(run.stdout, "HANGING rank ")
    rank, _, began = hanging.split()
    assert rank == "1"
    [stopped] = lines(run.stdout, "STOPPED rank 0 ")
    assert stopped.startswith("RankSilent: rank 1 did not reach the batch search's step")
    assert f"within {SLOW_START_S} s (seen from rank 0)" in stopped
    assert "STOPPED rank 1" not in run.stdout and "exitcode  : -15" in run.stderr   # SIGTERM from the agent
    assert ended - float(began) < SLOW_START_S + 60   # the timeout, then the agent's stop: not the hour's sleep


PROJECT = MODEL + f'''

def test_mlp(optimal_batch):
    result = optimal_batch(make_model(), torch.rand(1, 64), mode="train", name="mlp", timing={FAST!r})
    report(f"RESULT {{result.status}} {{result.optimal_batch}} {{result.max_batch}} {{result.hardware_key}}")
'''

CONFTEST = '''
import pytest_autobatch.record

pytest_autobatch.record.STEADY_ATTEMPTS = 1   # two ranks share two busy cores: time once, never wait
'''


def test_pytest_under_torchrun_with_a_budget_per_rank_records_once_from_rank_zero_then_serves_every_rank(pytester):
    pytester.makepyfile(test_project=PROJECT, conftest=CONFTEST)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pytest",
            "-p", "no:cacheprovider", "--autobatch", "--autobatch-device=cpu", "--autobatch-memory-budget=8MB,3MB",
            "--autobatch-tolerance=99%", "--autobatch-rank-timeout=60", "-s", "-q"]

    def run():
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=job_environment(),
                              cwd=pytester.path)
        assert done.returncode == 0, done.stdout + done.stderr
        return [line.split() for line in lines(done.stdout, "RESULT ")]

    first = run()
    assert len(first) == 2 and first[0] == first[1] and first[0][0] == "new"
    key = first[0][3]
    assert key.startswith("world2-cpu-")
    [path] = (pytester.path / "baselines").glob("*/*.json")
    assert path.parent.name == key
    stored = json.loads(path.read_text())
    entry = stored["entries"]["test_project.py::test_mlp::mlp"]
    assert stored["hardware"]["world_size"] == 2 and len(stored["hardware"]["ranks"]) == 2
    assert entry["max_batch"] == int(first[0][2]) == single_process_max_batch(3_000_000)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no lock or temporary file left
    written = path.stat().st_mtime_ns

    second = run()
    assert [result[:3] for result in second] == [["cached", *first[0][1:3]]] * 2
    assert path.stat().st_mtime_ns == written
