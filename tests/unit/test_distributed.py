"""run/distributed.py without a launch: who a rank is, which GPU it takes, and how the store
sharing is decided (a stand-in group answers for the other ranks)."""

from __future__ import annotations

import os

import pytest

from lavender_checks.run import distributed
from lavender_checks.run.distributed import DistributedUsageError, RankInfo, TorchrunShards

ENV = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "GROUP_RANK": "1",
       "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_a_torchrun_process_is_recognised_by_its_variables():
    assert distributed.launched(ENV)
    assert not distributed.launched({k: v for k, v in ENV.items() if k != "MASTER_PORT"})
    assert not distributed.launched({})
    with pytest.raises(DistributedUsageError, match="not started by torchrun: RANK"):
        RankInfo.from_env({k: v for k, v in ENV.items() if k != "RANK"})


def test_a_rank_is_named_with_its_node_and_host():
    info = RankInfo(rank=3, world_size=4, local_rank=1, node_rank=1, host="gpu-07.cluster", pid=42)
    assert info.name() == "rank 3 of 4 (node 1, local rank 1, host gpu-07.cluster, pid 42)"
    assert info.writer == "rank3-gpu-07.cluster"
    assert RankInfo(0, 1, 0, 0, "a b/c", 1).writer == "rank0-a_b_c"  # a valid store writer name


def test_each_rank_takes_the_gpu_of_its_local_rank():
    env = dict(ENV)
    assert distributed.pin_local_gpu(["4", "6"], env) == "6" and env["CUDA_VISIBLE_DEVICES"] == "6"
    env = dict(ENV, LOCAL_RANK="2")
    assert distributed.pin_local_gpu(["4", "6"], env) == "4"  # more ranks than GPUs: round robin
    env = dict(ENV)
    assert distributed.pin_local_gpu([], env) is None and "CUDA_VISIBLE_DEVICES" not in env


def test_a_gpu_index_is_refused_under_torchrun():
    distributed.check_device(None)
    distributed.check_device("cuda")
    distributed.check_device("cuda:0")
    with pytest.raises(DistributedUsageError, match="--device cuda:2: under torchrun"):
        distributed.check_device("cuda:2")


class StandInGroup:
    """Rank 0 of two; rank 1 sees the store folder or not."""

    def __init__(self, peer_sees: bool, peer_store: str):
        self.rank, self.world_size, self.timeout_s = 0, 2, 60.0
        self.ranks = [RankInfo(0, 2, 0, 0, "host-a", 10), RankInfo(1, 2, 0, 1, "host-b", 20)]
        self.me = self.ranks[0]
        self.peer = (peer_sees, peer_store)

    def broadcast(self, obj, phase):
        return obj

    def all_gather(self, obj, phase):
        return [obj, self.peer]


@pytest.mark.parametrize("asked, peer_sees, decided", [
    ("auto", True, "shared"), ("auto", False, "gather"), ("gather", True, "gather"),
    ("shared", True, "shared"),
])
def test_store_sharing_is_detected_with_a_probe_file(tmp_path, asked, peer_sees, decided):
    shards = TorchrunShards(StandInGroup(peer_sees, "/elsewhere"), tmp_path / "store", asked)
    assert shards.decide_sharing() == decided
    assert list((tmp_path / "store").iterdir()) == []  # the probe is gone


def test_shared_sharing_without_a_shared_folder_names_the_blind_rank(tmp_path):
    shards = TorchrunShards(StandInGroup(False, "/local/store"), tmp_path / "store", "shared")
    with pytest.raises(DistributedUsageError) as caught:
        shards.decide_sharing()
    message = str(caught.value)
    assert "rank 1 of 2 (node 1, local rank 0, host host-b, pid 20) (its --store is /local/store)" in message
    assert "--store-sharing gather" in message


def test_unknown_sharing_is_refused(tmp_path):
    with pytest.raises(DistributedUsageError, match="unknown --store-sharing 'nfs'"):
        TorchrunShards(StandInGroup(True, ""), tmp_path, "nfs")


def test_a_lock_left_by_a_dead_process_of_this_host_is_cleared(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from lavender_checks.run.store import LOCK_FILE, PredictionStore, StoreKey

    store = PredictionStore(tmp_path, run_id="torchrun:new")
    key = StoreKey("base", None, "MME", "md5", "seed-report", "fp")
    lock = tmp_path / key.relative_dir() / LOCK_FILE
    lock.parent.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)

    def held_by(**holder):
        lock.write_text(json.dumps({"run": "torchrun:old", "host": socket.gethostname(), **holder}))

    held_by(pid=os.getpid())  # alive: kept
    assert not store.clear_stale_lock(key) and lock.exists()
    held_by(pid=dead_pid, host="another-host")  # only that host can tell: kept
    assert not store.clear_stale_lock(key) and lock.exists()
    held_by(pid=dead_pid)  # its process is gone: cleared
    assert store.clear_stale_lock(key) and not lock.exists()
    assert not store.clear_stale_lock(key)  # nothing to clear


def test_rank0_insists_on_seeing_every_row_of_a_shared_store(tmp_path):
    """Shared mode: rows another rank reports stored but rank 0 cannot see (not one
    filesystem, stale caches) stop the run after a grace period, naming the file."""
    from lavender_checks.run.store import PredictionStore, StoreKey

    store = PredictionStore(tmp_path / "store")
    key = StoreKey("base", None, "MME", "md5", "seed-report", "fp")
    store.log(key, writer="rank0-host-a").append([(1, "Yes", "sha1"), (2, "No", "sha2")])
    store.log(key, writer="rank1-host-b").append([(3, "Yes", "sha3")])
    shards = TorchrunShards(StandInGroup(True, ""), tmp_path / "store", "shared")
    work = [(key, [1, 2, 3, 4])]
    shards._see_every_row(work, store, {"rank0-host-a": 2, "rank1-host-b": 1}, grace_s=0)
    with pytest.raises(distributed.RankFailure) as caught:
        shards._see_every_row(work, store, {"rank0-host-a": 2, "rank1-host-b": 3}, grace_s=0.2, step_s=0.05)
    message = str(caught.value)
    assert "2 of rank1-host-b.jsonl" in message and "--store-sharing gather" in message
    assert "rank0-host-a" not in message


def test_a_gpu_index_is_refused_when_cuda_started_before_the_rank_pinned_its_gpu(monkeypatch):
    """CUDA already initialised with every GPU of the host visible: cuda:0 would be the host's
    first GPU for every rank, so it is refused (exit status 2); --device cuda stays the rank's."""
    import torch

    from lavender_checks.run.config import input_errors

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(DistributedUsageError, match="--device cuda:0: under torchrun .* CUDA started in this "
                                                     "process before the rank could hide") as caught:
        distributed.check_device("cuda:0")
    assert isinstance(caught.value, input_errors())
    distributed.check_device("cuda")
    distributed.check_device(None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # pinned before CUDA started
    distributed.check_device("cuda:0")


def test_run_under_torchrun_refuses_a_gpu_index_once_cuda_started(monkeypatch, capsys):
    import torch

    from lavender_checks import cli

    for name, value in {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(name, value)  # (a group it tried to join would fail at once, locally)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert cli.main(["run", "--device", "cuda:0", "--dist-timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lavender-checks run: error: --device cuda:0: under torchrun"), err
    assert len(err.strip().splitlines()) == 1 and chosen == []  # refused before pinning or joining
def _launcher_summary(error_file, exitcode: int) -> str:
    """What torchrun prints for a launch whose rank failed with ``error_file`` (torch's own code)."""
    errors = pytest.importorskip("torch.distributed.elastic.multiprocessing.errors")
    failure = errors.ProcessFailure(local_rank=0, pid=4242, exitcode=exitcode, error_file=str(error_file))
    return str(errors.ChildFailedError("lavender_checks.cli", {0: failure}))


def test_a_failed_rank_puts_its_line_in_the_launchers_summary(tmp_path):
    line = "lavender-checks run: error: --lmu-data LMUData folder /data/x does not exist"
    error_file = tmp_path / "error.json"
    slept = []
    env = dict(ENV, LOCAL_RANK="0", TORCHELASTIC_ERROR_FILE=str(error_file))
    distributed.leave_failure_to_launcher(line, environ=env, sleep=slept.append)
    summary = _launcher_summary(error_file, 2)
    assert f"traceback : {line}" in summary and "To enable traceback" not in summary, summary
    assert slept == []  # local rank 0 exits at once


def test_the_other_local_ranks_leave_it_to_the_launcher_to_end_them(tmp_path, monkeypatch):
    handlers, slept = {}, []
    monkeypatch.setattr(distributed.signal, "signal", lambda signum, handler: handlers.setdefault(signum, handler))
    env = dict(ENV, TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"))  # LOCAL_RANK 1
    distributed.leave_failure_to_launcher("lavender-checks run: error: x", environ=env, sleep=slept.append)
    assert slept == [distributed.LAUNCHER_GRACE_S] and distributed.signal.SIGTERM in handlers
    # Outside torchrun: nothing written, no wait.
    distributed.leave_failure_to_launcher("x", environ={"TORCHELASTIC_ERROR_FILE": str(tmp_path / "no.json")},
                                          sleep=slept.append)
    assert len(slept) == 1 and not (tmp_path / "no.json").exists()
